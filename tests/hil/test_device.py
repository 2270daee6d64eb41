"""`--device`: what each name resolves to, and one line for a device that is not there."""

import argparse

import pytest
import torch

from hil.device import add_device_argument, resolve_device, to_device
from hil.errors import UserError


def machine(monkeypatch, cuda: bool, mps: bool, gpus: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus if cuda else 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_prefers_cuda_then_mps_then_the_cpu(monkeypatch, cuda, mps, expected):
    machine(monkeypatch, cuda, mps)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_on_this_machine():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    mps = torch.backends.mps.is_available()
    assert resolve_device("auto") == torch.device("mps" if mps else "cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("cuda", "cuda requested but torch.cuda.is_available() is False"),
        ("cuda:0", "cuda:0 requested but torch.cuda.is_available() is False"),
        ("mps", "mps requested but torch.backends.mps.is_available() is False"),
        ("tpu", "--device 'tpu': choose auto, cpu, cuda or mps"),
        ("cpu:1", "--device 'cpu:1': choose auto, cpu, cuda or mps"),
        ("cuda:x", "--device 'cuda:x': choose auto, cpu, cuda or mps"),
    ],
)
def test_an_unavailable_or_unknown_device_is_one_line(monkeypatch, name, message):
    machine(monkeypatch, cuda=False, mps=False)
    with pytest.raises(UserError) as e:
        resolve_device(name)
    assert str(e.value) == message


def test_cuda_n_needs_that_many_gpus(monkeypatch):
    machine(monkeypatch, cuda=True, mps=False, gpus=2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"cuda:2 requested but torch.cuda.device_count\(\) is 2"):
        resolve_device("cuda:2")


def test_the_benchmarks_argument_parses_to_a_device(monkeypatch, capsys):
    machine(monkeypatch, cuda=False, mps=False)
    ap = argparse.ArgumentParser()
    add_device_argument(ap)
    assert ap.parse_args([]).device == torch.device("cpu")
    assert ap.parse_args(["--device", "cpu"]).device == torch.device("cpu")
    with pytest.raises(SystemExit) as e:
        ap.parse_args(["--device", "cuda"])
    assert e.value.code == 2
    assert "cuda requested but torch.cuda.is_available() is False" in capsys.readouterr().err


def test_to_device_moves_tensors_dicts_and_modules():
    x = torch.ones(2, dtype=torch.float32)
    assert to_device(x, None) is x
    moved = to_device({"x": x, "y": torch.zeros(1)}, torch.device("meta"))
    assert {v.device.type for v in moved.values()} == {"meta"}
    module = to_device(torch.nn.Linear(2, 2), "meta")
    assert module.weight.device.type == "meta"
