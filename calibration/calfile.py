"""The calibration file: every fitted quantity of a bench calibration in one HDF5 file.

A calibration is measured once and then trusted by every capture after it, so the file has to
vouch for itself: it is written atomically (an interrupted save leaves the previous file or none,
never half of one), it carries a SHA-256 over everything it stores (bit rot and hand edits are
caught on load, not in a fine-tuned model weeks later), a schema version (an older hil refuses a
newer file instead of misreading it) and a fingerprint of the bench geometry (a calibration is
never applied to a bench it was not made for).

On-disk layout, flat, every entry named exactly as the `Calibration` field it holds:

- root attributes: `format` ("hil-calibration"), `checksum` (SHA-256 hex), and the scalars
  `schema_version`, `id`, `created`, `bench_name`, `fingerprint`, `simulated`, `frame_shape`,
  `display_shape`, `input_shape`, `display_origin` (int64 vectors), `display_scale`, `kernels`,
  `kernel_size`, `signed`, `channels`, `camera_bit_depth`, `exposure_s`,
  `conversion_gain_e_per_dn`, `black_level_dn`, `display_gamma`;
- datasets: the arrays (gzip + shuffle from 1024 elements up), in their declared dtypes;
- scalar UTF-8 string datasets: `devices`, `versions`, `steps`, `truth` as JSON text.
"""

from __future__ import annotations

import hashlib
import io
import json
import numbers
import operator
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from calibration.atomic import NoSpace, atomic_write_bytes
from calibration.errors import CalibrationError

if TYPE_CHECKING:
    from calibration.design import Design

SCHEMA_VERSION = 2  # 2: input grid on a physical display, tile maps with distortion, vignetting
FORMAT = "hil-calibration"

# What must match between a calibration and the bench that uses it, in the order errors name it.
FINGERPRINT_FIELDS = (
    "frame_shape",
    "display_shape",
    "input_shape",
    "display_scale",
    "display_origin",
    "kernels",
    "kernel_size",
    "signed",
    "channels",
    "camera_bit_depth",
)

# Root attributes and how each is typed in memory.
_SCALARS: dict[str, str] = {
    "schema_version": "int",
    "id": "str",
    "created": "str",
    "bench_name": "str",
    "fingerprint": "str",
    "simulated": "bool",
    "frame_shape": "shape",
    "display_shape": "shape",
    "input_shape": "shape",
    "display_scale": "int",
    "display_origin": "point",
    "kernels": "int",
    "kernel_size": "int",
    "signed": "bool",
    "channels": "int",
    "camera_bit_depth": "int",
    "exposure_s": "float",
    "conversion_gain_e_per_dn": "float",
    "black_level_dn": "float",
    "display_gamma": "float",
}

# Datasets and their dtypes; affines stay float64 because sub-pixel registration needs it.
_ARRAYS: dict[str, np.dtype] = {
    "dark_dn": np.dtype(np.float32),
    "read_noise_dn": np.dtype(np.float32),
    "background_dn_per_s": np.dtype(np.float32),
    "bright_field_dn_per_s": np.dtype(np.float32),
    "display_levels": np.dtype(np.float32),
    "display_response": np.dtype(np.float32),
    "illumination": np.dtype(np.float32),
    "affines": np.dtype(np.float64),
    "distortion_k1": np.dtype(np.float64),
    "distortion_centre_px": np.dtype(np.float64),
    "distortion_radius_px": np.dtype(np.float64),
    "vignetting": np.dtype(np.float32),
    "registration_rms_px": np.dtype(np.float32),
    "tile_boxes": np.dtype(np.int32),
    "psfs": np.dtype(np.float32),
    "psf_residual": np.dtype(np.float32),
    "tile_gain": np.dtype(np.float32),
}

_JSON = ("devices", "versions", "steps", "truth")

_COMPRESS_MIN = 1024  # elements; below this gzip costs more than it saves


def _one_line(text: object) -> str:
    """Collapse whitespace so a message from h5py or a path stays one line on the terminal."""
    return " ".join(str(text).split())


def _err(message: str) -> CalibrationError:
    return CalibrationError(_one_line(message))


