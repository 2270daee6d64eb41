"""A private Xvfb X server for GUI tests, and pixel-exact screenshots of it.

Xvfb is started with `-displayfd`: the server itself picks a free display number (no
/tmp/.X11-unix/X<n> socket, no /tmp/.X<n>-lock file) and writes it to a pipe only once it accepts
connections, so there is no race with other servers and no polling; a libxcb connection is then
checked before the display is handed out. `-noreset` keeps a server whose last client left from
resetting, during which it refuses connections (a probe that connects and leaves would cause it).

Screenshots are Pillow's `ImageGrab.grab(bbox=..., xdisplay=...)`, an XCB GetImage of the root
window: on Xvfb's 24-bit TrueColor frame buffer that is the stored pixels byte for byte (no
compositor, no scaling, no colour management, and GetImage never contains the cursor).
`tests/drivers/test_screen_display.py` proves it pixel for pixel with random images.

Debian packages: xvfb (the server); x11-utils (xwininfo) is optional, for window-state checks.
"""

from __future__ import annotations

import atexit
import os
import select
import shutil
import subprocess
import tempfile
import time

import numpy as np

from drivers.screen_display import probe_x_display


def missing() -> str | None:
    """Why GUI tests cannot run here, or None."""
    if shutil.which("Xvfb") is None:
        return "Xvfb is not installed (Debian/Ubuntu: apt-get install xvfb)"
    try:
        from PIL import features

        if not features.check("xcb"):
            return "Pillow was built without XCB support; it cannot grab X screenshots"
    except ImportError:
        return "Pillow is not installed; it takes the X screenshots"
    return None


class Xvfb:
    """`with Xvfb(320, 240) as display:` runs a virtual X screen WxHx24 and kills it after."""

    def __init__(
        self,
        width: int = 320,
        height: int = 240,
        background: str = "black",
        timeout_s: float = 10.0,
    ) -> None:
        if background not in ("black", "white"):
            raise ValueError("background must be 'black' or 'white'")
        self.width, self.height, self.background = width, height, background
        self.timeout_s = timeout_s
        self.display: str | None = None
        self._proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (the server's log, kept while it runs)

    def start(self) -> str:
        read_fd, write_fd = os.pipe()
        cmd = [
            "Xvfb",
            "-displayfd",
            str(write_fd),
            "-screen",
            "0",
            f"{self.width}x{self.height}x24",
            "-nolisten",
            "tcp",
            "-noreset",  # a server whose last client leaves resets and refuses connections
            "-br" if self.background == "black" else "-wr",
        ]
        try:
            self._proc = subprocess.Popen(
                cmd, pass_fds=(write_fd,), stdout=self._log, stderr=self._log
            )
        finally:
            os.close(write_fd)
        try:
            number = self._read_display_number(read_fd)
        finally:
            os.close(read_fd)
        self.display = f":{number}"
        why = probe_x_display(self.display, self.timeout_s)
        if why:
            self.stop()
            raise RuntimeError(f"Xvfb on {self.display} does not accept connections: {why}")
        return self.display

    def _read_display_number(self, fd: int) -> int:
        deadline = time.monotonic() + self.timeout_s
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.stop()
                raise RuntimeError(f"Xvfb did not start within {self.timeout_s} s{self._tail()}")
            chunk = os.read(fd, 64)
            if not chunk:  # the server exited
                self.stop()
                raise RuntimeError(f"Xvfb exited at start{self._tail()}")
            data += chunk
        return int(data)

    def _tail(self) -> str:
        self._log.seek(0)
        text = self._log.read().decode(errors="replace").strip()
        return f": {text[-500:]}" if text else ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_shared: Xvfb | None = None


def shared_xvfb(width: int = 320, height: int = 240, background: str = "white") -> str:
    """One Xvfb for the whole test process, stopped at interpreter exit.

    OpenCV's Qt GUI connects to one X display per process and cannot move to another, and Qt
    ends the process if that server dies while a window is open; so every GUI test in a pytest
    run shares this server, and it outlives them all.
    """
    global _shared
    if _shared is None:
        server = Xvfb(width, height, background)
        server.start()
        atexit.register(server.stop)
        _shared = server
    if (_shared.width, _shared.height, _shared.background) != (width, height, background):
        raise RuntimeError(
            f"the shared Xvfb is {_shared.width}x{_shared.height} on {_shared.background}; "
            f"a test asked for {width}x{height} on {background}"
        )
    assert _shared.display is not None
    return _shared.display


def grab(display: str, x: int, y: int, width: int, height: int) -> np.ndarray:
    """The screen's pixels in [x, x + width) x [y, y + height) as (height, width, 3) RGB uint8."""
    from PIL import ImageGrab

    image = ImageGrab.grab(bbox=(x, y, x + width, y + height), xdisplay=display)
    pixels = np.asarray(image.convert("RGB"))
    if pixels.shape != (height, width, 3):
        raise RuntimeError(f"screenshot is {pixels.shape}, asked for {(height, width, 3)}")
    return pixels


def map_state(display: str, window_name: str) -> str | None:
    """xwininfo's Map State of the named top-level window ('IsViewable', 'IsUnMapped', ...),
    None if there is no such window; raises FileNotFoundError without xwininfo (x11-utils)."""
    out = subprocess.run(
        ["xwininfo", "-display", display, "-name", window_name],
        capture_output=True,
        text=True,
        timeout=10,
    )
    for line in out.stdout.splitlines():
        if "Map State:" in line:
            return line.split(":", 1)[1].strip()
    return None
