"""The GenICam backend on the simulated GenTL producer shipped in the genicam wheel.

genicam 1.4.0's TLSimu.cti offers two mono (512x512 Mono8) and two colour (768x572 RGB8) devices
with a software trigger. Its test pattern is known, so frames are checked pixel for pixel:
mono frame n is (x + y + n) mod 256; colour frame n is R = y + n, G = x + n, B = n (mod 256),
with n the buffer's frame id. Paths a simulator lacks (exposure and gain nodes) run against a
fake node map through the same code.
"""

from __future__ import annotations

import shutil
import time
from types import SimpleNamespace

import numpy as np
import pydantic
import pytest
from contracts import CameraContract

from drivers.errors import DeviceDisconnected, DeviceError, DeviceTimeout
from drivers.genicam_camera import GenICamCamera, find_simulated_producer, to_mono
from drivers.protocols import RetryPolicy

PRODUCER = find_simulated_producer()
IS_TLSIMU = PRODUCER is not None and PRODUCER.name == "TLSimu.cti"

needs_producer = pytest.mark.skipif(
    PRODUCER is None,
    reason="no simulated GenTL producer (*.cti) in the installed genicam package "
    "(genicam 1.4.0 ships TLSimu.cti, 1.6 viky.cti, 1.5.x none)",
)
needs_tlsimu = pytest.mark.skipif(
    not IS_TLSIMU,
    reason="needs genicam 1.4.0's TLSimu.cti (software trigger, known test pattern); "
    f"found {PRODUCER}",
)

MONO_A, COLOUR_A, MONO_B = "SN_InterfaceA_0", "SN_InterfaceA_1", "SN_InterfaceB_0"
TRIGGER = "software" if IS_TLSIMU else "free_run"  # viky (genicam 1.6) only free-runs


def camera(name="cam", **options) -> GenICamCamera:
    options.setdefault("trigger", TRIGGER)
    return GenICamCamera(name, GenICamCamera.Options(**options))


def mono_pattern(n: int, shape=(512, 512)) -> np.ndarray:
    y, x = np.indices(shape)
    return ((x + y + n) % 256).astype(np.uint8)


def colour_luma_pattern(n: int, shape=(572, 768)) -> np.ndarray:
    y, x = np.indices(shape)
    r, g, b = (y + n) % 256, (x + n) % 256, np.full(shape, n % 256)
    return ((299 * r + 587 * g + 114 * b + 500) // 1000).astype(np.uint8)


@needs_producer
class TestGenICamContract(CameraContract):
    expect_simulated = True

    def make(self, tmp_path):
        return camera("genicam-sim", index=0)

    def make_stalled(self, tmp_path):
        if not IS_TLSIMU:
            return None  # viky free-runs: it cannot be kept from delivering
        cam = camera("genicam-stalled", serial=MONO_A, trigger="software")
        cam._fire_trigger = lambda: None  # armed for a software trigger that never comes
        return cam


@pytest.fixture(scope="module")
def mono():
    """One open TLSimu mono camera shared by the tests: closing a TLSimu device takes up to 0.5 s
    (its acquisition thread stops on a 500 ms tick), so tests open their own only when they must.
    """
    if not IS_TLSIMU:
        pytest.skip("needs genicam 1.4.0's TLSimu.cti")
    with camera("mono", serial=MONO_B, fixed_exposure_s=0.02) as cam:
        yield cam


# --- frames against the simulator's known pattern ---------------------------------------------


def test_mono_frames_are_tlsimus_diagonal_ramp(mono):
    assert mono.shape == (512, 512) and mono.bit_depth == 8 and mono.pixel_format == "Mono8"
    for _ in range(3):
        f = mono.snap(2.0)
        assert f.image.dtype == np.uint8
        np.testing.assert_array_equal(f.image, mono_pattern(f.meta["device_frame_id"]))
        assert f.frame_id == f.meta["device_frame_id"]
        assert f.meta["pixel_format"] == "Mono8" and f.meta["device_serial"] == MONO_B


@needs_tlsimu
def test_colour_frames_in_free_run_are_bt601_luma_of_tlsimus_rgb_ramps():
    with camera(serial=COLOUR_A, trigger="free_run") as cam:
        assert cam.shape == (572, 768) and cam.bit_depth == 8 and cam.pixel_format == "RGB8"
        frames = [cam.snap(2.0) for _ in range(3)]
        assert cam.snapshot()["trigger"] == "free_run"
    ids = [f.frame_id for f in frames]
    assert ids == sorted(set(ids))
    for f in frames:
        assert f.image.dtype == np.uint8 and f.meta["pixel_format"] == "RGB8"
        np.testing.assert_array_equal(f.image, colour_luma_pattern(f.frame_id))


def test_frames_are_copies_that_outlive_the_buffer_ring(mono):
    """More frames than the producer has buffers: each must still hold its own pattern."""
    frames = [mono.snap(2.0) for _ in range(mono._ia.num_buffers + 4)]
    frames[0].image[:] = 0
    assert frames[1].image.max() == 255
    for f in frames[1:]:
        assert f.image.flags.owndata  # not a view of anything the producer may reuse
        np.testing.assert_array_equal(f.image, mono_pattern(f.meta["device_frame_id"]))
    nxt = mono.snap(2.0)
    np.testing.assert_array_equal(nxt.image, mono_pattern(nxt.meta["device_frame_id"]))


def test_a_snap_drops_frames_triggered_before_it(mono):
    """With a software trigger the snap returns the frame of its own trigger, not a queued one."""
    last = mono.snap(2.0).frame_id
    for _ in range(2):
        mono._fire_trigger()
        time.sleep(0.05)  # delivered by now (TLSimu takes ~5 ms), and not merged with the next
    f = mono.snap(2.0)
    assert f.frame_id == last + 3
    np.testing.assert_array_equal(f.image, mono_pattern(f.frame_id))


@needs_tlsimu
def test_a_stalled_camera_times_out_then_recovers():
    cam = camera(serial=MONO_A, trigger="software")
    cam._fire_trigger = lambda: None
    cam.retry = RetryPolicy(retries=0)  # one attempt's timeout (retries: tests/sim)
    with cam:
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout, match="no frame within 0.3 s"):
            cam.snap(0.3)
        assert 0.3 <= time.monotonic() - t0 < 0.3 + 0.2
        del cam._fire_trigger  # the trigger works again
        f = cam.snap(2.0)
    assert f.frame_id == 0
    np.testing.assert_array_equal(f.image, mono_pattern(0))


