"""Reading instruction-data sources record by record: JSONL and JSON files (a broken JSON-array element is one bad
record, and reading resumes at the next element), folders of them, saved ``datasets`` folders, the embedded
ShareGPT data and Hub datasets. Each reader yields ``(origin, record number, line, record, BadRecord | None)``;
validation and tokenization are :mod:`noisyft.data`'s."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from noisyft._io import JsonArrayStructureError, line_column, scan_json_array

logger = logging.getLogger(__name__)

WHOLE_RECORD = "<record>"


@dataclasses.dataclass
class BadRecord:
    """One record that cannot be used; ``index`` is the 1-based record number within ``origin``."""

    origin: str
    index: int
    field: str
    problem: str
    kind: str = ""
    line: int | None = None  # 1-based line in the file, for JSONL and broken JSON

    def __str__(self) -> str:
        where = f"record {self.index}" + (f" (line {self.line})" if self.line is not None else "")
        return f"{self.origin}: {where}: field '{self.field}': {self.problem}"


class DataSourceError(ValueError):
    """The source itself cannot be read (not a bad record: a missing dataset, an unreadable file)."""


# ---------------------------------------------------------------------------------------------- readers


# Each reader yields (origin, record number, line or None, record, BadRecord or None).
_Item = tuple[str, int, "int | None", Any, "BadRecord | None"]


def _utf8_problem(exc: UnicodeDecodeError, offset: int = 0) -> str:
    byte = exc.object[exc.start : exc.start + 1].hex()
    return f"invalid UTF-8 (byte 0x{byte} at byte offset {offset + exc.start}: {exc.reason})"


def _bad(origin: str, index: int, line: int | None, problem: str, kind: str) -> _Item:
    return origin, index, line, None, BadRecord(origin, index, WHOLE_RECORD, problem, kind, line)


def _split_lines(raw: bytes) -> list[bytes]:
    """One line read in binary (ending in \\n) split on \\r too, as text mode with ``newline=""`` would."""
    body = raw[:-1] if raw.endswith(b"\n") else raw
    body = body[:-1] if body.endswith(b"\r") else body
    return body.split(b"\r")


def _read_jsonl(path: Path, origin: str) -> Iterator[_Item]:
    """JSON Lines, read as bytes and decoded line by line, so an invalid UTF-8 byte spoils one line only.

    Lines are split on \\n and \\r, not on U+2028 and the other separators that ``str.splitlines`` also splits
    on and that JSON strings may hold unescaped. A UTF-8 BOM is accepted.
    """
    index = line_no = offset = 0
    with open(path, "rb") as f:
        for raw in f:
            start = offset
            offset += len(raw)
            for piece in _split_lines(raw):
                line_no += 1
                piece_start, start = start, start + len(piece) + 1
                if line_no == 1 and piece.startswith(b"\xef\xbb\xbf"):
                    piece, piece_start = piece[3:], piece_start + 3
                if not piece.strip():
                    continue
                index += 1
                try:
                    line = piece.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield _bad(origin, index, line_no, _utf8_problem(e, piece_start), "invalid UTF-8")
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    if index == 1 and line.lstrip().startswith("["):
                        raise DataSourceError(_ARRAY_HINT.format(origin=origin)) from None
                    problem = f"invalid JSON: {e.msg} (column {e.colno})"
                    yield _bad(origin, index, line_no, problem, "invalid JSON")
                    continue
                if index == 1 and isinstance(record, list) and record and isinstance(record[0], dict):
                    raise DataSourceError(_ARRAY_HINT.format(origin=origin))
                yield origin, index, line_no, record, None


_ARRAY_HINT = (
    "{origin}: this looks like a JSON array, not JSON Lines (one object per line); "
    "rename it to .json, or write one record per line"
)
_SURROGATE = re.compile("[\udc80-\udcff]")


def _read_json(path: Path, origin: str) -> Iterator[_Item]:
    """A JSON array, element by element (:func:`noisyft._io.scan_json_array`): a broken element is a bad
    record and reading resumes at the next one; an element holding invalid UTF-8 is a bad record too."""
    data = path.read_bytes()
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    text = data.decode("utf-8", errors="surrogateescape")  # invalid bytes -> lone surrogates U+DC80..U+DCFF
    if text.lstrip().startswith("{"):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # one object per line: JSON Lines under a .json name
                logger.info("%s holds JSON Lines, not a JSON array; reading it line by line", origin)
                yield from _read_jsonl(path, origin)
                return
        else:
            raise DataSourceError(f"{origin}: holds one JSON object; expected a JSON array of records")
    has_bad_bytes = _SURROGATE.search(text) is not None
    try:
        for element in scan_json_array(text):
            line = line_column(text, element.start)[0]
            bad_byte = has_bad_bytes and _SURROGATE.search(text, element.start, element.end)
            if bad_byte:
                offset = len(text[: bad_byte.start()].encode("utf-8", errors="surrogateescape"))
                problem = (
                    f"invalid UTF-8 (byte 0x{ord(bad_byte.group()) - 0xDC00:02x} at byte offset {offset})"
                )
                yield _bad(origin, element.index, line, problem, "invalid UTF-8")
            elif element.error is None:
                yield origin, element.index, None, element.value, None
            else:
                problem = f"invalid JSON: {element.error}"
                if element.unread:
                    rest = len(text[element.start :].encode("utf-8", errors="surrogateescape"))
                    problem += f"; the rest of the file ({rest} bytes) could not be read"
                yield _bad(origin, element.index, line, problem, "invalid JSON")
    except JsonArrayStructureError as e:
        if e.index == 0:
            raise DataSourceError(f"{origin}: not a JSON array of records: {e.msg} (line {e.line})") from e
        raise DataSourceError(
            f"{origin}: {e}; fix the file (records after this point cannot be located)"
        ) from e


def _read_dataset(dataset: Any, origin: str) -> Iterator[_Item]:
    for index, row in enumerate(dataset, 1):
        # Arrow fills keys missing from a row with None; treat those as absent.
        yield origin, index, None, {k: v for k, v in row.items() if v is not None}, None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _open_source(source: Any, split: str) -> tuple[str, Iterator[_Item]]:
    """Return (source name, item iterator) for any supported kind of source."""
    import datasets

    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise DataSourceError(f"split {split!r} not in the DatasetDict (has {', '.join(source)})")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        return "<in-memory Dataset>", _read_dataset(source, "<in-memory Dataset>")
    if not isinstance(source, str | os.PathLike):
        raise TypeError(
            f"source must be a path, a dataset name or a datasets.Dataset, not {type(source).__name__}"
        )
    name = os.path.expanduser(os.fspath(source))
    if (
        isinstance(source, str)
        and (name == "sharegpt" or name.startswith("sharegpt:"))
        and not os.path.exists(name)
    ):
        from noisyft import embedded_data

        which = name.partition(":")[2] or split
        if which not in embedded_data.SPLITS:
            raise DataSourceError(
                f"the embedded ShareGPT data has splits {embedded_data.SPLITS}, not {which!r}"
            )
        label = f"sharegpt:{which}"
        return label, _read_jsonl(embedded_data.sharegpt_split(which), label)
    path = Path(name)
    if path.is_file():
        return name, _read_file(path, name)
    if path.is_dir():
        if _is_saved_dataset(path):
            loaded = datasets.load_from_disk(name)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataSourceError(f"{name}: no split {split!r} (has {', '.join(loaded)})")
                loaded = loaded[split]
            return name, _read_dataset(loaded, name)
        files = sorted(
            p
            for p in path.rglob("*")
            if p.suffix.lower() in (".json", ".jsonl")
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataSourceError(f"{name}: folder holds no .json or .jsonl files")
        return name, _chain_files(files)
    if path.suffix.lower() in (".json", ".jsonl") or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"data file or folder not found: {name}")
    return f"hub:{name}[{split}]", _read_dataset(_load_hub(name, split), f"hub:{name}[{split}]")


def _chain_files(files: list[Path]) -> Iterator[_Item]:
    for f in files:
        yield from _read_file(f, str(f))


def _read_file(path: Path, origin: str) -> Iterator[_Item]:
    return (_read_jsonl if path.suffix.lower() in (".jsonl", ".ndjson") else _read_json)(path, origin)


def _load_hub(name: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DataSourceError(
            f"{name!r} is not a local file or folder, and loading it as a Hugging Face Hub dataset "
            f"(split {split!r}) failed: {type(e).__name__}: {e}"
        ) from e
