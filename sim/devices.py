"""Simulated bench devices: the driver protocols implemented on one `SimWorld`."""

from __future__ import annotations

from drivers.errors import DeviceTimeout
from drivers.protocols import Camera, Display, Frame, LightSource
from sim.world import SimWorld


class SimDisplay(Display):
    simulated = True

    def __init__(self, world: SimWorld, name: str = "sim-display") -> None:
        super().__init__(name, world.display_shape, world.params.display.bit_depth)
        self.world = world

    def _show_hw(self, levels) -> None:
        self.world.show(levels)


class SimCamera(Camera):
    """Frames arrive no faster than max(exposure, 1 / fps_limit) apart, on the world's clock."""

    simulated = True

    def __init__(self, world: SimWorld, name: str = "sim-camera") -> None:
        sp = world.params.sensor
        super().__init__(name, world.layout.frame_shape, sp.bit_depth, (1e-6, 60.0))
        self.world = world
        self._exposure_s = sp.exposure_s
        self._next_start = -float("inf")
        self._frame_id = 0

    @property
    def frame_period_s(self) -> float:
        return max(self._exposure_s, 1.0 / self.world.params.sensor.fps_limit)

    def _get_exposure_hw(self) -> float:
        return self._exposure_s

    def _set_exposure_hw(self, exposure_s: float) -> None:
        self._exposure_s = exposure_s

    def _snap_hw(self, timeout_s: float) -> Frame:
        clock = self.world.clock
        now = clock.now()
        start = max(now, self._next_start)
        if start + self._exposure_s - now > timeout_s:
            clock.sleep(timeout_s)
            raise DeviceTimeout(f"{self.name}: no frame within {timeout_s} s")
        clock.sleep(start + self._exposure_s - now)
        image = self.world.capture(self._exposure_s)
        self._next_start = start + self.frame_period_s
        self._frame_id += 1
        saturated = float((image >= self.max_dn).mean())
        return Frame(
            image,
            clock.now(),
            self._exposure_s,
            self._frame_id,
            True,
            {"saturated_fraction": saturated},
        )


class SimLightSource(LightSource):
    """The illumination of the simulated display (an SLM's laser, a monitor's backlight)."""

    simulated = True

    def __init__(self, world: SimWorld, name: str = "sim-light") -> None:
        super().__init__(name)
        self.world = world

    def _set_output_hw(self, on: bool, level: float) -> None:
        self.world.light_on, self.world.light_level = on, level
