"""`hil calibrate` on simulated benches, measured against the simulated world's ground truth."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from calibration import calfile
from calibration.errors import CalibrationError
from calibration.model import noise_variance, predict_frames
from calibration.pipeline import Plan, calibrate
from hil.bench.assembly import Bench
from hil.bench.config import parse_bench
from hil.bench.design import design_with, load_design
from hil.bench.truth import ground_truth
from hil.cli import main
from sim.clock import VirtualClock

HARSH = {  # the range: gain 0.8-1.2, shift ≤ 3 px, rotation ≤ 1°, δ 10%, blur 0.5 px
    1: dict(gain=0.8, shift_px=[3.0, 2.0], rotation_deg=1.0),
    2: dict(gain=1.2, shift_px=[-3.0, 3.0], rotation_deg=-1.0),
    3: dict(gain=1.05, shift_px=[2.0, -3.0], rotation_deg=0.5),
}


def sim_bench(frontend: dict | None = None, **sections) -> Bench:
    return Bench(parse_bench({"frontend": frontend or {}, "sim": sections}), clock=VirtualClock())


def run(bench: Bench, plan: Plan = Plan()):
    with bench:
        design = bench.design
        cal = calibrate(bench, design, plan)
        truth = ground_truth(bench, cal, design)
    return cal, truth


@pytest.fixture(scope="module")
def default_calibration():
    return run(sim_bench())


@pytest.mark.parametrize("seed", sorted(HARSH))
def test_fitted_quantities_match_the_ground_truth(seed):
    fab = HARSH[seed] | dict(seed=seed, kernel_error=0.1, kernel_blur_px=0.5)
    cal, truth = run(sim_bench(fabrication=fab, sensor=dict(bit_depth=12, read_noise_e=3.0)))
    assert truth["psf_rel_error"] <= 0.05
    assert truth["registration_rms_input_px"] <= 0.1
    assert truth["tile_centre_error_px_max"] <= 0.1
    assert truth["gain_rel_error"] <= 0.02
    assert abs(truth["display_gamma_error"]) <= 0.05
    assert abs(truth["conversion_gain_rel_error"]) <= 0.05
    assert truth["white_field_rel_error"] <= 0.02


def test_frames_of_new_images_are_predicted_within_noise_plus_two_percent(default_calibration):
    cal, _ = default_calibration
    bench = sim_bench()
    rng = np.random.default_rng(7)
    images = np.round(rng.random((3, 32, 32)) * 255).astype(np.float32) / 255
    with bench:
        bench.light.on()
        bench.camera.exposure_s = cal.exposure_s
        captured = []
        for img in images:
            bench.display.show(img)
            captured.append(bench.camera.snap(1.0).image.astype(np.float64))
    predicted = predict_frames(cal, images)
    residual = np.asarray(captured) - predicted
    signal = predicted - cal.dark_dn
    allowed = noise_variance(cal, predicted).mean() + (0.02**2) * np.mean(signal**2)
    assert np.mean(residual**2) <= allowed
    recorded = next(s for s in cal.steps if s["name"] == "validation")
    assert recorded["prediction_excess_rel_error"] <= 0.02
    assert 0.8 < recorded["prediction_chi2"] < 1.3


def test_a_replayed_calibration_reproduces_the_bench(default_calibration, tmp_path):
    cal, _ = default_calibration
    path = calfile.save(cal, tmp_path / "cal.h5")
    original, replay = sim_bench(), sim_bench(replay=str(path))
    image = np.zeros((32, 32), np.float32)
    image[6:26, 12:20] = 0.8
    frames = []
    for bench in (original, replay):
        with bench:
            bench.light.on()
            bench.camera.exposure_s = cal.exposure_s
            bench.display.show(image)
            frames.append(np.mean([bench.camera.snap(1.0).image for _ in range(4)], axis=0))
    assert replay.simulated
    diff = frames[0] - frames[1]
    expected_var = 2 * noise_variance(cal, frames[0]) / 4
    assert np.mean(diff**2) <= 1.2 * expected_var.mean() + (0.02**2) * np.mean(
        (frames[0] - cal.dark_dn) ** 2
    )


def test_replaying_a_calibration_of_another_bench_is_refused(default_calibration, tmp_path):
    cal, _ = default_calibration
    path = calfile.save(cal, tmp_path / "cal.h5")
    with pytest.raises(CalibrationError, match="different bench"):
        sim_bench(replay=str(path), frontend=dict(kernels=4))


@pytest.mark.parametrize(
    "sensor, says",
    [(dict(flux_e_per_s=1.0), "switch the light on"), (dict(flux_e_per_s=1e13), "saturates")],
)
def test_unusable_light_levels_are_refused_with_what_to_change(sensor, says):
    with pytest.raises(CalibrationError, match=says):
        run(sim_bench(sensor=sensor))


def test_the_longest_exposure_a_bench_file_allows_does_not_stall_the_calibration():
    """exposure_s = 60 once spent four minutes of frames on the first dark; now the search
    starts at its own longest exposure and the run costs seconds of bench time, as the default."""
    took = {}
    for exposure in (0.01, 60.0):
        clock = VirtualClock()
        bench = Bench(parse_bench({"sim": {"sensor": {"exposure_s": exposure}}}), clock=clock)
        with bench:
            cal = calibrate(bench, bench.design, Plan(patterns=8))
        took[exposure] = clock.now()
        assert cal.exposure_s == pytest.approx(0.0078, rel=0.05)
    assert took[60.0] < took[0.01] + 10


def cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["hil", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_hil_calibrate_writes_the_file_the_summary_and_the_plots(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cal"
    code, stdout, err = cli(
        monkeypatch,
        capsys,
        "calibrate",
        "--out",
        out,
        "--json",
        "--patterns",
        16,
        "--runs-dir",
        tmp_path / "runs",
    )
    assert code == 0, err
    result = json.loads(stdout)
    assert result == json.loads((out / "result.json").read_text())
    cal = calfile.load(result["calibration_file"])
    assert result["id"] == cal.id and cal.simulated
    assert result["psf_rel_error"] <= 0.05 and result["registration_rms_input_px"] <= 0.1
    assert all(Path(picture).is_file() for picture in result["pictures"].values())


def test_a_corrupt_replay_file_is_one_clear_error(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "cal.h5"
    bad.write_bytes(b"\x89HDF\r\n" + b"\0" * 100)
    bench = tmp_path / "bench.toml"
    bench.write_text(f'[sim]\nreplay = "{bad}"\n')
    code, _, err = cli(monkeypatch, capsys, "devices", "--bench", bench)
    assert code == 2 and str(bad) in err and len(err.strip().splitlines()) == 1


def test_a_dim_sub_optic_is_registered_with_a_longer_grid_exposure():
    """One PSF passing 1/30 of its design's light: its dots need a longer exposure, and get it."""
    config = parse_bench({})
    psfs = load_design(config).psfs.copy()
    psfs[3] /= 30
    bench = Bench(config, clock=VirtualClock(), design=design_with(config, psfs))
    with bench:
        design = bench.design
        cal = calibrate(bench, design, Plan(patterns=16))
        truth = ground_truth(bench, cal, design)
    geometry = next(s for s in cal.steps if s["name"] == "geometry")
    assert set(geometry["grid_exposure_factor_for_dim_subimages"]) == {"3"}
    assert truth["registration_rms_px"] <= 0.2
