"""Shared fixtures: tiny randomly initialized models built from a config, fixed seeds, no network."""

from __future__ import annotations

import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

VOCAB = 96


@pytest.fixture(autouse=True)
def _fixed_seeds():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path_factory, monkeypatch):
    """Tests write to a temporary cache; tests marked `embedded` share the user's cache (~/.cache/noisyft), so
    the embedded model is converted once per machine, not once per test session."""
    if request.node.get_closest_marker("embedded") is None:
        monkeypatch.setenv("NOISYFT_CACHE", str(tmp_path_factory.getbasetemp() / "noisyft-cache"))
    yield


def tiny_llama(vocab_size: int = VOCAB, hidden_size: int = 16, layers: int = 2, tie: bool = False, **kw):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **kw,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture
def tiny_model():
    return tiny_llama()


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A word-level tokenizer over a made-up vocabulary, with a chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    # a few English words used by test data, then filler words up to vocab_size
    extra = [
        "below",
        "is",
        "an",
        "instruction",
        "that",
        "describes",
        "a",
        "task",
        "write",
        "response",
        "###",
        ":",
        "user",
        "assistant",
        "hello",
        "world",
    ]
    words = special + extra + [f"w{i}" for i in range(vocab_size - len(special) - len(extra))]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    return fast


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


def run_two_ranks(script: Path, out: Path, *, extra_env: dict | None = None, timeout: int = 300):
    """``python -m torch.distributed.run --nproc_per_node 2 SCRIPT OUT`` on a free local port, one torch thread per
    rank and this checkout's ``src`` first on the path; the finished process."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        **(extra_env or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
    ]
    cmd += ["--master_port", str(port), str(script), str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
