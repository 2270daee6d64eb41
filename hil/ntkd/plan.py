"""How `factored_ntk` covers a model in closed form: the model as a chain of layers, and for each
chosen parameter the site (a Linear or convolution, or a PSF frontend → map affine segment) that
carries it.

The optical student's own layers (`ONN`, `MapAffine`, the PSF and 4f frontends) are recognised in
one place, `_optical_layers`, imported on first use: the generic kernels (`hil.ntkd.exact`,
`hil.ntkd.projected`, `hil.ntkd.alignment`) never load `hil.models`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["SAMPLEWISE", "WEIGHTED", "Plan", "Segment", "Unsupported", "make_plan", "uniform_block"]


class Unsupported(Exception):
    """The forward pass met a shape the closed forms do not cover: use the vmap path."""


# Leaf layers whose output for a sample depends on that sample only (BatchNorm with running
# statistics; `check_batch_independent` has ruled out training mode and active dropout).
SAMPLEWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.Dropout,
)


# Layers y = W ⋆ a + b whose parameters enter the kernel through δ at y and their input a: a
# Linear's in `hil.ntkd.factored`, a convolution's over cell boxes in `hil.ntkd.windows`.
WEIGHTED = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


@functools.cache
def _optical_layers() -> tuple[type, type, type, type]:
    """(ONN, MapAffine, PSFFrontend, Fourier4fFrontend): the only place the plan names them."""
    from hil.models.onn import ONN, MapAffine
    from sim.fourier4f import Fourier4fFrontend
    from sim.psf_frontend import PSFFrontend

    return ONN, MapAffine, PSFFrontend, Fourier4fFrontend


def _chain(model: nn.Module) -> list[nn.Module] | None:
    """The model as the leaf layers its forward applies one after the other, or None.

    Only containers whose forward is known to be that chain (nn.Sequential, ONN) are unrolled.
    In-place activations are refused: they would overwrite the recorded layer outputs.
    """
    onn, affine, psf, fourier = _optical_layers()
    kind = type(model)
    if kind is nn.Sequential or kind is onn:
        layers = model if kind is nn.Sequential else (model.frontend, model.backend)
        parts = [_chain(m) for m in layers]
        return None if any(p is None for p in parts) else [m for p in parts for m in p]
    if kind in (psf, affine, fourier):
        return [model]
    if kind not in SAMPLEWISE or getattr(model, "inplace", False):
        return None
    if isinstance(model, nn.modules.batchnorm._BatchNorm) and model.running_mean is None:
        return None  # batch statistics even in eval mode
    return [model]


@dataclass(frozen=True)
class Segment:
    """PSFFrontend → MapAffine (either may be absent), with which of their parameters are chosen.

    When a uniform average pool follows, the segment runs at the pooled resolution (exactly: the
    pool of a "same" convolution is a strided convolution of the block-averaged input) and its δ
    is taken after the pool.
    """

    psf: nn.Module | None
    affine: nn.Module | None
    raw: bool
    gain: bool
    offset: bool

    @property
    def length(self) -> int:
        return (self.psf is not None) + (self.affine is not None)

    @property
    def chosen(self) -> bool:
        return self.raw or self.gain or self.offset

    def sites(self) -> list[tuple[str, nn.Module | None]]:
        """(parameter name, the layer that owns it) for each parameter a segment may carry."""
        return self.sites_of(self.psf, self.affine)

    @staticmethod
    def sites_of(psf: nn.Module | None, affine: nn.Module | None):
        return [("raw", psf), ("gain", affine), ("offset", affine)]


@dataclass(frozen=True)
class Plan:
    chain: list[nn.Module]
    layers: dict[int, tuple[bool, bool]]  # chain position -> (weight chosen, bias chosen)
    segments: dict[int, Segment]  # chain position of the segment's first layer -> segment


def make_plan(model: nn.Module, chosen: Mapping[str, Tensor]) -> Plan | None:
    """How `factored_ntk`'s closed forms cover every chosen parameter, or None where they cannot."""
    chain = _chain(model)
    if chain is None:
        return None
    shared = [p for m in chain for p in m.parameters(recurse=False)]
    if len({id(m) for m in chain}) != len(chain) or len({id(p) for p in shared}) != len(shared):
        return None  # a layer or weight used twice: its per-sample gradients would add up
    if not all(p.requires_grad for p in chosen.values()):
        return None  # the δ are taken by autograd, through the chosen parameters
    names = {id(m): n for n, m in model.named_modules()}

    def name(layer: nn.Module, attr: str) -> str:
        return f"{names[id(layer)]}.{attr}" if names[id(layer)] else attr

    covered: set[str] = set()
    layers: dict[int, tuple[bool, bool]] = {}
    segments: dict[int, Segment] = {}
    i = 0
    while i < len(chain):
        seg = _segment_at(chain, i, name, chosen)
        if seg is not None:
            segments[i] = seg
            covered |= {name(m, a) for a, m in seg.sites() if getattr(seg, a)}
            i += seg.length
            continue
        if type(chain[i]) in WEIGHTED:
            w, b = name(chain[i], "weight") in chosen, name(chain[i], "bias") in chosen
            if w or b:
                layers[i] = (w, b)
                covered |= {name(chain[i], a) for a, ok in (("weight", w), ("bias", b)) if ok}
        i += 1
    return Plan(chain, layers, segments) if covered == set(chosen) else None


def _segment_at(
    chain: list[nn.Module], i: int, name: Callable[[nn.Module, str], str], chosen: Mapping
) -> Segment | None:
    """The PSFFrontend → MapAffine segment starting at chain[i], or None if none starts there."""
    _, affine_type, psf_type, _ = _optical_layers()
    if type(chain[i]) not in (psf_type, affine_type):
        return None
    psf = chain[i] if type(chain[i]) is psf_type else None
    j = i + (psf is not None)
    affine = chain[j] if j < len(chain) and type(chain[j]) is affine_type else None
    picked = {a: m is not None and name(m, a) in chosen for a, m in Segment.sites_of(psf, affine)}
    return Segment(psf, affine, **picked)


def uniform_block(layer: nn.Module, hw: tuple[int, ...]) -> tuple[int, int] | None:
    """(bh, bw) when ``layer`` averages disjoint bh x bw blocks tiling an input of size ``hw``."""
    h, w = hw
    if type(layer) is nn.AdaptiveAvgPool2d:
        size = layer.output_size
        oh, ow = (size, size) if isinstance(size, int) else size
        oh, ow = oh or h, ow or w
        if h % oh == 0 and w % ow == 0:
            return h // oh, w // ow
    if type(layer) is nn.AvgPool2d:
        pair = lambda v: tuple(v) if isinstance(v, tuple | list) else (v, v)  # noqa: E731
        k, s, pad = pair(layer.kernel_size), pair(layer.stride), pair(layer.padding)
        exact = k == s and pad == (0, 0) and layer.divisor_override is None
        if exact and h % k[0] == 0 and w % k[1] == 0:
            return k
    return None
