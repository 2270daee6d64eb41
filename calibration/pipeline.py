"""`hil calibrate`'s measurement: every step on the bench, in order, each one recorded.

exposure → dark → stray light → photon transfer → display response → geometry (dot grid) →
illumination and kernels (random binary patterns) → validation on new images.
"""

from __future__ import annotations

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
from calibration.errors import CalibrationError
from calibration.model import validate_prediction
from calibration.psf import (
    as_emitted,
    estimate_kernel,
    exclusive_masks,
    fit_illumination,
    fit_region,
)
from calibration.registration import register_tile
from calibration.spots import find_spots

STEPS = (
    "exposure",
    "dark",
    "stray light",
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

    @property
    def display_hw(self) -> tuple[int, int]:
        return self.disp.shape[:2]

    def show_frames(self, images: list[np.ndarray], per_image: int = 1) -> np.ndarray:
        """Lights on, each image shown in turn: its mean of `per_image` frames."""
        photometry.set_lights(self.bench, True)
        out = []
        for img in images:
            self.disp.show(_with_channels(img.astype(np.float32), self.design.channels))
            out.append(photometry.mean_frame(self.cam, per_image)[0])
        return np.asarray(out)


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

    def signal(self, frames: np.ndarray) -> np.ndarray:
        """Frames → scene signal in DN/s: dark and stray light removed."""
        return (frames - self.dark) / self.exposure - self.background


@dataclass(frozen=True)
class _Geometry:
    """Each tile's display→frame map, its registration residual and its frame box."""

    affines: np.ndarray  # (P, 2, 3)
    rms: np.ndarray  # (P,)
    boxes: list[tuple[int, int, int, int]]


@dataclass(frozen=True)
class _Kernels:
    psfs: np.ndarray  # (P, C, k, k)
    residual: np.ndarray  # (P,)
    illumination: np.ndarray  # (H, W) of the display


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
    ctx = _Context(bench, design, plan)
    rng = np.random.default_rng(plan.seed)
    exposure, _ = steps.run("exposure", _exposure_step, ctx)
    dark, read_noise, _ = steps.run("dark", _dark_step, ctx)
    background, _ = steps.run("stray light", _background_step, ctx, dark)
    any_tile = _designed_footprint(ctx).any(axis=0)
    gain, _, _ = steps.run("photon transfer", _ptc_step, ctx, dark, any_tile)
    levels = _quantised(np.linspace(0, 1, plan.ramp_levels), ctx.disp.bit_depth)
    response, gamma, _ = steps.run(
        "display response", _ramp_step, ctx, dark, background, any_tile, levels
    )
    phot = _Photometry(exposure, dark, read_noise, background, gain, levels, response, gamma)
    geo, _ = steps.run("geometry", _geometry_step, ctx, phot)
    patterns = (rng.random((plan.patterns, *ctx.display_hw)) < 0.5).astype(np.float32)
    kern, _ = steps.run("kernels", _kernel_step, ctx, phot, geo, patterns)
    cal = _calibration(
        ctx, phot, geo, kern, bench_name=bench_name, versions=versions, steps=steps.records
    )
    steps.run("validation", _validation_step, ctx, cal, rng)
    photometry.set_lights(bench, False)
    ctx.disp.blank()
    return cal


def _exposure_step(ctx: _Context) -> tuple[float, dict]:
    """A quick dark for the black level, then the exposure that fills a white field to target."""
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


def _designed_footprint(ctx: _Context) -> np.ndarray:
    """Where each tile's light should land by design, before geometry has measured it: (P, H, W)."""
    k, display_hw, frame_hw = ctx.design.kernel_size, ctx.display_hw, ctx.frame_hw
    regions = [
        fit_region(_design_affine(b, display_hw), display_hw, k, frame_hw)
        for b in ctx.design.tile_boxes
    ]
    return exclusive_masks(regions, frame_hw)


def _ptc_step(ctx: _Context, dark: np.ndarray, any_tile: np.ndarray) -> tuple[float, float, dict]:
    levels = np.linspace(0.15, 1.0, ctx.plan.ptc_levels)
    gain, read_e, curve = photometry.photon_transfer(ctx.bench, dark, any_tile, levels)
    return gain, read_e, {"conversion_gain_e_per_dn": gain, "read_noise_e": read_e} | curve


def _ramp_step(ctx: _Context, dark, background, any_tile, levels) -> tuple:
    response, gamma = photometry.display_response(
        ctx.bench, dark, background, any_tile, levels, ctx.plan.ramp_frames
    )
    return response, gamma, {"display_gamma": gamma}


def _grid_spacing(ctx: _Context) -> int:
    return max(8, ctx.design.kernel_size + 1)


class _GridShots:
    """The dot grid (with a parity gap) shown as four sparser frames so spots never touch, dark
    removed; one set per exposure factor, taken on first use."""

    def __init__(self, ctx: _Context, phot: _Photometry) -> None:
        self.ctx, self.phot = ctx, phot
        self.grid = geometry.dot_grid(ctx.display_hw, _grid_spacing(ctx))
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


def _geometry_step(ctx: _Context, phot: _Photometry) -> tuple[_Geometry, dict]:
    """Register every tile against the dot grid; the PSF keeps its design centroid (see Design)."""
    # a dot carries a small fraction of a white field's light: expose longer (see _register_dim)
    shots = _GridShots(ctx, phot)
    shots(ctx.plan.grid_exposure_factor)
    affines, rms, boxes, assumed, longer = [], [], [], [], {}
    for p in range(len(ctx.design.tile_boxes)):
        lead = ctx.design.centroid_offset(p)
        reg, orientation_assumed, factor = _register_dim(ctx, shots, p, lead)
        if orientation_assumed:
            assumed.append(p)
        if factor != ctx.plan.grid_exposure_factor:
            longer[str(p)] = factor
        affine = reg.affine.copy()
        affine[:, 2] -= lead
        affines.append(affine)
        rms.append(reg.rms_px)
        boxes.append(geometry.tile_box(affine, ctx.display_hw, ctx.frame_hw))
    record = {"registration_rms_px": float(np.mean(rms)), "spacing_px": _grid_spacing(ctx)}
    if assumed:
        record["orientation_assumed_for_tiles"] = assumed
    if longer:
        record["grid_exposure_factor_for_dim_tiles"] = longer
    return _Geometry(np.asarray(affines), np.asarray(rms), boxes), record


def _register_dim(ctx: _Context, shots: _GridShots, p: int, lead: np.ndarray) -> tuple:
    """Register tile `p`, exposing 4x longer while its dots are too dim to be found (sub-optics
    differ in throughput): (registration, orientation assumed, exposure factor used)."""
    guess = _design_affine(ctx.design.tile_boxes[p], ctx.display_hw)
    guess[:, 2] += lead
    spacing = _grid_spacing(ctx)
    region = geometry.tile_box(guess, ctx.display_hw, ctx.frame_hw, pad=spacing + 2)
    longest = ctx.cam.exposure_range_s[1] / shots.phot.exposure
    factor = ctx.plan.grid_exposure_factor
    while True:
        try:
            reg, assumed = _register(shots.grid, shots(factor), guess, region, spacing)
            return reg, assumed, factor
        except geometry.GeometryError as e:
            if "found" in str(e) and factor < min(longest, 64 * ctx.plan.grid_exposure_factor):
                factor *= 4
                continue
            raise CalibrationError(f"geometry: tile {p}: {e}") from None


def _register(grid, dots: np.ndarray, guess: np.ndarray, region, spacing: int) -> tuple:
    """One tile's registration from its spots in every grid frame: (registration, whether the
    orientation had to be assumed)."""
    y0, x0, h, w = region
    spots = np.vstack(
        [find_spots(d[y0 : y0 + h, x0 : x0 + w], 2 * spacing) + [x0, y0] for d in dots]
    )
    try:
        return register_tile(grid, spots, guess, region=region), False
    except geometry.GeometryError as e:
        if "ambiguous" not in str(e):
            raise
        # a dot lost off the sensor's edge can hide the parity gap: keep the designed
        # orientation, and say so
        reg = register_tile(grid, spots, guess, region=region, orientations=("identity",))
        return reg, True


def _kernel_step(
    ctx: _Context, phot: _Photometry, geo: _Geometry, patterns: np.ndarray
) -> tuple[_Kernels, dict]:
    """Kernels from random binary patterns, then the display's illumination they imply, then the
    kernels again with it."""
    k, channels, display_hw = ctx.design.kernel_size, ctx.design.channels, ctx.display_hw
    regions = [fit_region(a, display_hw, k, ctx.frame_hw) for a in geo.affines]
    masks = exclusive_masks(regions, ctx.frame_hw)
    pattern_signal = phot.signal(ctx.show_frames(list(patterns)))
    white = phot.signal(ctx.show_frames([np.ones(display_hw, np.float32)], ctx.plan.grid_frames))
    illumination = np.ones(display_hw)
    for _ in range(2):
        emitted = as_emitted(patterns, illumination, channels)
        fits = [
            estimate_kernel(emitted, pattern_signal, geo.affines[p], k, regions[p], masks[p])
            for p in range(len(ctx.design.tile_boxes))
        ]
        psfs = np.asarray([f[0] for f in fits])
        illumination = fit_illumination(white[0], geo.affines, psfs, masks, display_hw, channels)
    residual = np.asarray([f[1] for f in fits])
    return _Kernels(psfs, residual, illumination), {"psf_residual_mean": float(residual.mean())}


def _calibration(
    ctx: _Context,
    phot: _Photometry,
    geo: _Geometry,
    kern: _Kernels,
    *,
    bench_name: str,
    versions: dict | None,
    steps: list[dict],
) -> Calibration:
    """The measured values as a Calibration; `steps` is kept, not copied (validation appends)."""
    design, cam, disp, frame_hw = ctx.design, ctx.cam, ctx.disp, ctx.frame_hw
    k, channels = design.kernel_size, design.channels
    ratio = kern.psfs.sum(axis=(1, 2, 3)) / design.psfs.sum(axis=(1, 2, 3))
    return Calibration(
        id=uuid.uuid4().hex,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        bench_name=bench_name,
        fingerprint=bench_fingerprint(design, frame_hw, disp.shape, cam.bit_depth),
        simulated=bool(ctx.bench.simulated),
        frame_shape=tuple(frame_hw),
        display_shape=tuple(disp.shape),
        kernels=design.kernels,
        kernel_size=k,
        signed=design.signed,
        channels=channels,
        camera_bit_depth=cam.bit_depth,
        exposure_s=float(phot.exposure),
        dark_dn=phot.dark.astype(np.float32),
        read_noise_dn=phot.read_noise.astype(np.float32),
        conversion_gain_e_per_dn=float(phot.gain),
        black_level_dn=float(np.median(phot.dark)),
        background_dn_per_s=phot.background.astype(np.float32),
        display_levels=phot.levels.astype(np.float32),
        display_response=phot.response.astype(np.float32),
        display_gamma=float(phot.gamma),
        illumination=kern.illumination.astype(np.float32),
        affines=geo.affines.astype(np.float64),
        registration_rms_px=geo.rms.astype(np.float32),
        tile_boxes=np.asarray(geo.boxes, np.int32),
        psfs=kern.psfs.astype(np.float32),
        psf_residual=kern.residual.astype(np.float32),
        tile_gain=(ratio / np.median(ratio)).astype(np.float32),
        devices=ctx.bench.snapshot(),
        versions=dict(versions or {}),
        steps=steps,
        truth=None,
    )


def _validation_step(ctx: _Context, cal: Calibration, rng: np.random.Generator) -> tuple:
    """New random grey images, captured and compared with what the calibration predicts."""
    levels = _quantised(rng.random(256), ctx.disp.bit_depth)
    images = rng.choice(levels, size=(ctx.plan.validation_images, *ctx.display_hw))
    images = images.astype(np.float32)
    captured = np.asarray([ctx.show_frames([img])[0] for img in images])
    return (), validate_prediction(cal, images, captured)


def _design_affine(box: tuple[int, int, int, int], display_hw) -> np.ndarray:
    """The design's display→frame map: the display pixel grid lands on the tile box 1:1."""
    y0, x0 = box[:2]
    return np.array([[1.0, 0.0, x0], [0.0, 1.0, y0]])
