"""A minimal tokenizer for trainer tests whose data is already tokenized (TRL only needs pad/eos ids)."""

from __future__ import annotations


def pad_tokenizer():
    from conftest import tiny_tokenizer

    return tiny_tokenizer()
