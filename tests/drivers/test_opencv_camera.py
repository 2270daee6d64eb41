"""The OpenCV camera backend on recordings the tests write themselves, checked pixel for pixel.

Oracles are lossless: FFV1 video in .avi (through FFmpeg) and PNG sequences (through CAP_IMAGES).
The stalled camera is a live YUV4MPEG stream on a named pipe whose writer sends one frame and then
goes silent with the pipe held open, so OpenCV's read blocks for real and only the driver's
worker-thread timeout can end the wait.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pydantic
import pytest
from contracts import CameraContract

from drivers.errors import DeviceDisconnected, DeviceError, DeviceTimeout
from drivers.opencv_camera import OpenCVCamera, source_kind
from drivers.protocols import RetryPolicy

H, W, N = 48, 64, 5


def frames(n: int = N, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(H, W), dtype=np.uint8) for _ in range(n)]


def write_ffv1(path: Path, images: list[np.ndarray]) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 10, (W, H), isColor=False)
    assert writer.isOpened(), "OpenCV's FFmpeg cannot write FFV1 (lossless) video here"
    for image in images:
        writer.write(image)
    writer.release()
    return path


def write_pngs(folder: Path, images: list[np.ndarray]) -> str:
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images):
        assert cv2.imwrite(str(folder / f"frame_{i:04d}.png"), image)
    return str(folder / "frame_%04d.png")


def camera(source, **options) -> OpenCVCamera:
    return OpenCVCamera("cam", OpenCVCamera.Options(source=source, **options))


class SilentStream:
    """A named pipe carrying a live Y4M stream: one frame, then silence with the pipe open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self._stop = threading.Event()
        threading.Thread(target=self._write, daemon=True).start()

    def _write(self) -> None:
        with open(self.path, "wb") as pipe:  # blocks until the camera opens the pipe
            pipe.write(f"YUV4MPEG2 W{W} H{H} F10:1 Ip A1:1 Cmono\n".encode())
            pipe.write(b"FRAME\n" + frames(1)[0].tobytes())
            pipe.flush()
            self._stop.wait(30)

    def end(self) -> None:
        """Close the writer's end (unblocking any read), also if no reader ever came."""
        self._stop.set()
        with contextlib.suppress(OSError):  # a writer still in open() needs a reader to come
            os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))


@pytest.fixture
def silent_streams():
    streams: list[SilentStream] = []
    yield streams
    for stream in streams:
        stream.end()


class TestOpenCVContract(CameraContract):
    expect_simulated = True  # a replayed file is not a live measurement

    @pytest.fixture(autouse=True)
    def _streams(self, silent_streams):
        self.streams = silent_streams

    def make(self, tmp_path):
        return camera(str(write_ffv1(tmp_path / "video.avi", frames())), loop=True)

    def make_stalled(self, tmp_path):
        self.streams.append(SilentStream(tmp_path / "live.y4m"))
        return camera(str(tmp_path / "live.y4m"))


def test_frames_are_the_written_frames_in_order_and_loop_restarts_at_the_first(tmp_path):
    written = frames()
    with camera(str(write_ffv1(tmp_path / "video.avi", written)), loop=True) as cam:
        assert cam.shape == (H, W)
        got = [cam.snap(2.0) for _ in range(2 * N + 2)]
    for k, frame in enumerate(got):
        assert frame.image.dtype == np.uint8
        np.testing.assert_array_equal(frame.image, written[k % N])
        assert frame.meta["source_frame"] == k % N
        assert frame.frame_id == k + 1 and frame.simulated
        assert frame.meta["source_pos_s"] == pytest.approx((k % N) / 10)  # written at 10 fps
    stamps = [f.timestamp_s for f in got]
    assert stamps == sorted(stamps)


def test_the_end_of_a_file_without_loop_times_out_at_once(tmp_path):
    with camera(str(write_ffv1(tmp_path / "video.avi", frames()))) as cam:
        for _ in range(N):
            cam.snap(2.0)
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout, match="ended after 5 frames"):
            cam.snap(2.0)
        assert time.monotonic() - t0 < 0.5


