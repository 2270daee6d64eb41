"""Bench assembly: open every configured device; on every exit, display blank and light off."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from calibration.design import Design
from calibration.errors import CalibrationError
from drivers import registry
from drivers.errors import DeviceError
from drivers.protocols import Camera, Device, Display, LightSource, PowerMeter
from hil.bench.config import ROLES, BenchConfig, DeviceConfig
from hil.bench.design import load_design, tile_layout
from hil.errors import UserError
from sim.clock import RealClock, VirtualClock
from sim.world import SimWorld

log = logging.getLogger("hil")


class Bench:
    """The devices of one bench file, as a context manager.

    Leaving the `with` block by any path (return, exception, Ctrl-C) switches every light source
    off, blanks the display and closes every device, even when one of those steps fails. A device
    with `backend = "auto"` that does not open is replaced by its simulated twin, loudly, and the
    bench's snapshot says so.

    `design` is the optic as designed; by default the bench file's (`hil.bench.design`). A
    simulated device builds the simulated world from it on first use; real devices never do.
    """

    def __init__(
        self,
        config: BenchConfig,
        clock: RealClock | VirtualClock | None = None,
        design: Design | None = None,
    ) -> None:
        self.config = config
        self._clock, self._design, self._world = clock, design, None
        self.fallbacks: list[str] = []
        self.devices: dict[str, Device] = {}
        self.build_errors: dict[str, DeviceError] = {}
        for role, dc in config.devices.configured().items():
            try:
                self.devices[role] = self._build(role, dc)
            except DeviceError as e:
                self.build_errors[role] = e

    @property
    def design(self) -> Design:
        """The optic as designed, from the bench file (and its design checkpoint) only."""
        if self._design is None:
            self._design = load_design(self.config)
        return self._design

    def sim_world(self) -> SimWorld:
        """The simulated world, made from the design on first use by a simulated device."""
        if self._world is None:
            design, sim = self.design, self.config.sim
            layout = tile_layout(self.config.frontend, design.hw)
            if tuple(layout.boxes) != design.tile_boxes:
                raise ValueError("the design's tile boxes are not the bench file's tile grid")
            if sim.replay:
                from hil.bench.replay import ReplayWorld

                self._world = ReplayWorld(sim, design, layout, sim.replay, self._clock)
            else:
                psfs = torch.from_numpy(design.psfs.astype(np.float32))
                self._world = SimWorld(
                    sim,
                    psfs,
                    design.signed,
                    layout,
                    self._clock,
                    display_scale=design.display_scale,
                    display_origin=design.display_origin,
                )
        return self._world

    world = property(sim_world)

    def _build(self, role: str, dc: DeviceConfig) -> Device:
        device = self._open_backend(role, dc)
        policy = {k: v for k in ("retries", "retry_backoff_s") if (v := getattr(dc, k)) is not None}
        if policy or dc.inject is not None:
            if not isinstance(device, Camera):
                raise UserError(
                    f"devices.{role}: retries, retry_backoff_s and inject are a camera's"
                )
            device.retry = device.retry.model_copy(update=policy)
            device.faults = dc.inject or device.faults
        return device

    def _open_backend(self, role: str, dc: DeviceConfig) -> Device:
        try:
            return registry.build(ROLES[role], dc.driver, role, dc.options, self)
        except (CalibrationError, UserError):
            raise  # an unusable replayed calibration or design checkpoint: the user's to fix
        except Exception as e:
            if dc.backend == "auto":
                return self._fallback(role, e)
            raise DeviceError(f"devices.{role}: {dc.driver} backend unavailable: {e}") from e

    def _fallback(self, role: str, error: Exception) -> Device:
        dc = self.config.devices.configured()[role]
        message = (
            f"devices.{role}: the {dc.real} {ROLES[role]} did not open ({error}); "
            f"using the SIMULATED {ROLES[role]} instead: what it records is not real"
        )
        log.warning(message)
        self.fallbacks.append(message)
        return registry.build(ROLES[role], "sim", role, {}, self)

    @property
    def display(self) -> Display:
        return self.devices["display"]

    @property
    def camera(self) -> Camera:
        return self.devices["camera"]

    @property
    def light(self) -> LightSource:
        return self.devices["light"]

    @property
    def power_meter(self) -> PowerMeter | None:
        return self.devices.get("power_meter")

    @property
    def light_sources(self) -> list[LightSource]:
        return [d for d in self.devices.values() if isinstance(d, LightSource)]

    @property
    def simulated(self) -> bool:
        return any(d.simulated for d in self.devices.values())

    def snapshot(self) -> dict[str, Any]:
        return {
            "simulated": self.simulated,
            "fallbacks": list(self.fallbacks),
            "devices": {role: d.snapshot() for role, d in self.devices.items()},
        }

    def _open(self, role: str) -> Device:
        if role in self.build_errors:
            raise self.build_errors[role]
        try:
            self.devices[role].open()
        except DeviceError as e:
            if self.config.devices.configured()[role].backend != "auto":
                raise
            self.devices[role] = self._fallback(role, e)
            self.devices[role].open()
        return self.devices[role]

    def __enter__(self) -> Bench:
        try:
            for role in self.config.devices.configured():
                self._open(role)
            self._mirror_into_world()
        except BaseException:
            self._shutdown()
            raise
        return self

    def probe(self) -> list[dict[str, Any]]:
        """Open, snapshot and close each device on its own: what `hil devices` reports."""
        rows = []
        for role, dc in self.config.devices.configured().items():
            row = {"role": role, "backend": dc.backend + (f" ({dc.real})" if dc.real else "")}
            try:
                device = self._open(role)
                row |= {"state": "ok", "simulated": device.simulated, "detail": device.snapshot()}
                if device.simulated and dc.backend == "auto":
                    row["state"] = "fallback"
            except DeviceError as e:
                row |= {"state": "failed", "simulated": None, "detail": {"error": str(e)}}
            finally:
                self._shutdown()
            rows.append(row)
        return rows

    def _mirror_into_world(self) -> None:
        """A simulated camera beside a real (or otherwise simulated) display or light must see
        what they do."""
        if self._world is None:
            return
        world = self._world
        for device in self.devices.values():
            if getattr(device, "world", None) is world:
                continue  # already part of the simulated world
            if isinstance(device, LightSource):
                device.listeners.append(lambda on, lv, n=device.name: world.set_source(n, on, lv))
            elif isinstance(device, Display):
                if device.shape == world.display_shape:
                    device.listeners.append(world.show)
                else:
                    log.warning(
                        "simulated camera cannot mirror display %s: shape %s, not %s",
                        device.name,
                        device.shape,
                        world.display_shape,
                    )

    def __exit__(self, *exc) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        steps = [d.off for d in self.light_sources]
        if "display" in self.devices:
            steps.append(self.display.blank)
        steps += [d.close for d in reversed(self.devices.values())]
        for step in steps:
            try:
                step()
            except Exception as e:  # keep going: the light must go off whatever else fails
                log.error("bench shutdown: %s failed: %s", step.__qualname__, e)
