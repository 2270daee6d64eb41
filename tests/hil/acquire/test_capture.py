"""Captures: each sample stored exactly once through SIGINT and SIGKILL; stores check themselves."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_run import run_hil
from identities import identity

from hil.acquire.identity import as_shown, check_source, pattern_hash
from hil.acquire.store import CaptureStore, Row, committed, read
from hil.data.datasets import load_dataset
from hil.data.sampling import stratified_fraction
from hil.errors import UserError

FPS = 10  # a paced camera: the 40 samples take 4 s, so a capture is cut midway whatever the load
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def paced_bench(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.toml"
    path.write_text(f"[sim.sensor]\nfps_limit = {FPS}\n")
    return path


def capture_cmd(calibration, bench, out):
    return [
        *(sys.executable, "-m", "hil", "capture", "--bench", str(bench)),
        *("--calibration", str(calibration), "--out", str(out)),
        *("--split", "test", "--fraction", "0.1", "--seed", "3"),
    ]


def capture(calibration, bench, out) -> None:
    done = subprocess.run(
        capture_cmd(calibration, bench, out),
        env=ENV,
        cwd=out.parent,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]


@pytest.fixture(scope="module")
def uninterrupted(calibration, paced_bench, tmp_path_factory):
    """The reference store: captured in the background while the interrupted runs go."""
    out = tmp_path_factory.mktemp("whole") / "whole.h5"
    proc = subprocess.Popen(
        capture_cmd(calibration, paced_bench, out),
        env=ENV,
        cwd=out.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    @functools.cache
    def finished():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr.decode()[-2000:]
        return read(out)

    yield finished
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("sig", "twice"),
    [
        (signal.SIGINT, False),
        (signal.SIGTERM, False),
        (signal.SIGKILL, False),
        (signal.SIGINT, True),
        (signal.SIGTERM, True),
    ],  # fmt: skip
    ids=["SIGINT", "SIGTERM", "SIGKILL", "SIGINT twice", "SIGTERM twice"],
)
def test_an_interrupted_capture_resumes_to_exactly_the_uninterrupted_store(
    calibration, paced_bench, uninterrupted, tmp_path, sig, twice
):
    """`twice`: the second signal lands while the writer stores what was taken (it once left
    the writer committing beside the store's close: a traceback, and exit 120)."""
    data = load_dataset("digits")
    planned = len(stratified_fraction(data.labels, data.split("test"), 0.1, 3))
    cut = tmp_path / "cut.h5"
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [*capture_cmd(calibration, paced_bench, cut), "--runs-dir", str(runs)],
        env=ENV,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # a shell's background job (CI's, perhaps) ignores SIGINT, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while committed(cut) < 1 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    if twice:
        time.sleep(0.02)
        proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    said = stderr.decode()
    assert "Traceback" not in said and "Exception" not in said, said
    if sig != signal.SIGKILL:  # a polite stop unwinds: recorded as interrupted, not failed
        assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], said
        record = json.loads(next(runs.glob("*-capture/result.json")).read_text())
        assert record["status"] == "interrupted"
    partial = committed(cut)
    assert 0 < partial < planned, f"the capture was not cut midway ({partial} of {planned})"
    if sig == signal.SIGKILL:  # the state a dead SWMR writer leaves, which the rerun must undo
        with pytest.raises(OSError, match="consistency flags"):
            h5py.File(cut, "a", libver="latest").close()
    capture(calibration, paced_bench, cut)
    resumed, reference = read(cut), uninterrupted()
    assert len(set(resumed.index.tolist())) == len(resumed.index) == planned  # each exactly once
    assert np.array_equal(resumed.index, reference.index)
    assert np.array_equal(resumed.labels, reference.labels)
    np.testing.assert_array_equal(resumed.features, reference.features)
    assert not cut.with_name("cut.h5.lock").exists()


def test_the_store_records_the_input_grid_and_where_the_display_showed_it(uninterrupted):
    store = uninterrupted()
    ident = store.identity
    assert (ident.input_shape, ident.display_scale) == ((32, 32), 1)
    assert (ident.display_origin, ident.display_shape) == ((0, 0), (32, 32))
    assert store.features.shape[-2:] == ident.input_shape
    data = load_dataset("digits")
    shown = as_shown(data.images[store.index], ident.input_shape)
    assert [h.decode() for h in store.meta["pattern_hash"]] == [pattern_hash(s) for s in shown]
    check_source("whole.h5", store, data)


