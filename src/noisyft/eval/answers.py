"""Answer files for the pairwise judge: JSONL (or a JSON array) of ``{"prompt": ..., "response": ...}`` records,
such as ``noisyft eval run``'s ``generations/*.jsonl``, read strictly and paired prompt by prompt."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from noisyft import _io


def _record_fields(record: Any, where: str) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "prompt" in record:
        prompt, name = record["prompt"], "prompt"
    elif "instruction" in record:
        prompt, name = record["instruction"], "instruction"
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise ValueError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        if isinstance(prompt, str) and extra and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
    else:
        raise ValueError(f"{where}: no 'prompt' (or alpaca-style 'instruction') field")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: field {name!r} must be a non-empty string")
    key = "response" if "response" in record else "output" if "output" in record else None
    if key is None:
        raise ValueError(f"{where}: no 'response' (or alpaca-style 'output') field")
    if not isinstance(record[key], str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
    return prompt, record[key]


def load_answers(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read answers: JSONL (one object a line) or a JSON array (AlpacaEval's reference files).

    Each record has ``"prompt"`` (or ``"instruction"`` plus an optional ``"input"``, joined by a blank
    line) and ``"response"`` (or ``"output"``; may be empty). Returns
    ``[{"index": position, "prompt", "response", "line"}]`` (``line`` is None for a JSON array). Blank
    lines are skipped; any other bad record raises ValueError naming the file, line (or record) and field.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    items: list[tuple[Any, str, int | None]] = []
    if text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        items = [(rec, f"{path}: record {k}", None) for k, rec in enumerate(array)]
    else:
        items = [(rec, where, lineno) for lineno, where, rec in _io.iter_jsonl_objects(path)]
    records = []
    for rec, where, lineno in items:
        prompt, response = _record_fields(rec, where)
        records.append({"index": len(records), "prompt": prompt, "response": response, "line": lineno})
    if not records:
        raise ValueError(f"{path}: no answer records")
    return records


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pair_answers(
    records_a: Sequence[dict],
    records_b: Sequence[dict],
    *,
    name_a: str = "answers A",
    name_b: str = "answers B",
) -> tuple[list[str], list[str], list[str]]:
    """Pair two answer lists by position: ``(instructions, responses_a, responses_b)``.

    Raises ValueError when the lengths differ or, naming the first mismatching index, when the prompts at
    the same position differ (compared after stripping surrounding whitespace).
    """
    if len(records_a) != len(records_b):
        raise ValueError(f"{name_a} has {len(records_a)} answers but {name_b} has {len(records_b)}")
    for i, (ra, rb) in enumerate(zip(records_a, records_b, strict=True)):
        if ra["prompt"].strip() != rb["prompt"].strip():
            lines = "".join(
                f", {name} line {r['line']}" for name, r in ((name_a, ra), (name_b, rb)) if r.get("line")
            )
            raise ValueError(
                f"prompts differ at index {i}{lines}: {_short(ra['prompt'])!r} vs {_short(rb['prompt'])!r}; "
                "pairs are matched by position, so both files must answer the same prompts in the same order"
            )
    return (
        [r["prompt"] for r in records_a],
        [r["response"] for r in records_a],
        [r["response"] for r in records_b],
    )


# --- scores ---------------------------------------------------------------------------------------------
