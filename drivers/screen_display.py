"""An SLM or monitor driven as an X screen: a borderless OpenCV window covering the panel exactly.

An SLM on a video input is just another monitor of the desktop. The window is an OpenCV
`WINDOW_AUTOSIZE | WINDOW_GUI_NORMAL` window, so it is exactly the image's size and OpenCV never
scales or interpolates; it is moved to the monitor's position in the X screen and asked to go
full screen (under a window manager that removes the decorations; without one, as on Xvfb, it is
a no-op and the plain window is undecorated already). `open()` returns only once the X server
reports the window mapped at exactly (x, y, width, height).

Level k of 2**bit_depth is sent as the 8-bit value round(k * 255 / top): 1.0 is full white, and
bit_depth 8 sends k itself. X screens carry 8 bits per channel through OpenCV's imshow (16-bit
images are rescaled by it), so bit_depth is at most 8.

OpenCV's Qt windows are sometimes mapped but never painted (seen with opencv-python 5.0 on Xvfb
under CPU load; WINDOW_NORMAL windows created again after destroyWindow do it almost every other
time, hence AUTOSIZE). Until a window has once been seen painted, each image is compared with a
GetImage of the screen and the window is created anew if it stays blank. The comparison needs a
24-bit TrueColor screen and an image that differs from what was behind the window; otherwise Qt
is trusted.

Things OpenCV's highgui cannot do, and that a bench must arrange itself:

- hide the mouse cursor (move it off the SLM's monitor, or run `unclutter`);
- switch X displays: OpenCV's Qt GUI connects to one X display per process, the first one used,
  and Qt ends a process whose X server died under an open window (exit status 1) at its next GUI
  call, and aborts one whose display is unreachable. So a second display is refused
  (DeviceError), an unreachable one is DeviceDisconnected before Qt sees it, and close() does not
  touch the GUI of a dead server;
- run from several threads: call every method from the thread that opened the first window;
- ignore the mouse wheel: scrolling over the window zooms Qt's view; keep the pointer away.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import Field

from drivers.errors import DeviceDisconnected, DeviceError
from drivers.protocols import BackendOptions, Display

log = logging.getLogger("hil.drivers.screen")

# The X display OpenCV's GUI in this process is bound to (Qt reads DISPLAY once, at its first
# window, and cannot move to another server later).
_bound_display: str | None = None

_WM_NAME = 39  # predefined atom
_VIEWABLE = 2  # XCB_MAP_STATE_VIEWABLE
_libc = ctypes.CDLL(None) if os.name == "posix" else None  # for free() of libxcb replies
if _libc is not None:
    _libc.free.argtypes = [ctypes.c_void_p]


class _Cookie(ctypes.Structure):
    _fields_ = [("sequence", ctypes.c_uint)]


class _ScreenIterator(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("rem", ctypes.c_int), ("index", ctypes.c_int)]


def _declare(xcb: Any) -> None:
    """Signatures of the few libxcb calls used (ctypes would otherwise truncate pointers)."""
    p, u32, cookie = ctypes.c_void_p, ctypes.c_uint32, _Cookie
    i16, u16 = ctypes.c_int16, ctypes.c_uint16
    for name, restype, argtypes in [
        ("xcb_connect", p, [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]),
        ("xcb_connection_has_error", ctypes.c_int, [p]),
        ("xcb_disconnect", None, [p]),
        ("xcb_get_setup", p, [p]),
        ("xcb_setup_roots_iterator", _ScreenIterator, [p]),
        ("xcb_screen_next", None, [ctypes.POINTER(_ScreenIterator)]),
        ("xcb_query_tree", cookie, [p, u32]),
        ("xcb_query_tree_reply", p, [p, cookie, p]),
        ("xcb_query_tree_children", ctypes.POINTER(u32), [p]),
        ("xcb_query_tree_children_length", ctypes.c_int, [p]),
        ("xcb_get_property", cookie, [p, ctypes.c_uint8, u32, u32, u32, u32, u32]),
        ("xcb_get_property_reply", p, [p, cookie, p]),
        ("xcb_get_property_value", p, [p]),
        ("xcb_get_property_value_length", ctypes.c_int, [p]),
        ("xcb_get_window_attributes", cookie, [p, u32]),
        ("xcb_get_window_attributes_reply", p, [p, cookie, p]),
        ("xcb_get_image", cookie, [p, ctypes.c_uint8, u32, i16, i16, u16, u16, u32]),
        ("xcb_get_image_reply", p, [p, cookie, p]),
        ("xcb_get_image_data", p, [p]),
        ("xcb_get_image_data_length", ctypes.c_int, [p]),
        ("xcb_get_extension_data", p, [p, p]),
        ("xcb_request_check", p, [p, cookie]),
    ]:
        fn = getattr(xcb, name)
        fn.restype, fn.argtypes = restype, argtypes


class _XcbExtension(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("global_id", ctypes.c_int)]


def _libxcb_shape() -> Any:
    """libxcb-shape: the system's, else the copy bundled with opencv-python's Qt; or None."""
    import glob

    import cv2

    candidates = ["libxcb-shape.so.0"]
    libs = os.path.join(os.path.dirname(os.path.dirname(cv2.__file__)), "opencv_python.libs")
    candidates += sorted(glob.glob(os.path.join(libs, "libxcb-shape*.so*")))
    for candidate in candidates:
        try:
            lib = ctypes.CDLL(candidate)
        except OSError:
            continue
        fn = lib.xcb_shape_rectangles_checked  # (c, op, kind, ordering, window, x, y, n, rects)
        p, u8, i16, u32 = ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int16, ctypes.c_uint32
        fn.restype, fn.argtypes = _Cookie, [p, u8, u8, u8, u32, i16, i16, u32, p]
        lib.xcb_shape_id_ext = _XcbExtension.in_dll(lib, "xcb_shape_id")
        return lib
    return None


class XConnection:
    """A libxcb client connection to an X display, made with a bounded wait.

    Checks a display before OpenCV's Qt touches it, because Qt aborts the whole process when it
    cannot connect. Held open while Qt connects: an X server whose last client leaves resets and
    refuses connections meanwhile (a bare Xvfb does), which would abort Qt as well. `error` is
    None when connected, else why not.
    """

    def __init__(self, display: str, timeout_s: float) -> None:
        self.error: str | None = None
        self._xcb: Any = None
        self._conn: int | None = None
        self._screen = 0
        try:
            xcb = ctypes.CDLL("libxcb.so.1")
        except OSError as e:
            self.error = f"libxcb.so.1 cannot be loaded ({e}); install libxcb1"
            return
        _declare(xcb)
        screen = ctypes.c_int(0)
        lock = threading.Lock()
        state: dict[str, Any] = {"done": False, "abandoned": False}

        def connect() -> None:  # in a thread: an unreachable TCP display may hang for minutes
            conn = xcb.xcb_connect(display.encode(), ctypes.byref(screen))
            err = xcb.xcb_connection_has_error(conn)
            with lock:
                if err or state["abandoned"]:
                    xcb.xcb_disconnect(conn)
                else:
                    state["conn"] = conn
                state["err"], state["done"] = err, True

        worker = threading.Thread(target=connect, daemon=True, name="x-display-probe")
        worker.start()
        worker.join(timeout_s)
        with lock:
            if not state["done"]:
                state["abandoned"] = True
                self.error = f"no answer within {timeout_s} s"
            elif state["err"]:
                self.error = f"connection refused or unauthorised (xcb error {state['err']})"
            else:
                self._xcb, self._conn, self._screen = xcb, state["conn"], screen.value

    def _root(self) -> int:
        xcb = self._xcb
        screens = xcb.xcb_setup_roots_iterator(xcb.xcb_get_setup(self._conn))
        for _ in range(self._screen):
            xcb.xcb_screen_next(ctypes.byref(screens))
        return ctypes.c_uint32.from_address(screens.data).value  # xcb_screen_t.root

    def region(self, x: int, y: int, width: int, height: int) -> np.ndarray | None:
        """What the screen shows there, (height, width, 3) RGB uint8; None where unreadable.

        Read with GetImage of the root window, which on a 24-bit TrueColor screen is the frame
        buffer's bytes; other depths and byte orders are not decoded.
        """
        xcb, conn = self._xcb, self._conn
        if conn is None:
            return None
        if ctypes.c_uint8.from_address(xcb.xcb_get_setup(conn) + 30).value != 0:
            return None  # setup.image_byte_order is not LSBFirst
        cookie = xcb.xcb_get_image(conn, 2, self._root(), x, y, width, height, 0xFFFFFFFF)
        reply = xcb.xcb_get_image_reply(conn, cookie, None)  # 2: ZPixmap
        if not reply:
            return None
        try:
            depth = ctypes.c_uint8.from_address(reply + 1).value
            n = xcb.xcb_get_image_data_length(reply)
            if depth != 24 or n != width * height * 4:
                return None
            data = np.frombuffer(ctypes.string_at(xcb.xcb_get_image_data(reply), n), np.uint8)
            return data.reshape(height, width, 4)[..., 2::-1]  # BGRX -> RGB
        finally:
            _libc.free(reply)

    def viewable(self, window_name: str) -> int | None:
        """The id of a window titled `window_name` that the X server shows (it and its
        ancestors mapped), or None.

        Qt maps a window and paints it asynchronously; this is how open() knows that the server
        really shows it.
        """
        xcb, conn = self._xcb, self._conn
        if conn is None:
            return None
        wanted = window_name.encode()
        pending, depth = [self._root()], 0
        while pending and depth < 4:  # top level, or inside a window manager's frame
            found = []
            for parent in pending:
                reply = xcb.xcb_query_tree_reply(conn, xcb.xcb_query_tree(conn, parent), None)
                if not reply:
                    continue
                n = xcb.xcb_query_tree_children_length(reply)
                found += list(xcb.xcb_query_tree_children(reply)[:n])
                _libc.free(reply)
            for window in found:
                if self._name(window) == wanted and self._map_state(window) == _VIEWABLE:
                    return window
            pending, depth = found, depth + 1
        return None

    def ignore_input(self, window: int) -> bool:
        """Make `window` transparent to the mouse (an empty SHAPE input region).

        Otherwise a mouse wheel turned over the SLM's window zooms OpenCV's Qt view, and the SLM
        shows a scaled image until the window is made again. False where it cannot be done.
        """
        shape = _libxcb_shape()
        if shape is None or self._conn is None:
            return False
        xcb, conn = self._xcb, self._conn
        extension = xcb.xcb_get_extension_data(conn, ctypes.byref(shape.xcb_shape_id_ext))
        if not extension or not ctypes.c_uint8.from_address(extension + 8).value:  # .present
            return False
        cookie = shape.xcb_shape_rectangles_checked(conn, 0, 2, 0, window, 0, 0, 0, None)
        error = xcb.xcb_request_check(conn, cookie)  # SO_SET, SK_INPUT, unsorted, no rectangles
        if error:
            _libc.free(error)
            return False
        return True

    def _name(self, window: int) -> bytes:
        xcb, conn = self._xcb, self._conn
        cookie = xcb.xcb_get_property(conn, 0, window, _WM_NAME, 0, 0, 256)
        reply = xcb.xcb_get_property_reply(conn, cookie, None)
        if not reply:
            return b""
        n = xcb.xcb_get_property_value_length(reply)
        value = ctypes.string_at(xcb.xcb_get_property_value(reply), n)
        _libc.free(reply)
        return value

    def _map_state(self, window: int) -> int:
        xcb, conn = self._xcb, self._conn
        cookie = xcb.xcb_get_window_attributes(conn, window)
        reply = xcb.xcb_get_window_attributes_reply(conn, cookie, None)
        if not reply:
            return -1
        state = ctypes.c_uint8.from_address(reply + 26).value  # reply.map_state
        _libc.free(reply)
        return state

    def close(self) -> None:
        if self._conn is not None:
            self._xcb.xcb_disconnect(self._conn)
            self._conn = None

    def __enter__(self) -> XConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def probe_x_display(display: str, timeout_s: float) -> str | None:
    """None if an X client can connect to `display`, else why not."""
    with XConnection(display, timeout_s) as conn:
        return conn.error


class ScreenDisplay(Display):
    """A monitor or SLM of the X desktop showing images pixel for pixel through OpenCV."""

    backend = "screen"

    class Options(BackendOptions):
        x: int = Field(0, description="left edge of the SLM's monitor in the X screen, in pixels")
        y: int = Field(0, description="top edge of the SLM's monitor in the X screen, in pixels")
        width: int = Field(..., gt=0, description="the monitor's width in pixels (image columns)")
        height: int = Field(..., gt=0, description="the monitor's height in pixels (image rows)")
        bit_depth: int = Field(
            8,
            ge=1,
            le=8,
            description="grey levels are 2**bit_depth; level k is sent as round(k * 255 / top), "
            "so 1.0 is full white; an X screen carries 8 bits per channel through OpenCV",
        )
        color: bool = Field(
            False,
            description="take RGB images (H, W, 3) instead of grey (H, W); an SLM is grey",
        )
        window_name: str = Field(
            "hil-slm",
            pattern=r"^[ -~]+$",
            description="OpenCV window name and X window title (printable ASCII)",
        )
        settle_s: float = Field(
            0.05,
            ge=0,
            le=60,
            description="wait after each new image until the panel really shows it (frame "
            "latency plus liquid-crystal response); show() returns only after it",
        )
        x_display: str | None = Field(
            None, description="X display to use, e.g. ':0' or ':99'; default: $DISPLAY"
        )

    def __init__(self, name: str, options: ScreenDisplay.Options) -> None:
        rows, cols = options.height, options.width
        super().__init__(
            name, (rows, cols, 3) if options.color else (rows, cols), options.bit_depth
        )
        self.options = options
        self._x_display: str | None = None  # where the window is, once created
        self._ui: str | None = None
        self._probe: XConnection | None = None
        self._painted = False

    # -- geometry ------------------------------------------------------------------------------

    @property
    def geometry(self) -> tuple[int, int, int, int]:
        o = self.options
        return (o.x, o.y, o.width, o.height)

    def _pump_until(self, cv2: Any, done: Callable[[], Any], wait_s: float) -> Any:
        """Handle GUI events until done() is truthy or wait_s passes; done()'s last value."""
        deadline = time.monotonic() + wait_s
        while True:
            cv2.waitKey(1)
            result = done()
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.002)

    def _place_window(self, cv2: Any, image: np.ndarray) -> None:
        """Show `image` in the (new) window at the monitor's place and check where it landed."""
        o = self.options
        name, timeout_s = o.window_name, o.timeout_s

        def landed() -> bool:
            return tuple(int(v) for v in cv2.getWindowImageRect(name)) == self.geometry

        cv2.moveWindow(name, o.x, o.y)
        cv2.imshow(name, image)
        cv2.waitKey(1)
        cv2.setWindowProperty(name, cv2.WND_PROP_FULLSCREEN, cv2.WINDOW_FULLSCREEN)
        if not self._pump_until(cv2, landed, timeout_s):
            # full screen covered another area (e.g. a single X screen larger than the SLM):
            # fall back to a plain window at the exact place
            cv2.setWindowProperty(name, cv2.WND_PROP_FULLSCREEN, cv2.WINDOW_NORMAL)
            cv2.moveWindow(name, o.x, o.y)
            if not self._pump_until(cv2, landed, timeout_s):
                raise DeviceError(
                    f"display {self.name!r}: the window's image landed at (x, y, w, h) = "
                    f"{tuple(cv2.getWindowImageRect(name))} instead of {self.geometry}; check x, "
                    "y, width, height against the monitor layout (xrandr) and the window manager"
                )
        window = self._pump_until(cv2, lambda: self._probe.viewable(name), timeout_s)
        if window is None:
            raise DeviceError(
                f"display {self.name!r}: window {name!r} was not mapped on {self._x_display} "
                f"within {timeout_s} s"
            )
        if not self._probe.ignore_input(window):
            log.warning(
                "display %r: cannot make the window ignore the mouse (no SHAPE); a mouse wheel "
                "over it zooms the image",
                self.name,
            )

    def _show_checked(self, cv2: Any, image: np.ndarray, checkable: bool) -> None:
        """imshow, and until the window has once been seen painted, check that it is.

        OpenCV's Qt windows are now and then mapped but never painted (seen under CPU load);
        such a window stays blank whatever is shown, and only a new window cures it. The check
        compares the screen with the image, so it is skipped where the two cannot differ (a black
        image over a black desktop) or the screen cannot be read; once passed, shows are plain.
        """
        name = self.options.window_name
        deadline = time.monotonic() + self.options.timeout_s
        bgr = np.ascontiguousarray(image[..., ::-1]) if image.ndim == 3 else image
        rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)

        def shown() -> bool:
            return np.array_equal(self._probe.region(*self.geometry), rgb)

        while True:
            cv2.imshow(name, bgr)
            self._settle(cv2)
            if self._painted or not checkable:
                return
            if self._probe.region(*self.geometry) is None:  # unreadable screen: trust Qt
                self._painted = True
                return
            if self._pump_until(cv2, shown, min(0.5, self.options.timeout_s)):
                self._painted = True
                return
            if time.monotonic() > deadline:
                raise DeviceError(
                    f"display {self.name!r}: OpenCV never painted window {name!r} within "
                    f"{self.options.timeout_s} s"
                )
            log.warning("display %r: window mapped but not painted; creating it again", self.name)
            self._destroy_window(keep_probe=True)
            cv2.namedWindow(name, cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL)
            self._place_window(cv2, bgr)

    # -- hooks ---------------------------------------------------------------------------------

    def _open_hw(self) -> None:
        o = self.options
        display = o.x_display or os.environ.get("DISPLAY")
        if not display:
            raise DeviceDisconnected(
                f"display {self.name!r}: no X display: set the DISPLAY environment variable or "
                "the x_display option (e.g. ':0')"
            )
        probe = XConnection(display, o.timeout_s)
        if probe.error:
            raise DeviceDisconnected(
                f"display {self.name!r}: X display {display!r} is not reachable ({probe.error}); "
                "start the X server or set DISPLAY / the x_display option to a running one"
            )
        # held while the window lives: Qt connects while a client is there (an X server whose
        # last client leaves resets and refuses connections, and Qt aborts on refusal), and it
        # reads the screen back to check the window
        self._probe = probe
        try:
            self._create_window(display)
        except BaseException:
            self._destroy_window()
            raise

    def _create_window(self, display: str) -> None:
        global _bound_display
        o = self.options
        if _bound_display is not None and display != _bound_display:
            raise DeviceError(
                f"display {self.name!r}: OpenCV's GUI in this process is connected to X display "
                f"{_bound_display!r} and cannot also use {display!r}; use one X display per "
                "process (set x_display alike for every screen display)"
            )
        import cv2

        before = self._probe.region(*self.geometry)  # what the window will cover
        # Qt reads DISPLAY (and the platform plugin) when it creates its first window; keep the
        # process environment as it was afterwards.
        saved = {k: os.environ.get(k) for k in ("DISPLAY", "QT_QPA_PLATFORM")}
        os.environ["DISPLAY"] = display
        os.environ["QT_QPA_PLATFORM"] = "xcb"
        try:
            cv2.namedWindow(o.window_name, cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL)
        except cv2.error as e:
            raise DeviceDisconnected(
                f"display {self.name!r}: OpenCV cannot open windows ({e}); opencv-python-headless "
                "has no GUI, install opencv-python"
            ) from e
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        _bound_display = self._x_display = display
        self._ui = _ui_framework(cv2)
        self._painted = False
        black = np.zeros(self.shape, np.uint8)
        self._place_window(cv2, black)
        self._show_checked(cv2, black, checkable=before is not None and bool(before.any()))

    def _show_hw(self, levels: np.ndarray) -> None:
        import cv2

        name = self.options.window_name
        try:
            visible = cv2.getWindowProperty(name, cv2.WND_PROP_VISIBLE)
        except cv2.error:
            visible = -1
        if visible < 1:
            # imshow would silently create a new, misplaced window
            raise DeviceDisconnected(
                f"display {self.name!r}: window {name!r} was closed; call reconnect()"
            )
        image = np.rint(levels * 255.0).astype(np.uint8)  # levels are k/top: exact, invertible
        self._show_checked(cv2, image, checkable=bool(image.any()))

    def _settle(self, cv2: Any) -> None:
        """Paint now, then wait settle_s while still handling GUI events (late Expose etc.)."""
        deadline = time.monotonic() + self.options.settle_s
        cv2.waitKey(1)  # paint and flush to the X server
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.005))
            cv2.waitKey(1)

    def _close_hw(self) -> None:
        self._destroy_window()

    def _destroy_window(self, keep_probe: bool = False) -> None:
        """Destroy the window; never raises, and never touches a GUI whose X server is gone."""
        probe = self._probe
        if not keep_probe:
            self._probe = None
            if probe is not None:
                probe.close()
        if self._x_display is None or probe_x_display(self._x_display, 1.0):
            return  # no window yet, or the server took it along: a GUI call would end the process
        try:
            import cv2

            cv2.destroyWindow(self.options.window_name)
            cv2.waitKey(1)  # let the unmap reach the server
        except Exception as e:  # already gone
            log.debug("display %r: destroyWindow: %s", self.name, e)

    def snapshot(self) -> dict[str, Any]:
        o = self.options
        return super().snapshot() | {
            "x": o.x,
            "y": o.y,
            "width": o.width,
            "height": o.height,
            "color": o.color,
            "window_name": o.window_name,
            "settle_s": o.settle_s,
            "x_display": self._x_display or o.x_display or os.environ.get("DISPLAY"),
            "ui_framework": self._ui,
        }


def _ui_framework(cv2: Any) -> str | None:
    try:
        return str(cv2.currentUIFramework())
    except Exception:
        return None
