"""What a capture store was captured from, typed, so nothing downstream guesses.

The store's rows are feature maps of images shown on the bench; the teacher that fine-tuning
distils from sees the raw images of the same dataset indices. `StoreIdentity` records which
dataset, split, subset, calibration and bench made the rows, and each row carries the hash of the
pattern that was displayed, so `check_source` can prove that the images the teacher will get are
the ones the optics saw.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hil.data.placement import to_display
from hil.errors import UserError

if TYPE_CHECKING:
    from hil.acquire.store import Captures

# 2: images are placed on the input grid, shown on the display at a scale and origin
IDENTITY_VERSION = 2


class StoreIdentity(BaseModel):
    """The capture a store holds; a resumed capture must have the same identity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[2] = IDENTITY_VERSION
    dataset: str
    split: str
    fraction: float = Field(ge=0, le=1)
    seed: int
    data_digest: str = Field(description="digest of the dataset's images and labels")
    indices_digest: str = Field(description="digest of the planned dataset indices, in order")
    input_shape: tuple[int, int] = Field(description="input grid (h, w) the images were placed on")
    display_scale: int = Field(ge=1, description="display pixels per input pixel")
    display_origin: tuple[int, int] = Field(description="(x, y) of the grid's top-left on it")
    display_shape: tuple[int, ...] = Field(description="the physical display they were shown on")
    calibration_id: str
    bench_fingerprint: str
    simulated: bool

    @classmethod
    def parse(cls, text: str, path: Path | str) -> StoreIdentity:
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            where = ".".join(str(p) for p in e.errors()[0]["loc"]) or "identity"
            raise UserError(
                f"{path}: capture store identity is not readable ({where}: "
                f"{e.errors()[0]['msg']}); capture it again"
            ) from None

    def differences(self, other: StoreIdentity) -> list[str]:
        mine, theirs = self.model_dump(), other.model_dump()
        return sorted(k for k in mine if mine[k] != theirs[k])


def pattern_hash(shown: np.ndarray) -> str:
    """The hash each row records of the display levels it was captured with."""
    return hashlib.sha1(np.ascontiguousarray(shown, np.float32).tobytes()).hexdigest()


def as_shown(images: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    """Dataset images (N, C, ·, ·) placed on the input grid (h, w), channels last: (N, h, w) or
    (N, h, w, 3), what `Design.on_display` turns into the display's levels."""
    shown = to_display(images, input_hw)
    return shown[:, 0] if shown.shape[1] == 1 else shown.transpose(0, 2, 3, 1)


def check_source(store: Path | str, captures: Captures, data) -> None:
    """Refuse a store whose rows were not captured from `data`'s images at their indices, or
    whose labels are not the dataset's: the teacher, which sees those raw images, would learn
    other pictures than the optics saw."""
    identity, index, hashes = captures.identity, captures.index, captures.meta["pattern_hash"]
    if identity.dataset != data.name:
        raise UserError(f"{store}: captured from dataset {identity.dataset!r}, not {data.name!r}")
    if len(index) and (index.min() < 0 or index.max() >= len(data.images)):
        raise UserError(
            f"{store}: dataset index {int(index.max())} is beyond dataset {data.name!r} "
            f"({len(data.images)} images): the store and the dataset disagree"
        )
    shown = as_shown(data.images[index], identity.input_shape)
    pairs = enumerate(zip(hashes, shown, strict=True))
    wrong = [i for i, (h, s) in pairs if _text(h) != pattern_hash(s)]
    if wrong:
        raise UserError(
            f"{store}: {len(wrong)} of {len(hashes)} rows were captured from other images than "
            f"dataset {data.name!r} gives for their indices (first: row {wrong[0]}); the store "
            "and the dataset disagree: give the --data-root it was captured from, or capture again"
        )
    differ = captures.labels != data.labels[index]
    relabelled = np.flatnonzero(differ.any(axis=tuple(range(1, differ.ndim))))
    if len(relabelled):
        raise UserError(
            f"{store}: {len(relabelled)} rows carry other labels than dataset {data.name!r} "
            f"gives for their indices (first: row {relabelled[0]}): the file was modified"
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
