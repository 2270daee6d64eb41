"""Editing capture stores the way a program that knows the format would, for the tests that
prove such edits are still refused."""

import h5py

from hil.acquire.store import digest


def rewrite_row(path, r: int, **values) -> None:
    """Set fields of row `r` and recompute its checksum."""
    with h5py.File(path, "a", libver="latest") as f:
        for field, value in values.items():
            f[field][r] = value
        f["checksum"][r] = digest(f["features"][r], f["labels"][r], f["index"][r])
