"""Fixtures the hil tests share."""

import pytest

from calibration import calfile
from calibration.pipeline import Plan, calibrate
from hil.bench.assembly import Bench
from hil.bench.config import BenchConfig
from sim.clock import VirtualClock


@pytest.fixture(scope="session")
def calibration(tmp_path_factory):
    """One calibration of the default simulated bench per test session, whichever module asks."""
    path = tmp_path_factory.getbasetemp() / "capture-calibration.h5"
    bench = Bench(BenchConfig(), clock=VirtualClock())
    with bench:
        cal = calibrate(bench, bench.design, Plan(patterns=16))
    calfile.save(cal, path)
    return path
