"""`hil calibrate`'s measurement: every step on the bench, in order, each one recorded.

exposure → dark → stray light → sub-images (found on a bright field) → photon transfer → display
response → geometry (dot grid, per sub-image) → kernels (random binary patterns; the sub-images
assigned to the design's kernels) → validation on new images.

Calibration knows the design (its kernels, input grid and display mapping), the devices and the
frames; where the sub-images fall, how large and how turned, it measures. Every image it shows is
an input-grid image (`calibration.grid_bench`).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from calibration import geometry, photometry
from calibration.calfile import Calibration, bench_fingerprint
from calibration.design import Design
from calibration.discovery import SubImage, find_subimages
from calibration.errors import CalibrationError
from calibration.grid_bench import GridBench
from calibration.kernels import Kernels, measure_kernels
from calibration.localize import register_region, spot_region
from calibration.model import validate_prediction

STEPS = (
    "exposure",
    "dark",
    "stray light",
    "sub-images",
    "photon transfer",
    "display response",
    "geometry",
    "kernels",
    "validation",
)


@dataclass(frozen=True)
class Plan:
    dark_frames: int = 16
    background_frames: int = 16
    ptc_levels: int = 8
    ramp_levels: int = 17
    ramp_frames: int = 3
    grid_frames: int = 16
    grid_exposure_factor: float = 6.0
    patterns: int = 32
    validation_images: int = 4
    target_fill: float = 0.7
    seed: int = 0


Progress = Callable[[str], None]


class _Steps:
    def __init__(self, progress: Progress | None) -> None:
        self.records: list[dict] = []
        self.progress = progress

    def run(self, name: str, fn, *args, **kwargs):
        if self.progress:
            self.progress(name)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        record = out[-1] if isinstance(out, tuple) and isinstance(out[-1], dict) else {}
        self.records.append({"name": name, "seconds": round(time.perf_counter() - t0, 3)} | record)
        return out


def _quantised(levels: np.ndarray, bit_depth: int) -> np.ndarray:
    top = 2**bit_depth - 1
    return np.unique(np.round(np.clip(levels, 0, 1) * top)) / top


def _with_channels(image: np.ndarray, channels: int) -> np.ndarray:
    return image if channels == 1 else np.repeat(image[..., None], 3, axis=-1)


@dataclass(frozen=True)
class _Context:
    """What every step reads and none changes: the open bench, the design and the plan."""

    bench: Any
    design: Design
    plan: Plan

    @property
    def cam(self):
        return self.bench.camera

    @property
    def disp(self):
        return self.bench.display

    @property
    def frame_hw(self) -> tuple[int, int]:
        return self.cam.shape

    def _each_shown(self, images: list[np.ndarray]):
        """Lights on, then each image on the display in turn, yielding its index once shown."""
        photometry.set_lights(self.bench, True)
        for i, img in enumerate(images):
            self.disp.show(_with_channels(img.astype(np.float32), self.design.channels))
            yield i

    def show_frames(self, images: list[np.ndarray], per_image: int = 1) -> np.ndarray:
        """Each image's mean of `per_image` frames."""
        out = np.empty((len(images), *self.frame_hw))
        for i in self._each_shown(images):
            out[i] = photometry.mean_frame(self.cam, per_image, variance=False)[0]
        return out

    def show_raw(self, images: list[np.ndarray]) -> np.ndarray:
        """One frame of each image in the camera's own counts (32 frames of 1440×1080 are
        100 MB in uint16, 400 MB as float64)."""
        out = None
        for i in self._each_shown(images):
            frame = self.cam.snap(self.cam.frame_timeout_s()).image
            if out is None:
                out = np.empty((len(images), *frame.shape), frame.dtype)
            out[i] = frame
        return out


@dataclass(frozen=True)
class _Photometry:
    """The sensor's and display's measured response, from the first five steps."""

    exposure: float
    dark: np.ndarray
    read_noise: np.ndarray
    background: np.ndarray
    gain: float
    levels: np.ndarray
    response: np.ndarray
    gamma: float

    def signal(self, frames: np.ndarray, window: tuple[slice, slice] | None = None) -> np.ndarray:
        """Frames (of the sensor's `window`, default all of it) → scene signal in DN/s: dark
        and stray light removed, in place when the frames are float64."""
        at = window or (slice(None), slice(None))
        out = np.subtract(frames, self.dark[at], out=frames if frames.dtype == np.float64 else None)
        out /= self.exposure
        out -= self.background[at]
        return out


