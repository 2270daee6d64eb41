"""Captures: each sample stored exactly once through SIGINT and SIGKILL; stores check themselves."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from calibration import calfile
from calibration.pipeline import Plan, calibrate
from hil.bench import Bench
from hil.calibrate import design_of
from hil.config import BenchConfig
from hil.errors import UserError
from hil.store import CaptureStore, Row, read
from sim.clock import VirtualClock


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    bench = Bench(BenchConfig(), clock=VirtualClock())
    with bench:
        cal = calibrate(bench, design_of(bench), Plan(patterns=16))
    return calfile.save(cal, tmp_path_factory.mktemp("cal") / "cal.h5")


def capture_cmd(calibration, out, *extra):
    return [
        sys.executable,
        "-m",
        "hil",
        "capture",
        "--calibration",
        str(calibration),
        "--out",
        str(out),
        "--split",
        "test",
        "--fraction",
        "0.25",
        "--seed",
        "3",
        *extra,
    ]


def committed(path) -> int:
    try:
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            return int(f.attrs["count"])
    except (OSError, KeyError):
        return 0


@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_an_interrupted_capture_resumes_to_exactly_the_uninterrupted_store(
    calibration, tmp_path, sig
):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole.h5"
    subprocess.run(
        capture_cmd(calibration, whole),
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    cut = tmp_path / "cut.h5"
    proc = subprocess.Popen(
        capture_cmd(calibration, cut),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while committed(cut) < 15 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    partial = committed(cut)
    reference = read(whole)
    assert 15 <= partial < len(reference.index), "the capture was not cut midway"
    subprocess.run(
        capture_cmd(calibration, cut),
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    resumed = read(cut)
    assert sorted(resumed.index.tolist()) == sorted(set(resumed.index.tolist()))  # once each
    assert np.array_equal(resumed.index, reference.index)
    assert np.array_equal(resumed.labels, reference.labels)
    np.testing.assert_array_equal(resumed.features, reference.features)


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


def make_store(path, n: int):
    store = CaptureStore.open_for_capture(
        path, plan=np.arange(n), feature_shape=(2, 4, 4), label_shape=(), identity={"dataset": "x"}
    )
    with store:
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
    np.testing.assert_array_equal(got.features[3], row(3).features)
    with pytest.raises(UserError, match="different capture"):
        CaptureStore.open_for_capture(
            path,
            plan=np.arange(5),
            feature_shape=(2, 4, 4),
            label_shape=(),
            identity={"dataset": "y"},
        )


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
