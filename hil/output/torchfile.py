"""The PyTorch files hil writes (model files, resume states, teacher caches), sealed by a digest.

`torch.load` reads a zip archive without checking its members' CRCs, so a flipped bit in a
weight loads as another weight and nothing notices. Every file written here carries the SHA-256
of its content, which each read recomputes; files without one (written before the seal, or by
another program) are returned as they are, for the caller's format check to judge.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import Any

import torch

from calibration.atomic import atomic_write_bytes
from hil.errors import UserError

SEAL = "sha256"


def content_digest(state: Any) -> str:
    """SHA-256 of a nest of dicts, lists, tensors and plain values, in a fixed order. Written
    here because pickled bytes are not canonical (the same weights pickle differently)."""
    h = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            h.update(b"{")
            for key in sorted(value, key=repr):
                h.update(repr(key).encode())
                walk(value[key])
            h.update(b"}")
        elif isinstance(value, list | tuple):
            h.update(b"[")
            for item in value:
                walk(item)
            h.update(b"]")
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())

    walk(state)
    return h.hexdigest()


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> None:
    """torch.save of `state` and its seal, atomically: an interrupt never leaves half a file.
    Saved to memory first: on a full disk torch.save fails with an internal assertion."""
    image = io.BytesIO()
    torch.save({**state, SEAL: content_digest(state)}, image)
    atomic_write_bytes(path, image.getbuffer())


def load_checkpoint(path: Path | str, what: str = "hil file") -> Any:
    """What `path` holds, its seal checked and removed; one UserError line naming the file when
    it is empty, not a PyTorch file, or not what was sealed."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise UserError(f"{path}: an empty file, not a {what}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch.load fails in many ways (and many lines) on a foreign file
        raise UserError(f"{path}: not a {what} (not readable as a PyTorch file)") from None
    if isinstance(state, dict) and SEAL in state:
        sealed = state.pop(SEAL)
        if sealed != content_digest(state):
            raise UserError(
                f"{path}: damaged: its content no longer matches the digest it was written "
                "with (a disk or copy error?)"
            )
    return state