@dataclass(frozen=True)
class _SignalFrames:
    """Raw frames (N, H, W) that stand for their signal and become it only where sliced: the
    kernel fit reads its tiles' windows, a small part of each frame, so the whole stack is never
    held in float64."""

    raw: np.ndarray
    phot: _Photometry

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        _, ys, xs = key
        return self.phot.signal(self.raw[key].astype(np.float64), (ys, xs))


@dataclass(frozen=True)
class _Found:
    """The sub-images on the sensor, their bright-field signal and the pixels they light."""

    subimages: list[SubImage]
    white: np.ndarray  # (H, W) DN/s
    lit: np.ndarray  # (H, W) bool


def calibrate(
    bench,
    design: Design,
    plan: Plan = Plan(),
    *,
    bench_name: str = "",
    versions: dict | None = None,
    progress: Progress | None = None,
) -> Calibration:
    """Measure the bench's frontend; the bench must be open. Returns the full calibration."""
    steps = _Steps(progress)
    ctx = _Context(GridBench(bench, design), design, plan)
    rng = np.random.default_rng(plan.seed)
    exposure, _ = steps.run("exposure", _exposure_step, ctx)
    dark, read_noise, _ = steps.run("dark", _dark_step, ctx)
    background, _ = steps.run("stray light", _background_step, ctx, dark)
    found, _ = steps.run("sub-images", _subimage_step, ctx, dark, read_noise, exposure, background)
    gain, _, _ = steps.run("photon transfer", _ptc_step, ctx, dark, found.lit)
    levels = _quantised(np.linspace(0, 1, plan.ramp_levels), ctx.disp.bit_depth)
    response, gamma, _ = steps.run(
        "display response", _ramp_step, ctx, dark, background, found.lit, levels
    )
    phot = _Photometry(exposure, dark, read_noise, background, gain, levels, response, gamma)
    regs, _ = steps.run("geometry", _geometry_step, ctx, phot, found)
    patterns = (rng.random((plan.patterns, *design.hw)) < 0.5).astype(np.float32)
    kern, _ = steps.run("kernels", _kernel_step, ctx, phot, found, regs, patterns)
    cal = _calibration(
        ctx, phot, found, kern, bench_name=bench_name, versions=versions, steps=steps.records
    )
    steps.run("validation", _validation_step, ctx, cal, rng, kern.models)
    photometry.set_lights(bench, False)
    bench.display.blank()
    return cal


def _exposure_step(ctx: _Context) -> tuple[float, dict]:
    """A quick dark for the black level, then the exposure that fills a white field to target.
    The dark is taken no longer than the search's longest exposure: a bench file's 60 s
    exposure would otherwise spend four silent minutes on it."""
    cam = ctx.bench.camera
    cam.exposure_s = min(cam.exposure_s, photometry.MAX_SEARCH_EXPOSURE_S)
    dark0, _ = photometry.measure_dark(ctx.bench, 4)
    black = float(np.median(dark0))
    exposure, fill = photometry.find_exposure(ctx.bench, black, target=ctx.plan.target_fill)
    return exposure, {"exposure_s": exposure, "white_fill": round(fill, 4)}


def _dark_step(ctx: _Context) -> tuple[np.ndarray, np.ndarray, dict]:
    dark, read = photometry.measure_dark(ctx.bench, ctx.plan.dark_frames)
    black = float(np.median(dark))
    return dark, read, {"black_level_dn": black, "read_noise_dn": float(np.median(read))}


def _background_step(ctx: _Context, dark: np.ndarray) -> tuple[np.ndarray, dict]:
    bg = photometry.measure_background(ctx.bench, dark, ctx.plan.background_frames)
    return bg, {"background_dn_per_s_median": float(np.median(bg))}


def _subimage_step(ctx: _Context, dark, read_noise, exposure, background) -> tuple[_Found, dict]:
    """A white input grid's regions on the sensor: one per designed tile, or a clear error."""
    frames = ctx.plan.grid_frames
    white = (ctx.show_frames([np.ones(ctx.design.hw, np.float32)], frames)[0] - dark) / exposure
    white -= background
    noise = np.maximum(read_noise, 0.5) / exposure / math.sqrt(frames)
    subimages = find_subimages(white, noise, ctx.design.tiles)
    lit = np.zeros(white.shape, bool)
    for sub in subimages:
        y0, x0, h, w = sub.box
        lit[y0 : y0 + h, x0 : x0 + w] = True
    lit &= white > 0.2 * np.percentile(white[lit], 95)
    scales = [sub.scale(ctx.design.hw) for sub in subimages]
    record = {
        "subimages_found": len(subimages),
        "sensor_px_per_input_px_median": round(float(np.median(scales)), 4),
        "centres_px": [[round(c, 2) for c in sub.centre] for sub in subimages],
    }
    return _Found(subimages, white, lit), record


