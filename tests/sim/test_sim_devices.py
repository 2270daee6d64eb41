"""The simulated backends under the device contracts, their fault injection, and the Bench."""

import numpy as np
import pytest
from contracts import CameraContract, DisplayContract, LightSourceContract, PowerMeterContract

from drivers.errors import DeviceDisconnected, DeviceError, DeviceTimeout
from drivers.protocols import FaultInjection, RetryPolicy
from hil.bench.assembly import Bench
from hil.bench.config import parse_bench
from sim.clock import RealClock, VirtualClock
from sim.devices import SimCamera, SimDisplay, SimLightSource, SimPowerMeter
from sim.layout import TileLayout
from sim.params import SimParams
from sim.psf_frontend import PSFFrontend
from sim.world import SimWorld


def world(clock=None) -> SimWorld:
    """A world fabricated from 8 signed 7x7 random kernels, tiled on the sensor in a 4x4 grid."""
    psfs = PSFFrontend(8, 7, 1, True, trainable=False).psfs
    layout = TileLayout.grid(16, (32, 32), 4, True)
    return SimWorld(SimParams(), psfs, True, layout, clock or VirtualClock())


class TestSimCameraContract(CameraContract):
    expect_simulated = True

    def make(self, tmp_path):
        return SimCamera(world())

    def make_stalled(self, tmp_path):
        cam = SimCamera(world(RealClock()))  # real time: the contract measures it
        cam.inject(stall=True)
        return cam


class TestSimDisplayContract(DisplayContract):
    expect_simulated = True

    def make(self, tmp_path):
        return SimDisplay(world())

    def read_back(self, device):
        return device.world.levels[0].numpy()


class TestSimLightContract(LightSourceContract):
    expect_simulated = True

    def make(self, tmp_path):
        return SimLightSource(world())

    def read_state(self, device):
        return device.world.sources[device.name]


class TestSimPowerMeterContract(PowerMeterContract):
    expect_simulated = True

    def make(self, tmp_path):
        return SimPowerMeter(world())


def test_power_meter_reads_the_light_leaving_the_display():
    w = world()
    meter, light, display = SimPowerMeter(w), SimLightSource(w), SimDisplay(w)
    with meter, light, display:
        assert meter.read_w() == 0.0
        light.on()
        display.show(np.ones(display.shape, np.float32))
        full = meter.read_w()
        display.show(np.full(display.shape, 0.5, np.float32))
        half = meter.read_w()
    gamma = w.params.display.gamma
    assert half / full == pytest.approx((128 / 255) ** gamma, rel=0.01)


def test_a_disconnected_camera_comes_back_with_reconnect():
    cam = SimCamera(world())
    cam.retry = RetryPolicy(retries=0)
    with cam:
        cam.snap(1.0)
        cam.inject(disconnect=True)
        with pytest.raises(DeviceDisconnected):
            cam.snap(1.0)
        cam.reconnect()
        assert cam.snap(1.0).image.shape == cam.shape


def test_injected_timeouts_and_corrupt_frames_surface_as_typed_errors():
    cam = SimCamera(world())
    cam.retry = RetryPolicy(retries=0)
    with cam:
        cam.inject(timeouts=2, corrupt=1)
        for _ in range(2):
            with pytest.raises(DeviceTimeout):
                cam.snap(0.5)
        with pytest.raises(DeviceError, match="corrupt"):
            cam.snap(0.5)
        cam.snap(0.5)


MISSING_LED = {"visa_library": "sim", "resource": "USB0::0x0::0x0::NOPE::INSTR", "max_current_a": 1}


def bench_file(**devices) -> Bench:
    return Bench(parse_bench({"devices": devices}), clock=VirtualClock())


def test_exception_inside_bench_leaves_every_light_off_and_the_display_blank():
    bench = bench_file(shutter={"backend": "sim"}, power_meter={"backend": "sim"})
    with pytest.raises(KeyboardInterrupt), bench:
        for source in bench.light_sources:
            source.on()
        bench.display.show(np.ones(bench.display.shape, np.float32))
        assert bench.world.light_level == 1.0
        raise KeyboardInterrupt
    assert bench.world.light_level == 0.0
    assert all(on is False for on, _ in bench.world.sources.values())
    assert float(bench.world.levels.max()) == 0.0
    assert not any(d.is_open for d in bench.devices.values())


def test_light_passes_only_when_light_and_shutter_are_both_on():
    bench = bench_file(shutter={"backend": "sim"})
    with bench:
        bench.light.on()
        assert bench.world.light_level == 0.0
        bench.devices["shutter"].on()
        bench.light.level = 0.5
        assert bench.world.light_level == 0.5


