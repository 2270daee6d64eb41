"""A restricted unpickler for CIFAR-10's python batches: numeric arrays out, nothing executed.

CIFAR-10 is distributed as Python pickles, and a pickle can name any global and call it. This
reader lets a pickle name only inert stand-ins (`PICKLE_ALLOWED`) that validate their arguments
and build arrays with ``np.frombuffer``, so loading a hostile file runs nothing.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from hil.errors import UserError

__all__ = ["PICKLE_ALLOWED", "read_safe_pickle"]

# Plain numeric dtypes a CIFAR batch may hold; never object or structured ones.
_PICKLE_DTYPES = frozenset(
    ["b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"]
    + list("?bBhHiIlLqQefd")
)


class _DtypeSpec:
    """Stands in for numpy.dtype(code, ...): a whitelisted scalar code and its byte order."""

    def __init__(self, code, align=False, copy=False):
        code = code.decode("ascii") if isinstance(code, bytes) else code
        if not isinstance(code, str) or code not in _PICKLE_DTYPES:
            raise pickle.UnpicklingError(f"refuses dtype {code!r}: only plain numeric ones")
        self.dtype = np.dtype(code)

    def __setstate__(self, state):
        # (version, byte order, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 5 or any(s is not None for s in state[2:5]):
            raise pickle.UnpicklingError("refuses a structured or sub-array dtype")
        order = state[1].decode("ascii") if isinstance(state[1], bytes) else state[1]
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)
        elif order not in ("|", "="):
            raise pickle.UnpicklingError(f"bad dtype byte order {order!r}")


class _Inert:
    """Refuses BUILD: a pickle must not set attributes on the stand-ins themselves."""

    def __setstate__(self, state):
        raise pickle.UnpicklingError("refuses to set state on a numpy stand-in")


class _NdarrayToken(_Inert):
    """Stands in for the class numpy.ndarray, which a pickle only passes to _reconstruct."""


class _ArraySpec:
    """Stands in for numpy's _reconstruct(ndarray, shape, dtype); __setstate__ builds the array
    from the pickled bytes with np.frombuffer, never from pickle-controlled pointers or objects."""

    array: np.ndarray | None = None  # stays None if the pickle never gives the state

    def __init__(self, subtype, shape, code):
        if subtype is not _NdarrayToken:
            raise pickle.UnpicklingError("_reconstruct of something other than an ndarray")

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("bad ndarray state")
        shape, spec, fortran, data = state[-4:]
        ok_shape = isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)
        if not (ok_shape and isinstance(spec, _DtypeSpec) and isinstance(data, bytes | bytearray)):
            raise pickle.UnpicklingError("bad ndarray state")
        count = int(np.prod(shape, dtype=np.int64))
        if count * spec.dtype.itemsize != len(data):
            raise pickle.UnpicklingError(f"array {shape} does not match its {len(data)} bytes")
        flat = np.frombuffer(data, spec.dtype, count)
        self.array = flat.reshape(shape, order="F" if fortran else "C").astype(
            spec.dtype.newbyteorder("=")
        )


class _Latin1Encode(_Inert):
    """_codecs.encode as Python 3 pickles bytes under protocol 2 (latin1 text), and nothing more."""

    def __call__(self, text, encoding):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError("_codecs.encode other than latin1 text to bytes")
        return text.encode("latin1")


# The only globals a pickle may name; each maps to an inert stand-in above, not to the real thing.
# numpy pickles an array as _reconstruct(ndarray, (0,), code) followed by a state tuple holding
# the shape, a dtype (itself reduced to numpy.dtype(code) plus a state) and the raw bytes; Python 3
# protocol-2 pickles write bytes as _codecs.encode(text, "latin1"). numpy.core is numpy 1.x's (and
# CIFAR's own Python 2) module path, numpy._core numpy 2's.
PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _ArraySpec,
    ("numpy._core.multiarray", "_reconstruct"): _ArraySpec,
    ("numpy", "ndarray"): _NdarrayToken,
    ("numpy", "dtype"): _DtypeSpec,
    ("_codecs", "encode"): _Latin1Encode(),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose find_class returns only the stand-ins in PICKLE_ALLOWED.

    Code runs out of a pickle only through the globals it names (GLOBAL / STACK_GLOBAL, then
    REDUCE / NEWOBJ / INST / OBJ calls them, BUILD sets state or attributes on objects); every
    other opcode builds only str, bytes, numbers, lists, tuples, dicts and sets. Refusing every
    other global, and making the allowed ones stand-ins that validate their arguments and own
    their __setstate__ (so BUILD cannot set attributes on them either), leaves nothing to run:
    numpy only ever sees np.frombuffer(bytes, a whitelisted numeric dtype). Persistent ids are
    refused by the base class, which has no persistent_load.
    """

    def find_class(self, module, name):
        found = PICKLE_ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refuses to load global {module}.{name}")
        return found


MAX_DEPTH = 32  # CIFAR's batches nest three deep; a deeper pickle is not one


def _resolve(obj, depth: int = 0, done: dict | None = None):
    """The unpickled object with each _ArraySpec replaced by its numpy array.

    Each container is resolved once however often the pickle refers to it (`done`, by id): a
    few hundred bytes of shared references would otherwise unfold into 2**depth copies."""
    done = {} if done is None else done
    if id(obj) in done:
        return done[id(obj)]
    if depth > MAX_DEPTH:
        raise pickle.UnpicklingError(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(obj, _ArraySpec):
        if obj.array is None:
            raise pickle.UnpicklingError("an ndarray without its data")
        found = obj.array
    elif isinstance(obj, dict):
        found = {_resolve(k, depth + 1, done): _resolve(v, depth + 1, done) for k, v in obj.items()}
    elif isinstance(obj, list | tuple):
        found = type(obj)(_resolve(v, depth + 1, done) for v in obj)
    else:
        return obj
    done[id(obj)] = found
    return found


def read_safe_pickle(path: Path | str):
    """A pickle of plain containers, bytes, numbers and numeric numpy arrays (CIFAR's batches),
    read without executing anything from the file. Python 2 strings come back as bytes."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return _resolve(_RestrictedUnpickler(f, encoding="bytes").load())
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused: {e}") from None
    except Exception as e:  # truncated or garbled: EOFError, ValueError, KeyError, ...
        raise UserError(f"{path}: not a readable pickle: {type(e).__name__}: {e}") from None
