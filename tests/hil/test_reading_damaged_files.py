"""Every kind of file hil reads, damaged every way, through the command line: exit 2, one line
naming the file, no traceback, and no output written."""

import shutil

import h5py
import numpy as np
import pytest
import torch
from cli_run import run_hil
from identities import identity

from hil.acquire.store import CaptureStore, Row
from hil.data.datasets import digits
from hil.models.checkpoint import save_model
from hil.models.onn import ONN, StudentSpec
from hil.models.teachers import build_teacher

SPEC = StudentSpec(kernels=2, kernel_size=3, image_size=8, hidden=8)


@pytest.fixture(scope="module")
def files(tmp_path_factory, calibration):
    """A student, a teacher, a store the student reads and a calibration, all undamaged."""
    root = tmp_path_factory.mktemp("readers")
    student = ONN(SPEC)
    save_model(root / "onn.pt", "student", student)
    arch = {"arch": "lenet", "in_channels": 1, "classes": 10}
    save_model(root / "teacher.pt", "teacher", build_teacher("lenet", 1, 10), arch=arch)
    data, rng = digits(), np.random.default_rng(0)
    plan = data.split("train")[:40]
    store = CaptureStore.open_for_capture(
        root / "train.h5", plan=plan, feature_shape=(2, 8, 8), label_shape=(),
        identity=identity(split="train", input_shape=(8, 8), display_shape=(8, 8)),
    )  # fmt: skip
    with store:
        for i in plan:
            maps = rng.random((2, 8, 8), dtype=np.float32)
            store.append(Row(int(i), maps, int(data.labels[i]), 0.0, 0.01, 0.0, "0" * 40, True))
    shutil.copy(calibration, root / "calibration.h5")
    return root


def finetune(root, **given):
    paths = {"captures": root / "train.h5", "checkpoint": root / "onn.pt"} | given
    args = [
        "finetune",
        "--method",
        "kd",
        "--teacher",
        str(paths.pop("teacher", root / "teacher.pt")),
    ]
    for name, path in paths.items():
        args += [f"--{name}", str(path)]
    return [*args, "--epochs", "1", "--out", str(root / "out" / "ft.pt")]


READERS = {  # the file and the command that reads it
    "student": ("onn.pt", lambda r, p: finetune(r, checkpoint=p)),
    "teacher": ("teacher.pt", lambda r, p: finetune(r, teacher=p)),
    "store": ("train.h5", lambda r, p: finetune(r, captures=p)),
    "calibration": (
        "calibration.h5",
        lambda r, p: ["capture", "--calibration", str(p), "--out", str(r / "out" / "s.h5")],
    ),  # fmt: skip
}
OTHER_KIND = {"student": "teacher.pt", "teacher": "onn.pt", "store": "calibration.h5",
              "calibration": "train.h5"}  # fmt: skip


def damage(src, how: str, dst) -> None:
    data = bytearray(src.read_bytes())
    if how == "empty":
        data = b""
    elif how == "garbage":
        data = np.random.default_rng(1).bytes(3000)
    elif how == "truncated":
        data = data[: len(data) // 2]
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["missing", "empty", "garbage", "truncated", "other kind"])
@pytest.mark.parametrize("reader", READERS)
def test_a_damaged_input_is_one_line_naming_it(files, tmp_path, monkeypatch, capsys, reader, how):
    name, command = READERS[reader]
    bad = tmp_path / f"bad-{name}"
    if how == "other kind":
        bad = files / OTHER_KIND[reader]
    elif how != "missing":
        damage(files / name, how, bad)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_hil(monkeypatch, capsys, *command(files, bad))
    assert code == 2 and err.count("\n") == 1 and f"{bad}" in err, err
    assert "Traceback" not in err and not (files / "out").exists()


@pytest.mark.parametrize("reader", ["student", "teacher", "store", "calibration"])
def test_a_flipped_bit_in_the_data_is_refused_naming_the_file(
    files, tmp_path, monkeypatch, capsys, reader
):
    """Weights, rows and calibration arrays each carry a digest that a flipped bit breaks."""
    name, command = READERS[reader]
    bad = tmp_path / f"flipped-{name}"
    data = bytearray((files / name).read_bytes())
    inside = {  # bytes that are certainly payload: a weight, a row of maps, an array
        "student": lambda: ONN(SPEC).backend[-1].weight.detach().numpy().tobytes(),
        "teacher": lambda: (
            torch.load(files / name)["weights"]["classifier.5.weight"].numpy().tobytes()
        ),
        "store": None,
        "calibration": None,
    }[reader]
    if inside is not None:
        at = data.find(inside()[:64])
    else:  # HDF5: where the first chunk of the maps (or of an array) lies in the file
        with h5py.File(files / name, "r") as f:
            ds = f["features" if reader == "store" else "dark_dn"]
            at = ds.id.get_offset() if ds.chunks is None else ds.id.get_chunk_info(0).byte_offset
    assert at > 0
    data[at + 8] ^= 0x40
    bad.write_bytes(bytes(data))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_hil(monkeypatch, capsys, *command(files, bad))
    assert code == 2 and err.count("\n") == 1 and f"{bad}" in err, err
    assert any(word in err for word in ("damaged", "checksum", "modified")), err
