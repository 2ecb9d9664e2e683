"""Small file-system helpers: the cache folder, crash-safe (write, then rename) outputs, JSON readers.

Modes: every file and folder written here gets the mode ``open()`` / ``mkdir()`` would give it
(``0o666 & ~umask`` for files, ``0o777 & ~umask`` for folders), not the private ``0o600`` / ``0o700`` of
``mkstemp`` / ``mkdtemp``, so a run folder is as readable as the user's umask allows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple


def cache_dir() -> Path:
    """Where converted models and prepared data splits are cached (`$NOISYFT_CACHE`, else ~/.cache/noisyft)."""
    root = os.environ.get("NOISYFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "noisyft")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def packaged_file(distribution: str, relpath: str, *, purpose: str, install: str) -> Path:
    """A data file shipped inside an installed PyPI distribution, located without importing the package.

    Raises FileNotFoundError naming `purpose` and the `install` command when the package or the file is missing.
    """
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"{purpose} needs the PyPI package {distribution!r}, which is not installed: `{install}`"
        ) from exc
    path = Path(str(dist.locate_file(relpath)))
    if not path.is_file():
        raise FileNotFoundError(
            f"{distribution} {dist.version} is installed but has no {relpath} (looked at {path}); "
            f"reinstall it: `{install}`"
        )
    return path


def iter_jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[int, str, dict]]:
    """``(line number, "FILE: line N", record)`` for every non-blank line of a JSONL file of objects.

    Strict: a line that is not valid JSON, or not a JSON object, raises ValueError naming the file and line.
    Lines are split on newlines only (iterating the file), not on U+2028 and the other separators that
    ``str.splitlines`` also splits on and that JSON strings may hold unescaped. A UTF-8 BOM is accepted.
    (The training-data reader, :mod:`noisyft.data`, collects bad records instead of raising.)
    """
    with open(path, encoding="utf-8-sig", newline="") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield lineno, where, record


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``), else by setting it back at once."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing; its folder must exist) between processes: POSIX
    `flock`, elsewhere none."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the whole new one, never a torn one.

    The file gets mode ``0o666 & ~umask``, as ``open(path, "w")`` would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` in one rename.

    If the body raises (or the process is killed), `path` keeps its previous content (or stays absent)
    and only a `.<name>.tmp-*` folder is left behind, which the next call cleans up. The folder gets mode
    ``0o777 & ~umask``, as ``mkdir`` would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


# --- JSON arrays, element by element --------------------------------------------------------------------


class ArrayElement(NamedTuple):
    """One element of a JSON array: its 1-based ``index``, its ``value`` (None when it does not parse), the
    character span ``[start, end)`` it occupies in the text, and ``error`` (a message) when it does not parse.
    ``unread`` is True when the scan could not find the next element after this broken one (the file is
    cut off inside it): the rest of the text, ``text[start:]``, was not read."""

    index: int
    value: Any
    start: int
    end: int
    error: str | None = None
    unread: bool = False


class JsonArrayStructureError(ValueError):
    """The text is not a JSON array, or its structure is broken in a way no element boundary can be found
    after (an unbalanced bracket mid-file). ``pos`` is the character offset, ``index`` the element number."""

    def __init__(self, message: str, text: str, pos: int, index: int) -> None:
        self.pos, self.index = pos, index
        self.line, self.column = line_column(text, pos)
        self.msg = message
        super().__init__(f"{message} (line {self.line}, column {self.column}, element {index})")


def line_column(text: str, pos: int) -> tuple[int, int]:
    """1-based (line, column) of character offset `pos` in `text`."""
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


_STRUCTURE = re.compile(r'["\\{}\[\],\n]')
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _next_boundary(text: str, start: int) -> tuple[str, int]:
    """From `start` (inside a top-level element), the next ``,`` at array depth outside strings
    (``("next", pos)``), the bracket that takes the depth back to 0 (``("close", pos)``), or
    ``("eof", len(text))``. A JSON string cannot hold a raw newline, so a newline ends a string left open
    by a missing quote."""
    depth, in_string, escaped_at = 1, False, -1
    for m in _STRUCTURE.finditer(text, start):
        c, pos = m.group(), m.start()
        if in_string:
            if pos == escaped_at:
                continue
            if c == "\\":
                escaped_at = pos + 1
            elif c in '"\n':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return "close", pos
        elif c == "," and depth == 1:
            return "next", pos
    return "eof", len(text)


def _broken(text: str, index: int, start: int, error: str) -> tuple[ArrayElement, int]:
    """The broken element `index` starting at `start`, and where the scan resumes (its ``,`` or ``]``)."""
    kind, pos = _next_boundary(text, start)
    if kind == "eof":
        if text.rstrip().endswith("]"):
            raise JsonArrayStructureError(
                f"element {index} is broken ({error}) and no later element boundary was found "
                "(an unbalanced bracket or quote?)",
                text,
                start,
                index,
            )
        return ArrayElement(index, None, start, len(text), error, unread=True), len(text)
    if kind == "close" and text[pos] != "]":
        raise JsonArrayStructureError(
            f"element {index} is broken ({error}) and closes with an unbalanced '{text[pos]}'",
            text,
            pos,
            index,
        )
    return ArrayElement(index, None, start, pos, error), pos


def scan_json_array(text: str) -> Iterator[ArrayElement]:
    """Yield the elements of the JSON array in `text` one at a time, resynchronizing after a broken one.

    A broken element (a trailing comma inside an object, a stray comma, a missing comma between two
    elements) is yielded with ``error`` set, and the scan resumes at the next element: the next ``,`` at
    the array's depth, outside strings. When the text ends inside an element (a file cut off mid-record),
    that element is yielded with ``unread=True`` and the scan stops. Raises :class:`JsonArrayStructureError`
    when `text` is not a JSON array, when something other than whitespace follows the closing ``]``, or
    when a broken element is followed by no element boundary although the text ends with ``]`` (an
    unbalanced bracket mid-file), so that no element is ever dropped without a position.
    """
    decoder = json.JSONDecoder()
    n = len(text)
    i = _WHITESPACE.match(text, 0).end()
    if not text.startswith("[", i):
        raise JsonArrayStructureError("expected a JSON array of records ('[')", text, i, 0)
    i = _WHITESPACE.match(text, i + 1).end()
    index = 0
    while not text.startswith("]", i):  # i: where element index + 1 starts
        index += 1
        if i >= n:
            yield ArrayElement(index, None, n, n, "end of text, no closing ']'", unread=True)
            return
        if text[i] == ",":
            element, i = _broken(text, index, i, "empty element (a stray ',')")
        else:
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as exc:
                element, i = _broken(text, index, i, f"{exc.msg} (line {exc.lineno}, column {exc.colno})")
            else:
                element, i = ArrayElement(index, value, i, end), _WHITESPACE.match(text, end).end()
                if i < n and text[i] not in ",]":  # two elements without a ',' between them
                    yield element
                    index += 1
                    element, i = _broken(text, index, i, "expected ',' or ']' before this element")
        yield element
        if element.unread:
            return
        if i < n and text[i] == ",":
            i = _WHITESPACE.match(text, i + 1).end()
            if text.startswith("]", i):  # a trailing comma: an empty last element
                index += 1
                yield ArrayElement(index, None, i, i, "empty element (a trailing ',' before ']')")
    if text[i + 1 :].strip():
        raise JsonArrayStructureError("extra data after the closing ']'", text, i + 1, index)
