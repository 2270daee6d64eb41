"""Backends are found through the entry-point group `hil.drivers` and imported only when used.

An entry point is named `<kind>.<backend>` (e.g. `camera.genicam`) and points at a `Device`
subclass, so a lab adds its own driver by installing a package that declares one; nothing here
changes. A backend whose import fails is reported, not fatal.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from drivers.protocols import Device

GROUP = "hil.drivers"
KINDS = ("display", "camera", "light", "power_meter")


class UnknownBackend(LookupError):
    """No installed backend of that name for that kind of device."""


@dataclass(frozen=True)
class BackendInfo:
    kind: str
    backend: str
    target: str
    error: str | None  # why it failed to import, or None


@cache
def _entry_points() -> dict[tuple[str, str], EntryPoint]:
    found = {}
    for ep in entry_points(group=GROUP):
        kind, _, backend = ep.name.partition(".")
        if kind in KINDS and backend:
            found[(kind, backend)] = ep
    return found


def backends(kind: str) -> list[str]:
    return sorted(b for k, b in _entry_points() if k == kind)


def load(kind: str, backend: str) -> type[Device]:
    """The backend's class; UnknownBackend if none is installed, ImportError if it won't import."""
    ep = _entry_points().get((kind, backend))
    if ep is None:
        known = ", ".join(backends(kind)) or "none"
        raise UnknownBackend(f"no {kind} backend {backend!r} (installed: {known})")
    cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, Device) and cls.kind == kind):
        raise ImportError(f"entry point {ep.name} = {ep.value} is not a {kind} Device class")
    return cls


def available() -> list[BackendInfo]:
    """Every installed backend, importing each to report the ones that fail and why."""
    infos = []
    for (kind, backend), ep in sorted(_entry_points().items()):
        try:
            load(kind, backend)
            error = None
        except Exception as e:  # a broken third-party driver must not break the listing
            error = f"{type(e).__name__}: {e}"
        infos.append(BackendInfo(kind, backend, ep.value, error))
    return infos


def build(kind: str, backend: str, name: str, options: dict[str, Any], context: Any) -> Device:
    """A device from its bench-file section; options are validated by the backend's model."""
    cls = load(kind, backend)
    return cls.from_options(name, cls.Options.model_validate(options), context)
