"""The kernels step: each sub-image's PSF, which designed kernel it is, and the flat field.

1. Every found sub-image's kernel is fitted through its registered map (its PSF's centroid still
   in the map: the spots' centroids put it there).
2. The sub-images are assigned to designed tiles (`calibration.assignment`).
3. Each map takes its designed PSF's centroid back out, so a measured PSF keeps its design's
   centroid (a PSF and a misalignment share one translation, and the backend was trained on the
   design's).
4. The display's illumination and each sub-image's vignetting come from the white field given
   the kernels; then the kernels are fitted again through the final maps with both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calibration.assignment import Assignment, assign, grid_cells
from calibration.design import Design
from calibration.discovery import SubImage
from calibration.errors import CalibrationError
from calibration.forward import (
    TileModel,
    estimate_kernel,
    exclusive_masks,
    margin_for,
    render,
    shifted_taps,
)
from calibration.localize import Registered
from calibration.tilemap import PaddedGrid, TileMap


@dataclass(frozen=True, eq=False)
class Kernels:
    """What the kernels step measured, in the design's tile order."""

    psfs: np.ndarray  # (P, C, k, k)
    residual: np.ndarray  # (P,)
    illumination: np.ndarray  # (h, w) on the input grid, 1 at its centre
    vignetting: np.ndarray  # (P,)
    registered: list[Registered]
    regions: list[tuple[int, int, int, int]]
    registration_rms_px: np.ndarray  # (P,) sensor px
    registration_rms_input_px: np.ndarray  # (P,)
    assignment: Assignment
    models: list[TileModel]  # the final maps' forward models, which validation reuses

    @property
    def maps(self) -> list[TileMap]:
        return [reg.map for reg in self.registered]

    def record(self) -> dict:
        return {
            "dots": [reg.record() for reg in self.registered],
            "psf_residual_mean": float(self.residual.mean()),
            "registration_rms_px": float(np.mean(self.registration_rms_px)),
            "registration_rms_input_px": float(np.mean(self.registration_rms_input_px)),
            "vignetting": [round(float(v), 4) for v in self.vignetting],
            "assignment": self.assignment.record(),
        }


def illumination_basis(hw: tuple[int, int]) -> np.ndarray:
    """Smooth display illumination over the input grid, 1 at its centre for the constant term:
    (5, h, w). The radial term is left to each sub-image's vignetting, which the white field
    cannot tell apart from it."""
    h, w = hw
    ys, xs = np.mgrid[:h, :w].astype(np.float64)
    x = (xs - (w - 1) / 2) / max((w - 1) / 2, 1)
    y = (ys - (h - 1) / 2) / max((h - 1) / 2, 1)
    return np.stack([np.ones_like(x), x, y, x * y, x * x - y * y])


def _fit_all(models, masks, emitted, signal, k, vignetting) -> tuple[np.ndarray, np.ndarray]:
    taps = shifted_taps(emitted, k)
    fits = [
        estimate_kernel(m, emitted, m.window(signal), k, mask, v, taps)
        for m, mask, v in zip(models, masks, vignetting, strict=True)
    ]
    return np.asarray([f[0] for f in fits]), np.asarray([f[1] for f in fits])


def _emitted(grid: PaddedGrid, patterns: np.ndarray, illumination, channels: int) -> np.ndarray:
    light = patterns[:, None] * illumination
    return grid.pad(np.repeat(light, channels, axis=1) if channels > 1 else light)


def _window(models, masks, frame: np.ndarray) -> np.ndarray:
    """The masked region pixels of every tile of one frame (H, W), concatenated."""
    return np.concatenate(
        [m.window(frame[None])[0][mask] for m, mask in zip(models, masks, strict=True)]
    )


def _white_of(models, masks, kernels, vignetting, light) -> np.ndarray:
    parts = zip(models, masks, kernels, vignetting, strict=True)
    return np.concatenate([render(m, light, kernel, v)[0][mask] for m, mask, kernel, v in parts])


