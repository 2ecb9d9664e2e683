"""`_io`: artifacts get the modes `open()` / `mkdir()` would give them under the current umask."""

from __future__ import annotations

import os
import stat

import pytest

from noisyft import _io


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_and_folders_follow_the_umask(tmp_path, umask):
    assert _io.current_umask() == umask
    _io.atomic_write_text(tmp_path / "a.txt", "x")
    _io.atomic_write_json(tmp_path / "sub" / "b.json", {"a": 1})
    with _io.atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights.bin").write_bytes(b"0")
    reference_file = tmp_path / "ref.txt"
    reference_file.write_text("x")  # what open() gives
    (tmp_path / "ref_dir").mkdir()  # what mkdir() gives
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "sub" / "b.json") == mode(reference_file)
    assert mode(tmp_path / "a.txt") == 0o666 & ~umask
    assert mode(tmp_path / "model") == mode(tmp_path / "ref_dir") == 0o777 & ~umask
    assert mode(tmp_path / "model" / "weights.bin") == 0o666 & ~umask
