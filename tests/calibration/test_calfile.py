"""Calibration file: exact round trip, atomic save, and one clear line for every unusable file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from calibration import calfile
from calibration.calfile import (
    SCHEMA_VERSION,
    Calibration,
    bench_fingerprint,
    fingerprint_inputs,
    load,
    save,
    summary,
)
from calibration.design import Design
from calibration.errors import CalibrationError

H, W, HD, WD, K = 40, 40, 16, 16, 5
BENCH = {
    "frame_shape": (H, W),
    "display_shape": (HD + 8, WD + 4),
    "input_shape": (HD, WD),
    "display_scale": 1,
    "display_origin": (2, 4),
    "kernels": 2,
    "kernel_size": K,
    "signed": True,
    "channels": 1,
    "camera_bit_depth": 12,
}


def _design(
    kernels: int = 2,
    kernel_size: int = K,
    signed: bool = True,
    channels: int = 1,
    input_shape=(HD, WD),
    display_scale: int = 1,
    display_origin=(2, 4),
):
    """A design with that geometry (what the fingerprint reads of it; PSFs and boxes are not)."""
    p = kernels * (2 if signed else 1)
    return Design(
        kernels=kernels,
        kernel_size=kernel_size,
        signed=signed,
        channels=channels,
        tile_boxes=[(0, 0, HD, WD)] * p,
        psfs=np.ones((p, channels, kernel_size, kernel_size)),
        hw=input_shape,
        display_scale=display_scale,
        display_origin=display_origin,
    )


def _fingerprint(fields: dict, of=bench_fingerprint):
    """`of` (bench_fingerprint or fingerprint_inputs) of the seven geometry fields."""
    f = dict(fields)
    camera = (f.pop("frame_shape"), f.pop("display_shape"), f.pop("camera_bit_depth"))
    return of(_design(**f), *camera)


def _cal(seed: int = 0, **over) -> Calibration:
    """A small but complete calibration: 2 signed kernels, so P = 4 tiles."""
    rng = np.random.default_rng(seed)
    geometry = {**BENCH, **{k: over.pop(k) for k in list(over) if k in BENCH}}
    p = geometry["kernels"] * (2 if geometry["signed"] else 1)
    c, (h, w) = geometry["channels"], geometry["frame_shape"]
    affines = np.tile(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (p, 1, 1))
    affines[:, :, 2] += rng.normal(size=(p, 2))
    levels = np.linspace(0.0, 1.0, 9, dtype=np.float32)
    fields = {
        "bench_name": "test-bench",
        "simulated": True,
        **geometry,
        "exposure_s": 0.01,
        "dark_dn": rng.normal(32, 1, (h, w)).astype(np.float32),
        "read_noise_dn": rng.uniform(1, 2, (h, w)).astype(np.float32),
        "conversion_gain_e_per_dn": 2.4,
        "black_level_dn": 32.0,
        "background_dn_per_s": rng.uniform(0, 5, (h, w)).astype(np.float32),
        "bright_field_dn_per_s": rng.uniform(0, 500, (h, w)).astype(np.float32),
        "display_levels": levels,
        "display_response": levels**2.2,
        "display_gamma": 2.2,
        "illumination": rng.uniform(0.9, 1.0, geometry["input_shape"]).astype(np.float32),
        "vignetting": rng.uniform(0, 0.1, p).astype(np.float32),
        "affines": affines,
        "distortion_k1": rng.uniform(-0.02, 0.02, p),
        "distortion_centre_px": rng.uniform(0, 40, (p, 2)),
        "distortion_radius_px": rng.uniform(10, 12, p),
        "registration_rms_px": rng.uniform(0, 0.1, p).astype(np.float32),
        "tile_boxes": np.array([[2 + 20 * (i // 2), 2 + 20 * (i % 2), 12, 12] for i in range(p)]),
        "psfs": rng.uniform(0, 1, (p, c, geometry["kernel_size"], geometry["kernel_size"])),
        "psf_residual": rng.uniform(0, 0.05, p).astype(np.float32),
        "tile_gain": rng.uniform(0.8, 1.0, p).astype(np.float32),
        "devices": {"camera": {"backend": "sim", "serial": "X1", "roi": (0, 0, h, w)}},
        "versions": {"hil": "0.1.0", "numpy": np.__version__},
        "steps": [{"name": "dark", "seconds": 0.5, "frames": 16}, {"name": "psf", "seconds": 1.25}],
        "truth": {"psf_rel_error": 0.031, "shift_px": [1.4, -0.8]},
    }
    fields.update(over)
    return Calibration(**fields)


def _load_error(path: Path, **kwargs) -> str:
    """The message of the CalibrationError `load` raises; always one line that names the file."""
    with pytest.raises(CalibrationError) as info:
        load(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Calibration, Path]:
    cal = _cal()
    return cal, save(cal, tmp_path / "cal.h5")


@pytest.mark.parametrize("variant", ["signed", "unsigned_rgb"])
def test_round_trip_is_exact(tmp_path: Path, variant: str) -> None:
    over = {} if variant == "signed" else {"signed": False, "kernels": 3, "channels": 3}
    if variant == "unsigned_rgb":
        over |= {"display_shape": (HD + 8, WD + 4, 3), "truth": None, "bench_name": ""}
    cal = _cal(**over)
    path = save(cal, tmp_path / "cal.h5")
    back = load(path, expect_fingerprint=cal.fingerprint)
    assert back == cal
    for name, dtype in calfile._ARRAYS.items():
        a, b = getattr(cal, name), getattr(back, name)
        assert b.dtype == dtype and a.dtype == dtype, name
        np.testing.assert_array_equal(a, b)
    assert back.devices == {"camera": {"backend": "sim", "serial": "X1", "roi": [0, 0, H, W]}}
    assert back.steps == cal.steps and back.versions == cal.versions and back.truth == cal.truth
    assert back.frame_shape == (H, W) and isinstance(back.simulated, bool)
    assert back.schema_version == SCHEMA_VERSION and len(back.id) == 32
    assert sorted(os.listdir(tmp_path)) == ["cal.h5"]


def test_save_replaces_the_previous_file(saved: tuple[Calibration, Path]) -> None:
    first, path = saved
    second = _cal(seed=1)
    assert second != first and second.id != first.id
    save(second, path)
    assert load(path) == second
    assert sorted(os.listdir(path.parent)) == ["cal.h5"]


def test_interrupted_rename_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(calfile.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(_cal(), tmp_path / "cal.h5")
    assert os.listdir(tmp_path) == []


def test_interrupted_write_keeps_the_previous_file(saved, monkeypatch) -> None:
    first, path = saved
    create = h5py.Group.create_dataset
    calls = []

    def power_cut(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise RuntimeError("power cut")
        return create(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        save(_cal(seed=1), path)
    monkeypatch.undo()
    assert sorted(os.listdir(path.parent)) == ["cal.h5"]
    assert load(path) == first


def test_os_errors_on_save_are_one_line(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(CalibrationError, match="no-such-folder") as info:
        save(_cal(), tmp_path / "no-such-folder" / "cal.h5")
    assert "\n" not in str(info.value)

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(calfile.os, "replace", disk_full)
    with pytest.raises(CalibrationError, match="disk full while writing it") as info:
        save(_cal(), tmp_path / "cal.h5")
    assert "\n" not in str(info.value) and str(tmp_path / "cal.h5") in str(info.value)
    assert os.listdir(tmp_path) == []


def test_a_full_disk_refuses_the_save_in_one_line_and_keeps_the_previous_file(small_disk):
    path = small_disk / "cal.h5"
    first = _cal()
    save(first, path)
    free = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(bytes(free.f_bavail * free.f_frsize - 4096))
    with pytest.raises(CalibrationError, match="disk full while writing it") as info:
        save(_cal(seed=1), path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    assert sorted(os.listdir(small_disk)) == ["cal.h5", "filler"] and load(path) == first


def test_missing_file(tmp_path: Path) -> None:
    assert "calibration file not found" in _load_error(tmp_path / "nope.h5")


def test_truncated_file(saved) -> None:
    _, path = saved
    cut = path.with_name("cut.h5")
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert "truncated or not a calibration file" in _load_error(cut)


@pytest.mark.parametrize("content", [b"", b"not an hdf5 file\n" * 100])
def test_not_hdf5(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "cal.h5"
    path.write_bytes(content)
    assert "truncated or not a calibration file" in _load_error(path)


def test_hdf5_that_is_not_a_calibration(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.zeros(3)
    assert "not a calibration file" in _load_error(path)


def test_a_schema_1_file_is_refused_with_what_changed(saved) -> None:
    _, path = saved
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 1
    message = _load_error(path)
    assert "older hil (schema 1, without the physical display" in message
    assert "run `hil calibrate` again" in message


def test_newer_schema(saved) -> None:
    _, path = saved
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    message = _load_error(path)
    assert f"newer hil (schema {SCHEMA_VERSION + 1}, this hil reads up to {SCHEMA_VERSION})" in (
        message
    )
    assert "upgrade hil" in message


def _bump_psf(f: h5py.File) -> None:
    f["psfs"][0, 0, 2, 2] = f["psfs"][0, 0, 2, 2] + 1e-3


def _bump_exposure(f: h5py.File) -> None:
    f.attrs["exposure_s"] = 0.02


def _edit_steps(f: h5py.File) -> None:
    del f["steps"]
    f.create_dataset("steps", data="[]", dtype=h5py.string_dtype("utf-8"))


def _retype_dark(f: h5py.File) -> None:
    dark = f["dark_dn"][()]
    del f["dark_dn"]
    f["dark_dn"] = dark.astype(np.float64)


@pytest.mark.parametrize("tamper", [_bump_psf, _bump_exposure, _edit_steps, _retype_dark])
def test_tampering_fails_the_checksum(saved, tamper) -> None:
    _, path = saved
    with h5py.File(path, "r+") as f:
        tamper(f)
    assert "checksum mismatch: the file was modified or corrupted" in _load_error(path)


@pytest.mark.parametrize("name", ["dark_dn", "psfs", "steps", "exposure_s", "checksum"])
def test_missing_field_is_named(saved, name: str) -> None:
    _, path = saved
    with h5py.File(path, "r+") as f:
        if name in f:
            del f[name]
        else:
            del f.attrs[name]
    assert f"missing '{name}'" in _load_error(path)


def test_other_bench_names_what_differs(saved) -> None:
    cal, path = saved
    bench = {**BENCH, "kernels": 3, "frame_shape": (48, 48)}
    message = _load_error(path, expect_fingerprint=bench)
    assert "calibration is for a different bench" in message
    assert "kernels 2 in the file vs 3 on the bench" in message
    assert "frame_shape 40x40 in the file vs 48x48 on the bench" in message
    assert "display_shape" not in message and "run `hil calibrate` for this bench" in message
    other = _fingerprint(bench)
    message = _load_error(path, expect_fingerprint=other)
    assert cal.fingerprint in message and other in message and "kernels 2" in message
    assert load(path, expect_fingerprint=BENCH) == cal


def test_fingerprint_is_stable_and_canonical() -> None:
    fp = _fingerprint(BENCH)
    assert fp == "2bdac29a7144eab9"  # a change here orphans every calibration file on disk
    numpy_typed = {**BENCH, "frame_shape": np.array([H, W]), "kernels": np.int64(2)}
    assert _fingerprint(numpy_typed) == fp
    inputs = _fingerprint(BENCH, fingerprint_inputs)
    assert _fingerprint(numpy_typed, fingerprint_inputs) == json.loads(json.dumps(inputs))
    assert inputs == _cal().bench_inputs
    changed = {
        "camera_bit_depth": 10,
        "signed": False,
        "channels": 3,
        "display_shape": (26, 21),
        "input_shape": (12, 16),
        "display_origin": (0, 0),
    }
    for key, value in changed.items():
        assert _fingerprint({**BENCH, key: value}) != fp, key
    assert _cal().fingerprint == fp


@pytest.mark.parametrize(
    ("over", "name"),
    [
        ({"psfs": np.zeros((4, 1, 5, 4))}, "psfs"),
        ({"registration_rms_px": np.zeros(3)}, "registration_rms_px"),
        ({"dark_dn": np.full((H, W), np.nan)}, "dark_dn"),
        ({"tile_boxes": np.array([[30, 30, 12, 12]] * 4)}, "tile_boxes"),
        ({"tile_boxes": np.full((4, 4), 2.5)}, "tile_boxes"),
        ({"display_levels": np.linspace(1, 0, 9)}, "display_levels"),
        ({"display_shape": (16, 16, 4)}, "display_shape"),
        ({"fingerprint": "0123456789abcdef"}, "fingerprint"),
        ({"created": "yesterday"}, "created"),
        ({"exposure_s": 0.0}, "exposure_s"),
        ({"camera_bit_depth": 12.0}, "camera_bit_depth"),
        ({"steps": [{"seconds": 1.0}]}, "steps"),
        ({"devices": {"camera": object()}}, "devices"),
        ({"truth": [0.1]}, "truth"),
    ],
)
def test_validation_names_the_field(over: dict, name: str) -> None:
    with pytest.raises(CalibrationError, match=f"'{name}'") as info:
        _cal(**over)
    assert "\n" not in str(info.value)


def test_values_are_normalised_on_construction(tmp_path: Path) -> None:
    cal = _cal(dark_dn=np.zeros((H, W)), exposure_s=np.float32(0.5), truth={"e": np.float32(1)})
    assert cal.dark_dn.dtype == np.float32 and cal.tile_boxes.dtype == np.int32
    assert type(cal.exposure_s) is float
    back = load(save(cal, tmp_path / "cal.h5"))
    assert back == cal and back.truth == {"e": 1.0} and type(back.truth["e"]) is float


def test_steps_recorded_after_construction_are_saved(tmp_path: Path) -> None:
    records = [{"name": "dark", "seconds": 0.5}]
    cal = _cal(steps=records)
    records.append({"name": "validation", "seconds": 2.0, "rel_error": np.float32(0.25)})
    back = load(save(cal, tmp_path / "cal.h5"))
    assert [s["name"] for s in back.steps] == ["dark", "validation"]
    assert back.steps[1]["rel_error"] == 0.25
    records.append({"seconds": 1.0})
    with pytest.raises(CalibrationError, match="'steps'"):
        save(cal, tmp_path / "cal.h5")


def test_summary_is_json(saved) -> None:
    cal, _ = saved
    s = json.loads(json.dumps(summary(cal)))
    assert s["id"] == cal.id and s["simulated"] is True and s["tiles"] == 4
    assert s["display_gamma"] == pytest.approx(2.2) and s["seconds"] == pytest.approx(1.75)
    assert s["registration_rms_px_mean"] == pytest.approx(float(cal.registration_rms_px.mean()))
    assert s["psf_residual_mean"] == pytest.approx(float(cal.psf_residual.mean()))
    assert s["truth"] == {"psf_rel_error": 0.031, "shift_px": [1.4, -0.8]}


def test_copy_of_a_file_loads_anywhere(saved, tmp_path: Path) -> None:
    cal, path = saved
    moved = tmp_path / "elsewhere" / "renamed.h5"
    moved.parent.mkdir()
    shutil.copy(path, moved)
    assert load(moved) == cal
