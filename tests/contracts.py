"""One contract per device protocol, run against every backend that can run here.

A backend's test module subclasses a contract and supplies `make(tmp_path)` (an unopened device)
plus the hooks that read back what the device really did (a screenshot, the instrument's state).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from drivers.errors import DeviceDisconnected, DeviceError, DeviceTimeout
from drivers.protocols import SNAP_TIMEOUT_S, Camera, Display, LightSource, PowerMeter, RetryPolicy


class DeviceContract:
    expect_simulated: bool = False

    def make(self, tmp_path):
        raise NotImplementedError

    @pytest.fixture
    def device(self, tmp_path):
        dev = self.make(tmp_path)
        try:
            yield dev
        finally:
            dev.close()

    def test_open_and_close_are_idempotent(self, device):
        device.open()
        device.open()
        assert device.is_open
        device.close()
        device.close()
        assert not device.is_open

    def test_snapshot_is_json_and_says_whether_simulated(self, device):
        with device:
            snap = device.snapshot()
        assert json.loads(json.dumps(snap, default=str))["simulated"] is self.expect_simulated
        assert snap["kind"] == device.kind and snap["backend"] == device.backend

    def test_reconnect_leaves_it_open_and_working(self, device):
        device.open()
        device.reconnect()
        assert device.is_open
        self.exercise(device)

    def exercise(self, device) -> None:
        """One ordinary call of the protocol."""
        raise NotImplementedError


class CameraContract(DeviceContract):
    def exercise(self, device: Camera) -> None:
        device.snap(SNAP_TIMEOUT_S)

    def make_stalled(self, tmp_path) -> Camera | None:
        """An unopened camera whose frames never arrive, or None if the backend cannot make one."""
        return None

    def test_frames_have_the_declared_shape_range_and_metadata(self, device: Camera):
        with device:
            frames = [device.snap(SNAP_TIMEOUT_S) for _ in range(3)]
        for f in frames:
            assert f.image.shape == device.shape
            assert np.issubdtype(f.image.dtype, np.integer)
            assert f.image.min() >= 0 and f.image.max() <= device.max_dn
            assert f.simulated is self.expect_simulated
            assert f.exposure_s == pytest.approx(device.exposure_s, rel=1e-6)
        ids = [f.frame_id for f in frames]
        assert ids == sorted(set(ids))
        stamps = [f.timestamp_s for f in frames]
        assert stamps == sorted(stamps)

    def test_exposure_is_bounded_and_round_trips(self, device: Camera):
        lo, hi = device.exposure_range_s
        with device:
            target = min(max(lo * 4, 0.004), hi)
            device.exposure_s = target
            assert device.exposure_s == pytest.approx(target, rel=0.05)
            with pytest.raises(ValueError):
                device.exposure_s = hi * 2
            with pytest.raises(ValueError):
                device.exposure_s = lo / 2

    def test_snap_needs_a_finite_timeout_and_an_open_camera(self, device: Camera):
        with pytest.raises(DeviceDisconnected):
            device.snap(SNAP_TIMEOUT_S)
        with device:
            for bad in (0.0, -1.0, math.inf, math.nan):
                with pytest.raises(ValueError):
                    device.snap(bad)

    def test_a_frame_that_never_arrives_times_out_on_time(self, tmp_path):
        cam = self.make_stalled(tmp_path)
        if cam is None:
            pytest.skip("this backend cannot be made to stall")
        cam.retry = RetryPolicy(retries=0)  # one attempt; retries are the protocol's, tested once
        with cam:
            t0 = time.monotonic()
            with pytest.raises(DeviceTimeout, match="gave up after 1 attempts"):
                cam.snap(timeout_s=1.0)
            assert time.monotonic() - t0 < 1.0 + 0.5


class DisplayContract(DeviceContract):
    def read_back(self, device: Display) -> np.ndarray:
        """What the display shows now, as levels in [0, 1] of the display's shape."""
        raise NotImplementedError

    def exercise(self, device: Display) -> None:
        device.show(np.zeros(device.shape, np.uint8))

    def test_shown_image_is_what_the_display_shows_pixel_for_pixel(self, device: Display):
        rng = np.random.default_rng(0)
        top = 2**device.bit_depth - 1
        image = rng.integers(0, top + 1, size=device.shape, dtype=np.uint16)
        with device:
            device.show(image)
            np.testing.assert_array_equal(np.round(self.read_back(device) * top), image)
            device.blank()
            assert self.read_back(device).max() == 0

    def test_bad_images_are_refused(self, device: Display):
        with device:
            with pytest.raises(ValueError):
                device.show(np.zeros((device.shape[0] + 1, *device.shape[1:]), np.uint8))
            with pytest.raises(ValueError):
                device.show(np.full(device.shape, 1.5, np.float32))
            with pytest.raises(ValueError):
                device.show(np.full(device.shape, np.nan, np.float32))
            with pytest.raises(TypeError):
                device.show(np.zeros(device.shape, bool))

    def test_show_on_a_closed_display_raises_disconnected(self, device: Display):
        with pytest.raises(DeviceDisconnected):
            device.show(np.zeros(device.shape, np.uint8))


class LightSourceContract(DeviceContract):
    supports_level = True

    def read_state(self, device: LightSource) -> tuple[bool, float]:
        """(on, level) as the instrument itself reports it; must work after close too."""
        raise NotImplementedError

    def exercise(self, device: LightSource) -> None:
        device.off()

    def test_switching_reaches_the_instrument(self, device: LightSource):
        with device:
            device.on()
            assert self.read_state(device)[0] is True
            if self.supports_level:
                device.level = 0.25
                assert self.read_state(device)[1] == pytest.approx(0.25, abs=1e-3)
            device.off()
            assert self.read_state(device)[0] is False
            with pytest.raises(ValueError):
                device.level = 1.5

    def test_closing_switches_the_light_off(self, device: LightSource):
        device.open()
        device.on()
        device.close()
        assert self.read_state(device)[0] is False

    def test_switching_a_closed_source_raises_disconnected(self, device: LightSource):
        with pytest.raises(DeviceDisconnected):
            device.on()
        device.off()  # off is always safe


class PowerMeterContract(DeviceContract):
    def exercise(self, device: PowerMeter) -> None:
        device.read_w(SNAP_TIMEOUT_S)

    def test_readings_are_finite_watts(self, device: PowerMeter):
        with device:
            values = [device.read_w(SNAP_TIMEOUT_S) for _ in range(3)]
        assert all(math.isfinite(v) and v >= 0 for v in values)

    def test_reading_a_closed_meter_raises_disconnected(self, device: PowerMeter):
        with pytest.raises((DeviceDisconnected, DeviceError)):
            device.read_w(SNAP_TIMEOUT_S)
