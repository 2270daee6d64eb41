"""The pooled logit map's kernel in closed form (`hil.ntkd.windows`, through `ntk_and_outputs`):
equal to `student_ntk` of the pooled view, with its gradients, wherever it takes over, and the
generic path's where the cells' boxes do not lie on a grid."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import hil.ntkd.factored
from hil.models.onn import ONN, StudentSpec
from hil.ntkd.alignment import ntk_mse
from hil.ntkd.exact import select_params, student_ntk
from hil.ntkd.factored import _batched_ntk, ntk_and_outputs
from hil.ntkd.losses import NTKD, PooledLogits, pooled_ntk
from hil.ntkd.plan import make_plan
from hil.ntkd.windows import Axis, conv_of_maps, windows

F64 = torch.float64


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def no_fallback(monkeypatch) -> None:
    """Make the per-sample vmap path fail, so a passing test ran the closed forms."""
    import hil.ntkd.factored

    def fail(*args, **kwargs):
        raise AssertionError("fell back to the vmap path")

    monkeypatch.setattr(hil.ntkd.factored, "_factored_ntk_vmap", fail)


def updecoder(size: int, kernels: int = 3) -> nn.Module:
    """The shapes student's decoder; from 10 kernels on (more maps than a 3x3 PSF's 9 shifted
    inputs and the offset's ones) its PSF segment is fused into the first convolution."""
    spec = StudentSpec(
        kernels=kernels, kernel_size=3, image_size=size, backend="updecoder", classes=2
    )
    return ONN(spec).double()


