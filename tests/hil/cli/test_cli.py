"""The command line: one clear line for user errors, run records, and what it writes."""

import json
import tomllib

import cv2
import numpy as np
import pytest
from cli_run import run_hil

from hil import __version__
from hil.bench.config import BenchConfig, default_bench_toml, load_bench


def test_version(monkeypatch, capsys):
    code, out, _ = run_hil(monkeypatch, capsys, "--version")
    assert code == 0 and __version__ in out


def test_help_explains_every_command(monkeypatch, capsys):
    code, out, _ = run_hil(monkeypatch, capsys, "--help")
    assert code == 0
    for command in ("bench", "devices", "sim", "demo"):
        assert command in out


@pytest.mark.parametrize(
    "text, names",
    [
        ("[sim.sensor]\nexposure_s = -0.01\n", "sim.sensor.exposure_s"),
        ("[sim.sensor]\nexposure = 0.01\n", "sim.sensor.exposure"),
        ("[frontend]\nkernels = 0\n", "frontend.kernels"),
        ("[sim\n", "not valid TOML"),
    ],
)
def test_bad_bench_file_exits_non_zero_with_one_line_naming_it(
    tmp_path, monkeypatch, capsys, text, names
):
    bench = tmp_path / "bench.toml"
    bench.write_text(text)
    code, out, err = run_hil(monkeypatch, capsys, "devices", "--bench", bench)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(bench) in lines[0] and names in lines[0]
    assert "Traceback" not in err + out


def test_missing_bench_file(tmp_path, monkeypatch, capsys):
    code, _, err = run_hil(monkeypatch, capsys, "devices", "--bench", tmp_path / "nope.toml")
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1


def test_bench_init_writes_the_defaults_and_a_partial_file_keeps_the_rest(
    tmp_path, monkeypatch, capsys
):
    path = tmp_path / "bench.toml"
    code, _, _ = run_hil(monkeypatch, capsys, "bench", "init", path)
    assert code == 0
    assert tomllib.loads(path.read_text()) == tomllib.loads(default_bench_toml())
    assert load_bench(path) == BenchConfig()
    code, _, err = run_hil(monkeypatch, capsys, "bench", "init", path)
    assert code == 2 and "--force" in err
    partial = tmp_path / "partial.toml"
    partial.write_text("[sim.sensor]\nbit_depth = 10\n")
    cfg = load_bench(partial)
    assert cfg.sim.sensor.bit_depth == 10
    assert cfg.sim.sensor.full_well_e == BenchConfig().sim.sensor.full_well_e
    assert cfg.frontend == BenchConfig().frontend


def test_devices_lists_the_simulated_bench(monkeypatch, capsys):
    code, out, _ = run_hil(monkeypatch, capsys, "devices", "--json")
    assert code == 0
    result = json.loads(out)
    rows = result["devices"]
    assert [r["role"] for r in rows] == ["display", "camera", "light"]
    assert all(r["state"] == "ok" and r["simulated"] for r in rows)
    assert rows[1]["detail"]["shape"] == [148, 148]
    sims = {(b["kind"], b["backend"]): b["error"] for b in result["backends"]}
    assert sims[("camera", "sim")] is None and sims[("light", "sim")] is None


def test_sim_render_writes_the_frame_and_a_run_record(tmp_path, monkeypatch, capsys):
    image = np.zeros((16, 16), np.uint8)
    image[4:12, 7:9] = 255
    src = tmp_path / "bar.png"
    cv2.imwrite(str(src), image)
    out_png, tiles = tmp_path / "frame.png", tmp_path / "tiles.png"
    args = ["sim", "render", src, "--out", out_png, "--tiles", tiles]
    code, out, err = run_hil(monkeypatch, capsys, *args, "--runs-dir", tmp_path / "runs", "--json")
    assert code == 0, err
    result = json.loads(out)
    frame = cv2.imread(str(out_png), cv2.IMREAD_UNCHANGED)
    assert frame.dtype == np.uint16 and list(frame.shape) == result["frame_shape"]
    dn = frame // result["png_scale"]
    assert int(dn.max()) == result["max_dn"]
    assert dn.max() > 10 * dn.min()  # a lit bar on a dark background
    sheet = cv2.imread(str(tiles))  # 2 rows (designed, captured) of the 8 maps, at 110 dpi
    assert sheet.shape == (round(110 * (1.3 * 2 + 0.6)), round(110 * (1.3 * 8 + 1)), 3)
    assert result["simulated"] is True
    run_dir = tmp_path / "runs" / result["run_dir"].split("/")[-1]
    recorded = json.loads((run_dir / "result.json").read_text())
    assert recorded["status"] == "ok" and recorded["frame"] == str(out_png)
    for name in ("config.toml", "environment.json", "command.json", "run.log"):
        assert (run_dir / name).is_file()
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["packages"]["torch"] and env["hil"] == __version__


