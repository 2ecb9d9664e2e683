"""Load instruction data (Alpaca, ShareGPT, messages), validate every record, and tokenize it for SFT.

Validation runs over the whole source before anything is tokenized: by default every bad record is collected
and :class:`BadRecordsError` lists them (file, record number, field, problem); with ``skip_bad_records=True``
they are skipped, counted per kind, logged and returned in the :class:`DataReport`. Nothing is dropped silently:
a broken element of a JSON array is one bad record and reading resumes at the next element (or stops with the
position, when no next element can be found); an invalid UTF-8 byte spoils one JSONL line or one array element.

Normalisation applied to every conversation (counted in the report): assistant turns that open a conversation
before any user turn are dropped, as FastChat does for ShareGPT (such turns continue an earlier chunk of a
split conversation and have no prompt to answer).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from typing import Any

from noisyft import templates
from noisyft.data_sources import WHOLE_RECORD, BadRecord, DataSourceError, _open_source

__all__ = [
    "BadRecord",
    "BadRecordsError",
    "DataReport",
    "DataSourceError",
    "build_sft_dataset",
    "load_conversations",
]

logger = logging.getLogger(__name__)

FORMATS = ("auto", "alpaca", "sharegpt", "messages")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
MESSAGE_ROLES = ("system", "user", "assistant")
MAX_LISTED = 20


class BadRecordsError(ValueError):
    """The source holds bad records; ``bad_records`` has all of them."""

    def __init__(self, source: str, bad_records: list[BadRecord], n_records: int):
        self.bad_records = bad_records
        self.by_kind = dict(Counter(b.kind for b in bad_records))
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.by_kind.items(), key=lambda kv: -kv[1]))
        lines = [f"{len(bad_records)} bad record(s) out of {n_records} in {source} ({kinds}):"]
        lines += [f"  - {b}" for b in bad_records[:MAX_LISTED]]
        if len(bad_records) > MAX_LISTED:
            lines.append(f"  ... and {len(bad_records) - MAX_LISTED} more")
        lines.append(
            "Fix them, or pass skip_bad_records=True to skip them (they are then counted and reported)."
        )
        super().__init__("\n".join(lines))


@dataclasses.dataclass
class DataReport:
    source: str
    format: str  # detected format(s), "+"-joined when a folder mixes them
    template: str  # resolved template name ("" from load_conversations)
    n_records: int = 0  # records read
    n_bad: int = 0  # bad records (skipped)
    bad_by_kind: dict[str, int] = dataclasses.field(default_factory=dict)
    bad_examples: list[str] = dataclasses.field(default_factory=list)  # first 20 messages
    n_truncated: int = 0  # records longer than max_length, cut to max_length
    n_no_response_after_truncation: int = 0  # truncation left no response token: dropped (completion-only)
    n_examples: int = 0  # examples (conversations, or tokenized examples) returned
    n_tokens: int = 0  # total tokens
    n_response_tokens: int = 0  # tokens with loss
    n_leading_assistant_dropped: int = 0  # records whose opening assistant turn(s) had no prompt, dropped

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RecordProblem(ValueError):
    """What is wrong with one record (raised by :func:`normalize_record`)."""

    def __init__(self, kind: str, field: str, problem: str):
        super().__init__(problem)
        self.kind, self.field, self.problem = kind, field, problem


# ---------------------------------------------------------------------------------------------- validation


def detect_format(record: dict) -> str | None:
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "messages"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def _text(record: dict, key: str, field: str, *, required: bool = True) -> str:
    if key not in record or (record[key] is None and not required):
        if required:
            raise RecordProblem("missing field", field, "missing required field")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise RecordProblem(
            "wrong type", field, f"expected a string, got {type(value).__name__} ({_short(value)})"
        )
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _normalize_alpaca(record: dict) -> list[dict]:
    instruction = _text(record, "instruction", "instruction")
    extra = _text(record, "input", "input", required=False)
    output = _text(record, "output", "output")
    if not instruction.strip():
        raise RecordProblem("empty instruction", "instruction", "empty instruction")
    if not output.strip():
        raise RecordProblem("empty response", "output", "empty response")
    return [
        {"role": "user", "content": instruction, "input": extra},
        {"role": "assistant", "content": output},
    ]


def _normalize_turns(
    record: dict, key: str, role_key: str, text_key: str, roles: dict[str, str]
) -> list[dict]:
    if key not in record:
        raise RecordProblem("missing field", key, "missing required field")
    turns = record[key]
    if not isinstance(turns, list):
        raise RecordProblem(
            "wrong type", key, f"expected a list of turns, got {type(turns).__name__} ({_short(turns)})"
        )
    conversation = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RecordProblem(
                "wrong type", where, f"expected an object, got {type(turn).__name__} ({_short(turn)})"
            )
        role = _text(turn, role_key, f"{where}.{role_key}")
        if role not in roles:
            raise RecordProblem("unknown role", f"{where}.{role_key}", f"unknown role {role!r}")
        conversation.append(
            {"role": roles[role], "content": _text(turn, text_key, f"{where}.{text_key}"), "_at": where}
        )
    return conversation


def _finish(conversation: list[dict], key: str, text_key: str) -> tuple[list[dict], bool]:
    """Drop opening assistant turns, check there is a non-empty reply; returns (conversation, dropped?)."""
    first_user = next((i for i, t in enumerate(conversation) if t["role"] == "user"), len(conversation))
    kept = [t for i, t in enumerate(conversation) if i >= first_user or t["role"] != "assistant"]
    dropped = len(kept) < len(conversation)
    replies = [t for t in kept if t["role"] == "assistant"]
    if not replies:
        if dropped:
            problem = (
                "no assistant turn after a user turn (the only replies open the conversation, unprompted)"
            )
        else:
            problem = "no assistant turn" + (" (empty conversation)" if not conversation else "")
        raise RecordProblem("no assistant turn", key, problem)
    for t in replies:
        if not t["content"].strip():
            raise RecordProblem("empty response", f"{t['_at']}.{text_key}", "empty response")
    return [{"role": t["role"], "content": t["content"]} for t in kept], dropped


def normalize_record(record: Any, format: str = "auto") -> tuple[list[dict], str, bool]:
    """Validate one raw record; return (conversation, format, opening replies dropped?) or raise :class:`RecordProblem`."""
    if not isinstance(record, dict):
        raise RecordProblem(
            "not an object", WHOLE_RECORD, f"record is not a JSON object but {type(record).__name__}"
        )
    fmt = detect_format(record) if format == "auto" else format
    if fmt == "alpaca":
        return _normalize_alpaca(record), fmt, False
    if fmt == "sharegpt":
        turns = _normalize_turns(record, "conversations", "from", "value", SHAREGPT_ROLES)
        conversation, dropped = _finish(turns, "conversations", "value")
        return conversation, fmt, dropped
    if fmt == "messages":
        turns = _normalize_turns(record, "messages", "role", "content", {r: r for r in MESSAGE_ROLES})
        conversation, dropped = _finish(turns, "messages", "content")
        return conversation, fmt, dropped
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise RecordProblem(
        "unknown format",
        WHOLE_RECORD,
        f"format not recognizable (keys: {keys}); expected Alpaca (instruction/input/output), "
        "ShareGPT (conversations) or messages",
    )


# ---------------------------------------------------------------------------------------------- loading

_Loc = tuple[str, int, "int | None"]


def _collect(
    source: Any, format: str, split: str, limit: int | None
) -> tuple[list[list[dict]], list[_Loc], list[BadRecord], DataReport]:
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of records, got {limit}")
    name, items = _open_source(source, split)
    conversations: list[list[dict]] = []
    locs: list[_Loc] = []
    bad: list[BadRecord] = []
    formats: Counter[str] = Counter()
    report = DataReport(source=name, format="", template="")
    for origin, index, line, record, error in items:
        report.n_records += 1
        if error is not None:
            bad.append(error)
            continue
        try:
            conversation, fmt, dropped = normalize_record(record, format)
        except RecordProblem as b:
            bad.append(BadRecord(origin, index, b.field, b.problem, b.kind, line))
            continue
        formats[fmt] += 1
        report.n_leading_assistant_dropped += dropped
        conversations.append(conversation)
        locs.append((origin, index, line))
        if limit is not None and len(conversations) >= limit:
            break
    report.format = "+".join(sorted(formats)) or (format if format != "auto" else "unknown")
    return conversations, locs, bad, report


def _settle_bad(report: DataReport, bad: list[BadRecord], skip_bad_records: bool) -> None:
    """Raise on bad records, or record them in the report (and log them) when skipping."""
    if not bad:
        return
    if not skip_bad_records:
        raise BadRecordsError(report.source, bad, report.n_records)
    report.n_bad = len(bad)
    report.bad_by_kind = dict(Counter(b.kind for b in bad).most_common())
    report.bad_examples = [str(b) for b in bad[:MAX_LISTED]]
    kinds = ", ".join(f"{k}: {n}" for k, n in report.bad_by_kind.items())
    examples = "".join(f"\n  - {m}" for m in report.bad_examples)
    logger.warning(
        "skipped %d bad record(s) out of %d in %s (%s); first ones:%s",
        len(bad),
        report.n_records,
        report.source,
        kinds,
        examples,
    )


def _check_usable(report: DataReport, n: int) -> None:
    if n == 0:
        raise ValueError(
            f"no usable records in {report.source} ({report.n_records} read, {report.n_bad} bad)"
        )


def load_conversations(
    source: str | os.PathLike | Any,
    *,
    format: str = "auto",
    split: str = "train",
    skip_bad_records: bool = False,
    limit: int | None = None,
) -> tuple[list[list[dict]], DataReport]:
    """Read and validate every record of ``source``; return normalised conversations and a report.

    ``source``: a ``.json`` file (JSON array), a ``.jsonl`` file, a folder of them (read recursively, sorted),
    a ``save_to_disk`` folder, a ``datasets.Dataset``, ``"sharegpt"`` / ``"sharegpt:heldout"`` (the embedded
    ShareGPT splits) or a Hub dataset id (``split`` applies to Hub datasets, DatasetDicts and ``"sharegpt"``).
    ``format``: ``"auto"`` (per record, by its keys), ``"alpaca"``, ``"sharegpt"`` or ``"messages"``.
    ``limit``: stop after that many good records; the bad records met before that point are reported (or
    raise), later records are not read.

    Conversations are lists of ``{"role", "content"}`` turns; Alpaca user turns also carry ``"input"``.
    """
    conversations, _, bad, report = _collect(source, format, split, limit)
    _settle_bad(report, bad, skip_bad_records)
    _check_usable(report, len(conversations))
    report.n_examples = len(conversations)
    logger.info(
        "loaded %d conversations from %s (%s; %d records read, %d bad skipped, %d opening replies dropped)",
        len(conversations),
        report.source,
        report.format,
        report.n_records,
        report.n_bad,
        report.n_leading_assistant_dropped,
    )
    return conversations, report


# ---------------------------------------------------------------------------------------------- tokenizing


def response_mask(offsets: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap a response range (``ranges``: sorted, half-open)."""
    mask = []
    r = 0
    for start, end in offsets:
        while r < len(ranges) and ranges[r][1] <= start:
            r += 1
        hit = False
        if r < len(ranges):
            lo, hi = ranges[r]
            # zero-width tokens (special tokens the tokenizer adds, whitespace whose offsets were trimmed)
            # count when they sit inside a response
            hit = (start < hi and end > lo) if end > start else lo <= start < hi
        mask.append(int(hit))
    return mask


