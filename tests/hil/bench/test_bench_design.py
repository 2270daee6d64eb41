"""The optic's design comes from the bench file's `[frontend]` (and its checkpoint), never from a
simulated world: a bench of real devices builds none, and the simulated one is built from it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from cli_run import run_hil

from drivers import registry
from drivers.protocols import BackendOptions, Camera, Display, Frame, LightSource
from hil.bench.assembly import Bench
from hil.bench.config import BenchConfig, load_bench, parse_bench
from hil.bench.design import load_design, square_side
from hil.bench.truth import has_truth
from hil.errors import UserError
from hil.models.checkpoint import save_model
from hil.models.onn import ONN, StudentSpec
from sim.clock import VirtualClock
from sim.world import SimWorld

# The designed PSFs (P, C, k, k) the simulated world drew before [frontend] existed (commit
# d39f565, `Bench(...).world.designed.psfs`): their sum, sum of squares and row 3 of PSF 1.
BEFORE = {
    "default": ({}, (16, 1, 7, 7), 8.851534311193973, 0.2354941710530335),
    "seeded": (
        {"design_seed": 3, "kernels": 3, "signed": False, "channels": 3, "kernel_size": 5},
        (3, 3, 5, 5),
        6.459937761072069,
        0.2775712849625321,
    ),
}
DEFAULT_ROW = [0.00390585, 0.00271079, 0.00271079, 0.00271079, 0.01240277, 0.00271079, 0.00271079]


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_the_random_design_is_what_the_simulated_world_used_before(name):
    frontend, shape, total, squares = BEFORE[name]
    config = parse_bench({"frontend": frontend})
    design = load_design(config)
    assert design.psfs.shape == shape and design.psfs.dtype == np.float64
    assert design.psfs.sum() == pytest.approx(total, rel=1e-9)
    assert (design.psfs**2).sum() == pytest.approx(squares, rel=1e-9)
    if name == "default":
        np.testing.assert_allclose(design.psfs[1, 0, 3], DEFAULT_ROW, atol=5e-9)
        assert design.tile_boxes[:3] == ((4, 4, 32, 32), (4, 40, 32, 32), (4, 76, 32, 32))
        assert design.hw == (32, 32)
    np.testing.assert_array_equal(load_design(config).psfs, design.psfs)  # same seed, same PSFs
    world = Bench(config, clock=VirtualClock()).world  # and the world is built from it
    np.testing.assert_array_equal(world.designed.psfs.double().numpy(), design.psfs)
    assert tuple(world.layout.boxes) == design.tile_boxes
    other = load_design(parse_bench({"frontend": {**frontend, "design_seed": 99}}))
    assert not np.allclose(other.psfs, design.psfs)


@pytest.fixture
def student(tmp_path):
    """A student checkpoint `onn.pt` in tmp_path whose PSFs are not any seed's random design."""
    model = ONN(StudentSpec(kernels=4, kernel_size=5, image_size=16, seed=11))
    with torch.no_grad():
        model.frontend.raw.add_(
            torch.linspace(-1, 1, model.frontend.raw.numel()).view_as(model.frontend.raw)
        )
    save_model(tmp_path / "onn.pt", "student", model)
    return model.frontend.psfs.detach().double().numpy()


