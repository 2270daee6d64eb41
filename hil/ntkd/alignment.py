"""Comparing a student's kernel with a teacher's: normalisation, mean squared difference, CKA.

These exist because teacher and student kernels differ in scale by an order of magnitude or
more, which would otherwise dominate a raw mean squared difference.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["Normalisation", "cka", "normalise", "ntk_alignment_loss", "ntk_mse"]

Normalisation = Literal["none", "diag", "frobenius"]


def normalise(K: Tensor, how: Normalisation = "diag", eps: float = 1e-12) -> Tensor:
    """Remove a kernel's scale, which differs by orders of magnitude between teacher and student.

    - ``"none"``: unchanged (the paper's literal loss).
    - ``"diag"``: ``K / mean(diag K)``; the mean self-similarity becomes 1.
    - ``"frobenius"``: ``K / (‖K‖_F / N)``; the root-mean-square entry becomes 1 for any batch size
      ``N`` (a constant all-ones kernel is unchanged, an identity becomes ``sqrt(N) · I``), so the
      mean squared difference stays O(1) whatever the batch.
    """
    if how == "none":
        return K
    if how == "diag":
        return K / K.diagonal().mean().clamp_min(eps)
    if how == "frobenius":
        return K * (K.shape[0] / torch.linalg.matrix_norm(K).clamp_min(eps))
    raise ValueError(f"normalisation must be 'none', 'diag' or 'frobenius', got {how!r}")


def ntk_mse(K_student: Tensor, K_teacher: Tensor, how: Normalisation = "diag") -> Tensor:
    """NTKD loss: mean squared difference of the two kernels after normalising each."""
    return (normalise(K_student, how) - normalise(K_teacher, how)).pow(2).mean()


def _centre(K: Tensor) -> Tensor:
    """H K H with H = I - 11ᵀ/N, done by subtracting row and column means."""
    return K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()


def cka(K1: Tensor, K2: Tensor, eps: float = 1e-12) -> Tensor:
    """Centred kernel alignment ``HSIC(K1,K2)/sqrt(HSIC(K1,K1) HSIC(K2,K2))``; in [0, 1] for PSD.

    Scale-invariant, so it needs no normalisation; 1 when the kernels agree up to a positive
    factor (and an additive constant, which centring removes).
    """
    c1, c2 = _centre(K1), _centre(K2)
    hsic12 = (c1 * c2).sum()
    return hsic12 / ((c1 * c1).sum() * (c2 * c2).sum()).sqrt().clamp_min(eps)


def ntk_alignment_loss(K_student: Tensor, K_teacher: Tensor) -> Tensor:
    """``1 - cka``: a scale-free alternative to :func:`ntk_mse`."""
    return 1 - cka(K_student, K_teacher)
