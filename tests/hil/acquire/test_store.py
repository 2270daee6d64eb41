"""The capture store through kills at creation, edited rows and a full disk: no row lost, no
damaged row counted."""

import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from identities import identity
from stores import rewrite_row

from hil.acquire import store as store_module
from hil.acquire.store import CaptureStore, Row, StoreFull, committed, read
from hil.errors import UserError


def row(i: int, size: int = 4) -> Row:
    rng = np.random.default_rng(i)
    return Row(i, rng.random((2, size, size), dtype=np.float32), i % 3, float(i), 0.01, 0.0,
               "ab" * 20, True)  # fmt: skip


def open_store(path, n: int, size: int = 4) -> CaptureStore:
    return CaptureStore.open_for_capture(
        path, plan=np.arange(n), feature_shape=(2, size, size), label_shape=(),
        identity=identity(dataset="x"),
    )  # fmt: skip


def killed_before_the_rename(monkeypatch, path, rows: int) -> None:
    """`open_store(path, rows)` in a process that dies just before its file is renamed into
    place (a KeyboardInterrupt where os.replace would run)."""

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        open_store(path, rows)
    monkeypatch.undo()


def test_a_kill_while_the_store_is_created_leaves_no_store_and_the_rerun_starts_clean(
    tmp_path, monkeypatch
):
    path = tmp_path / "s.h5"
    killed_before_the_rename(monkeypatch, path, 3)  # after writing the schema
    assert not path.exists()
    assert (tmp_path / ".s.h5.create.tmp").exists()  # what the kill left
    with open_store(path, 3) as store:
        assert store.count == 0
        store.append(row(0))
    assert read(path).index.tolist() == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


DIE_WRITING = """
import os, sys
sys.path[:0] = {paths!r}
from test_store import open_store, row
store = open_store({path!r}, 6)
for i in range(4):
    store.append(row(i))
store.commit()
os._exit(0)  # a writer killed with the file open: HDF5's "open for writing" flags stay set
"""


def test_a_kill_while_a_rerun_recovers_the_store_loses_nothing(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    here = [
        str(Path(__file__).parents[3]),
        str(Path(__file__).parents[2]),
        str(Path(__file__).parent),
    ]
    code = DIE_WRITING.format(paths=here, path=str(path))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    with pytest.raises(OSError, match="consistency flags"):
        h5py.File(path, "a", libver="latest").close()
    killed_before_the_rename(monkeypatch, path, 6)  # the rerun, after rewriting the rows
    with open_store(path, 6) as store:  # the next rerun recovers again and goes on
        assert store.count == 4
        for i in range(4, 6):
            store.append(row(i))
    got = read(path)
    assert got.index.tolist() == list(range(6))
    np.testing.assert_array_equal(got.features[3], row(3).features)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        ({"index": 1}, "row 2 holds dataset index 1, the plan says 2"),
        ({"index": 10**9}, "row 2 holds dataset index 1000000000, the plan says 2"),
        ({"features": np.full((2, 4, 4), np.nan, np.float32)}, "non-finite feature maps in 1"),
    ],
)
def test_rows_rewritten_with_their_checksums_are_still_refused(tmp_path, edit, said):
    path = tmp_path / "s.h5"
    with open_store(path, 4) as store:
        for i in range(4):
            store.append(row(i))
    rewrite_row(path, 2, **edit)
    with pytest.raises(UserError, match=f"^{path}: {re.escape(said)}"):
        read(path)


@pytest.mark.parametrize("field", ["labels", "index"])
def test_labels_and_indices_are_inside_the_row_checksum(tmp_path, field):
    path = tmp_path / "s.h5"
    with open_store(path, 4) as store:
        for i in range(4):
            store.append(row(i))
    with h5py.File(path, "a", libver="latest") as f:
        f[field][2] = 99
    with pytest.raises(UserError, match=r"checksum mismatch in 1 rows \(first: row 2"):
        read(path)


def test_a_rerun_recaptures_from_the_first_damaged_row_instead_of_appending_after_it(
    tmp_path, caplog
):
    path = tmp_path / "s.h5"
    with open_store(path, 6) as store:
        for i in range(5):
            store.append(row(i))
    with h5py.File(path, "a", libver="latest") as f:
        f["features"][3] = 0.0  # what a disk that lost writes leaves
    with open_store(path, 6) as store:
        assert store.count == 3
        for i in range(3, 6):
            store.append(row(i))
    assert "1 of 5 committed rows fail their checksum (first: row 3)" in caplog.text
    got = read(path)
    assert got.index.tolist() == list(range(6))
    np.testing.assert_array_equal(got.features, np.stack([row(i).features for i in range(6)]))


def test_a_full_disk_stops_the_capture_with_every_committed_row_intact(small_disk):
    path, n = small_disk / "s.h5", 400  # 400 rows of 32 KiB: three times the disk
    store = open_store(path, n, size=64)
    with pytest.raises(StoreFull, match=r"disk full .* committed rows are intact"):
        for i in range(n):
            store.append(row(i, 64))
            if store.pending == 8:
                store.commit()
    kept = store.count
    store.close()
    assert 0 < kept < n and committed(path) == kept
    got = read(path)  # every committed row is the row captured, checksums and all
    assert got.index.tolist() == list(range(kept))
    np.testing.assert_array_equal(got.features[-1], row(kept - 1, 64).features)
    subprocess.run(["mount", "-o", "remount,size=32m", str(small_disk)], check=True)
    with open_store(path, n, size=64) as store:  # space freed: the rerun resumes after them
        assert store.count == kept
        for i in range(kept, n):
            store.append(row(i, 64))
    assert read(path).index.tolist() == list(range(n))