def test_a_png_sequence_replays_16_bit_frames_exactly(tmp_path):
    written = [(f.astype(np.uint16) * 257) for f in frames()]
    pattern = write_pngs(tmp_path / "seq", written)
    assert source_kind(pattern) == "sequence"
    with camera(pattern, bit_depth=16) as cam:
        got = [cam.snap(2.0).image for _ in range(N)]
        with pytest.raises(DeviceTimeout):
            cam.snap(2.0)
    for image, expected in zip(got, written, strict=True):
        assert image.dtype == np.uint16
        np.testing.assert_array_equal(image, expected)
    with pytest.raises(DeviceError, match="16-bit"), camera(pattern, bit_depth=8):
        pass


def test_a_colour_source_becomes_bt601_luminance(tmp_path):
    rng = np.random.default_rng(3)
    bgr = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    pattern = write_pngs(tmp_path / "colour", [bgr])
    with camera(pattern) as cam:
        image = cam.snap(2.0).image
    b, g, r = (bgr[..., c].astype(float) for c in range(3))
    luminance = 0.299 * r + 0.587 * g + 0.114 * b
    # rounded to nearest; OpenCV's 14-bit fixed-point weights may add up to 0.03
    assert np.abs(image - luminance).max() <= 0.53
    assert (image == np.rint(luminance)).mean() > 0.99
    with pytest.raises(DeviceError, match="grayscale: true"), camera(pattern, grayscale=False):
        pass


def test_grayscale_false_passes_a_grey_source_through(tmp_path):
    written = frames(2)
    with camera(str(write_ffv1(tmp_path / "video.avi", written)), grayscale=False) as cam:
        for expected in written:
            np.testing.assert_array_equal(cam.snap(2.0).image, expected)


def test_a_missing_source_is_a_disconnect_naming_it(tmp_path):
    missing = tmp_path / "nowhere.avi"
    with pytest.raises(DeviceDisconnected, match="nowhere.avi"):
        camera(str(missing)).open()
    with pytest.raises(DeviceDisconnected, match="nothing_%04d.png"):
        camera(str(tmp_path / "nothing_%04d.png")).open()
    not_video = tmp_path / "notes.avi"
    not_video.write_text("not a video")
    with pytest.raises(DeviceDisconnected, match="notes.avi"):
        camera(str(not_video)).open()


def test_a_silent_live_stream_times_out_then_needs_a_reconnect(tmp_path, silent_streams):
    silent_streams.append(SilentStream(tmp_path / "live.y4m"))
    threads = threading.active_count()
    with camera(str(tmp_path / "live.y4m"), timeout_s=2.0) as cam:
        cam.retry = RetryPolicy(retries=0)  # the driver's own answer to each snap
        assert not cam.simulated and cam.shape == (H, W)
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout, match="within 0.3 s"):
            cam.snap(0.3)
        assert time.monotonic() - t0 < 0.8
        for _ in range(3):  # the read is still blocked: no new threads, a clear disconnect
            with pytest.raises(DeviceDisconnected, match="reconnect"):
                cam.snap(0.3)
        assert threading.active_count() <= threads + 1
        assert cam.snapshot()["source_kind"] == "stream"
    silent_streams[0].end()  # the blocked read returns; the worker releases and ends
    deadline = time.monotonic() + 2.0
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= threads


def test_exposure_of_a_file_is_nominal_and_recorded(tmp_path):
    source = str(write_ffv1(tmp_path / "video.avi", frames(2)))
    with camera(source, exposure_s=0.02) as cam:
        assert cam.exposure_s == 0.02
        assert cam.snap(2.0).exposure_s == 0.02
        cam.exposure_s = 0.5
        assert cam.snap(2.0).exposure_s == 0.5
        snap = cam.snapshot()
    assert snap["exposure_control"] == "nominal" and snap["backend_api"] == "FFMPEG"
    assert snap["source"] == source and snap["shape"] == [H, W] and snap["simulated"] is True


def test_sources_are_classified_and_options_checked(tmp_path):
    assert source_kind(0) == "device" and source_kind("/dev/video0") == "device"
    assert source_kind("rtsp://cam.local/stream") == "url"
    assert source_kind(str(tmp_path / "rec.avi")) == "file"
    assert not camera(0).simulated and not camera("http://x/y.mjpg").simulated
    assert OpenCVCamera.Options(source="1").source == 1  # a quoted index in a bench file
    with pytest.raises(pydantic.ValidationError):
        OpenCVCamera.Options(source=0, exposure=0.1)
    with pytest.raises(pydantic.ValidationError):
        OpenCVCamera.Options(source=0, bit_depth=17)
