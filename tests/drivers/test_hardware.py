"""The device contracts against a real bench: `HIL_HARDWARE_BENCH=bench.toml pytest -m hardware`.

Deselected by default (and in CI); each test runs only for the roles the bench file configures
with a real backend.
"""

import os

import numpy as np
import pytest
from contracts import SNAP_TIMEOUT_S, CameraContract

from hil.bench.assembly import Bench
from hil.bench.config import load_bench

pytestmark = pytest.mark.hardware
BENCH = os.environ.get("HIL_HARDWARE_BENCH")


def bench() -> Bench:
    if not BENCH:
        pytest.skip("set HIL_HARDWARE_BENCH to a bench file describing real devices")
    return Bench(load_bench(BENCH))


def real_device(role: str):
    device = bench().devices.get(role)
    if device is None or device.simulated:
        pytest.skip(f"the bench file has no real {role}")
    return device


class TestRealCameraContract(CameraContract):
    expect_simulated = False

    def make(self, tmp_path):
        return real_device("camera")


def test_real_light_switches_and_goes_off_on_close():
    light = real_device("light")
    light.open()
    try:
        light.on()
        assert light.is_on
        light.off()
        assert not light.is_on
        light.on()
    finally:
        light.close()
    assert not light.is_on


def test_real_display_light_reaches_the_real_camera():
    b = bench()
    if b.camera.simulated or b.display.simulated:
        pytest.skip("needs a real display and a real camera")
    with b:
        for source in b.light_sources:
            source.on()
        b.display.show(np.zeros(b.display.shape, np.float32))
        dark = b.camera.snap(SNAP_TIMEOUT_S).image.mean()
        b.display.show(np.ones(b.display.shape, np.float32))
        lit = b.camera.snap(SNAP_TIMEOUT_S).image.mean()
    assert lit > dark + 5 * np.sqrt(max(dark, 1.0))