def _ptc_step(ctx: _Context, dark: np.ndarray, lit: np.ndarray) -> tuple[float, float, dict]:
    levels = np.linspace(0.15, 1.0, ctx.plan.ptc_levels)
    gain, read_e, curve = photometry.photon_transfer(ctx.bench, dark, lit, levels)
    return gain, read_e, {"conversion_gain_e_per_dn": gain, "read_noise_e": read_e} | curve


def _ramp_step(ctx: _Context, dark, background, lit, levels) -> tuple:
    response, gamma = photometry.display_response(
        ctx.bench, dark, background, lit, levels, ctx.plan.ramp_frames
    )
    return response, gamma, {"display_gamma": gamma}


def grid_spacing(kernel_size: int, input_hw: tuple[int, int]) -> int:
    """Dot spacing in input px: k + 1 where the grid holds four dots a side at it (fewer leave
    the parity gap's place symmetric), smaller on a small grid, but never so small that a split(2)
    frame's spots (two spacings apart, k + 1 wide) touch."""
    least = max(3, math.ceil((kernel_size + 2) / 2))
    fits = [
        s for s in range(least, kernel_size + 2) if geometry.dots_per_axis(min(input_hw), s) >= 4
    ]
    return max(fits, default=least)


class _GridShots:
    """The dot grid (with a parity gap) shown as four sparser frames so spots never touch, dark
    removed; one set per exposure factor, taken on first use."""

    def __init__(self, ctx: _Context, phot: _Photometry) -> None:
        self.ctx, self.phot = ctx, phot
        self.grid = geometry.dot_grid(
            ctx.design.hw, grid_spacing(ctx.design.kernel_size, ctx.design.hw)
        )
        self._taken: dict[float, np.ndarray] = {}

    def __call__(self, factor: float) -> np.ndarray:
        if factor not in self._taken:
            cam, exposure = self.ctx.cam, self.phot.exposure
            cam.exposure_s = min(exposure * factor, cam.exposure_range_s[1])
            try:
                shown = self.ctx.show_frames(self.grid.split(2), self.ctx.plan.grid_frames)
                self._taken[factor] = shown - self.phot.dark
            finally:
                cam.exposure_s = exposure
        return self._taken[factor]


def _psf_reach(design: Design) -> float:
    """Input px from a spot's centroid to the edge of its light: half the kernel, plus how far
    the designed PSFs' centroids sit off their windows' centres."""
    k = design.kernel_size
    leads = [np.abs(design.centroid_offset(p)).max() for p in range(design.tiles)]
    return (k + 1) / 2 + float(max(leads))


class _Ambiguous(Exception):
    """A sub-image whose orientation its own dots cannot settle."""


def _geometry_step(ctx: _Context, phot: _Photometry, found: _Found) -> tuple[list, dict]:
    """Register every found sub-image against the dot grid, in the order they were found; one
    whose parity gap is lost at an edge takes the orientation its neighbours agree on."""
    # a dot carries a small fraction of a white field's light: expose longer (see _register_dim)
    shots = _GridShots(ctx, phot)
    shots(ctx.plan.grid_exposure_factor)
    regs, longer, unsettled = {}, {}, []
    for r in range(len(found.subimages)):
        try:
            regs[r], factor = _register_dim(ctx, shots, r, found.subimages)
        except _Ambiguous:
            unsettled.append(r)
            continue
        if factor != ctx.plan.grid_exposure_factor:
            longer[str(r)] = factor
    if unsettled and not regs:
        raise CalibrationError(
            "geometry: no sub-image's orientation is settled by its dots (each lost the dots "
            "near its parity gap): leave more room between the sub-images and the sensor's edge"
        )
    if unsettled:
        prefer = np.median([reg.map.affine[:, :2] for reg in regs.values()], axis=0)
        for r in unsettled:
            regs[r], _ = _register_dim(ctx, shots, r, found.subimages, prefer)
    ordered = [regs[r] for r in range(len(found.subimages))]
    record = {
        "registration_rms_px": float(np.mean([reg.rms_px for reg in ordered])),
        "spacing_input_px": shots.grid.spacing,
        "orientations": [reg.orientation for reg in ordered],
        "distortion_k1": [round(reg.map.k1, 5) for reg in ordered],
    }
    if unsettled:
        record["orientation_from_neighbours"] = unsettled
    if longer:
        record["grid_exposure_factor_for_dim_subimages"] = longer
    return ordered, record


