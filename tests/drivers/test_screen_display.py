"""The screen backend on a private Xvfb screen, checked against screenshots pixel for pixel.

The "SLM" is a 160x120 monitor at (64, 32) of a 320x240 X screen whose root window is white, so a
misplaced, scaled or missing window shows up in a screenshot. Without Xvfb the tests are skipped,
except under CI=true, where they must run and fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pydantic
import pytest
import xvfb
from contracts import DisplayContract

from calibration.design import Design
from drivers.errors import DeviceDisconnected, DeviceError
from drivers.screen_display import ScreenDisplay

SCREEN = (320, 240)
SLM = dict(x=64, y=32, width=160, height=120)
WHITE = 255


@pytest.fixture(scope="module")
def xdisplay() -> str:
    why = xvfb.missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the screen-display tests: {why}", pytrace=False)
        pytest.skip(why)
    return xvfb.shared_xvfb(*SCREEN, background="white")


def make_display(xdisplay: str, **options) -> ScreenDisplay:
    opts = dict(SLM, x_display=xdisplay, settle_s=0.02, timeout_s=5.0) | options
    return ScreenDisplay("slm", ScreenDisplay.Options(**opts))


def screenshot(display: ScreenDisplay) -> np.ndarray:
    """The display's monitor region as (H, W, 3) RGB uint8."""
    x, y, w, h = display.geometry
    return xvfb.grab(display.options.x_display, x, y, w, h)


class TestScreenDisplayContract(DisplayContract):
    expect_simulated = False

    @pytest.fixture(autouse=True)
    def _screen(self, xdisplay):
        self.xdisplay = xdisplay

    def make(self, tmp_path):
        return make_display(self.xdisplay)

    def read_back(self, device: ScreenDisplay) -> np.ndarray:
        rgb = screenshot(device)
        assert (rgb == rgb[..., :1]).all(), "a grey image came back coloured"
        return rgb[..., 0].astype(np.float32) / 255.0


def test_window_covers_exactly_the_monitor_region(xdisplay):
    image = np.random.default_rng(1).integers(1, 255, size=(120, 160), dtype=np.uint8)
    with make_display(xdisplay) as display:
        display.show(image)
        screen = xvfb.grab(xdisplay, 0, 0, *SCREEN)
    x, y, w, h = SLM["x"], SLM["y"], SLM["width"], SLM["height"]
    np.testing.assert_array_equal(screen[y : y + h, x : x + w], np.repeat(image[..., None], 3, 2))
    outside = np.ones(SCREEN[::-1], bool)
    outside[y : y + h, x : x + w] = False
    assert (screen[outside] == WHITE).all(), "the window spills over its monitor"


def test_colour_images_are_shown_exactly_in_rgb_order(xdisplay):
    image = np.random.default_rng(2).integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    with make_display(xdisplay, color=True) as display:
        assert display.shape == (120, 160, 3)
        display.show(image)
        np.testing.assert_array_equal(screenshot(display), image)
        display.show(np.zeros((120, 160, 3), np.float32) + np.array([1.0, 0.0, 0.0], np.float32))
        assert (screenshot(display) == [255, 0, 0]).all()


@pytest.mark.parametrize("color", [False, True])
def test_a_scaled_input_grid_is_shown_pixel_exactly_at_its_origin(xdisplay, color):
    """`Design.on_display` of a 30×40 input grid at display_scale 3, origin (11, 17) off-centre:
    every screen pixel is its input pixel's 8-bit value or black, nothing interpolated."""
    h, w, s, (ox, oy) = 30, 40, 3, (11, 17)
    design = Design(1, 1, False, 1, ((0, 0, h, w),), np.ones((1, 1, 1, 1)), (h, w), s, (ox, oy))
    image = np.random.default_rng(6).integers(0, 256, size=(h, w, 3)[: 3 if color else 2])
    expected = np.zeros((120, 160, 3), np.uint8)
    for i in range(h):
        for j in range(w):
            expected[oy + s * i : oy + s * i + s, ox + s * j : ox + s * j + s] = image[i, j]
    with make_display(xdisplay, color=color) as display:
        display.show(design.on_display(image.astype(np.float32) / 255, (120, 160)))
        np.testing.assert_array_equal(screenshot(display), expected)


def test_lower_bit_depths_span_the_full_grey_range(xdisplay):
    levels = np.arange(120 * 160).reshape(120, 160) % 16  # 4-bit levels
    with make_display(xdisplay, bit_depth=4) as display:
        display.show(levels)
        np.testing.assert_array_equal(screenshot(display)[..., 1], levels * 17)
        display.show(np.ones((120, 160), np.float32))
        assert (screenshot(display) == 255).all()


