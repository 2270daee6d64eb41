"""The one atomic write: a reader sees the old file or the new one, never half, and no temp file."""

import os

import pytest

from calibration.atomic import atomic_path, atomic_write_text


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_the_temporary_keeps_the_suffix_and_the_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "frame.png"
    path.write_bytes(b"x")
    os.chmod(path, 0o640)
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".")
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o640