def encode_truncated(
    tokenizer: Any, texts: list[str], max_length: int, *, add_special_tokens: bool, batch_size: int = 512
) -> list[tuple[list[int], list[tuple[int, int]], bool]]:
    """Tokenize ``texts`` keeping the first ``max_length`` tokens: ``[(ids, offsets, truncated), ...]``.

    Long texts are first tokenized from a prefix of the characters only (about 6 per token): when that prefix
    already gives well over ``max_length`` tokens, the first ``max_length`` are those of the whole text
    (tokenization is local; the margin keeps the cut away from them) and the rest need not be tokenized. Texts
    whose prefix turns out too short are retried with a 4x longer prefix, up to the whole text.
    """
    margin = 32
    budget = max_length * 6 + 256
    results: list[Any] = [None] * len(texts)
    pending = list(range(len(texts)))
    while pending:
        retry = []
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            encoded = tokenizer(
                [texts[i][:budget] for i in chunk],
                add_special_tokens=add_special_tokens,
                return_offsets_mapping=True,
                return_attention_mask=False,
                verbose=False,
            )
            for i, ids, offsets in zip(chunk, encoded["input_ids"], encoded["offset_mapping"], strict=True):
                cut = len(texts[i]) > budget
                if cut and len(ids) <= max_length + margin:
                    retry.append(i)
                else:
                    results[i] = (
                        ids[:max_length],
                        [tuple(o) for o in offsets[:max_length]],
                        len(ids) > max_length,
                    )
        pending = retry
        budget *= 4
    return results


