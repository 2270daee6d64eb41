"""Where the tensors live: `--device auto|cpu|cuda|mps`, resolved once per command.

Every command that trains or takes a kernel (`hil teacher train`, `hil train`, `hil finetune`,
`hil estimate`, `hil demo`) and the benchmark scripts take the same option, resolved here, so
`auto` means the same everywhere: CUDA when torch sees a GPU, else Apple's MPS, else the CPU.
torch is imported inside the functions: `hil --help` does not load it.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from hil.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
DEVICE_HELP = "auto (CUDA when present, else MPS, else the CPU), cpu, cuda, cuda:N or mps."

__all__ = ["DEVICES", "DEVICE_HELP", "add_device_argument", "resolve_device", "to_device"]


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device `name` asks for, or one UserError line saying why it cannot be had.

    `auto`: CUDA when `torch.cuda.is_available()`, else MPS when available, else the CPU.
    `cuda` and `cuda:N` need a CUDA device (N below `torch.cuda.device_count()`), `mps` needs
    MPS; a name torch does not know, or one not in `DEVICES`, is refused with the choices.
    """
    import torch

    text = str(name).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    kind, _, index = text.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise UserError(f"--device {name!r}: choose {', '.join(DEVICES[:-1])} or {DEVICES[-1]}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{text} requested but torch.cuda.is_available() is False")
    if index and int(index) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UserError(f"{text} requested but torch.cuda.device_count() is {count}")
    if kind == "mps" and not _mps_available():
        raise UserError("mps requested but torch.backends.mps.is_available() is False")
    return torch.device(text)


def to_device(value: Any, device: torch.device | str | None) -> Any:
    """`value` (a tensor, a module, or a dict of tensors) on `device`; as it is for None.

    The one way the training loop puts the model and each batch on the device, so a test can
    watch everything that goes there."""
    if device is None:
        return value
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return value.to(device)


def _argparse_device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """`--device` for a benchmark script: parsed to a `torch.device`, default auto; an
    unavailable device is argparse's one-line error (exit 2)."""
    parser.add_argument("--device", type=_argparse_device, default="auto", help=DEVICE_HELP)
