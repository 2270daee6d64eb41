"""The PSF frontend is the true convolution that optics performs: checked against conv2d."""

import pytest
import torch
import torch.nn.functional as F

from sim.fftconv import conv2d_fft, output_window, smooth_size
from sim.layout import TileLayout
from sim.psf_frontend import PSFFrontend, signed_combine


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("k", [3, 7, 28])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("signed", [True, False])
def test_frontend_equals_conv2d_with_flipped_kernel(k, channels, signed):
    gen = torch.Generator().manual_seed(k * 10 + channels)
    size = 32 if k == 28 else 20
    x = torch.rand(3, channels, size, size, generator=gen, dtype=torch.float64, requires_grad=True)
    front = PSFFrontend(4, k, channels, signed, seed=k, method="fft").double()
    out = front(x)
    kernel = front.kernel
    ref = F.conv2d(x, kernel.flip(-2, -1), padding="same")
    assert out.shape == ref.shape == (3, 4, size, size)
    assert rel_err(out, ref) < 1e-5

    probe = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    g_x, g_raw = torch.autograd.grad((out * probe).sum(), (x, front.raw))
    r_x, r_raw = torch.autograd.grad((ref * probe).sum(), (x, front.raw))
    assert rel_err(g_x, r_x) < 1e-5
    assert rel_err(g_raw, r_raw) < 1e-5


@pytest.mark.parametrize("mode", ["full", "same", "valid"])
def test_every_output_mode_matches_conv2d(mode):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 17, 23, generator=gen, dtype=torch.float64)
    kernels = torch.rand(5, 3, 6, 4, generator=gen, dtype=torch.float64)
    pad = {"full": (5, 3), "same": "same", "valid": 0}[mode]
    ref = F.conv2d(x, kernels.flip(-2, -1), padding=pad)
    assert rel_err(conv2d_fft(x, kernels, mode), ref) < 1e-10
    assert output_window(17, 6, mode)[1] == ref.shape[-2]


def test_intensities_are_the_psf_pairs_and_subtract_to_the_output():
    front = PSFFrontend(3, 7, 1, True, seed=3, trainable=False, method="fft")
    x = torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    tiles = front.intensities(x, mode="full")
    assert tiles.shape == (2, 6, 30, 30) and (tiles > -1e-6).all()
    ref = F.conv2d(x, front.psfs.flip(-2, -1), padding=6)
    assert rel_err(tiles, ref) < 1e-5
    assert rel_err(signed_combine(tiles), front(x, mode="full")) < 1e-5


def test_trainable_psfs_stay_non_negative_under_optimisation():
    front = PSFFrontend(2, 5, 1, True, seed=0, method="fft")
    opt = torch.optim.SGD(front.parameters(), lr=50.0)
    x = torch.rand(4, 1, 12, 12)
    for _ in range(5):
        opt.zero_grad()
        (-front.intensities(x).sum()).backward()  # pushes hard both ways on a large step
        opt.step()
        opt.zero_grad()
        front.intensities(x).sum().backward()
        opt.step()
    assert (front.psfs >= 0).all()


def test_fixed_psf_spectrum_is_cached_and_invalidated_on_change():
    front = PSFFrontend(2, 15, 1, True, seed=0, trainable=False, method="fft")
    x = torch.rand(1, 1, 20, 20)
    a = front(x)
    assert len(front._spectra) == 1
    (key,) = front._spectra
    front(x)
    assert list(front._spectra) == [key]
    with torch.no_grad():
        front.fixed.mul_(2.0)
    assert torch.allclose(front(x), 2 * a, rtol=1e-5, atol=1e-6)
    assert list(front._spectra) != [key]


def test_initial_design_passes_no_more_light_than_arrives():
    front = PSFFrontend(8, 7, 3, True, seed=0, trainable=False)
    sums = front.psfs.sum(dim=(-2, -1))
    assert sums.max().item() == pytest.approx(1.0, rel=1e-6)
    assert (sums > 0).all()


def test_smooth_sizes_have_only_small_prime_factors():
    for n in [1, 13, 34, 91, 97, 127, 1000]:
        m = smooth_size(n)
        assert m >= n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        assert m == 1


def test_tile_layout_places_and_crops_back_exactly():
    layout = TileLayout.grid(10, (5, 7), gap_px=2, signed=True)
    assert layout.cols % 2 == 0
    tiles = torch.rand(3, 10, 5, 7)
    frames = layout.place(tiles)
    assert frames.shape == (3, *layout.frame_shape)
    assert torch.equal(layout.crop(frames), tiles)
    mask = torch.zeros(layout.frame_shape, dtype=torch.bool)
    for y, x, h, w in layout.boxes:
        assert not mask[y : y + h, x : x + w].any()  # boxes never overlap
        mask[y : y + h, x : x + w] = True
    assert frames[:, ~mask].abs().max() == 0  # gaps stay dark


def test_short_circular_ffts_never_alias_into_the_output_window():
    gen = torch.Generator().manual_seed(2)
    for size in (5, 8, 13):
        for k in (1, 2, 5, 9, 16):
            x = torch.rand(1, 2, size, size + 3, generator=gen, dtype=torch.float64)
            w = torch.rand(3, 2, k, k, generator=gen, dtype=torch.float64)
            for mode, pad in (("full", (k - 1, k - 1)), ("same", "same"), ("valid", 0)):
                if mode == "valid" and size < k:
                    continue
                ref = F.conv2d(x, w.flip(-2, -1), padding=pad)
                assert rel_err(conv2d_fft(x, w, mode), ref) < 1e-10, (size, k, mode)