# --- opening: devices, producers, pixel formats -----------------------------------------------


@needs_tlsimu
def test_two_cameras_share_one_producer_and_a_device_opens_once(mono):
    """A GenTL producer loads once per process; a second Harvester on it would see no devices."""
    with camera("a", serial=MONO_A) as a:
        fa, fb = a.snap(2.0), mono.snap(2.0)
        np.testing.assert_array_equal(fa.image, mono_pattern(fa.frame_id))
        np.testing.assert_array_equal(fb.image, mono_pattern(fb.frame_id))
        twin = camera("twin", serial=MONO_A)
        with pytest.raises(DeviceError, match="cannot open SN_InterfaceA_0"):
            twin.open()
        assert not twin.is_open
    assert mono.snap(2.0).image.shape == (512, 512)  # closing the others left it working


@needs_tlsimu
def test_unknown_device_raises_disconnected_listing_what_exists():
    with pytest.raises(DeviceDisconnected) as err:
        camera(serial="no-such-serial").open()
    message = str(err.value)
    assert "'no-such-serial'" in message
    for serial, model in [(MONO_A, "TLSimuMono"), (COLOUR_A, "TLSimuColor"), (MONO_B, "")]:
        assert f"{serial} ({model}" in message
    with pytest.raises(DeviceDisconnected, match=r"no device #4 .* SN_InterfaceB_1"):
        camera(index=4).open()


def test_missing_producer_raises_device_error_naming_it(tmp_path):
    path = tmp_path / "vendor" / "Missing.cti"
    cam = camera(producer=str(path))
    assert cam.simulated is False
    with pytest.raises(DeviceError, match="Missing.cti") as err:
        cam.open()
    assert str(path) in str(err.value) and not isinstance(err.value, DeviceDisconnected)
    assert not cam.is_open


def test_a_producer_that_will_not_load_raises_device_error_naming_it(tmp_path):
    garbage = tmp_path / "Garbage.cti"
    garbage.write_bytes(b"not a shared library")
    cam = camera(producer=str(garbage))
    with pytest.raises(DeviceError, match=r"cannot load GenTL producer .*Garbage\.cti") as err:
        cam.open()
    assert not isinstance(err.value, DeviceDisconnected) and not cam.is_open


@needs_tlsimu
def test_a_renamed_simulator_is_still_flagged_simulated_by_its_devices(tmp_path):
    shutil.copy(PRODUCER, tmp_path / "Vendor.cti")
    shutil.copy(PRODUCER.parent / "libVirtualFG.so", tmp_path)
    cam = camera(producer=str(tmp_path / "Vendor.cti"), serial=MONO_A)
    assert cam.simulated is False  # nothing known before it opens
    with cam:
        assert cam.simulated is True  # the device calls itself TLSimuMono
        assert cam.snap(2.0).simulated is True
        assert cam.snapshot()["simulated"] is True


