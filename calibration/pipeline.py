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

import numpy as np

from calibration import geometry, photometry
from calibration.calfile import Calibration, bench_fingerprint
from calibration.design import Design
from calibration.errors import CalibrationError
from calibration.model import noise_variance, predict_frames
from calibration.psf import (
    estimate_kernel,
    exclusive_masks,
    fit_region,
    render_tiles,
)

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


def _illumination_basis(display_hw: tuple[int, int]) -> np.ndarray:
    """Quadratic polynomials over the display, 1 at its centre for the constant term: (6, H, W)."""
    h, w = display_hw
    ys, xs = np.mgrid[:h, :w].astype(np.float64)
    x = (xs - (w - 1) / 2) / max((w - 1) / 2, 1)
    y = (ys - (h - 1) / 2) / max((h - 1) / 2, 1)
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y])


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
    cam, disp = bench.camera, bench.display
    frame_hw, display_hw = cam.shape, disp.shape[:2]
    n_tiles = len(design.tile_boxes)
    k, channels = design.kernel_size, design.channels
    rng = np.random.default_rng(plan.seed)

    def show_frames(images: list[np.ndarray], per_image: int = 1) -> np.ndarray:
        photometry.set_lights(bench, True)
        out = []
        for img in images:
            disp.show(_with_channels(img.astype(np.float32), channels))
            out.append(photometry.mean_frame(cam, per_image)[0])
        return np.asarray(out)

    # exposure: a quick dark for the black level, then the white field
    def exposure_step():
        dark0, _ = photometry.measure_dark(bench, 4)
        black = float(np.median(dark0))
        exposure, fill = photometry.find_exposure(bench, black, target=plan.target_fill)
        return exposure, {"exposure_s": exposure, "white_fill": round(fill, 4)}

    exposure, _ = steps.run("exposure", exposure_step)

    def dark_step():
        dark, read = photometry.measure_dark(bench, plan.dark_frames)
        black = float(np.median(dark))
        return dark, read, {"black_level_dn": black, "read_noise_dn": float(np.median(read))}

    dark, read_noise, _ = steps.run("dark", dark_step)

    def background_step():
        bg = photometry.measure_background(bench, dark, plan.background_frames)
        return bg, {"background_dn_per_s_median": float(np.median(bg))}

    (background, _) = steps.run("stray light", background_step)
    lit = exclusive_masks(
        [
            fit_region(_design_affine(b, display_hw), display_hw, k, frame_hw)
            for b in design.tile_boxes
        ],
        frame_hw,
    )
    any_tile = lit.any(axis=0)

    def ptc_step():
        levels = np.linspace(0.15, 1.0, plan.ptc_levels)
        gain, read_e, curve = photometry.photon_transfer(bench, dark, any_tile, levels)
        return gain, read_e, {"conversion_gain_e_per_dn": gain, "read_noise_e": read_e} | curve

    gain, read_e, _ = steps.run("photon transfer", ptc_step)

    ramp = _quantised(np.linspace(0, 1, plan.ramp_levels), disp.bit_depth)

    def ramp_step():
        response, gamma = photometry.display_response(
            bench, dark, background, any_tile, ramp, plan.ramp_frames
        )
        return response, gamma, {"display_gamma": gamma}

    response, gamma, _ = steps.run("display response", ramp_step)

    def signal(frames: np.ndarray) -> np.ndarray:
        """Frames → scene signal in DN/s: dark and stray light removed."""
        return (frames - dark) / exposure - background

    # geometry from a dot grid with a parity gap, shown as four sparser frames so spots never touch
    spacing = max(8, k + 1)
    grid = geometry.dot_grid(display_hw, spacing)

    def grid_frames(factor: float) -> np.ndarray:
        cam.exposure_s = min(exposure * factor, cam.exposure_range_s[1])
        try:
            return show_frames(grid.split(2), plan.grid_frames) - dark
        finally:
            cam.exposure_s = exposure

    def register(dots: np.ndarray, guess: np.ndarray, region) -> tuple:
        y0, x0, h, w = region
        spots = np.vstack(
            [geometry.find_spots(d[y0 : y0 + h, x0 : x0 + w], 2 * spacing) + [x0, y0] for d in dots]
        )
        try:
            return geometry.register_tile(grid, spots, guess, region=region), False
        except geometry.GeometryError as e:
            if "ambiguous" not in str(e):
                raise
            # a dot lost off the sensor's edge can hide the parity gap: keep the designed
            # orientation, and say so
            reg = geometry.register_tile(
                grid, spots, guess, region=region, orientations=("identity",)
            )
            return reg, True

    def geometry_step():
        # a dot carries a small fraction of a white field's light: expose longer, and longer
        # still for a tile too dim to show its dots (sub-optics differ in throughput)
        longest = cam.exposure_range_s[1] / exposure
        shots = {plan.grid_exposure_factor: grid_frames(plan.grid_exposure_factor)}
        affines, rms, boxes, assumed, longer = [], [], [], [], {}
        for p, box in enumerate(design.tile_boxes):
            lead = design.centroid_offset(p)
            guess = _design_affine(box, display_hw)
            guess[:, 2] += lead
            region = geometry.tile_box(guess, display_hw, frame_hw, pad=spacing + 2)
            factor = plan.grid_exposure_factor
            while True:
                if factor not in shots:
                    shots[factor] = grid_frames(factor)
                try:
                    reg, orientation_assumed = register(shots[factor], guess, region)
                    break
                except geometry.GeometryError as e:
                    if "found" in str(e) and factor < min(longest, 64 * plan.grid_exposure_factor):
                        factor *= 4
                        continue
                    raise CalibrationError(f"geometry: tile {p}: {e}") from None
            if orientation_assumed:
                assumed.append(p)
            if factor != plan.grid_exposure_factor:
                longer[str(p)] = factor
            affine = reg.affine.copy()
            affine[:, 2] -= lead  # the PSF keeps its design centroid (see Design)
            affines.append(affine)
            rms.append(reg.rms_px)
            boxes.append(geometry.tile_box(affine, display_hw, frame_hw))
        record = {"registration_rms_px": float(np.mean(rms)), "spacing_px": spacing}
        if assumed:
            record["orientation_assumed_for_tiles"] = assumed
        if longer:
            record["grid_exposure_factor_for_dim_tiles"] = longer
        return np.asarray(affines), np.asarray(rms), boxes, record

    affines, reg_rms, boxes, _ = steps.run("geometry", geometry_step)
    regions = [fit_region(a, display_hw, k, frame_hw) for a in affines]
    masks = exclusive_masks(regions, frame_hw)

    # kernels, then the display's illumination they imply, then the kernels again with it
    patterns = (rng.random((plan.patterns, *display_hw)) < 0.5).astype(np.float32)

    def kernel_step():
        pattern_signal = signal(show_frames(list(patterns)))
        white = signal(show_frames([np.ones(display_hw, np.float32)], plan.grid_frames))
        illumination = np.ones(display_hw)
        for _ in range(2):
            emitted = as_emitted(patterns, illumination, channels)
            fits = [
                estimate_kernel(emitted, pattern_signal, affines[p], k, regions[p], masks[p])
                for p in range(n_tiles)
            ]
            psfs = np.asarray([f[0] for f in fits])
            illumination = _fit_illumination(white[0], affines, psfs, masks, display_hw, channels)
        residual = np.asarray([f[1] for f in fits])
        return psfs, residual, illumination, {"psf_residual_mean": float(residual.mean())}

    psfs, psf_residual, illumination, _ = steps.run("kernels", kernel_step)
    ratio = psfs.sum(axis=(1, 2, 3)) / design.psfs.sum(axis=(1, 2, 3))
    cal = Calibration(
        id=uuid.uuid4().hex,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        bench_name=bench_name,
        fingerprint=bench_fingerprint(design, frame_hw, disp.shape, cam.bit_depth),
        simulated=bool(bench.simulated),
        frame_shape=tuple(frame_hw),
        display_shape=tuple(disp.shape),
        kernels=design.kernels,
        kernel_size=k,
        signed=design.signed,
        channels=channels,
        camera_bit_depth=cam.bit_depth,
        exposure_s=float(exposure),
        dark_dn=dark.astype(np.float32),
        read_noise_dn=read_noise.astype(np.float32),
        conversion_gain_e_per_dn=float(gain),
        black_level_dn=float(np.median(dark)),
        background_dn_per_s=background.astype(np.float32),
        display_levels=ramp.astype(np.float32),
        display_response=response.astype(np.float32),
        display_gamma=float(gamma),
        illumination=illumination.astype(np.float32),
        affines=affines.astype(np.float64),
        registration_rms_px=reg_rms.astype(np.float32),
        tile_boxes=np.asarray(boxes, np.int32),
        psfs=psfs.astype(np.float32),
        psf_residual=psf_residual.astype(np.float32),
        tile_gain=(ratio / np.median(ratio)).astype(np.float32),
        devices=bench.snapshot(),
        versions=dict(versions or {}),
        steps=steps.records,
        truth=None,
    )

    def validation_step():
        levels = _quantised(rng.random(256), disp.bit_depth)
        images = rng.choice(levels, size=(plan.validation_images, *display_hw)).astype(np.float32)
        captured = np.asarray([show_frames([img])[0] for img in images])
        return (), validate_prediction(cal, images, captured)

    steps.run("validation", validation_step)
    photometry.set_lights(bench, False)
    disp.blank()
    return cal