def test_close_removes_the_window(xdisplay):
    with make_display(xdisplay, window_name="hil-slm-close") as display:
        display.show(np.full((120, 160), 128, np.uint8))
        assert (screenshot(display) == 128).all()
    assert not display.is_open
    assert (screenshot(display) == WHITE).all(), "the root background should be back"
    if shutil.which("xwininfo"):
        assert xvfb.map_state(xdisplay, "hil-slm-close") in (None, "IsUnMapped")
    display.close()  # closing again never raises


def test_a_window_closed_behind_its_back_is_a_disconnect_and_reconnect_heals(xdisplay):
    import cv2

    with make_display(xdisplay) as display:
        cv2.destroyWindow(display.options.window_name)
        cv2.waitKey(1)
        with pytest.raises(DeviceDisconnected, match="reconnect"):
            display.show(np.zeros((120, 160), np.uint8))
        display.reconnect()
        display.show(np.full((120, 160), 7, np.uint8))
        assert (screenshot(display) == 7).all()


def test_a_window_that_never_paints_is_made_again(xdisplay, monkeypatch, caplog):
    import cv2

    windows_made = []
    real_named_window, real_imshow = cv2.namedWindow, cv2.imshow

    def named_window(*args):
        windows_made.append(args[0])
        return real_named_window(*args)

    def imshow(name, image):  # the first window looks like the white root: mapped, unpainted
        real_imshow(name, image if len(windows_made) > 1 else np.full_like(image, WHITE))

    monkeypatch.setattr(cv2, "namedWindow", named_window)
    monkeypatch.setattr(cv2, "imshow", imshow)
    image = np.random.default_rng(4).integers(0, 256, size=(120, 160), dtype=np.uint8)
    with caplog.at_level("WARNING"), make_display(xdisplay) as display:
        display.show(image)
        np.testing.assert_array_equal(screenshot(display)[..., 0], image)
    assert len(windows_made) == 2 and "creating it again" in caplog.text


def test_the_mouse_wheel_over_the_window_does_not_zoom_it(xdisplay):
    tool = shutil.which("xdotool")
    if tool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run this test: install xdotool", pytrace=False)
        pytest.skip("xdotool is not installed (Debian/Ubuntu: apt-get install xdotool)")
    image = np.random.default_rng(5).integers(0, 256, size=(120, 160), dtype=np.uint8)
    env = dict(os.environ, DISPLAY=xdisplay)
    with make_display(xdisplay) as display:
        display.show(image)
        subprocess.run([tool, "mousemove", "140", "90"], env=env, check=True)
        for _ in range(3):  # wheel up: Qt's view would zoom in
            subprocess.run([tool, "click", "4"], env=env, check=True)
        display.show(image)
        np.testing.assert_array_equal(screenshot(display)[..., 0], image)


def test_no_x_display_is_a_disconnect_that_says_what_to_set(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    display = ScreenDisplay("slm", ScreenDisplay.Options(**SLM))
    with pytest.raises(DeviceDisconnected, match="DISPLAY.*x_display"):
        display.open()
    assert not display.is_open
    unused = next(n for n in range(500, 600) if not os.path.exists(f"/tmp/.X11-unix/X{n}"))
    display = ScreenDisplay("slm", ScreenDisplay.Options(**SLM, x_display=f":{unused}"))
    with pytest.raises(DeviceDisconnected, match=f":{unused}.*not reachable"):
        display.open()


def test_a_second_x_display_in_the_same_process_is_refused(xdisplay):
    with make_display(xdisplay):  # binds OpenCV's GUI to the shared screen
        pass
    with xvfb.Xvfb(64, 48) as other, pytest.raises(DeviceError, match="one X display per"):
        make_display(other).open()


def test_options_are_checked_and_recorded(xdisplay):
    with pytest.raises(pydantic.ValidationError):
        ScreenDisplay.Options(**SLM, bit_depth=10)  # imshow cannot show more than 8 bits
    with pytest.raises(pydantic.ValidationError):
        ScreenDisplay.Options(**SLM, fullscreen=True)
    with pytest.raises(pydantic.ValidationError):
        ScreenDisplay.Options(x=0, y=0, width=160)
    with make_display(xdisplay) as display:
        snap = display.snapshot()
    assert (snap["x"], snap["y"], snap["width"], snap["height"]) == (64, 32, 160, 120)
    assert snap["x_display"] == xdisplay and snap["bit_depth"] == 8
    assert snap["backend"] == "screen" and snap["shape"] == [120, 160]
