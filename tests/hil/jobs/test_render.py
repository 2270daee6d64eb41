"""`hil sim render` shows the input-grid image on the display through `Design.on_display`: each
input pixel an s×s block at the grid's origin, black around it, whatever the display's size."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import Field

from drivers import registry
from drivers.protocols import BackendOptions, Camera, Display, Frame, LightSource
from hil.bench.config import parse_bench
from hil.errors import UserError
from hil.jobs.render import render_image

DISPLAY_HW = (60, 80)  # a lab display larger than the 16×16 input grid


class LabDisplay(Display):
    """A real display of any size that remembers what it was asked to show."""

    backend = "lab"
    shown: list[np.ndarray] = []

    class Options(BackendOptions):
        height: int = Field(DISPLAY_HW[0], gt=0)
        width: int = Field(DISPLAY_HW[1], gt=0)

    def __init__(self, name: str, options: LabDisplay.Options) -> None:
        super().__init__(name, (options.height, options.width), 8)

    def _show_hw(self, levels: np.ndarray) -> None:
        LabDisplay.shown.append(levels.copy())


class LabCamera(Camera):
    backend = "lab"

    def __init__(self, name: str, options: BackendOptions) -> None:
        super().__init__(name, (40, 40), 12, (1e-6, 1.0))
        self._exposure_s = 0.01

    def _snap_hw(self, timeout_s: float) -> Frame:
        return Frame(np.full(self.shape, 7, np.uint16), 0.0, self._exposure_s, 0, False)

    def _get_exposure_hw(self) -> float:
        return self._exposure_s

    def _set_exposure_hw(self, exposure_s: float) -> None:
        self._exposure_s = exposure_s


class LabLight(LightSource):
    backend = "lab"

    def __init__(self, name: str, options: BackendOptions) -> None:
        super().__init__(name)

    def _set_output_hw(self, on: bool, level: float) -> None:
        pass


LAB = {"display": LabDisplay, "camera": LabCamera, "light": LabLight}


@pytest.fixture
def lab(monkeypatch):
    load = registry.load
    monkeypatch.setattr(registry, "load", lambda k, b: LAB[k] if b == "lab" else load(k, b))
    LabDisplay.shown = []
    return {role: {"backend": "lab"} for role in LAB}


def lab_bench(devices, **frontend):
    return parse_bench({"frontend": {"input_px": [16, 16], **frontend}, "devices": devices})


def test_the_display_shows_each_input_pixel_as_a_block_at_the_origin(lab, tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    np.save(tmp_path / "img.npy", image)
    config = lab_bench(lab, display_scale=3, display_origin_px=[7, 2])
    render_image(config, tmp_path / "img.npy", tmp_path / "frame.png", None, fill=1.0)
    shown = [s for s in LabDisplay.shown if s.any()]  # blank() on opening and closing
    assert len(shown) == 1 and shown[0].shape == DISPLAY_HW
    expected = np.zeros(DISPLAY_HW, np.uint8)
    for i in range(16):
        for j in range(16):
            expected[2 + 3 * i : 5 + 3 * i, 7 + 3 * j : 10 + 3 * j] = image[i, j]
    np.testing.assert_array_equal(np.rint(shown[0] * 255).astype(np.uint8), expected)


def test_the_default_origin_centres_the_grid(lab, tmp_path):
    np.save(tmp_path / "white.npy", np.ones((16, 16), np.float32))
    config = lab_bench(lab, display_scale=2)
    render_image(config, tmp_path / "white.npy", tmp_path / "frame.png", None, fill=1.0)
    lit = np.argwhere(LabDisplay.shown[-2] > 0)  # the last is the blank of closing
    assert lit.min(0).tolist() == [(60 - 32) // 2, (80 - 32) // 2]
    assert lit.max(0).tolist() == [(60 - 32) // 2 + 31, (80 - 32) // 2 + 31]
    assert len(lit) == 32 * 32


def test_a_grid_that_does_not_fit_the_opened_display_is_one_clear_error(lab, tmp_path):
    np.save(tmp_path / "img.npy", np.ones((16, 16), np.float32))
    config = lab_bench(lab, display_scale=3, display_origin_px=[40, 0])  # 40 + 48 > 80
    with pytest.raises(UserError) as err:
        render_image(config, tmp_path / "img.npy", tmp_path / "frame.png", None, fill=1.0)
    message = str(err.value)
    assert "input_px, display_scale, display_origin_px" in message
    assert "display 'display'" in message and "60×80 display" in message
    assert len(message.splitlines()) == 1