def test_sim_render_rejects_a_file_that_is_not_an_image(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    args = ["sim", "render", bad, "--out", tmp_path / "f.png", "--runs-dir", tmp_path / "runs"]
    code, _, err = run_hil(monkeypatch, capsys, *args)
    assert code == 2 and "bad.png" in err and len(err.strip().splitlines()) == 1
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "result.json").read_text())["status"] == "failed"


DEVICE_COMMANDS = [
    ["teacher", "train", "--arch", "lenet"],
    ["train", "--method", "none"],
    ["finetune", "--captures", "train.h5", "--checkpoint", "onn.pt"],
    ["estimate"],
    ["demo"],
]


@pytest.mark.parametrize("command", DEVICE_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_an_unavailable_device_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, command):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    args = [*command, "--device", "cuda", "--runs-dir", tmp_path / "runs"]
    code, out, err = run_hil(monkeypatch, capsys, *args)
    assert code == 2, err
    assert err.strip().splitlines() == [
        "error: cuda requested but torch.cuda.is_available() is False"
    ]
    assert not (tmp_path / "runs").exists() and "Traceback" not in out


@pytest.mark.parametrize("command", DEVICE_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_every_computing_command_offers_the_device_option(monkeypatch, capsys, command):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_hil(
        monkeypatch, capsys, *command[: 2 if command[0] == "teacher" else 1], "--help"
    )
    assert code == 0 and "--device" in out and "auto (CUDA when present" in out


def test_the_run_record_names_the_device(tmp_path, monkeypatch, capsys):
    """`auto` resolves here (CPU unless a GPU is present) and the record says what it was."""
    from hil.device import resolve_device

    expected = str(resolve_device("auto"))
    monkeypatch.setenv("HIL_TEACHERS", str(tmp_path / "teachers"))
    runs = tmp_path / "runs"
    teacher = ["teacher", "train", "--arch", "lenet", "--epochs", "1", "--device", "auto"]
    train = ["train", "--method", "kd", "--teacher", "lenet", "--epochs", "1", "--kernels", "2"]
    train += ["--kernel-size", "3", "--batch-size", "256", "--out", tmp_path / "onn.pt"]
    for args in (teacher, train):
        code, out, err = run_hil(monkeypatch, capsys, *args, "--runs-dir", runs, "--json")
        assert code == 0, err
        result = json.loads(out)
        assert result["device"] == expected
        run = runs / result["run_dir"].split("/")[-1]
        assert json.loads((run / "result.json").read_text())["device"] == expected
        assert json.loads((run / "command.json").read_text())["device"] == expected
    # KD's teacher logits were cached beside the stored teacher
    assert len(list((tmp_path / "teachers").glob("digits-lenet.logits-*.pt"))) == 1


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["train", "--epochs", "0"],
            "error: Invalid value for '--epochs': Input should be greater",
        ),
        (["capture"], "error: Missing option '--calibration'. (see `hil capture --help`)"),
        (["nope"], "error: No such command 'nope'. (see `hil --help`)"),
        (["train", "--frontend", "5f"], "error: --frontend '5f': choose psf, 4f"),
        (["train", "--backend", "fc9"], "error: --backend 'fc9': choose fc2, fc3, conv, updecoder"),
    ],
)
def test_a_bad_option_is_one_line_exit_2_before_any_work(tmp_path, monkeypatch, capsys, args, said):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_hil(monkeypatch, capsys, *args)
    assert code == 2 and err.startswith(said) and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # not even a run folder


def test_help_still_exits_0_and_a_bare_hil_shows_it(monkeypatch, capsys):
    code, out, err = run_hil(monkeypatch, capsys, "train", "--help")
    assert code == 0 and "Usage: hil train" in out and err == ""
    code, out, err = run_hil(monkeypatch, capsys)
    assert code == 2 and "Usage: hil" in out and "error" not in err