def _register_dim(ctx: _Context, shots: _GridShots, r: int, subimages, prefer=None) -> tuple:
    """Register sub-image `r`, exposing 4x longer while its dots are too dim to be found
    (sub-optics differ in throughput): (registration, exposure factor used)."""
    hw, spacing, sub = ctx.design.hw, shots.grid.spacing, subimages[r]
    centres = np.asarray([s.centre for s in subimages])
    scale = sub.scale(hw)
    region = spot_region(sub, scale, spacing + ctx.design.kernel_size, ctx.frame_hw)
    longest = ctx.cam.exposure_range_s[1] / shots.phot.exposure
    factor = ctx.plan.grid_exposure_factor
    while True:
        try:
            reg = register_region(
                shots.grid, shots(factor), region, scale, _psf_reach(ctx.design), centres, r, prefer
            )
            return reg, factor
        except geometry.GeometryError as e:
            # too few spots, or spots so faint that noise moves them: more light helps both
            dim = any(w in str(e) for w in ("found", "matched", "fewer", "residuals"))
            if dim and factor < min(longest, 64 * ctx.plan.grid_exposure_factor):
                factor *= 4
                continue
            if "ambiguous" in str(e) and prefer is None:
                raise _Ambiguous from None
            raise CalibrationError(f"geometry: sub-image {r} at {sub.describe()}: {e}") from None


def _kernel_step(ctx: _Context, phot: _Photometry, found: _Found, regs, patterns) -> tuple:
    """Kernels from random binary patterns, with the sub-images assigned to designed tiles."""
    pattern_signal = _SignalFrames(ctx.show_raw(list(patterns)), phot)
    kern = measure_kernels(ctx.design, regs, found.subimages, patterns, pattern_signal, found.white)
    return kern, kern.record()


def _calibration(
    ctx: _Context,
    phot: _Photometry,
    found: _Found,
    kern: Kernels,
    *,
    bench_name: str,
    versions: dict | None,
    steps: list[dict],
) -> Calibration:
    """The measured values as a Calibration; `steps` is kept, not copied (validation appends)."""
    design, cam, frame_hw = ctx.design, ctx.cam, ctx.frame_hw
    physical = tuple(ctx.disp.device.shape)
    ratio = kern.psfs.sum(axis=(1, 2, 3)) / design.psfs.sum(axis=(1, 2, 3))
    maps = kern.maps
    return Calibration(
        id=uuid.uuid4().hex,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        bench_name=bench_name,
        fingerprint=bench_fingerprint(design, frame_hw, physical, cam.bit_depth),
        simulated=bool(ctx.bench.simulated),
        frame_shape=tuple(frame_hw),
        display_shape=physical,
        input_shape=design.hw,
        display_scale=design.display_scale,
        display_origin=design.origin_on(physical[:2]),
        kernels=design.kernels,
        kernel_size=design.kernel_size,
        signed=design.signed,
        channels=design.channels,
        camera_bit_depth=cam.bit_depth,
        exposure_s=float(phot.exposure),
        dark_dn=phot.dark.astype(np.float32),
        read_noise_dn=phot.read_noise.astype(np.float32),
        conversion_gain_e_per_dn=float(phot.gain),
        black_level_dn=float(np.median(phot.dark)),
        background_dn_per_s=phot.background.astype(np.float32),
        bright_field_dn_per_s=found.white.astype(np.float32),
        display_levels=phot.levels.astype(np.float32),
        display_response=phot.response.astype(np.float32),
        display_gamma=float(phot.gamma),
        illumination=kern.illumination.astype(np.float32),
        vignetting=kern.vignetting.astype(np.float32),
        affines=np.asarray([m.affine for m in maps]),
        distortion_k1=np.asarray([m.k1 for m in maps]),
        distortion_centre_px=np.asarray([m.centre for m in maps]),
        distortion_radius_px=np.asarray([m.radius for m in maps]),
        registration_rms_px=kern.registration_rms_px.astype(np.float32),
        tile_boxes=np.asarray(kern.regions, np.int32),
        psfs=kern.psfs.astype(np.float32),
        psf_residual=kern.residual.astype(np.float32),
        tile_gain=(ratio / np.median(ratio)).astype(np.float32),
        devices=ctx.bench.snapshot(),
        versions=dict(versions or {}),
        steps=steps,
        truth=None,
    )


def _validation_step(ctx: _Context, cal: Calibration, rng: np.random.Generator, models) -> tuple:
    """New random grey images, captured and compared with what the calibration predicts."""
    levels = _quantised(rng.random(256), ctx.disp.bit_depth)
    images = rng.choice(levels, size=(ctx.plan.validation_images, *ctx.design.hw))
    images = images.astype(np.float32)
    captured = np.asarray([ctx.show_frames([img])[0] for img in images])
    return (), validate_prediction(cal, images, captured, models)