def _bad(name: str, problem: str) -> CalibrationError:
    return _err(f"calibration field '{name}': {problem}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _new_id() -> str:
    return uuid.uuid4().hex


# -- type normalisation (shared by construction, fingerprints and loading) ---------------------


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool | np.bool_):
        raise _bad(name, f"expected an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise _bad(name, f"expected an integer, got {value!r}") from None


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise _bad(name, f"expected a number, got {value!r}")
    out = float(value)
    if not np.isfinite(out):
        raise _bad(name, f"expected a finite number, got {out}")
    return out


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise _bad(name, f"expected true or false, got {value!r}")
    return bool(value)


def _as_str(name: str, value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise _bad(name, f"expected a string, got {value!r}")
    return value


def _as_shape(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, tuple | list):
        dims = value
    elif isinstance(value, np.ndarray) and value.ndim == 1:
        dims = value.tolist()
    else:
        raise _bad(name, f"expected a shape, got {value!r}")
    out = tuple(_as_int(name, d) for d in dims)
    if not out or any(d < 1 for d in out):
        raise _bad(name, f"expected positive sizes, got {out}")
    return out


def _as_point(name: str, value: Any) -> tuple[int, int]:
    dims = value.tolist() if isinstance(value, np.ndarray) else value
    if not isinstance(dims, tuple | list) or len(dims) != 2:
        raise _bad(name, f"expected (x, y), got {value!r}")
    out = tuple(_as_int(name, d) for d in dims)
    if min(out) < 0:
        raise _bad(name, f"expected non-negative pixels, got {out}")
    return out


_CONVERT = {
    "point": _as_point,
    "int": _as_int,
    "float": _as_float,
    "bool": _as_bool,
    "str": _as_str,
    "shape": _as_shape,
}


def _as_array(name: str, value: Any, dtype: np.dtype) -> np.ndarray:
    """A C-contiguous native array of `dtype`; refuses what would not convert faithfully."""
    try:
        a = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise _bad(name, f"not an array ({e})") from None
    if a.dtype.kind not in "iuf":
        raise _bad(name, f"expected a numeric array of {dtype}, got dtype {a.dtype}")
    if dtype.kind == "i":
        if a.dtype.kind == "f" and not np.all(np.isfinite(a) & (a == np.round(a))):
            raise _bad(name, f"expected integers ({dtype}), got non-integral values")
        info = np.iinfo(dtype)
        if a.size and (a.min() < info.min or a.max() > info.max):
            raise _bad(name, f"values outside the range of {dtype}")
    out = np.ascontiguousarray(a, dtype=dtype)
    if dtype.kind == "f" and not np.all(np.isfinite(out)):
        raise _bad(name, f"has NaN or infinite values (as {dtype})")
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _dumps(name: str, value: Any, sort_keys: bool = False) -> str:
    try:
        return json.dumps(value, default=_json_default, sort_keys=sort_keys, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise _bad(name, f"not JSON-serialisable ({e})") from None


# -- fingerprint --------------------------------------------------------------------------------


def fingerprint_inputs(
    design: Design, frame_shape: Any, display_shape: Any, camera_bit_depth: int
) -> dict[str, Any]:
    """What a calibration of `design` on this camera and display is valid for, in canonical JSON
    types; pass this dict as `load(expect_fingerprint=)` so a mismatch names the fields that
    differ instead of two opaque hashes."""
    return _canonical_inputs(
        {
            "frame_shape": frame_shape,
            "display_shape": display_shape,
            "input_shape": design.hw,
            "display_scale": design.display_scale,
            "display_origin": design.origin_on(tuple(display_shape)[:2]),
            "kernels": design.kernels,
            "kernel_size": design.kernel_size,
            "signed": design.signed,
            "channels": design.channels,
            "camera_bit_depth": camera_bit_depth,
        }
    )


def bench_fingerprint(
    design: Design, frame_shape: Any, display_shape: Any, camera_bit_depth: int
) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of what a calibration is only valid for:
    any change of frame, display, kernel layout or bit depth invalidates every fitted quantity."""
    return _digest(fingerprint_inputs(design, frame_shape, display_shape, camera_bit_depth))


def _canonical_inputs(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The FINGERPRINT_FIELDS of `fields` as canonical JSON types (shapes as lists of ints)."""
    return {
        "frame_shape": list(_as_shape("frame_shape", fields["frame_shape"])),
        "display_shape": list(_as_shape("display_shape", fields["display_shape"])),
        "input_shape": list(_as_shape("input_shape", fields["input_shape"])),
        "display_scale": _as_int("display_scale", fields["display_scale"]),
        "display_origin": list(_as_point("display_origin", fields["display_origin"])),
        "kernels": _as_int("kernels", fields["kernels"]),
        "kernel_size": _as_int("kernel_size", fields["kernel_size"]),
        "signed": _as_bool("signed", fields["signed"]),
        "channels": _as_int("channels", fields["channels"]),
        "camera_bit_depth": _as_int("camera_bit_depth", fields["camera_bit_depth"]),
    }


def _digest(inputs: Mapping[str, Any]) -> str:
    """The fingerprint of canonical inputs; the algorithm every calibration file on disk used."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(b"hil-bench-fingerprint/1\n" + text.encode()).hexdigest()[:16]


# -- the calibration ----------------------------------------------------------------------------


@dataclass(eq=False, kw_only=True)
class Calibration:
    """Every fitted quantity of one bench calibration. Construction validates and normalises
    (scalars to Python types, arrays to their declared dtypes) so that what is in memory is what
    `save` writes and `load` returns; `==` compares arrays exactly and the dicts as JSON."""

    # identity
    bench_name: str
    simulated: bool
    id: str = field(default_factory=_new_id)
    created: str = field(default_factory=_now)
    fingerprint: str = ""  # empty: computed from the geometry
    schema_version: int = SCHEMA_VERSION
    # geometry of the bench
    frame_shape: tuple[int, int]
    display_shape: tuple[int, ...]  # the physical display: (H, W) or (H, W, 3)
    input_shape: tuple[int, int]  # the design's input grid (h, w) on it
    display_scale: int  # display pixels per input pixel
    display_origin: tuple[int, int]  # (x, y) display pixel of the grid's top-left
    kernels: int
    kernel_size: int
    signed: bool
    channels: int
    camera_bit_depth: int
    # sensor
    exposure_s: float
    dark_dn: np.ndarray  # (H, W) float32, mean dark frame
    read_noise_dn: np.ndarray  # (H, W) float32, temporal sigma
    conversion_gain_e_per_dn: float
    black_level_dn: float
    background_dn_per_s: np.ndarray  # (H, W) float32, stray-light rate
    bright_field_dn_per_s: np.ndarray  # (H, W) float32, a white input grid's signal
    # display
    display_levels: np.ndarray  # (L,) float32, strictly increasing
    display_response: np.ndarray  # (L,) float32, 1 at level 1
    display_gamma: float
    # illumination
    illumination: np.ndarray  # (h, w) float32 on the input grid, 1 at the centre
    vignetting: np.ndarray  # (P,) float32, relative fall-off at each sub-image's corner
    # registration: input grid (x, y) -> affine -> radial distortion -> sensor (x, y)
    affines: np.ndarray  # (P, 2, 3) float64
    distortion_k1: np.ndarray  # (P,) float64, relative displacement at the radius
    distortion_centre_px: np.ndarray  # (P, 2) float64, sensor (x, y)
    distortion_radius_px: np.ndarray  # (P,) float64
    registration_rms_px: np.ndarray  # (P,) float32, sensor px
    tile_boxes: np.ndarray  # (P, 4) int32, (y0, x0, h, w)
    # kernels
    psfs: np.ndarray  # (P, C, k, k) float32, DN/s per unit display intensity
    psf_residual: np.ndarray  # (P,) float32
    tile_gain: np.ndarray  # (P,) float32
    # provenance
    devices: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    truth: dict | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def tiles(self) -> int:
        """P: one tile per kernel, two (positive, negative) per signed kernel."""
        return self.kernels * (2 if self.signed else 1)

    @property
    def bench_inputs(self) -> dict[str, Any]:
        """The geometry this calibration is valid for, as `fingerprint_inputs` returns it."""
        return _canonical_inputs({name: getattr(self, name) for name in FINGERPRINT_FIELDS})

    def validate(self) -> None:
        """Check and normalise every field; raises CalibrationError naming the field. `save` calls
        it again, so steps appended after construction are checked before they reach disk."""
        for name, kind in _SCALARS.items():
            setattr(self, name, _CONVERT[kind](name, getattr(self, name)))
        self._check_scalars()
        for name, dtype in _ARRAYS.items():
            setattr(self, name, _as_array(name, getattr(self, name), dtype))
        self._check_arrays()
        self._check_provenance()

    def _check_identity(self) -> None:
        if self.schema_version < 1:
            raise _bad("schema_version", f"must be at least 1, got {self.schema_version}")
        if not self.id:
            raise _bad("id", "must not be empty")
        try:
            created = datetime.fromisoformat(self.created)
        except ValueError:
            raise _bad("created", f"not an ISO 8601 time: {self.created!r}") from None
        if created.tzinfo is None:
            raise _bad("created", f"needs a UTC offset: {self.created!r}")

    def _check_scalars(self) -> None:
        self._check_identity()
        if len(self.frame_shape) != 2:
            raise _bad("frame_shape", f"expected (H, W), got {self.frame_shape}")
        ds = self.display_shape
        if not (len(ds) == 2 or (len(ds) == 3 and ds[2] == 3)):
            raise _bad("display_shape", f"expected (H, W) or (H, W, 3), got {ds}")
        if len(self.input_shape) != 2 or min(self.input_shape) < 1:
            raise _bad("input_shape", f"expected (h, w) ≥ 1, got {self.input_shape}")
        (ih, iw), sc, (ox, oy) = self.input_shape, self.display_scale, self.display_origin
        if sc < 1 or ox + sc * iw > ds[1] or oy + sc * ih > ds[0]:
            raise _bad(
                "display_scale",
                f"the {ih}x{iw} input grid at scale {sc} and origin ({ox}, {oy}) leaves the "
                f"{ds[0]}x{ds[1]} display",
            )
        for name in ("kernels", "kernel_size", "channels"):
            if getattr(self, name) < 1:
                raise _bad(name, f"must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.camera_bit_depth <= 32:
            raise _bad("camera_bit_depth", f"must be 1 to 32, got {self.camera_bit_depth}")
        for name in ("exposure_s", "conversion_gain_e_per_dn", "display_gamma"):
            if getattr(self, name) <= 0:
                raise _bad(name, f"must be positive, got {getattr(self, name)}")
        expected = _digest(self.bench_inputs)
        if not self.fingerprint:
            self.fingerprint = expected
        elif self.fingerprint != expected:
            raise _bad(
                "fingerprint",
                f"{self.fingerprint} does not match the geometry ({expected}); "
                "leave it empty to have it computed",
            )

    def _check_arrays(self) -> None:
        h, w = self.frame_shape
        p, c, k = self.tiles, self.channels, self.kernel_size
        n_levels = self.display_levels.shape[0] if self.display_levels.ndim == 1 else -1
        shapes = {
            "dark_dn": ((h, w), "frame_shape"),
            "read_noise_dn": ((h, w), "frame_shape"),
            "background_dn_per_s": ((h, w), "frame_shape"),
            "bright_field_dn_per_s": ((h, w), "frame_shape"),
            "display_levels": ((n_levels,), "1-D"),
            "display_response": ((n_levels,), "display_levels"),
            "illumination": (tuple(self.input_shape), "input_shape"),
            "vignetting": ((p,), "P tiles"),
            "affines": ((p, 2, 3), "P tiles"),
            "distortion_k1": ((p,), "P tiles"),
            "distortion_centre_px": ((p, 2), "P tiles"),
            "distortion_radius_px": ((p,), "P tiles"),
            "registration_rms_px": ((p,), "P tiles"),
            "tile_boxes": ((p, 4), "P tiles"),
            "psfs": ((p, c, k, k), "P tiles, channels, kernel_size"),
            "psf_residual": ((p,), "P tiles"),
            "tile_gain": ((p,), "P tiles"),
        }
        for name, (shape, source) in shapes.items():
            got = getattr(self, name).shape
            if got != shape:
                raise _bad(name, f"shape {got}, expected {shape} ({source}, P={p})")
        if n_levels < 2 or not np.all(np.diff(self.display_levels) > 0):
            raise _bad("display_levels", "needs at least 2 strictly increasing levels")
        if np.any(self.read_noise_dn < 0):
            raise _bad("read_noise_dn", "has negative values")
        y0, x0, bh, bw = self.tile_boxes.T.astype(np.int64)
        if np.any(bh < 1) or np.any(bw < 1):
            raise _bad("tile_boxes", "has a box of zero or negative size")
        if np.any(y0 < 0) or np.any(x0 < 0) or np.any(y0 + bh > h) or np.any(x0 + bw > w):
            raise _bad("tile_boxes", f"has a box outside the {h}x{w} frame")

    def _check_provenance(self) -> None:
        for name in ("devices", "versions"):
            if not isinstance(getattr(self, name), Mapping):
                raise _bad(name, f"expected a dict, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.steps, list | tuple):
            raise _bad("steps", f"expected a list, got {type(self.steps).__name__}")
        for i, step in enumerate(self.steps):
            if not isinstance(step, Mapping) or not isinstance(step.get("name"), str):
                raise _bad("steps", f"entry {i} is not a dict with a 'name'")
            seconds = step.get("seconds", 0.0)
            if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
                raise _bad("steps", f"entry {i} ({step['name']}): 'seconds' is not a number")
        if self.truth is not None and not isinstance(self.truth, Mapping):
            raise _bad("truth", f"expected a dict or None, got {type(self.truth).__name__}")
        # Checked, not copied: the pipeline keeps appending to the same `steps` list after
        # construction. Tuples and numpy scalars come back from load as lists and Python numbers.
        for name in _JSON:
            _dumps(name, getattr(self, name))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Calibration):
            return NotImplemented
        for name in _SCALARS:
            if getattr(self, name) != getattr(other, name):
                return False
        for name in _ARRAYS:
            a, b = getattr(self, name), getattr(other, name)
            if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
                return False
        # As canonical text, so a NaN in truth compares equal to itself.
        return all(
            _dumps(n, getattr(self, n), sort_keys=True) == _dumps(n, getattr(other, n), True)
            for n in _JSON
        )


# -- checksum -----------------------------------------------------------------------------------


def _checksum(
    scalars: Mapping[str, Any], arrays: Mapping[str, np.ndarray], texts: Mapping[str, str]
) -> str:
    """SHA-256 over the scalars (canonical JSON), each array's name, dtype, shape and
    little-endian bytes, and the JSON texts; every item is length-prefixed so that bytes cannot
    move from one item to the next without changing the digest."""
    h = hashlib.sha256(b"hil-calibration-checksum/1\n")

    def put(data: Any, size: int) -> None:
        h.update(size.to_bytes(8, "little"))
        h.update(data)

    def put_bytes(data: bytes) -> None:
        put(data, len(data))

    put_bytes(json.dumps(dict(scalars), sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        put_bytes(name.encode())
        put_bytes(a.dtype.str.encode())
        put_bytes(json.dumps(list(a.shape)).encode())
        put(a.reshape(-1).view(np.uint8), a.nbytes)
    for name in sorted(texts):
        put_bytes(name.encode())
        put_bytes(texts[name].encode())
    return h.hexdigest()


def _contents(cal: Calibration) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    scalars = {name: getattr(cal, name) for name in _SCALARS}
    arrays = {name: getattr(cal, name) for name in _ARRAYS}
    texts = {name: _dumps(name, getattr(cal, name)) for name in _JSON}
    return scalars, arrays, texts


# -- save ---------------------------------------------------------------------------------------


def _write(f: h5py.File, scalars: dict, arrays: dict, texts: dict, checksum: str) -> None:
    f.attrs["format"] = FORMAT
    for name, value in scalars.items():
        kind = _SCALARS[name]
        if kind in ("shape", "point"):
            f.attrs[name] = np.asarray(value, dtype=np.int64)
        elif kind == "bool":
            f.attrs[name] = np.bool_(value)
        else:
            f.attrs[name] = value
    for name, a in arrays.items():
        opts: dict[str, Any] = {}
        if a.size >= _COMPRESS_MIN:
            opts = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
        f.create_dataset(name, data=a, **opts)
    for name, text in texts.items():
        f.create_dataset(name, data=text, dtype=h5py.string_dtype("utf-8"))
    f.attrs["checksum"] = checksum


def save(cal: Calibration, path: str | os.PathLike[str]) -> Path:
    """Validate `cal` and write it to `path` atomically (`calibration.atomic`): a crash or Ctrl-C
    leaves the previous file (or none) and no temporary file. OSErrors become a one-line
    CalibrationError naming the path; anything else is re-raised after the clean-up."""
    path = Path(path)
    cal.validate()
    scalars, arrays, texts = _contents(cal)
    checksum = _checksum(scalars, arrays, texts)
    if not path.parent.is_dir():
        raise _err(f"{path}: cannot write the calibration; {path.parent} is not a folder")
    try:
        image = io.BytesIO()  # HDF5 never meets the disk: a full one is a plain OSError
        with h5py.File(image, "w") as f:
            _write(f, scalars, arrays, texts, checksum)
        atomic_write_bytes(path, image.getvalue())
    except NoSpace as e:
        raise _err(f"{path}: cannot write the calibration: {e.strerror}") from None
    except OSError as e:
        raise _err(
            f"{path}: cannot write the calibration ({e}); check the disk space and "
            "permissions of the folder"
        ) from e
    return path


# -- load ---------------------------------------------------------------------------------------


def _missing(path: Path, name: str, what: str) -> CalibrationError:
    return _err(
        f"{path}: missing '{name}' ({what}; the file is incomplete or from another program); "
        "run `hil calibrate` again"
    )


def _read_attr(path: Path, f: h5py.File, name: str, kind: str) -> Any:
    """The attribute as the plain Python value it was saved from; the type is not checked here
    (the checksum and then validation do that), so a tampered type shows as a checksum error."""
    if name not in f.attrs:
        raise _missing(path, name, "root attribute")
    value = f.attrs[name]
    if isinstance(value, np.ndarray):
        return tuple(value.ravel().tolist()) if kind in ("shape", "point") else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _read(path: Path, f: h5py.File) -> tuple[dict, dict, dict, str]:
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode("utf-8", "replace")
    if fmt != FORMAT:
        raise _err(
            f"{path}: truncated or not a calibration file (HDF5 without format "
            f"'{FORMAT}'); pass a file written by `hil calibrate`"
        )
    version = _read_attr(path, f, "schema_version", "int")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _err(f"{path}: unreadable schema_version {version!r}; run `hil calibrate` again")
    if version > SCHEMA_VERSION:
        raise _err(
            f"{path}: written by a newer hil (schema {version}, this hil reads up to "
            f"{SCHEMA_VERSION}); upgrade hil"
        )
    if version < SCHEMA_VERSION:
        raise _err(
            f"{path}: written by an older hil (schema {version}, without the physical display "
            f"and tile geometry of schema {SCHEMA_VERSION}); run `hil calibrate` again"
        )
    scalars = {name: _read_attr(path, f, name, kind) for name, kind in _SCALARS.items()}
    arrays = {}
    for name in _ARRAYS:
        ds = f.get(name)
        if not isinstance(ds, h5py.Dataset):
            raise _missing(path, name, "dataset")
        arrays[name] = np.asarray(ds[()])
    texts = {}
    for name in _JSON:
        ds = f.get(name)
        if not isinstance(ds, h5py.Dataset):
            raise _missing(path, name, "JSON dataset")
        if ds.dtype.kind not in "OSU" or ds.shape != ():
            raise _err(f"{path}: '{name}' is not a JSON string; run `hil calibrate` again")
        texts[name] = ds.asstr()[()]
    checksum = f.attrs.get("checksum")
    if checksum is None:
        raise _missing(path, "checksum", "root attribute")
    checksum = checksum.decode() if isinstance(checksum, bytes) else str(checksum)
    return scalars, arrays, texts, checksum


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return "x".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_bench(path: Path, cal: Calibration, expected: str | Mapping[str, Any]) -> None:
    have = cal.bench_inputs
    if isinstance(expected, Mapping):
        missing = [k for k in FINGERPRINT_FIELDS if k not in expected]
        if missing:
            raise _err(f"expect_fingerprint: the bench inputs lack {', '.join(missing)}")
        want = _canonical_inputs(expected)
        if _digest(want) == cal.fingerprint:
            return
        detail = ", ".join(
            f"{k} {_fmt(have[k])} in the file vs {_fmt(want[k])} on the bench"
            for k in FINGERPRINT_FIELDS
            if have[k] != want[k]
        )
    else:
        if str(expected) == cal.fingerprint:
            return
        made_for = ", ".join(f"{k} {_fmt(have[k])}" for k in FINGERPRINT_FIELDS)
        detail = f"fingerprint {cal.fingerprint} made for {made_for}; bench fingerprint {expected}"
    raise _err(
        f"{path}: calibration is for a different bench ({detail}); "
        "run `hil calibrate` for this bench"
    )


def load(
    path: str | os.PathLike[str], expect_fingerprint: str | Mapping[str, Any] | None = None
) -> Calibration:
    """Read and verify a calibration file. Every way it can be unusable (missing, truncated, not
    a calibration, a newer schema, a missing field, a checksum mismatch, inconsistent values,
    another bench) is one CalibrationError whose one-line message starts with the path.

    `expect_fingerprint` is the bench's fingerprint string, or better the `fingerprint_inputs`
    dict (one entry per FINGERPRINT_FIELDS name), with which a mismatch names the fields that
    differ.
    """
    path = Path(path)
    if not path.exists():
        raise _err(f"{path}: calibration file not found; check the path or run `hil calibrate`")
    try:
        with h5py.File(path, "r") as f:
            scalars, arrays, texts, stored = _read(path, f)
    except CalibrationError:
        raise
    except Exception as e:  # h5py reports damage as OSError, KeyError, ValueError, ...
        raise _err(
            f"{path}: damaged, truncated or not a calibration file ({type(e).__name__}: {e}); "
            "run `hil calibrate` again"
        ) from e
    if _checksum(scalars, arrays, texts) != stored:
        raise _err(f"{path}: checksum mismatch: the file was modified or corrupted")
    try:
        dicts = {name: json.loads(text) for name, text in texts.items()}
    except ValueError as e:
        raise _err(f"{path}: unreadable JSON ({e}); run `hil calibrate` again") from e
    try:
        cal = Calibration(**scalars, **arrays, **dicts)
    except CalibrationError as e:
        raise _err(f"{path}: {e}; run `hil calibrate` again") from e
    if expect_fingerprint is not None:
        _check_bench(path, cal, expect_fingerprint)
    return cal


# -- summary ------------------------------------------------------------------------------------


def summary(cal: Calibration) -> dict[str, Any]:
    """The few numbers a person checks first, JSON-friendly, for result.json and `--json`."""
    return {
        "id": cal.id,
        "created": cal.created,
        "bench_name": cal.bench_name,
        "fingerprint": cal.fingerprint,
        "simulated": cal.simulated,
        "schema_version": cal.schema_version,
        "tiles": cal.tiles,
        "exposure_s": cal.exposure_s,
        "display_gamma": cal.display_gamma,
        "conversion_gain_e_per_dn": cal.conversion_gain_e_per_dn,
        "black_level_dn": cal.black_level_dn,
        "registration_rms_px_mean": float(np.mean(cal.registration_rms_px)),
        "psf_residual_mean": float(np.mean(cal.psf_residual)),
        "tile_gain_mean": float(np.mean(cal.tile_gain)),
        "seconds": float(sum(float(s.get("seconds", 0.0)) for s in cal.steps)),
        "truth": json.loads(_dumps("truth", cal.truth)),
    }
