"""Sealed PyTorch files: what was written is what is read, or one line says it is not."""

import os

import pytest
import torch
from cli_run import run_hil

from calibration.atomic import NoSpace
from hil.errors import UserError
from hil.output.torchfile import SEAL, content_digest, load_checkpoint, save_checkpoint


def test_the_digest_follows_values_dtypes_and_structure_not_pickled_bytes():
    state = {"w": torch.arange(6.0).reshape(2, 3), "epoch": 3, "history": [{"loss": 0.5}]}
    same = {"history": [{"loss": 0.5}], "epoch": 3, "w": torch.arange(6.0).reshape(2, 3).T.T}
    assert content_digest(state) == content_digest(same)
    for other in (
        state | {"w": state["w"].double()},
        state | {"w": state["w"].reshape(3, 2)},
        state | {"epoch": 4},
        state | {"history": [{"loss": 0.5000001}]},
    ):
        assert content_digest(other) != content_digest(state)


def test_a_sealed_file_reads_back_without_its_seal_and_a_foreign_one_as_it_is(tmp_path):
    state = {"format": "x", "w": torch.randn(4)}
    save_checkpoint(tmp_path / "a.pt", state)
    back = load_checkpoint(tmp_path / "a.pt")
    assert SEAL not in back and torch.equal(back["w"], state["w"])
    torch.save({"w": torch.ones(2)}, tmp_path / "foreign.pt")
    assert load_checkpoint(tmp_path / "foreign.pt").keys() == {"w"}


def test_a_flipped_bit_is_refused_naming_the_file(tmp_path):
    w = torch.randn(64)
    save_checkpoint(tmp_path / "a.pt", {"w": w})
    data = bytearray((tmp_path / "a.pt").read_bytes())
    data[data.find(w.numpy().tobytes()) + 17] ^= 0x80
    (tmp_path / "a.pt").write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"^{tmp_path / 'a.pt'}: damaged: its content no longer"):
        load_checkpoint(tmp_path / "a.pt", "hil model file")


def test_a_full_disk_leaves_the_previous_file_and_no_temporary(small_disk):
    path = small_disk / "state.pt"
    save_checkpoint(path, {"w": torch.zeros(4)})
    with pytest.raises(NoSpace, match="disk full while writing it") as info:
        save_checkpoint(path, {"w": torch.zeros(2**21)})  # 8 MiB on a 4 MiB disk
    assert info.value.filename == str(path)
    assert os.listdir(small_disk) == ["state.pt"]
    assert torch.equal(load_checkpoint(path)["w"], torch.zeros(4))


def test_hil_train_on_a_full_disk_is_one_line_and_exit_2(small_disk, monkeypatch, capsys):
    free = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(bytes(free.f_bavail * free.f_frsize - 8192))
    args = ["train", "--dataset", "digits", "--method", "none", "--epochs", "1"]
    args += ["--kernels", "2", "--out", small_disk / "onn.pt", "--runs-dir", small_disk.parent]
    code, _, err = run_hil(monkeypatch, capsys, *args)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {small_disk / 'onn.resume.pt'}: disk full while writing it")
    assert os.listdir(small_disk) == ["filler"]