def as_emitted(patterns: np.ndarray, illumination: np.ndarray, channels: int) -> np.ndarray:
    """Binary patterns are display-response free: 0 and 1 map to 0 and 1 by definition."""
    light = patterns[:, None] * illumination
    return np.repeat(light, channels, axis=1) if channels > 1 else light


def _design_affine(box: tuple[int, int, int, int], display_hw) -> np.ndarray:
    """The design's display→frame map: the display pixel grid lands on the tile box 1:1."""
    y0, x0 = box[:2]
    return np.array([[1.0, 0.0, x0], [0.0, 1.0, y0]])


def _fit_illumination(white, affines, psfs, masks, display_hw, channels) -> np.ndarray:
    """The display's relative illumination (1 at the centre) from a white field, given kernels."""

    basis = _illumination_basis(display_hw)
    use = masks.any(axis=0)
    columns = []
    for b in basis:
        light = np.repeat(b[None, None], channels, axis=1)
        columns.append(render_tiles(light, affines, psfs, white.shape)[0][use])
    coef, *_ = np.linalg.lstsq(np.stack(columns, axis=1), white[use], rcond=None)
    illumination = np.tensordot(coef / coef[0], basis, axes=1)
    return np.clip(illumination, 1e-3, None)


def validate_prediction(cal: Calibration, images: np.ndarray, captured: np.ndarray) -> dict:
    """How well the calibration predicts frames of new images, against the noise it expects.

    `excess_rel_error` is the residual beyond what sensor noise explains, relative to the
    signal: the model's own error. `chi2` is the residual over the expected noise (1 is perfect).
    """
    predicted = predict_frames(cal, images)
    residual = captured - predicted
    var = noise_variance(cal, predicted)
    signal = predicted - cal.dark_dn
    use = np.abs(signal) > 0  # where the scene reaches
    excess = max(float(np.mean(residual[..., use] ** 2) - np.mean(var[..., use])), 0.0)
    return {
        "prediction_chi2": float(np.mean(residual[..., use] ** 2 / var[..., use])),
        "prediction_excess_rel_error": float(np.sqrt(excess / np.mean(signal[..., use] ** 2))),
        "prediction_rel_error": float(
            np.sqrt(np.mean(residual[..., use] ** 2) / np.mean(signal[..., use] ** 2))
        ),
    }
