"""Small file-system helpers: the cache folder and crash-safe (write, then rename) outputs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the whole new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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
    and only a `.<name>.tmp-*` folder is left behind, which the next call cleans up.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
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
