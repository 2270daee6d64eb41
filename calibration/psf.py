"""Kernel conventions and the non-negative least squares every PSF fit ends in.

The design's "same" window starts `off = k − 1 − (k − 1) // 2` into the full convolution; a PSF is
an intensity, so its fit is kept non-negative and regularised towards zero (the forward model it
is fitted through is `calibration.forward`).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import cholesky, solve_triangular
from scipy.optimize import nnls


def kernel_offset(k: int) -> int:
    """Where the design's "same" window starts inside the full convolution."""
    return k - 1 - (k - 1) // 2


def psf_centroid(psf: np.ndarray) -> np.ndarray:
    """(x, y) intensity centroid of a PSF (C, k, k), summed over channels."""
    img = psf.sum(axis=0)
    ys, xs = np.mgrid[: img.shape[0], : img.shape[1]]
    return np.array([(xs * img).sum(), (ys * img).sum()]) / img.sum()


def solve_normal(
    normal: np.ndarray, rhs: np.ndarray, yty: float, ridge: float = 1e-6
) -> tuple[np.ndarray, float]:
    """argmin_{K ≥ 0} of the least-squares problem with normal equations AᵀA = `normal`,
    Aᵀy = `rhs`, yᵀy = `yty`, plus λ||K||², λ = ridge · mean diagonal.

    With R the Cholesky factor of AᵀA + λI the objective equals ||R K − R⁻ᵀ Aᵀy||² up to a
    constant, which `nnls` takes directly, so the tall system itself is never needed.
    Returns (K, relative residual ||A K − y|| / ||y||).
    """
    normal = np.array(normal, np.float64)
    lam = ridge * float(np.mean(np.diag(normal)))
    fit_normal = normal.copy()
    fit_normal[np.diag_indices_from(fit_normal)] += lam
    r = cholesky(fit_normal, lower=False)
    z = solve_triangular(r, rhs, trans="T")
    kernel, _ = nnls(r, z, maxiter=50 * len(z))
    sq = float(kernel @ normal @ kernel - 2 * kernel @ rhs + yty)
    return kernel, float(np.sqrt(max(sq, 0.0) / yty)) if yty > 0 else 0.0