def fit_flat_field(models, masks, kernels, white, grid: PaddedGrid, channels, rounds=4) -> tuple:
    """(illumination (h, w), vignetting (P,)) that, with the kernels, best predict the white
    field (H, W): alternately the illumination's coefficients (linear) and each sub-image's
    vignetting (linear per tile)."""
    basis = illumination_basis((grid.h, grid.w))
    lights = [grid.pad(np.repeat(b[None, None], channels, axis=1)) for b in basis]
    values = _window(models, masks, white)
    vignetting = np.zeros(len(models))
    for _ in range(rounds):
        columns = [_white_of(models, masks, kernels, vignetting, light) for light in lights]
        coef, *_ = np.linalg.lstsq(np.stack(columns, 1), values, rcond=None)
        light = sum(c * lt for c, lt in zip(coef, lights, strict=True))
        for p, (m, mask, kernel) in enumerate(zip(models, masks, kernels, strict=True)):
            bare = render(m, light, kernel, 0.0)[0][mask]
            drop = bare * m.radial[mask]
            y = m.window(white[None])[0][mask]
            vignetting[p] = float(np.dot(drop, bare - y) / max(np.dot(drop, drop), 1e-30))
    illumination = np.clip(np.tensordot(coef / coef[0], basis, 1), 1e-3, None)
    return illumination, vignetting


def _assignment(design: Design, subimages: list[SubImage], measured: np.ndarray) -> Assignment:
    """Which designed tile each found sub-image is (see `calibration.assignment`)."""
    found_cells, found_shape, _ = grid_cells(np.asarray([s.centre for s in subimages]))
    boxes = np.asarray(design.tile_boxes, np.float64)
    design_centres = boxes[:, [1, 0]] + boxes[:, [3, 2]] / 2
    design_cells, design_shape, _ = grid_cells(design_centres)
    try:
        return assign(found_cells, found_shape, design_cells, design_shape, measured, design.psfs)
    except ValueError as e:
        raise CalibrationError(f"kernels: {e}") from None


def measure_kernels(
    design: Design,
    regs: list[Registered],
    subimages: list[SubImage],
    patterns: np.ndarray,
    pattern_signal: np.ndarray,
    white: np.ndarray,
) -> Kernels:
    """The kernels step (see the module docstring); frames are signals (dark, stray removed)."""
    k, channels, hw = design.kernel_size, design.channels, design.hw
    frame_hw = white.shape
    grid = PaddedGrid(*hw, margin_for(k))
    first = [TileModel.build(reg.map, grid, frame_hw) for reg in regs]
    first_masks = exclusive_masks(first, frame_hw)
    plain = _emitted(grid, patterns, np.ones(hw), channels)
    measured, _ = _fit_all(first, first_masks, plain, pattern_signal, k, np.zeros(len(regs)))
    chosen = _assignment(design, subimages, measured)
    region_of = np.argsort(chosen.tile_of_region)  # tile p ← sub-image region_of[p]
    illumination, vignetting = fit_flat_field(
        [first[r] for r in region_of],
        [first_masks[r] for r in region_of],
        measured[region_of],
        white,
        grid,
        channels,
    )
    final = [regs[r].refit(design.centroid_offset(p), hw) for p, r in enumerate(region_of)]
    models = [TileModel.build(reg.map, grid, frame_hw) for reg in final]
    masks = exclusive_masks(models, frame_hw)
    emitted = _emitted(grid, patterns, illumination, channels)
    psfs, residual = _fit_all(models, masks, emitted, pattern_signal, k, vignetting)
    rms = np.asarray([reg.rms_px for reg in final])
    scales = np.asarray([np.sqrt(abs(np.linalg.det(reg.map.affine[:, :2]))) for reg in final])
    return Kernels(
        psfs=psfs,
        residual=residual,
        illumination=illumination,
        vignetting=vignetting,
        registered=final,
        regions=[m.region for m in models],
        registration_rms_px=rms,
        registration_rms_input_px=rms / scales,
        assignment=chosen,
        models=models,
    )
