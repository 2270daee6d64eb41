"""The calibrated forward model: what the bench records for any image, from a calibration alone.

It is the model every fitted quantity was fitted to, so it predicts frames for new images (the
check that a calibration is good), drives the replay bench and is what capture inverts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from calibration.forward import TileModel, margin_for, render_all
from calibration.tilemap import PaddedGrid, TileMap

if TYPE_CHECKING:
    from calibration.calfile import Calibration


def padded_grid(cal: Calibration) -> PaddedGrid:
    return PaddedGrid(*cal.input_shape, margin_for(cal.kernel_size))


def tile_maps(cal: Calibration) -> list[TileMap]:
    """Each tile's input-grid → sensor map, as registered."""
    return [
        TileMap(a, float(k1), c, float(r))
        for a, k1, c, r in zip(
            cal.affines,
            cal.distortion_k1,
            cal.distortion_centre_px,
            cal.distortion_radius_px,
            strict=True,
        )
    ]


def tile_models(cal: Calibration) -> list[TileModel]:
    grid = padded_grid(cal)
    return [TileModel.build(m, grid, tuple(cal.frame_shape)) for m in tile_maps(cal)]


def as_channels(levels: np.ndarray) -> np.ndarray:
    """Input-grid drive levels (N, h, w) or (N, h, w, 3) → (N, C, h, w)."""
    levels = np.asarray(levels, np.float64)
    return levels[:, None] if levels.ndim == 3 else levels.transpose(0, 3, 1, 2)


def emitted_light(cal: Calibration, levels: np.ndarray) -> np.ndarray:
    """Relative light leaving the input grid (N, C, Hp, Wp) on the padded grid: measured
    response × illumination, dark around the grid."""
    x = as_channels(levels)
    response = np.interp(x, cal.display_levels, cal.display_response)
    return padded_grid(cal).pad(response * cal.illumination)


def predict_signal(cal: Calibration, emitted: np.ndarray, models=None) -> np.ndarray:
    """Scene signal in DN/s (N, H, W): every tile's convolved, mapped light, overlap-added."""
    models = tile_models(cal) if models is None else models
    return render_all(models, emitted, cal.psfs, cal.vignetting, tuple(cal.frame_shape))


def predict_frames(cal: Calibration, levels: np.ndarray, exposure_s: float | None = None):
    """Expected frames in DN for input-grid levels (N, h, w[, 3]), as the camera would average."""
    exposure = cal.exposure_s if exposure_s is None else exposure_s
    signal = predict_signal(cal, emitted_light(cal, levels))
    return cal.dark_dn + exposure * (cal.background_dn_per_s + signal)


def noise_variance(cal: Calibration, mean_dn: np.ndarray) -> np.ndarray:
    """Temporal variance (DN²) of a frame with this mean: read noise, then shot noise."""
    return _variance(mean_dn, cal.dark_dn, cal.read_noise_dn, cal.conversion_gain_e_per_dn)


def _variance(mean_dn, dark_dn, read_noise_dn, gain: float) -> np.ndarray:
    return read_noise_dn**2 + np.maximum(mean_dn - dark_dn, 0.0) / gain


def validate_prediction(
    cal: Calibration, images: np.ndarray, captured: np.ndarray, models=None
) -> dict:
    """How well the calibration predicts frames of new images, against the noise it expects.

    `excess_rel_error` is the residual beyond what sensor noise explains, relative to the
    signal: the model's own error. `chi2` is the residual over the expected noise (1 is perfect).
    """
    full = cal.exposure_s * predict_signal(cal, emitted_light(cal, images))
    use = full > 0.01 * full.max()  # where the scene's light reaches; only these pixels count

    def at(values: np.ndarray) -> np.ndarray:
        return np.broadcast_to(values, use.shape)[use]

    dark = at(cal.dark_dn)
    predicted = dark + cal.exposure_s * at(cal.background_dn_per_s) + full[use]
    residual2 = (at(captured) - predicted) ** 2
    var = _variance(predicted, dark, at(cal.read_noise_dn), cal.conversion_gain_e_per_dn)
    signal2 = np.mean((predicted - dark) ** 2)
    excess = max(float(np.mean(residual2) - np.mean(var)), 0.0)
    return {
        "prediction_chi2": float(np.mean(residual2 / var)),
        "prediction_excess_rel_error": float(np.sqrt(excess / signal2)),
        "prediction_rel_error": float(np.sqrt(np.mean(residual2) / signal2)),
    }