def test_auto_falls_back_to_the_simulated_device_loudly(caplog):
    bench = bench_file(camera={"backend": "auto", "real": "sim"})
    assert not bench.fallbacks  # the "real" one here is the simulator itself, and it opens
    bench = bench_file(light={"backend": "auto", "real": "visa", **MISSING_LED})
    with caplog.at_level("WARNING", logger="hil"), bench:
        assert bench.light.simulated
        snapshot = bench.snapshot()
    assert snapshot["simulated"] is True and len(snapshot["fallbacks"]) == 1
    assert "SIMULATED" in caplog.text and "devices.light" in caplog.text


def test_a_device_that_cannot_open_fails_the_bench_but_the_lights_still_go_off():
    bench = bench_file(shutter={"backend": "sim"}, light={"backend": "visa", **MISSING_LED})
    with pytest.raises(DeviceError, match="NOPE"), bench:
        pass
    assert bench.world.light_level == 0.0 and not bench.devices["shutter"].is_open
    rows = {r["role"]: r for r in bench_file(light={"backend": "visa", **MISSING_LED}).probe()}
    assert rows["light"]["state"] == "failed" and "NOPE" in rows["light"]["detail"]["error"]
    assert rows["camera"]["state"] == "ok"


def test_exception_inside_bench_switches_a_visa_led_off_at_the_instrument():
    pyvisa = pytest.importorskip("pyvisa")
    from drivers.visa_instruments import resolve_visa_library

    led = {
        "backend": "visa",
        "visa_library": "sim",
        "max_current_a": 0.8,
        "resource": "USB0::0x1313::0x80C8::M00000001::INSTR",
    }
    bench = bench_file(light=led)
    with pytest.raises(RuntimeError, match="mid-capture"), bench:
        bench.light.level = 0.5
        bench.light.on()
        bench.display.show(np.ones(bench.display.shape, np.float32))
        assert bench.world.light_level == 0.5  # the simulated camera sees the real LED
        raise RuntimeError("mid-capture")
    rm = pyvisa.ResourceManager(resolve_visa_library("sim"))
    inst = rm.open_resource(led["resource"], read_termination="\n", write_termination="\n")
    try:
        assert inst.query("OUTP?").strip().upper() in ("OFF", "0")
    finally:
        inst.close()
    assert float(bench.world.levels.max()) == 0.0 and bench.world.light_level == 0.0


def test_transient_faults_are_retried_and_recorded_and_the_frame_still_arrives():
    cam = SimCamera(world())
    cam.retry = RetryPolicy(retries=3, retry_backoff_s=0.0)
    cam.faults = FaultInjection(timeouts=2, disconnects=1, after_frames=3, wait_s=0.0)
    with cam:
        cam.exposure_s = 0.004
        frames = [cam.snap(0.5) for _ in range(6)]
        cam.inject(corrupt=1)
        frames.append(cam.snap(0.5))
    assert [f.frame_id for f in frames] == [1, 2, 3, 4, 5, 6, 8]  # 7 came corrupt
    assert [(r["frame"], r["attempt"], r["error"]) for r in cam.retried] == [
        (3, 1, "DeviceTimeout"),
        (3, 2, "DeviceTimeout"),
        (3, 3, "DeviceDisconnected"),
        (6, 1, "DeviceError"),
    ]
    assert frames[3].exposure_s == 0.004  # set again after the reconnect
    assert cam.snapshot()["retries"] == 4


def test_a_persistent_fault_is_the_typed_error_naming_the_attempts():
    cam = SimCamera(world())
    cam.retry = RetryPolicy(retries=2, retry_backoff_s=0.0)
    with cam:
        cam.inject(timeouts=3)
        with pytest.raises(
            DeviceTimeout, match=r"no frame within 0.5 s \(gave up after 3 attempts\)"
        ):
            cam.snap(0.5)
    assert len(cam.retried) == 2


def test_a_bench_file_sets_the_retry_policy_and_the_faults_to_rehearse():
    bench = bench_file(
        camera={"retries": 2, "retry_backoff_s": 0.0, "inject": {"timeouts": 1, "wait_s": 0.0}}
    )
    with bench:
        bench.camera.snap(1.0)
    assert bench.camera.retry == RetryPolicy(retries=2, retry_backoff_s=0.0)
    assert bench.camera.snapshot()["retries"] == 1
    assert bench.camera.snapshot()["injected"]["timeouts"] == 1
