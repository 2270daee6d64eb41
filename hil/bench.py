"""Bench assembly: open every configured device; on every exit, display blank and light off."""

from __future__ import annotations

import logging
from typing import Any

import torch

from drivers.protocols import Camera, Device, Display, LightSource
from hil.config import BenchConfig
from sim.clock import RealClock, VirtualClock
from sim.devices import SimCamera, SimDisplay, SimLightSource
from sim.world import SimWorld

log = logging.getLogger("hil")


class Bench:
    """The devices of one bench file, as a context manager.

    Leaving the `with` block by any path (return, exception, Ctrl-C) blanks the display, switches
    the light off and closes every device, even when one of those steps fails.
    """

    def __init__(
        self,
        config: BenchConfig,
        clock: RealClock | VirtualClock | None = None,
        designed_psfs: torch.Tensor | None = None,
    ) -> None:
        self.config = config
        self.world = SimWorld(config.sim, designed_psfs=designed_psfs, clock=clock)
        self.display: Display = SimDisplay(self.world)
        self.camera: Camera = SimCamera(self.world)
        self.light: LightSource = SimLightSource(self.world)

    @property
    def devices(self) -> list[Device]:
        return [self.display, self.camera, self.light]

    @property
    def simulated(self) -> bool:
        return any(d.simulated for d in self.devices)

    def snapshot(self) -> dict[str, Any]:
        return {"simulated": self.simulated, "devices": [d.snapshot() for d in self.devices]}

    def __enter__(self) -> Bench:
        try:
            for device in self.devices:
                device.open()
        except BaseException:
            self._shutdown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        steps = [self.light.off, self.display.blank] + [d.close for d in self.devices]
        for step in steps:
            try:
                step()
            except Exception as e:  # keep going: the light must go off whatever else fails
                log.error("bench shutdown: %s failed: %s", step.__qualname__, e)