@needs_tlsimu
def test_a_pixel_format_the_producer_ignores_is_caught():
    """TLSimu accepts PixelFormat = Mono12 but still sends Mono8: frames must not pass as 12-bit."""
    with camera(serial=MONO_A, pixel_format="Mono12") as cam:
        assert cam.bit_depth == 12
        with pytest.raises(DeviceError, match="delivered Mono8 but declares Mono12"):
            cam.snap(2.0)


def test_unsupported_pixel_formats_are_refused_by_the_options():
    with pytest.raises(pydantic.ValidationError):
        GenICamCamera.Options(pixel_format="Mono12Packed")
    with pytest.raises(pydantic.ValidationError):
        GenICamCamera.Options(exposure=1.0)  # unknown keys are errors
    with pytest.raises(pydantic.ValidationError):
        GenICamCamera.Options(trigger="hardware")


# --- exposure, gain, snapshot -----------------------------------------------------------------


def test_a_device_without_exposure_node_records_the_fixed_exposure(mono):
    assert camera(fixed_exposure_s=0.02).exposure_range_s == (0.02, 0.02)  # known before open
    assert mono.exposure_range_s == (0.02, 0.02) and mono.exposure_s == 0.02
    mono.exposure_s = 0.02
    with pytest.raises(ValueError):
        mono.exposure_s = 0.021
    f = mono.snap(2.0)
    assert f.exposure_s == 0.02 and f.meta["exposure_source"] == "fixed_exposure_s"
    snap = mono.snapshot()
    assert snap["exposure_node"] is None and snap["exposure_s"] == 0.02


def test_a_device_without_gain_node_refuses_gain(mono):
    assert mono.has_gain is False and "gain" not in mono.snapshot()
    with pytest.raises(DeviceError, match="no Gain node"):
        _ = mono.gain
    with pytest.raises(DeviceDisconnected):
        _ = camera().gain  # not open


@needs_tlsimu
def test_snapshot_records_producer_device_pixel_format_and_trigger(mono):
    snap = mono.snapshot()
    assert snap["producer"] == str(PRODUCER) and snap["simulated"] is True
    assert snap["device"] == {"model": "TLSimuMono", "serial": MONO_B, "vendor": "EMVA_D"}
    assert snap["pixel_format"] == "Mono8" and snap["trigger"] == "software"
    assert snap["shape"] == [512, 512] and snap["bit_depth"] == 8


@needs_producer
def test_from_options_defaults_to_the_simulated_producer():
    cam = GenICamCamera.from_options("cam", GenICamCamera.Options(), context=None)
    assert cam.producer == PRODUCER and cam.simulated is True
    assert cam.options.trigger == "software" and cam.options.timeout_s == 2.0


class FakeNodeMap:
    """A camera's node map as GenApi presents it: typed nodes with value, min/max, symbolics."""

    def __init__(self, **nodes):
        self.nodes = nodes

    def has_node(self, name):
        return name in self.nodes

    def __getattr__(self, name):
        try:
            return self.__dict__["nodes"][name]
        except KeyError:
            raise AttributeError(name) from None


def enum(value, *symbolics):
    return SimpleNamespace(value=value, symbolics=symbolics or (value,))


def fake_camera(**nodes) -> tuple[GenICamCamera, FakeNodeMap]:
    """A camera configured and 'opened' on a fake node map, as `_open_hw` would leave it."""
    nm = FakeNodeMap(
        PixelFormat=enum("Mono12", "Mono8", "Mono12"),
        Height=SimpleNamespace(value=1200),
        Width=SimpleNamespace(value=1920),
        TriggerMode=enum("Off", "Off", "On"),
        TriggerSource=enum("Line0", "Line0", "Software"),
        TriggerSoftware=SimpleNamespace(execute=lambda: None),
        ExposureAuto=enum("Continuous", "Off", "Once", "Continuous"),
        **nodes,
    )
    cam = GenICamCamera("real", GenICamCamera.Options(producer="/opt/vendor/Vendor.cti"))
    cam._configure(nm)
    cam._ia = SimpleNamespace(remote_device=SimpleNamespace(node_map=nm))
    cam._open = True
    return cam, nm


def test_exposure_node_microseconds_map_to_seconds():
    node = SimpleNamespace(value=12500.0, min=20.0, max=1_000_000.0)
    cam, nm = fake_camera(ExposureTime=node)
    assert cam.shape == (1200, 1920) and cam.bit_depth == 12 and cam.simulated is False
    assert nm.TriggerMode.value == "On" and nm.TriggerSource.value == "Software"
    assert nm.ExposureAuto.value == "Off"  # auto exposure would move DN with the scene
    assert cam.exposure_range_s == pytest.approx((20e-6, 1.0))
    assert cam.exposure_s == pytest.approx(0.0125)
    cam.exposure_s = 0.004
    assert node.value == pytest.approx(4000.0)
    assert cam.exposure_s == pytest.approx(0.004)
    with pytest.raises(ValueError):
        cam.exposure_s = 2.0
    assert cam.snapshot()["exposure_node"] == "ExposureTime"


