"""The capture store: feature maps captured on the bench, appended as they come, resumable.

One HDF5 file per capture. Rows are appended in SWMR mode and the row count is committed only
after a row's data is flushed, so a run killed at any moment leaves a readable file whose
committed rows are complete; a rerun continues after them. Every row carries a checksum of its
feature maps, so corruption is found when the store is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hil.errors import UserError

SCHEMA_VERSION = 1
FORMAT = "hil-capture-store"


def digest(features: np.ndarray) -> bytes:
    """First 128 bits of SHA-256 of the feature maps, as hex bytes."""
    return (
        hashlib.sha256(np.ascontiguousarray(features, np.float32).tobytes())
        .hexdigest()[:32]
        .encode()
    )


@dataclass(frozen=True)
class Row:
    index: int
    features: np.ndarray  # (m, H, W) float32
    label: np.ndarray | int
    timestamp_s: float
    exposure_s: float
    saturated_fraction: float
    pattern_hash: str
    simulated: bool
    frame: np.ndarray | None = None


class CaptureStore:
    """Append-only store; `open_for_capture` creates or resumes, `read` loads and verifies."""

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path, self.file = Path(path), file

    @classmethod
    def open_for_capture(
        cls,
        path: Path | str,
        *,
        plan: np.ndarray,
        feature_shape: tuple[int, ...],
        label_shape: tuple[int, ...],
        identity: dict[str, Any],
        keep_frames: tuple[int, int] | None = None,
    ) -> CaptureStore:
        """Create a store for `plan` (dataset indices, in capture order) or resume one whose
        identity (dataset, split, calibration, ...) matches."""
        path = Path(path)
        if path.exists():
            try:
                f = h5py.File(path, "a", libver="latest")
            except OSError as e:
                raise UserError(
                    f"{path}: cannot resume, not a readable capture store ({e})"
                ) from None
            stored = json.loads(f.attrs.get("identity", "{}"))
            if stored != json.loads(json.dumps(identity, default=str)):
                f.close()
                differs = sorted(
                    k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k)
                )
                raise UserError(
                    f"{path}: exists from a different capture (differs in {', '.join(differs)}); "
                    "choose another --out or delete it"
                )
            f.swmr_mode = True
            return cls(path, f)
        path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(path, "w", libver="latest")
        f.attrs.update(
            format=FORMAT,
            schema_version=SCHEMA_VERSION,
            count=0,
            identity=json.dumps(identity, default=str),
        )
        f.create_dataset("plan", data=np.asarray(plan, np.int64))
        n = (0,)
        f.create_dataset(
            "features",
            shape=n + tuple(feature_shape),
            maxshape=(None, *feature_shape),
            dtype="f4",
            chunks=(1, *feature_shape),
        )
        f.create_dataset(
            "labels",
            shape=n + tuple(label_shape),
            maxshape=(None, *label_shape),
            dtype="i8",
            chunks=(64, *label_shape) if not label_shape else (1, *label_shape),
        )
        for name, dtype in (
            ("index", "i8"),
            ("timestamp_s", "f8"),
            ("exposure_s", "f8"),
            ("saturated_fraction", "f4"),
            ("simulated", "?"),
            ("pattern_hash", "S40"),
            ("checksum", "S32"),
        ):
            f.create_dataset(name, shape=n, maxshape=(None,), dtype=dtype, chunks=(256,))
        if keep_frames is not None:
            f.create_dataset(
                "frames",
                shape=(0, *keep_frames),
                maxshape=(None, *keep_frames),
                dtype="u2",
                chunks=(1, *keep_frames),
                compression="gzip",
            )
        f.swmr_mode = True
        return cls(path, f)

    @property
    def count(self) -> int:
        return int(self.file.attrs["count"])

    @property
    def plan(self) -> np.ndarray:
        return self.file["plan"][:]

    def append(self, row: Row) -> None:
        """Write one row past the committed count, flush it, then commit the count."""
        f, i = self.file, self.count
        values = {
            "features": row.features,
            "labels": row.label,
            "index": row.index,
            "timestamp_s": row.timestamp_s,
            "exposure_s": row.exposure_s,
            "saturated_fraction": row.saturated_fraction,
            "simulated": row.simulated,
            "pattern_hash": row.pattern_hash.encode(),
            "checksum": digest(row.features),
        }
        if row.frame is not None and "frames" in f:
            values["frames"] = row.frame
        for name, value in values.items():
            ds = f[name]
            if ds.shape[0] < i + 1:
                ds.resize(i + 1, axis=0)
            ds[i] = value
        f.flush()
        f.attrs["count"] = i + 1
        f.flush()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> CaptureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _recover(path: Path) -> None:
    """Rewrite a store whose writer died (HDF5 then refuses to reopen it for writing, but SWMR
    readers still see every committed row) as a clean file with exactly those rows."""
    tmp = path.with_name(f".{path.name}.recover.tmp")
    with (
        h5py.File(path, "r", libver="latest", swmr=True) as src,
        h5py.File(tmp, "w", libver="latest") as dst,
    ):
        n = int(src.attrs["count"])
        dst.attrs.update(dict(src.attrs))
        for name, ds in src.items():
            rows = ds[:] if name == "plan" else ds[:n]
            maxshape = ds.shape if name == "plan" else (None, *ds.shape[1:])
            dst.create_dataset(
                name, data=rows, maxshape=maxshape, chunks=ds.chunks, compression=ds.compression
            )
    os.replace(tmp, path)


def _open_for_reading(path: Path) -> h5py.File:
    """Plain read-only first: a damaged file fails at once, where SWMR reading would retry its
    metadata for a long time. SWMR only for a store a writer holds (or held, until it died)."""
    try:
        return h5py.File(path, "r", libver="latest")
    except OSError as e:
        if "consistency flags" not in str(e):
            raise
        return h5py.File(path, "r", libver="latest", swmr=True)


@dataclass(frozen=True)
class Captures:
    features: np.ndarray  # (N, m, H, W)
    labels: np.ndarray
    index: np.ndarray
    meta: dict[str, np.ndarray]
    identity: dict[str, Any]


def read(path: Path | str) -> Captures:
    """The committed rows of a store, verified; one clear error for a bad file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: capture store not found")
    try:
        with _open_for_reading(path) as f:
            if f.attrs.get("format") != FORMAT:
                raise UserError(f"{path}: not a hil capture store")
            if int(f.attrs["schema_version"]) > SCHEMA_VERSION:
                raise UserError(
                    f"{path}: written by a newer hil (schema "
                    f"{int(f.attrs['schema_version'])}); upgrade hil"
                )
            n = int(f.attrs["count"])
            data = {
                k: f[k][:n]
                for k in (
                    "features",
                    "labels",
                    "index",
                    "timestamp_s",
                    "exposure_s",
                    "saturated_fraction",
                    "simulated",
                    "pattern_hash",
                    "checksum",
                )
            }
            identity = json.loads(f.attrs["identity"])
    except UserError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: truncated or corrupt capture store ({e})") from None
    if len(data["features"]) != n:
        raise UserError(f"{path}: truncated: {len(data['features'])} rows of {n} committed")
    bad = [i for i in range(n) if digest(data["features"][i]) != bytes(data["checksum"][i])]
    if bad:
        raise UserError(
            f"{path}: checksum mismatch in {len(bad)} rows (first: row {bad[0]}, "
            f"dataset index {int(data['index'][bad[0]])}): the file was modified"
        )
    meta = {k: v for k, v in data.items() if k not in ("features", "labels", "index", "checksum")}
    return Captures(data["features"], data["labels"], data["index"], meta, identity)