def test_a_design_checkpoint_in_the_bench_file_is_that_students_psfs(
    student, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    bench_file = tmp_path / "bench.toml"
    bench_file.write_text('[frontend]\nkernels = 4\nkernel_size = 5\ndesign = "onn.pt"\n')
    design = load_design(load_bench(bench_file))
    np.testing.assert_array_equal(design.psfs, student)
    assert (design.kernels, design.kernel_size, design.signed, design.tiles) == (4, 5, True, 8)
    np.testing.assert_allclose(
        design.centroid_offset(0), _centroid(student[0]) - 2, atol=1e-12
    )  # (5 - 1) - (5 - 1) // 2 = 2: the "same" window's offset
    bench_file.write_text('[frontend]\nkernels = 8\ndesign = "onn.pt"\n')
    with pytest.raises(UserError, match=r"\[frontend\] design = 'onn.pt'.*\(4, 5, True, 1\)"):
        load_design(load_bench(bench_file))


def _centroid(psf: np.ndarray) -> np.ndarray:
    img = psf.sum(axis=0)
    ys, xs = np.mgrid[: img.shape[0], : img.shape[1]]
    return np.array([(xs * img).sum(), (ys * img).sum()]) / img.sum()


# --- the bench file's sections ---------------------------------------------------------------


def test_a_deprecated_sim_frontend_moves_to_frontend_with_one_warning(caplog):
    keys = {"kernels": 4, "kernel_size": 5, "design_seed": 2}
    with caplog.at_level(logging.WARNING, logger="hil"):
        old = parse_bench({"sim": {"frontend": keys, "sensor": {"bit_depth": 10}}}, "old.toml")
    assert old == parse_bench({"frontend": keys, "sim": {"sensor": {"bit_depth": 10}}})
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message and "old.toml" in message and "rename" in message
    assert "[sim.frontend]" in message and "[frontend]" in message
    with pytest.raises(UserError, match=r"old.toml: sim.frontend.kernels: input should be"):
        parse_bench({"sim": {"frontend": {"kernels": 0}}}, "old.toml")


def test_both_frontend_sections_at_once_is_one_line_naming_both():
    with pytest.raises(UserError) as info:
        parse_bench({"frontend": {"kernels": 4}, "sim": {"frontend": {"kernels": 4}}}, "b.toml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("b.toml: ")
    assert "[frontend]" in message and "[sim.frontend]" in message


def test_an_input_grid_that_overflows_the_simulated_display_is_refused_naming_the_keys():
    fits = {"input_px": [16, 20], "display_scale": 2}  # 32×40 on a 32×40 display, centred
    design = load_design(parse_bench({"frontend": fits, "sim": {"display": {"width": 40}}}))
    assert design.origin_on((32, 40)) == (0, 0)
    with pytest.raises(UserError) as info:  # the default display is 32×32
        load_design(parse_bench({"frontend": fits}))
    message = str(info.value)
    assert message.startswith("[frontend] input_px, display_scale, display_origin_px: ")
    assert "32×40 display pixels" in message and "32×32 display" in message
    assert "[sim.display] height, width" in message and "\n" not in message
    shifted = {"input_px": [16, 16], "display_origin_px": [17, 0]}  # 17 + 16 > 32
    with pytest.raises(UserError, match=r"at display_origin_px \[17, 0\] does not fit"):
        load_design(parse_bench({"frontend": shifted}))


def test_a_student_is_sized_to_the_input_grid_not_the_display():
    config = parse_bench({"frontend": {"input_px": [24, 24]}, "sim": {"display": {"width": 64}}})
    assert square_side(config, "hil train") == 24
    wide = parse_bench({"frontend": {"input_px": [16, 20]}})
    with pytest.raises(UserError, match=r"input_px = \[16, 20\]: hil train sizes its student"):
        square_side(wide, "hil train")


def test_the_cli_refuses_an_overflowing_grid_with_one_line_and_exit_2(
    tmp_path, monkeypatch, capsys
):
    bench, image = tmp_path / "big.toml", tmp_path / "img.npy"
    bench.write_text("[frontend]\ninput_px = [16, 16]\ndisplay_scale = 3\n")
    np.save(image, np.ones((16, 16), np.float32))
    args = ["sim", "render", image, "--out", tmp_path / "f.png", "--bench", bench]
    code, _, err = run_hil(monkeypatch, capsys, *args, "--runs-dir", tmp_path / "runs")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "input_px, display_scale, display_origin_px" in err and "32×32 display" in err


def test_the_cli_prints_the_deprecation_as_a_warning_line(tmp_path, monkeypatch, capsys):
    bench = tmp_path / "old.toml"
    bench.write_text("[sim.frontend]\nkernels = 4\n")
    code, _, err = run_hil(monkeypatch, capsys, "devices", "--bench", bench)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "[sim.frontend]" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {bench}: ")


def test_bench_init_writes_a_frontend_section_and_no_sim_frontend(tmp_path, monkeypatch, capsys):
    path = tmp_path / "bench.toml"
    code, _, _ = run_hil(monkeypatch, capsys, "bench", "init", path)
    text = path.read_text()
    assert code == 0 and "\n[frontend]\n" in text and "[sim.frontend]" not in text
    assert "design_seed = 0" in text and "# design = (unset)" in text
    assert load_bench(path).frontend == BenchConfig().frontend


# --- a bench of real devices ------------------------------------------------------------------


class FakeDisplay(Display):
    backend = "fake"

    def __init__(self, name: str, options: BackendOptions) -> None:
        super().__init__(name, (32, 32), 8)
        self.shown: list[np.ndarray] = []

    def _show_hw(self, levels: np.ndarray) -> None:
        self.shown.append(levels)


class FakeCamera(Camera):
    backend = "fake"

    def __init__(self, name: str, options: BackendOptions) -> None:
        super().__init__(name, (148, 148), 12, (1e-6, 1.0))
        self._exposure_s, self._id = 0.01, 0

    def _snap_hw(self, timeout_s: float) -> Frame:
        self._id += 1
        image = np.full(self.shape, 32 + self._id, np.uint16)
        return Frame(image, float(self._id), self._exposure_s, self._id, False)

    def _get_exposure_hw(self) -> float:
        return self._exposure_s

    def _set_exposure_hw(self, exposure_s: float) -> None:
        self._exposure_s = exposure_s


class FakeLight(LightSource):
    backend = "fake"

    def __init__(self, name: str, options: BackendOptions) -> None:
        super().__init__(name)

    def _set_output_hw(self, on: bool, level: float) -> None:
        pass


FAKES = {"display": FakeDisplay, "camera": FakeCamera, "light": FakeLight}
REAL = {role: {"backend": "fake"} for role in FAKES}


@pytest.fixture
def no_sim_world(monkeypatch):
    """Fake real backends in the registry, and a SimWorld that fails if anything builds one."""
    load = registry.load

    def fake_load(kind: str, backend: str):
        return FAKES[kind] if backend == "fake" else load(kind, backend)

    def refuse(*args, **kwargs):
        raise AssertionError("a bench of real devices built a SimWorld")

    monkeypatch.setattr(registry, "load", fake_load)
    monkeypatch.setattr(SimWorld, "__init__", refuse)


def test_a_bench_of_real_devices_never_builds_a_simulated_world(
    no_sim_world, student, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    bench_file = tmp_path / "lab.toml"
    devices = "".join(f'[devices.{role}]\nbackend = "fake"\n' for role in REAL)
    bench_file.write_text(f'[frontend]\nkernels = 4\nkernel_size = 5\ndesign = "onn.pt"\n{devices}')
    config = load_bench(bench_file)
    bench = Bench(config)
    assert not bench.build_errors and not bench.simulated
    np.testing.assert_array_equal(bench.design.psfs, student)  # the design, without a world
    rows = bench.probe()
    assert [(r["role"], r["state"], r["simulated"]) for r in rows] == [
        ("display", "ok", False),
        ("camera", "ok", False),
        ("light", "ok", False),
    ]
    with bench:
        bench.light.on()
        bench.display.show(np.full((32, 32), 0.5, np.float32))
        frame = bench.camera.snap(1.0)
        assert not frame.simulated and not has_truth(bench)
    assert not bench.light.is_on and not bench.display.is_open
    simulated = Bench(parse_bench({}))  # the guard is live: a simulated bench does build one
    assert "built a SimWorld" in str(simulated.build_errors["display"])
