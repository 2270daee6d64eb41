"""`--out` is checked against the command's inputs and what already lies there, before any work."""

import hashlib
import os
from pathlib import Path

import h5py
import pytest
import torch
from cli_run import run_hil

from hil.errors import UserError
from hil.output.guard import check_output, file_kind


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hdf5(path, fmt: str):
    with h5py.File(path, "w") as f:
        f.attrs["format"] = fmt
    return path


def test_file_kind_reads_what_the_tool_wrote(tmp_path):
    torch.save({"a": 1}, tmp_path / "c.pt")
    (tmp_path / "e").touch()
    (tmp_path / "t.txt").write_text("notes")
    assert file_kind(hdf5(tmp_path / "s.h5", "hil-capture-store")) == "capture store"
    assert file_kind(hdf5(tmp_path / "cal.h5", "hil-calibration")) == "calibration"
    assert file_kind(hdf5(tmp_path / "x.h5", "other")) == "HDF5 file"
    assert file_kind(tmp_path / "c.pt") == "checkpoint"
    assert file_kind(tmp_path / "e") == "empty file"
    assert file_kind(tmp_path / "t.txt") == "file"


def test_an_output_that_is_an_input_is_refused_naming_both(tmp_path):
    store = hdf5(tmp_path / "s.h5", "hil-capture-store")
    with pytest.raises(UserError, match=r"--out .*s\.h5 is also --captures"):
        check_output(tmp_path / "sub" / ".." / "s.h5", "checkpoint", {"--captures": store})


def test_a_file_of_another_kind_is_kept_unless_forced(tmp_path):
    cal = hdf5(tmp_path / "calibration.h5", "hil-calibration")
    with pytest.raises(UserError, match="holds a calibration; refusing to replace it with a"):
        check_output(cal, "checkpoint")
    assert check_output(cal, "checkpoint", force=True) == cal
    torch.save({}, tmp_path / "onn.pt")
    assert check_output(tmp_path / "onn.pt", "checkpoint") == tmp_path / "onn.pt"


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("", "capture store", "an empty name"),
        ("/dev/null", "capture store", "not a regular file"),
        ("x" * 300 + ".h5", "capture store", "a name of 303 characters; at most 255"),
        (".", "checkpoint", "an empty name"),
    ],
)
def test_names_the_file_system_cannot_take_are_one_line(name, kind, message):
    with pytest.raises(UserError, match=message):
        check_output(Path(name), kind)


def test_a_folder_output_must_not_be_a_file_nor_a_file_output_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        check_output(tmp_path / "f", "folder")
    with pytest.raises(UserError, match="is a folder; give a file name"):
        check_output(tmp_path, "checkpoint")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_any_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(UserError, match="is not writable"):
        check_output(ro / "deeper" / "onn.pt", "checkpoint")


def test_finetune_onto_its_own_store_is_refused_and_the_store_is_unchanged(
    tmp_path, monkeypatch, capsys
):
    store = hdf5(tmp_path / "S.h5", "hil-capture-store")
    before = sha(store)
    code, _, err = run_hil(
        monkeypatch, capsys, "finetune", "--captures", store, "--checkpoint", tmp_path / "onn.pt",
        "--out", store, "--runs-dir", tmp_path / "runs",
    )  # fmt: skip
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: --out {store} is also --captures: writing it would destroy that input; "
        "choose another name"
    ]
    assert sha(store) == before
    assert not (tmp_path / "runs").exists()  # refused before the run record


def test_train_onto_a_calibration_is_refused(tmp_path, monkeypatch, capsys):
    cal = hdf5(tmp_path / "calibration.h5", "hil-calibration")
    before = sha(cal)
    code, _, err = run_hil(
        monkeypatch, capsys, "train", "--out", cal, "--epochs", "1", "--runs-dir", tmp_path
    )
    assert code == 2
    assert "holds a calibration; refusing to replace it with a checkpoint" in err
    assert len(err.strip().splitlines()) == 1
    assert sha(cal) == before


def test_calibrate_into_an_existing_file_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "out").write_text("x")
    code, _, err = run_hil(monkeypatch, capsys, "calibrate", "--out", tmp_path / "out")
    assert code == 2
    assert "exists and is not a folder" in err
