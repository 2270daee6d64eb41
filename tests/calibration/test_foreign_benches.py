"""Calibration on benches laid out the way real glass lays them out, against the world's truth.

Each bench differs from its design in what a lab cannot know in advance: magnification (or an
inverted image), where the sub-images fall, a turned camera, distortion, vignetting, a blocked
sub-optic or sub-images that overlap. Calibration reads only the design, the devices (through
their protocols) and the frames.
"""

from pathlib import Path

import numpy as np
import pytest

from calibration.errors import CalibrationError
from calibration.pipeline import Plan, calibrate
from hil.bench.assembly import Bench
from hil.bench.config import load_bench, parse_bench
from hil.bench.design import design_with, load_design
from hil.bench.truth import ground_truth
from sim.clock import VirtualClock

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def calibrated(bench: Bench, patterns: int = 16):
    with bench:
        cal = calibrate(bench, bench.design, Plan(patterns=patterns))
        truth = ground_truth(bench, cal, bench.design)
    return cal, truth


def assert_truth_within_acceptance(cal, truth) -> None:
    assert truth["psf_rel_error"] <= 0.05
    assert truth["registration_rms_input_px"] <= 0.1
    assert truth["tile_centre_error_px_max"] <= 0.1
    validation = next(s for s in cal.steps if s["name"] == "validation")
    assert validation["prediction_excess_rel_error"] <= 0.02


def test_an_inverted_image_is_registered_turned_and_assigned_in_layout_order():
    bench = Bench(load_bench(EXAMPLES / "bench-inverted.toml"), clock=VirtualClock())
    cal, truth = calibrated(bench)
    assert_truth_within_acceptance(cal, truth)
    geometry = next(s for s in cal.steps if s["name"] == "geometry")
    assert set(geometry["orientations"]) == {"rot180"}  # every sub-image upside down
    assert cal.affines[:, 0, 0] == pytest.approx(-2.4, abs=0.01)
    kernels = next(s for s in cal.steps if s["name"] == "kernels")
    assert kernels["assignment"]["symmetry"] == "identity"  # the grid itself is not inverted


def test_a_camera_turned_by_a_quarter_turn_is_assigned_by_the_psfs():
    bench = Bench(load_bench(EXAMPLES / "bench-quarter-turn.toml"), clock=VirtualClock())
    cal, truth = calibrated(bench)
    assert_truth_within_acceptance(cal, truth)  # a wrong assignment would fail the PSF error
    kernels = next(s for s in cal.steps if s["name"] == "kernels")
    assert kernels["assignment"]["symmetry"] == "rot90"
    assert kernels["assignment"]["confidence"] > 0.1


def test_a_rotated_jittered_distorted_grid_is_found_and_registered():
    bench = Bench(load_bench(EXAMPLES / "bench-rotated.toml"), clock=VirtualClock())
    cal, truth = calibrated(bench)
    assert_truth_within_acceptance(cal, truth)
    assert np.median(cal.distortion_k1) == pytest.approx(0.02, abs=0.004)
    assert np.median(cal.vignetting) == pytest.approx(0.1, abs=0.03)


def test_a_blocked_sub_optic_stops_with_what_was_found():
    config = parse_bench({})
    psfs = load_design(config).psfs.copy()
    psfs[5] = 0.0  # sub-optic 5 passes no light
    bench = Bench(config, clock=VirtualClock(), design=design_with(config, psfs))
    with pytest.raises(CalibrationError) as info:
        calibrated(bench)
    message = str(info.value)
    assert "found 15 sub-images" in message and "the design has 16" in message
    assert "blocked" in message and len(message.splitlines()) == 1


def test_overlapping_sub_images_stop_with_what_was_found():
    optics = {"tile_pitch_px": [28.0, 36.0]}  # 32 px sub-images, 28 px apart in each row
    bench = Bench(parse_bench({"sim": {"optics": optics}}), clock=VirtualClock())
    with pytest.raises(CalibrationError) as info:
        calibrated(bench)
    message = str(info.value)
    assert "sub-images overlap" in message and len(message.splitlines()) == 1


class _Only:
    """A device reduced to the protocol calls calibration may make: nothing of the world."""

    def __init__(self, device, names: tuple[str, ...]) -> None:
        object.__setattr__(self, "_device", device)
        object.__setattr__(self, "_names", names)

    def __getattr__(self, name):
        if name not in self._names:
            raise AttributeError(f"calibration used {name!r}, which is not in the protocol")
        return getattr(self._device, name)

    def __setattr__(self, name, value):
        if name not in self._names:
            raise AttributeError(f"calibration set {name!r}, which is not in the protocol")
        setattr(self._device, name, value)


class _ProtocolBench:
    """The bench as a real lab's: displays, cameras and lights through their protocols only."""

    simulated = False

    def __init__(self, bench: Bench) -> None:
        self.display = _Only(bench.display, ("show", "blank", "shape", "bit_depth"))
        camera = ("snap", "shape", "bit_depth", "max_dn", "exposure_s", "exposure_range_s")
        self.camera = _Only(bench.camera, (*camera, "frame_timeout_s"))
        self.light_sources = [_Only(s, ("on", "off", "level")) for s in bench.light_sources]

    def snapshot(self) -> dict:
        return {}


def test_calibration_works_through_the_device_protocols_alone():
    bench = Bench(load_bench(EXAMPLES / "bench-inverted.toml"), clock=VirtualClock())
    with bench:
        cal = calibrate(_ProtocolBench(bench), bench.design, Plan(patterns=16))
        truth = ground_truth(bench, cal, bench.design)
    assert not cal.simulated
    assert_truth_within_acceptance(cal, truth)