def odd_decoder() -> nn.Module:
    """Strides, paddings, kernels and activations the updecoder does not have: a 5x5 conv
    without padding, a 1x1 stride-2 conv, a 3x3 up-convolution with padding and output
    padding, and a 4x4 one with stride 2 (its outputs overlap)."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 5, padding=2),
        nn.Tanh(),
        nn.Conv2d(4, 4, 1, stride=2),
        nn.Sigmoid(),
        nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 6, 3, stride=2, padding=0),
        nn.Identity(),
        nn.ConvTranspose2d(6, 3, 4, stride=2, padding=1),
    ).double()


def inputs(n: int, channels: int, size: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g, dtype=F64)


SUBSETS = {
    "all": None,
    "backend": lambda n: n.startswith("backend"),
    "psf": lambda n: n == "frontend.raw",
    "gain+offset+convT": lambda n: n.endswith(("gain", "offset")) or n.startswith("backend.5"),
    "last conv": lambda n: n.startswith("backend.7"),
    "up-convolutions": lambda n: n.startswith(("4.", "8.")),
}

# (model, kernels, input channels, display size, pool, region)
CASES = {
    "updecoder, region 4x4 cells": ("updecoder", 3, 1, 12, 2, (2, 2, 8, 8)),
    "updecoder, whole map 3x3 grid": ("updecoder", 3, 1, 12, 3, None),
    "updecoder, 6-pixel cells as on shapes": ("updecoder", 3, 1, 16, 2, (2, 2, 12, 12)),
    "updecoder, 12 maps: the segment fused": ("updecoder", 12, 1, 12, 2, (2, 2, 8, 8)),
    "odd decoder": ("odd", 0, 2, 12, 2, (1, 2, 8, 8)),
}
PAIRS = [(c, s) for c in CASES if c != "odd decoder" for s in SUBSETS if s != "up-convolutions"]
PAIRS += [("odd decoder", "all"), ("odd decoder", "up-convolutions")]


@pytest.mark.parametrize("case, subset", PAIRS)
def test_pooled_kernel_equals_the_jacobian_kernel_with_its_gradients(monkeypatch, case, subset):
    """Kernel, cross-kernel and the gradients of a loss of both w.r.t. every parameter (PSF,
    map affine, convolutions, up-convolutions) agree with student_ntk of the pooled view."""
    kind, kernels, channels, size, pool, region = CASES[case]
    model = updecoder(size, kernels) if kind == "updecoder" else odd_decoder()
    fused = []
    monkeypatch.setattr(
        hil.ntkd.factored, "conv_of_maps", lambda *a: fused.append(1) or conv_of_maps(*a)
    )
    pick = SUBSETS[subset]
    names = None if pick is None else [n for n, _ in model.named_parameters() if pick(n)]
    x, x2 = inputs(5, channels, size, 1), inputs(3, channels, size, 2)
    view = PooledLogits(model, pool, region)
    exact, exact2 = student_ntk(view, x, names), student_ntk(view, x, names, x2=x2)
    no_fallback(monkeypatch)
    fast, logits = ntk_and_outputs(model, x, names, pool=pool, region=region)
    assert fast is not None and torch.equal(logits, model(x))
    plan = make_plan(model, select_params(model, names))
    fast2 = _batched_ntk(plan, x, x2, pooled=(pool, region))[0]  # no public cross kernel
    assert fast2.shape == (5, 3)
    touches_segment = kind == "updecoder" and subset not in ("last conv", "up-convolutions")
    assert bool(fused) == (kernels >= 10 and touches_segment)
    assert rel(fast, exact) < 1e-12 and rel(fast2, exact2) < 1e-12
    params = list(model.parameters())
    for e, f in ((exact, fast), (exact2, fast2)):
        loss_e, loss_f = (ntk_mse(k, k.detach().flip(0), "diag") for k in (e, f))
        g_exact = torch.autograd.grad(loss_e, params, allow_unused=True, materialize_grads=True)
        g_fast = torch.autograd.grad(loss_f, params, allow_unused=True, materialize_grads=True)
        scale = torch.stack([a.norm() for a in g_exact]).norm()
        for a, b in zip(g_exact, g_fast, strict=True):
            assert (b - a).norm() <= 1e-10 * a.norm() + 1e-14 * scale


def test_cells_whose_boxes_leave_the_grid_take_the_generic_path():
    """3-pixel cells before a stride-2 up-convolution: their input boxes are not evenly spaced,
    so the closed form steps aside and `pooled_ntk` still gives the exact kernel."""
    model, x = updecoder(8), inputs(4, 1, 8, 3)
    region, pool = (1, 1, 6, 6), 2
    assert ntk_and_outputs(model, x, pool=pool, region=region)[0] is None
    exact = student_ntk(PooledLogits(model, pool, region), x)
    assert rel(pooled_ntk(model, x, pool, region), exact) < 1e-12


def test_windows_are_the_cells_boxes_zero_outside_the_map():
    """Each cell's box against slicing a zero-padded copy by hand, boxes overlapping and
    leaving the map on both sides."""
    t = torch.arange(2 * 3 * 7 * 9, dtype=F64).reshape(2, 3, 7, 9)
    ah, aw = Axis(-2, 3, 5, 3), Axis(-1, 4, 6, 3)
    got = windows(t, (ah, aw))
    padded = nn.functional.pad(t, (5, 5, 5, 5))
    for qy in range(3):
        for qx in range(3):
            y, x = ah.start + qy * ah.stride + 5, aw.start + qx * aw.stride + 5
            want = padded[..., y : y + ah.size, x : x + aw.size]
            assert torch.equal(got[:, qy * 3 + qx], want)


def test_segmentation_ntkd_takes_the_closed_form_and_its_gradients_are_the_generic_ones(
    monkeypatch,
):
    """NTKD's loss on a logit-map batch: kernel and CE from one forward, same total and
    parameter gradients as the kernel taken through the pooled view's vmap path."""
    model, x = updecoder(12).float(), inputs(4, 1, 12, 5).float()
    y = (x[:, 0] > 0.5).long()
    features = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(0))
    batch = {"x": x, "y": y, "teacher_features": features}
    loss = NTKD(pool=2, region=(2, 2, 8, 8))
    params = list(model.parameters())
    monkeypatch.setattr(
        "hil.ntkd.losses.ntk_and_outputs", lambda m, x, p, **kw: (None, m(x))
    )  # the generic path: the kernel of the pooled view
    generic = loss(model, batch)
    g_generic = torch.autograd.grad(generic["total"], params)
    monkeypatch.undo()
    no_fallback(monkeypatch)
    fast = loss(model, batch)
    assert torch.allclose(fast["total"], generic["total"], rtol=1e-5)
    for a, b in zip(g_generic, torch.autograd.grad(fast["total"], params), strict=True):
        assert (b - a).norm() <= 1e-4 * a.norm() + 1e-7
