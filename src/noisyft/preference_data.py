"""Preference data for `noisyft train --task dpo|kto`: read, validate record by record, normalise for TRL.

The sources are those of SFT data (``.json`` / ``.jsonl`` files, folders of them, saved or Hub datasets; see
:mod:`noisyft.data_sources`), and so are the rules: every bad record is collected and :class:`BadRecordsError` names
file, record number and field; ``skip_bad_records=True`` skips them, counted per kind and reported.

Records, as TRL's preference trainers take them:

* paired, plain text: ``{"prompt": str, "chosen": str, "rejected": str}``;
* paired, conversational: ``prompt`` (or ``messages``) a list of ``{"role", "content"}`` turns ending with a user
  turn, ``chosen`` / ``rejected`` lists of assistant turns (a string is one assistant turn);
* paired, implicit prompt: no ``prompt``; ``chosen`` / ``rejected`` whole conversations that share their opening
  turns, which become the prompt (as ``trl.extract_prompt`` does);
* unpaired (KTO only): ``prompt`` + ``completion`` (plain or conversational, as above) + ``label`` (``true``: a
  desirable completion). For KTO, paired records are unpaired as ``trl.unpair_preference_dataset`` does: chosen ->
  ``label: true``, rejected -> ``label: false``.

Plain and conversational records cannot mix in one data set (TRL renders a data set one way): the first good
record decides, and records of the other kind are bad records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from typing import Any

from noisyft.data import (
    MESSAGE_ROLES,
    BadRecordsError,
    DataReport,
    RecordProblem,
    _check_usable,
    _settle_bad,
    _short,
)
from noisyft.data_sources import WHOLE_RECORD, BadRecord, _open_source

__all__ = ["BadRecordsError", "build_preference_dataset", "load_preference_records", "normalize_preference"]

logger = logging.getLogger(__name__)

PREFERENCE_TASKS = ("dpo", "kto")


# ---------------------------------------------------------------------------------------------- validation


def _nonempty_text(value: Any, field: str, what: str) -> str:
    if not isinstance(value, str):
        raise RecordProblem(
            "wrong type", field, f"expected a string, got {type(value).__name__} ({_short(value)})"
        )
    if not value.strip():
        raise RecordProblem(f"empty {what}", field, f"empty {what}")
    return value


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    """A list of ``{"role", "content"}`` turns, each checked (roles: system, user, assistant; content non-empty)."""
    if not isinstance(value, list):
        raise RecordProblem(
            "wrong type", field, f"expected a list of messages, got {type(value).__name__} ({_short(value)})"
        )
    if not value:
        raise RecordProblem("empty conversation", field, "empty list of messages")
    out = []
    for i, turn in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise RecordProblem(
                "wrong type", where, f"expected an object, got {type(turn).__name__} ({_short(turn)})"
            )
        for key in ("role", "content"):
            if key not in turn:
                raise RecordProblem("missing field", f"{where}.{key}", "missing required field")
        role = turn["role"]
        if role not in MESSAGE_ROLES:
            raise RecordProblem(
                "unknown role", f"{where}.role", f"unknown role {role!r} (expected {MESSAGE_ROLES})"
            )
        out.append({"role": role, "content": _nonempty_text(turn["content"], f"{where}.content", "message")})
    return out


def _prompt(record: dict) -> tuple[Any, bool]:
    """(prompt, conversational?) from ``prompt`` (a string or messages) or ``messages`` (messages)."""
    keys = [k for k in ("prompt", "messages") if k in record]
    if len(keys) == 2:
        raise RecordProblem(
            "ambiguous prompt", "messages", "both 'prompt' and 'messages' are given; keep one"
        )
    key = keys[0]
    value = record[key]
    if isinstance(value, str) and key == "prompt":
        return _nonempty_text(value, key, "prompt"), False
    if key == "prompt" and not isinstance(value, list):
        raise RecordProblem(
            "wrong type",
            key,
            f"expected a string or a list of messages, got {type(value).__name__} ({_short(value)})",
        )
    turns = _messages(value, key)
    if turns[-1]["role"] != "user":
        raise RecordProblem(
            "prompt not ending with a user turn",
            f"{key}[{len(turns) - 1}].role",
            "the prompt must end with a user turn",
        )
    return turns, True


def _reply(value: Any, field: str, conversational: bool) -> Any:
    """A reply to a prompt: a string, or (conversational) assistant turns; a string becomes one assistant turn."""
    if not conversational:
        if isinstance(value, list):
            raise RecordProblem(
                "wrong type", field, "expected a string (the prompt is a string), got a list of messages"
            )
        return _nonempty_text(value, field, "response")
    if isinstance(value, str):
        return [{"role": "assistant", "content": _nonempty_text(value, field, "response")}]
    turns = _messages(value, field)
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            raise RecordProblem(
                "non-assistant reply",
                f"{field}[{i}].role",
                f"a reply holds assistant turns only, got {turn['role']!r}",
            )
    return turns


def _implicit(record: dict) -> dict[str, Any]:
    """Chosen / rejected whole conversations: the shared opening turns are the prompt (``trl.extract_prompt``)."""
    for key in ("chosen", "rejected"):
        if isinstance(record[key], str):
            raise RecordProblem(
                "missing field",
                "prompt",
                f"missing required field ({key} is text, so the prompt must be given)",
            )
    chosen, rejected = _messages(record["chosen"], "chosen"), _messages(record["rejected"], "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    shared = max((i + 1 for i in range(shared) if chosen[i]["role"] == "user"), default=0)
    if shared == 0:
        raise RecordProblem(
            "no shared prompt",
            "chosen",
            "no prompt given, and chosen and rejected share no opening user turn",
        )
    replies = {}
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        replies[key] = _reply(turns[shared:], key, True) if turns[shared:] else None
        if replies[key] is None:
            raise RecordProblem("empty response", key, f"no {key} reply after the shared prompt")
    return {"prompt": chosen[:shared], **replies}


def normalize_preference(record: Any, task: str) -> tuple[dict[str, Any], str, bool]:
    """Validate one raw record: return (normalised record, ``"paired"`` or ``"unpaired"``, conversational?), or raise
    :class:`~noisyft.data.RecordProblem` naming the field."""
    if not isinstance(record, dict):
        raise RecordProblem(
            "not an object", WHOLE_RECORD, f"record is not a JSON object but {type(record).__name__}"
        )
    # a DPO record with a prompt is a pair, whatever it lacks; a KTO one may be either
    prompted = "prompt" in record or "messages" in record
    paired = (
        "chosen" in record
        or "rejected" in record
        or (task == "dpo" and prompted and "completion" not in record)
    )
    if not paired and ("completion" in record or "label" in record):
        if task == "dpo":
            raise RecordProblem(
                "unpaired record",
                WHOLE_RECORD,
                "prompt/completion/label is unpaired data: DPO needs chosen and "
                "rejected (use --task kto for unpaired data)",
            )
        for key in ("prompt", "completion", "label"):
            if key not in record and not (key == "prompt" and "messages" in record):
                raise RecordProblem("missing field", key, "missing required field")
        prompt, conversational = _prompt(record)
        completion = _reply(record["completion"], "completion", conversational)
        if not isinstance(record["label"], bool):
            raise RecordProblem(
                "wrong type", "label", f"expected true or false, got {_short(record['label'])}"
            )
        return (
            {"prompt": prompt, "completion": completion, "label": record["label"]},
            "unpaired",
            conversational,
        )
    if not paired:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise RecordProblem(
            "unknown format",
            WHOLE_RECORD,
            f"not a preference record (keys: {keys}); expected prompt/chosen/rejected"
            + (" or prompt/completion/label" if task == "kto" else ""),
        )
    for key in ("chosen", "rejected"):
        if key not in record:
            raise RecordProblem("missing field", key, "missing required field")
    if "prompt" in record or "messages" in record:
        prompt, conversational = _prompt(record)
        out = {"prompt": prompt, **{k: _reply(record[k], k, conversational) for k in ("chosen", "rejected")}}
    else:
        out, conversational = _implicit(record), True
    if out["chosen"] == out["rejected"]:
        raise RecordProblem("identical pair", "chosen", "chosen and rejected are the same")
    return out, "paired", conversational


# ---------------------------------------------------------------------------------------------- loading


def _collect(
    source: Any, task: str, split: str, limit: int | None
) -> tuple[list[dict[str, Any]], list[str], list[BadRecord], DataReport]:
    if task not in PREFERENCE_TASKS:
        raise ValueError(f"task must be one of {', '.join(PREFERENCE_TASKS)}, got {task!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of records, got {limit}")
    name, items = _open_source(source, split)
    records: list[dict[str, Any]] = []
    kinds: list[str] = []
    bad: list[BadRecord] = []
    report = DataReport(source=name, format="", template="")
    first: tuple[bool, int] | None = None  # (conversational?, record number) of the first good record
    for origin, index, line, raw, error in items:
        report.n_records += 1
        if error is not None:
            bad.append(error)
            continue
        try:
            record, kind, conversational = normalize_preference(raw, task)
            if first is not None and conversational != first[0]:
                this, other = (
                    ("conversational", "plain-text") if conversational else ("plain-text", "conversational")
                )
                raise RecordProblem(
                    "mixed formats",
                    WHOLE_RECORD,
                    f"a {this} record among {other} ones (the first good record, "
                    f"number {first[1]}, is {other}); one data set holds one kind",
                )
        except RecordProblem as b:
            bad.append(BadRecord(origin, index, b.field, b.problem, b.kind, line))
            continue
        first = first or (conversational, index)
        records.append(record)
        kinds.append(kind)
        if limit is not None and len(records) >= limit:
            break
    counts = Counter(kinds)
    report.format = "+".join(sorted(counts)) + (
        " conversational" if first and first[0] else " plain" if first else ""
    )
    report.format = report.format.strip() or "unknown"
    report.template = "chat" if first and first[0] else ("plain" if first else "")
    return records, kinds, bad, report


def load_preference_records(
    source: str | os.PathLike | Any,
    *,
    task: str,
    split: str = "train",
    skip_bad_records: bool = False,
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], DataReport]:
    """Read and validate every record of ``source`` for ``task`` (``"dpo"`` or ``"kto"``); return the normalised
    records (paired ones as prompt/chosen/rejected, unpaired ones as prompt/completion/label) and a report.
    ``limit`` stops after that many good records (pairs count once)."""
    records, _, bad, report = _collect(source, task, split, limit)
    _settle_bad(report, bad, skip_bad_records)
    _check_usable(report, len(records))
    report.n_examples = len(records)
    logger.info(
        "loaded %d preference records from %s (%s; %d records read, %d bad skipped)",
        len(records),
        report.source,
        report.format,
        report.n_records,
        report.n_bad,
    )
    return records, report


def build_preference_dataset(
    source: str | os.PathLike | Any,
    *,
    task: str,
    split: str = "train",
    skip_bad_records: bool = False,
    limit: int | None = None,
) -> tuple[Any, DataReport]:
    """The ``datasets.Dataset`` TRL's ``DPOTrainer`` (prompt/chosen/rejected) or ``KTOTrainer``
    (prompt/completion/label) takes; tokenization is the trainer's. For KTO the paired records are unpaired with
    ``trl.unpair_preference_dataset`` and follow the unpaired ones."""
    import datasets

    records, report = load_preference_records(
        source, task=task, split=split, skip_bad_records=skip_bad_records, limit=limit
    )
    if task == "dpo":
        dataset = datasets.Dataset.from_list(records)
    else:
        from trl.data_utils import unpair_preference_dataset

        parts = [datasets.Dataset.from_list([r for r in records if "label" in r])]
        paired = [r for r in records if "label" not in r]
        if paired:
            parts.append(unpair_preference_dataset(datasets.Dataset.from_list(paired)))
        dataset = datasets.concatenate_datasets([p for p in parts if len(p)])
    report.n_examples = len(dataset)
    return dataset, report


def fingerprint_records(dataset: Any) -> str:
    """SHA-256 over every example as canonical JSON, in order (the data the run trained on, before tokenization)."""
    digest = hashlib.sha256()
    for row in dataset:
        digest.update(json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def count_tokens(report: DataReport, tokenized: Any, max_length: int | None, n_before: int) -> None:
    """Fill the report's token counts from the trainer's tokenized data set (``prompt_ids`` and ``chosen_ids`` /
    ``rejected_ids`` or ``completion_ids``), per sequence the model sees (prompt + one reply: two per pair): those
    longer than ``max_length`` (TRL keeps their start) are counted as truncated, and their tokens up to the cut;
    the examples whose prompt alone fills ``max_length`` were dropped by TRL (``n_before`` - what is left)."""
    replies = [c for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in tokenized.column_names]
    report.n_examples = len(tokenized)
    report.n_no_response_after_truncation = n_before - len(tokenized)
    for row in tokenized:
        n_prompt = len(row["prompt_ids"])
        for column in replies:
            n = n_prompt + len(row[column])
            report.n_tokens += n if max_length is None else min(n, max_length)
            report.n_response_tokens += (
                len(row[column]) if max_length is None else max(0, min(n, max_length) - n_prompt)
            )
            report.n_truncated += max_length is not None and n > max_length
    if report.n_no_response_after_truncation:
        logger.warning(
            "dropped %d example(s) of %s whose prompt alone fills max_length=%s tokens",
            report.n_no_response_after_truncation,
            report.source,
            max_length,
        )