def row(i: int, m: int = 2) -> Row:
    rng = np.random.default_rng(i)
    return Row(
        index=i,
        features=rng.random((m, 4, 4), dtype=np.float32),
        label=i % 3,
        timestamp_s=float(i),
        exposure_s=0.01,
        saturated_fraction=0.0,
        pattern_hash="ab" * 20,
        simulated=True,
    )


def open_store(path, n: int, ident=None) -> CaptureStore:
    return CaptureStore.open_for_capture(
        path,
        plan=np.arange(n),
        feature_shape=(2, 4, 4),
        label_shape=(),
        identity=ident or identity(dataset="x"),
    )


def make_store(path, n: int):
    with open_store(path, n) as store:
        for i in range(n):
            store.append(row(i))


def test_store_round_trip_and_uncommitted_rows_are_ignored(tmp_path):
    path = tmp_path / "s.h5"
    make_store(path, 5)
    with h5py.File(path, "a", libver="latest") as f:  # a row written but never committed
        f["features"].resize(6, axis=0)
        f["index"].resize(6, axis=0)
    got = read(path)
    assert got.index.tolist() == [0, 1, 2, 3, 4]
    assert got.labels.tolist() == [0, 1, 2, 0, 1]
    np.testing.assert_array_equal(got.features[3], row(3).features)
    with pytest.raises(UserError, match="different capture"):
        open_store(path, 5, ident=identity(dataset="y"))
    with pytest.raises(UserError, match="another list of samples"):
        open_store(path, 6)


def test_rows_are_committed_in_batches_and_a_resumed_store_continues_after_them(tmp_path):
    path = tmp_path / "s.h5"
    with open_store(path, 6) as store:
        for i in range(3):
            store.append(row(i))
        assert (store.count, store.pending, committed(path)) == (0, 3, 0)
        store.commit()
        assert (store.count, store.pending, committed(path)) == (3, 0, 3)
        store.append(row(3))
    assert committed(path) == 4  # closing commits what is pending
    with open_store(path, 6) as store:
        assert store.count == 4
        store.append(row(4))
        store.append(row(5))
    got = read(path)
    assert got.index.tolist() == list(range(6))
    np.testing.assert_array_equal(got.features, np.stack([row(i).features for i in range(6)]))


def test_a_second_writer_is_refused_while_the_first_holds_the_store(tmp_path):
    path = tmp_path / "s.h5"
    with open_store(path, 3) as store:
        store.append(row(0))
        with pytest.raises(UserError, match=rf"s\.h5: another process \(pid {os.getpid()}\)"):
            open_store(path, 3)
    assert not (tmp_path / "s.h5.lock").exists()
    with open_store(path, 3) as store:  # free again once the first writer closed it
        assert store.count == 1


def test_a_tampered_or_truncated_store_is_one_clear_error(tmp_path):
    path = tmp_path / "s.h5"
    make_store(path, 4)
    with h5py.File(path, "a", libver="latest") as f:
        f["features"][2, 0, 0, 0] += 1.0
    with pytest.raises(UserError, match=r"s\.h5: checksum mismatch .* dataset index 2"):
        read(path)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match=r"cut\.h5: truncated or corrupt"):
        read(cut)
    with pytest.raises(UserError, match=r"cut\.h5: cannot resume"):
        open_store(cut, 4)


def test_a_rehearsed_flaky_camera_captures_every_row_and_the_record_lists_the_retries(
    calibration, tmp_path, monkeypatch, capsys
):
    rehearsal = Path(__file__).resolve().parents[3] / "examples" / "rehearsal.toml"
    out = tmp_path / "r.h5"
    code, stdout, err = run_hil(
        monkeypatch, capsys, "capture", "--bench", rehearsal, "--calibration", calibration,
        "--out", out, "--split", "test", "--fraction", "0.6", "--json",
        "--runs-dir", tmp_path / "runs",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(stdout)
    camera = result["bench"]["devices"]["camera"]
    assert result["captured"] == result["planned"] >= 200
    assert [r["error"] for r in camera["retried"]] == [
        "DeviceTimeout",
        "DeviceTimeout",
        "DeviceDisconnected",
    ]
    assert {r["frame"] for r in camera["retried"]} == {50}
    assert read(out).index.tolist() == sorted(read(out).index.tolist())
    assert len(read(out).index) == result["planned"]
    record = json.loads(next((tmp_path / "runs").glob("*/result.json")).read_text())
    assert record["bench"]["devices"]["camera"]["retries"] == 3
