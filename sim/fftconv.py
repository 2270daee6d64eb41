"""Linear 2-D convolution by FFT, the way an incoherent imaging system convolves.

Optics performs a true (flipped-kernel) convolution, so this module does too; `torch.nn.functional
.conv2d` is a cross-correlation and equals it only with the kernel flipped. FFT sizes are padded to
smooth numbers (factors 2, 3, 5, 7), where FFTs are fastest, and large enough for a linear result.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from scipy.fft import next_fast_len

Mode = Literal["full", "same", "valid"]


def smooth_size(n: int) -> int:
    """Smallest size ≥ n whose prime factors are all ≤ 7."""
    return next_fast_len(int(n), real=True)


def output_window(size: int, k: int, mode: Mode) -> tuple[int, int]:
    """(offset, length) of the `mode` output inside the full convolution of length size + k - 1.

    `same` follows torch's padding="same": for even k the extra pad goes after, so the window
    starts at k - 1 - (k - 1) // 2.
    """
    if mode == "full":
        return 0, size + k - 1
    if mode == "same":
        return k - 1 - (k - 1) // 2, size
    if mode == "valid":
        if size < k:
            raise ValueError(f"valid convolution needs an image of at least {k} px, got {size}")
        return k - 1, size - k + 1
    raise ValueError(f"unknown convolution mode {mode!r}")


def fft_length(size: int, k: int, mode: Mode) -> int:
    """Shortest smooth circular length whose wrap-around misses the `mode` window.

    A circular convolution of length L folds full[n + L] onto full[n]; the window [o, o + len) is
    clean when L ≥ size + k - 1 - o and L ≥ o + len. For `same` and `valid` that is shorter than
    the full linear length, so those modes need smaller FFTs.
    """
    o, n = output_window(size, k, mode)
    return smooth_size(max(size + k - 1 - o, o + n))


def fft_shape(image_hw: tuple[int, int], kernel_hw: tuple[int, int], mode: Mode) -> tuple[int, int]:
    return tuple(fft_length(s, k, mode) for s, k in zip(image_hw, kernel_hw, strict=True))


def kernel_spectrum(kernels: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """rfft2 of kernels (P, C, k, k) zero-padded to `shape`."""
    return torch.fft.rfft2(kernels, s=shape)


def conv2d_fft(
    images: torch.Tensor,
    kernels: torch.Tensor,
    mode: Mode = "same",
    spectrum: torch.Tensor | None = None,
) -> torch.Tensor:
    """True 2-D convolution of images (N, C, H, W) with kernels (P, C, kh, kw), summed over C.

    Returns (N, P, Ho, Wo). `spectrum` is a precomputed `kernel_spectrum` for the same FFT shape,
    so fixed PSFs are transformed once rather than on every call.
    """
    if images.ndim != 4 or kernels.ndim != 4:
        raise ValueError("images must be (N, C, H, W) and kernels (P, C, kh, kw)")
    if images.shape[1] != kernels.shape[1]:
        raise ValueError(f"images have {images.shape[1]} channels, kernels {kernels.shape[1]}")
    (h, w), (kh, kw) = images.shape[-2:], kernels.shape[-2:]
    shape = fft_shape((h, w), (kh, kw), mode)
    if spectrum is None:
        spectrum = kernel_spectrum(kernels, shape)
    x = torch.fft.rfft2(images, s=shape)
    out = torch.fft.irfft2(torch.einsum("nchw,pchw->nphw", x, spectrum), s=shape)
    (oy, ny), (ox, nx) = output_window(h, kh, mode), output_window(w, kw, mode)
    return out[..., oy : oy + ny, ox : ox + nx]


def conv2d_direct(images: torch.Tensor, kernels: torch.Tensor, mode: Mode = "same") -> torch.Tensor:
    """The same true convolution through `conv2d` (flipped kernel); fastest for small kernels."""
    kh, kw = kernels.shape[-2:]
    flipped = kernels.flip(-2, -1)
    if mode == "same":
        return F.conv2d(images, flipped, padding="same")
    if mode == "valid":
        return F.conv2d(images, flipped)
    return F.conv2d(images, flipped, padding=(kh - 1, kw - 1))