def _join(segments: templates.Segments) -> tuple[str, list[tuple[int, int]]]:
    text, ranges, pos = [], [], 0
    for chunk, is_response in segments:
        if is_response:
            ranges.append((pos, pos + len(chunk)))
        text.append(chunk)
        pos += len(chunk)
    return "".join(text), ranges


def build_sft_dataset(
    source: str | os.PathLike | Any,
    tokenizer: Any,
    *,
    template: str = "auto",
    format: str = "auto",
    split: str = "train",
    max_length: int = 512,
    completion_only_loss: bool = True,
    skip_bad_records: bool = False,
    limit: int | None = None,
    batch_size: int = 512,
) -> tuple[Any, DataReport]:
    """Load, validate, render and tokenize ``source`` into a pre-tokenized dataset for TRL's SFTTrainer.

    Columns: ``input_ids`` and ``assistant_masks`` (1 on response tokens, the loss targets; all ones when
    ``completion_only_loss=False``). A token is a response token when its characters overlap a response
    segment of the template. The tokenizer adds its special tokens (BOS) for alpaca/vicuna, not for
    ``"chat"`` (the chat template writes them). Examples longer than ``max_length`` keep their start; those
    left without any response token are dropped. Records the template cannot render count as bad records
    (kind ``"template error"``). ``limit`` counts good records as :func:`load_conversations` does, so
    template errors and truncation may leave fewer examples. Everything is counted in the :class:`DataReport`.
    """
    import datasets
    import jinja2

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "build_sft_dataset needs a fast tokenizer (character offsets are used to place the masks)"
        )
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    conversations, locs, bad, report = _collect(source, format, split, limit)
    alpaca = bool(conversations) and all(templates.is_alpaca_conversation(c) for c in conversations)
    report.template = name = templates.resolve_template(template, tokenizer, alpaca=alpaca)

    texts: list[str] = []
    all_ranges: list[list[tuple[int, int]]] = []
    for conversation, (origin, index, line) in zip(conversations, locs, strict=True):
        try:
            text, ranges = _join(templates.render_segments(conversation, tokenizer, name))
        except (templates.TemplateError, jinja2.TemplateError) as e:
            if isinstance(e, jinja2.TemplateSyntaxError):
                raise  # a broken chat template, not a problem of this record
            # e.g. the chat template's raise_exception("roles must alternate ...")
            problem = f"template {name!r} cannot render it: {e}"
            bad.append(BadRecord(origin, index, WHOLE_RECORD, problem, "template error", line))
            continue
        texts.append(text)
        all_ranges.append(ranges)
    _settle_bad(report, bad, skip_bad_records)
    _check_usable(report, len(texts))

    input_ids: list[list[int]] = []
    masks: list[list[int]] = []
    encoded = encode_truncated(
        tokenizer, texts, max_length, add_special_tokens=name != "chat", batch_size=batch_size
    )
    for (ids, offsets, truncated), ranges in zip(encoded, all_ranges, strict=True):
        report.n_truncated += truncated
        mask = response_mask(offsets, ranges)
        if not any(mask):
            report.n_no_response_after_truncation += 1
            if not truncated:
                logger.warning("an example has no response token even untruncated (tokenizer offsets?)")
            if completion_only_loss:
                continue
        if not completion_only_loss:
            mask = [1] * len(ids)
        input_ids.append(ids)
        masks.append(mask)
        report.n_tokens += len(ids)
        report.n_response_tokens += sum(mask)
    if report.n_no_response_after_truncation:
        logger.warning(
            "%s %d example(s) whose response starts after the first %d tokens (max_length) of the prompt",
            "dropped" if completion_only_loss else "kept (completion_only_loss=False)",
            report.n_no_response_after_truncation,
            max_length,
        )
    if not input_ids:
        raise ValueError(
            f"no example of {report.source} keeps a response token within max_length={max_length} tokens"
        )
    report.n_examples = len(input_ids)
    logger.info(
        "built %d examples from %s (template %s): %d tokens, %d with loss; %d truncated to %d tokens",
        report.n_examples,
        report.source,
        name,
        report.n_tokens,
        report.n_response_tokens,
        report.n_truncated,
        max_length,
    )
    dataset = datasets.Dataset.from_dict({"input_ids": input_ids, "assistant_masks": masks})
    return dataset, report