def test_exposure_time_abs_is_used_when_exposure_time_is_absent():
    node = SimpleNamespace(value=100.0, min=10.0, max=50_000.0)
    cam, _ = fake_camera(ExposureTimeAbs=node)
    assert cam.exposure_range_s == pytest.approx((1e-5, 0.05))
    cam.exposure_s = 0.01
    assert node.value == pytest.approx(10_000.0) and cam.snapshot()["exposure_node"] == (
        "ExposureTimeAbs"
    )


def test_gain_is_bounded_by_its_node():
    gain = SimpleNamespace(value=0.0, min=0.0, max=24.0)
    cam, _ = fake_camera(Gain=gain, GainAuto=enum("Continuous", "Off", "Continuous"))
    assert cam.has_gain and cam.gain == 0.0
    cam.gain = 6.5
    assert gain.value == 6.5 and cam.snapshot()["gain"] == 6.5
    with pytest.raises(ValueError):
        cam.gain = 30.0


def test_software_trigger_needs_the_trigger_nodes():
    nm = FakeNodeMap(
        PixelFormat=enum("Mono8"), Height=SimpleNamespace(value=8), Width=SimpleNamespace(value=8)
    )
    cam = GenICamCamera("c", GenICamCamera.Options(producer="/x.cti"))
    with pytest.raises(DeviceError, match="no software trigger"):
        cam._configure(nm)
    free = GenICamCamera("c", GenICamCamera.Options(producer="/x.cti", trigger="free_run"))
    free._configure(nm)
    assert free.shape == (8, 8)


def test_an_unsupported_device_pixel_format_is_refused_at_open():
    nm = FakeNodeMap(PixelFormat=enum("BayerRG8"))
    cam = GenICamCamera("c", GenICamCamera.Options(producer="/x.cti", trigger="free_run"))
    with pytest.raises(DeviceError, match="'BayerRG8' is not supported"):
        cam._configure(nm)


# --- pixel-format conversion on synthetic buffers ---------------------------------------------


def test_mono12_in_uint16_keeps_every_level_and_is_a_copy():
    data = np.arange(4096, dtype=np.uint16)
    image = to_mono(data, "Mono12", 64, 64)
    assert image.dtype == np.uint16 and image.shape == (64, 64)
    assert image[0, 0] == 0 and image[-1, -1] == 4095 and image[1, 0] == 64
    image[0, 0] = 7
    assert data[0] == 0


def test_mono12_from_little_endian_bytes():
    values = np.array([0, 1, 256, 4095], dtype="<u2")
    image = to_mono(values.view(np.uint8), "Mono12", 2, 2)
    np.testing.assert_array_equal(image, [[0, 1], [256, 4095]])


def test_mono_values_above_the_bit_depth_are_refused():
    with pytest.raises(DeviceError, match="above 1023"):
        to_mono(np.array([0, 1024], np.uint16), "Mono10", 1, 2)
    with pytest.raises(DeviceError, match="above 4095"):
        to_mono(np.array([0xFFF0, 0], np.uint16), "Mono12", 1, 2)  # MSB-aligned data
    assert to_mono(np.array([65535], np.uint16), "Mono16", 1, 1)[0, 0] == 65535


def test_rgb8_becomes_bt601_luma():
    rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [10, 20, 30]], np.uint8)
    # 0.299*255 = 76.2, 0.587*255 = 149.7, 0.114*255 = 29.1, 2.99 + 11.74 + 3.42 = 18.15
    expected = [[76, 150, 29, 255, 18]]
    np.testing.assert_array_equal(to_mono(rgb.reshape(-1), "RGB8", 1, 5), expected)
    np.testing.assert_array_equal(to_mono(rgb[:, ::-1].reshape(-1), "BGR8", 1, 5), expected)
    alpha = np.full((5, 1), 77, np.uint8)
    rgba = np.hstack([rgb, alpha])
    bgra = np.hstack([rgb[:, ::-1], alpha])
    np.testing.assert_array_equal(to_mono(rgba.reshape(-1), "RGBa8", 1, 5), expected)
    np.testing.assert_array_equal(to_mono(bgra.reshape(-1), "BGRa8", 1, 5), expected)
    assert to_mono(rgb.reshape(-1), "RGB8", 1, 5).dtype == np.uint8


def test_bad_buffers_are_refused():
    with pytest.raises(DeviceError, match="expected 4x4x1"):
        to_mono(np.zeros(15, np.uint8), "Mono8", 4, 4)
    with pytest.raises(DeviceError, match="'YUV422Packed'"):
        to_mono(np.zeros(32, np.uint8), "YUV422Packed", 4, 4)
