"""Empirical neural tangent kernels for NTK distillation (NTKD).

The kernel of a network ``f(x; θ)`` with ``C`` outputs is traced over classes and parameters::

    Θ(x_i, x_j) = Σ_c Σ_p ∂f_c(x_i)/∂θ_p · ∂f_c(x_j)/∂θ_p

Two estimators, because the two sides of NTKD have very different sizes:

- **student** (:func:`student_ntk`): exact, ``vmap(jacrev(...))`` per sample, differentiable w.r.t.
  the student's parameters (the loss is backpropagated through the Jacobians: double backward).
  :func:`factored_ntk` is the same kernel from closed-form per-sample gradients (what the NTKD
  loss uses: about as cheap as a forward and backward pass of the student for the fc backends).
- **teacher** (:class:`ProjectedTeacher`): a ResNet-18 Jacobian at batch 128 and 10 classes is
  ~56 GB, so the teacher's kernel is estimated without gradients by fixed random projections,
  ``Θ ≈ (1/R) Σ_r (J v_r)(J v_r)ᵀ`` with ``v_r ~ N(0, I)``. The projections are fixed by a seed, so
  the projected features ``φ(x) = [J(x) v_1 … J(x) v_R]`` of each sample can be cached once per
  data set and any minibatch kernel is a cheap contraction of cached features.

Both require a network whose output for one sample does not depend on the rest of the batch:
BatchNorm must be in eval mode (running statistics) and there must be no active dropout.

The loss pieces (:func:`normalise`, :func:`ntk_mse`, :func:`cka`, :func:`ntk_alignment_loss`) exist
because teacher and student kernels differ in scale by an order of magnitude or more, which would
otherwise dominate a raw mean squared difference.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vmap

__all__ = [
    "ProjectedTeacher",
    "check_batch_independent",
    "cka",
    "factored_ntk",
    "kernel_from_features",
    "normalise",
    "ntk_alignment_loss",
    "ntk_mse",
    "ntk_of",
    "student_ntk",
]

Normalisation = Literal["none", "diag", "frobenius"]


# --------------------------------------------------------------------------- helpers


def check_batch_independent(model: nn.Module) -> None:
    """Raise if ``model`` has a layer whose output for one sample depends on its batch.

    The student kernel calls the model on one sample at a time (inside ``vmap``) and the teacher's
    cached features must not depend on which batch a sample was in, so BatchNorm must use running
    statistics and dropout must be off.
    """
    for name, module in model.named_modules():
        if module.training and isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"{name or type(module).__name__}: BatchNorm in training mode uses batch "
                "statistics; call .eval() on it (or the whole model) before taking its NTK"
            )
        if module.training and isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            raise ValueError(
                f"{name or type(module).__name__}: dropout is active; call .eval() before the NTK"
            )


def _select_params(model: nn.Module, params: Iterable[str] | None) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
    else:
        names = list(params)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise KeyError(f"not parameters of the model: {unknown}; known: {list(named)}")
        chosen = {n: named[n] for n in names}
    if not chosen:
        raise ValueError("no parameters to take the NTK over")
    return chosen


def _contract(jac_a: Mapping[str, Tensor], jac_b: Mapping[str, Tensor]) -> Tensor:
    """Σ over parameter tensors of J_a J_bᵀ, traced over outputs: (Na, C, *p) x (Nb, C, *p)."""
    total = None
    for name, ja in jac_a.items():
        jb = jac_b[name]
        term = torch.einsum("ncp,mcp->nm", ja.flatten(2), jb.flatten(2))
        total = term if total is None else total + term
    assert total is not None
    return total


# --------------------------------------------------------------------------- exact (student) NTK


def ntk_of(
    fn: Callable[[dict[str, Tensor], Tensor], Tensor],
    params: Mapping[str, Tensor],
    x: Tensor,
    x2: Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Exact class-traced empirical NTK of ``fn(params, sample)`` over the rows of ``x`` (``x2``).

    ``fn`` maps a parameter dict and ONE sample (no batch dimension) to its outputs (any shape;
    flattened to C). The result is differentiable w.r.t. the tensors in ``params`` (nothing is
    detached). Peak memory is the full Jacobian: ``N · C · Σ|θ|`` elements, kept alive for the
    backward pass when gradients flow. ``chunk_size`` bounds vmap's working set, not the result.
    """
    params = dict(params)

    def flat(p: dict[str, Tensor], sample: Tensor) -> Tensor:
        return fn(p, sample).reshape(-1)

    jac_fn = vmap(jacrev(flat), in_dims=(None, 0), chunk_size=chunk_size)
    jac_a = jac_fn(params, x)
    jac_b = jac_a if x2 is None else jac_fn(params, x2)
    return _contract(jac_a, jac_b)


def student_ntk(
    model: nn.Module,
    x: Tensor,
    params: Iterable[str] | None = None,
    *,
    x2: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Exact empirical NTK ``(N, N)`` (or ``(N, N2)`` with ``x2``) of ``model`` over its parameters.

    ``params``: names of the parameters to differentiate (e.g. the backend only, for compensation
    after fabrication); default: every parameter with ``requires_grad``. The other parameters and
    the buffers are passed through unchanged, so a loss on the kernel still backpropagates into
    them where they shape the Jacobian (e.g. a frontend feeding the backend).

    The model is called on one sample at a time, so it must not have batch-dependent layers:
    BatchNorm in eval mode is fine, BatchNorm in training mode or active dropout raises.
    """
    check_batch_independent(model)
    chosen = _select_params(model, params)
    fixed = {n: p for n, p in model.named_parameters() if n not in chosen}
    fixed.update(dict(model.named_buffers()))

    def fn(p: dict[str, Tensor], sample: Tensor) -> Tensor:
        return functional_call(model, (p, fixed), (sample.unsqueeze(0),))

    return ntk_of(fn, chosen, x, x2, chunk_size=chunk_size)


def factored_ntk(
    model: nn.Module,
    x: Tensor,
    params: Iterable[str] | None = None,
    *,
    x2: Tensor | None = None,
) -> Tensor:
    """The same exact kernel as `student_ntk`, from per-sample gradients in closed form.

    A layer linear in its parameters enters the kernel through δ_c = ∂f_c/∂y at its output y
    and its input: y = W a + b contributes Σ_c ⟨δ_ic, δ_jc⟩ (⟨a_i, a_j⟩ + 1 for the bias), so
    its weights' Jacobians are never formed. When the model is a chain of layers known to treat
    samples independently and every chosen parameter belongs to a Linear, a `MapAffine` or a
    `PSFFrontend` (`_batched_ntk`), the δ of the whole batch come from one class-batched backward
    pass and the per-sample gradients are a few tensor contractions, which is what makes an NTKD
    step cost about a KD step. Anything else (4f or convolutional parameters, other modules)
    falls back to `_factored_ntk_vmap`: vmap over samples of jacrev, with the Linear
    factorisation. Both are differentiable w.r.t. every parameter (double backward).
    """
    check_batch_independent(model)
    chosen = _select_params(model, params)
    plan = _plan(model, chosen)
    if plan is not None:
        try:
            return _batched_ntk(plan, x, x2)
        except _Unsupported:
            pass
    return _factored_ntk_vmap(model, x, params, x2=x2)


# --------------------------------------------------------------- batched closed-form student NTK


class _Unsupported(Exception):
    """The forward pass met a shape the closed forms do not cover: use the vmap path."""


# Leaf layers whose output for a sample depends on that sample only (BatchNorm with running
# statistics; `check_batch_independent` has ruled out training mode and active dropout).
_SAMPLEWISE = (
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


def _chain(model: nn.Module) -> list[nn.Module] | None:
    """The model as the leaf layers its forward applies one after the other, or None.

    Only containers whose forward is known to be that chain (nn.Sequential, ONN) are unrolled.
    In-place activations are refused: they would overwrite the recorded layer outputs.
    """
    from hil.models.onn import ONN, MapAffine
    from sim.fourier4f import Fourier4fFrontend
    from sim.psf_frontend import PSFFrontend

    kind = type(model)
    if kind is nn.Sequential or kind is ONN:
        layers = model if kind is nn.Sequential else (model.frontend, model.backend)
        parts = [_chain(m) for m in layers]
        return None if any(p is None for p in parts) else [m for p in parts for m in p]
    if kind in (PSFFrontend, MapAffine, Fourier4fFrontend):
        return [model]
    if kind not in _SAMPLEWISE or getattr(model, "inplace", False):
        return None
    if isinstance(model, nn.modules.batchnorm._BatchNorm) and model.running_mean is None:
        return None  # batch statistics even in eval mode
    return [model]


@dataclass(frozen=True)
class _Segment:
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


@dataclass(frozen=True)
class _Plan:
    chain: list[nn.Module]
    linears: dict[int, tuple[bool, bool]]  # chain position -> (weight chosen, bias chosen)
    segments: dict[int, _Segment]  # chain position of the segment's first layer -> segment


def _plan(model: nn.Module, chosen: Mapping[str, Tensor]) -> _Plan | None:
    """How `_batched_ntk` covers every chosen parameter, or None where it cannot."""
    from hil.models.onn import MapAffine
    from sim.psf_frontend import PSFFrontend

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
    linears: dict[int, tuple[bool, bool]] = {}
    segments: dict[int, _Segment] = {}
    i = 0
    while i < len(chain):
        layer = chain[i]
        if type(layer) in (PSFFrontend, MapAffine):
            psf = layer if type(layer) is PSFFrontend else None
            j = i + (psf is not None)
            affine = chain[j] if j < len(chain) and type(chain[j]) is MapAffine else None
            own = {"raw": psf, "gain": affine, "offset": affine}
            picked = {a: m is not None and name(m, a) in chosen for a, m in own.items()}
            covered |= {name(own[a], a) for a, ok in picked.items() if ok}
            segments[i] = _Segment(psf, affine, **picked)
            i += segments[i].length
            continue
        if type(layer) is nn.Linear:
            w, b = name(layer, "weight") in chosen, name(layer, "bias") in chosen
            if w or b:
                linears[i] = (w, b)
                covered |= {name(layer, a) for a, ok in (("weight", w), ("bias", b)) if ok}
        i += 1
    return _Plan(chain, linears, segments) if covered == set(chosen) else None


def _uniform_block(layer: nn.Module, hw: tuple[int, ...]) -> tuple[int, int] | None:
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


def _shifted_inputs(x: Tensor, k: int, block: tuple[int, int] | None) -> Tensor:
    """(N, Cin·k·k, L): the input under kernel offset u at output position l of a "same"
    convolution (conv2d_direct and conv2d_fft cut it alike), block-averaged when pooled.

    A PSF output is y_p[h] = Σ_u x[h - (k-1)//2 + u] · kernel_p[k-1-u], so ∂y_p[h]/∂kernel_p
    is this with the offsets flipped, and the block average of y_p is the same sum over the
    block-averaged input taken with the block as stride.
    """
    lo = (k - 1) // 2
    xp = F.pad(x, (lo, k - 1 - lo, lo, k - 1 - lo))
    stride = (1, 1)
    if block is not None:
        xp = xp.unfold(2, block[0], 1).mean(-1).unfold(3, block[1], 1).mean(-1)
        stride = block
    cols = xp.unfold(2, k, stride[0]).unfold(3, k, stride[1])  # (N, Cin, h, w, k, k)
    cols = cols.flip(-2, -1).permute(0, 1, 4, 5, 2, 3)  # flipped: indexed like the kernel
    return cols.reshape(x.shape[0], -1, cols.shape[-2] * cols.shape[-1])


class _KernelOf(nn.Module):
    """``front.kernel`` as a forward, so functional_call can swap ``front.raw`` for a tensor."""

    def __init__(self, front: nn.Module) -> None:
        super().__init__()
        self.front = front

    def forward(self) -> Tensor:
        return self.front.kernel


def _batched_ntk(plan: _Plan, x: Tensor, x2: Tensor | None) -> Tensor:
    """Σ over sites of per-sample gradient inner products, from `_sample_terms` of each side."""
    outer = torch.is_grad_enabled()
    with torch.enable_grad():  # the δ are taken by autograd even under no_grad
        terms = _sample_terms(plan, x, outer)
        terms2 = terms if x2 is None else _sample_terms(plan, x2, outer)
        total: Tensor | int = 0
        for (g, w, a, plain), (g2, _, a2, _) in zip(terms, terms2, strict=True):
            gg = (g if w is None else g * w) @ g2.T  # (N, N2)
            if a is not None:
                total = total + gg * (a @ a2.T)
            if plain:
                total = total + gg
    assert isinstance(total, Tensor)
    return total if outer else total.detach()


# (g, w, a, plain): per-sample factors of one batch whose kernel term is
# (g diag(w) g'ᵀ) ⊙ (a a'ᵀ) for a Linear's weight (a: its inputs), plus g diag(w) g'ᵀ if plain.
_Term = tuple[Tensor, Tensor | None, Tensor | None, bool]


def _sample_terms(plan: _Plan, x: Tensor, create_graph: bool) -> list[_Term]:
    """The kernel terms of batch ``x`` (see `_Term`), in the order of the plan.

    δ_c at every site comes from one backward pass of Σ_i f_c(x_i), batched over the classes:
    samples are independent, so its gradient at sample i's activations is sample i's own.
    """
    chain, n = plan.chain, x.shape[0]
    h, inputs, probes, segs, seg_probes = x, [], [], [], []
    i = 0
    while i < len(chain):
        seg = plan.segments.get(i)
        if seg is None:
            out = chain[i](h)
            if i in plan.linears:
                if h.dim() != 2:
                    raise _Unsupported  # per-sample weight gradients would sum over positions
                inputs.append(h)
                probes.append(out)
            h, i = out, i + 1
            continue
        nxt, block, cols = i + seg.length, None, None
        if seg.psf is not None and (h.dim() != 4 or h.shape[1] != seg.psf.channels):
            raise _Unsupported  # the PSF's own forward says what is wrong
        if h.dim() == 4 and nxt < len(chain):  # a PSF's "same" output has its input's size
            block = _uniform_block(chain[nxt], tuple(h.shape[-2:]))
        if seg.psf is not None and (block is not None or seg.raw):
            cols = _shifted_inputs(h, seg.psf.kernel_size, block)
        if seg.psf is not None and block is not None:
            kernel = seg.psf.kernel.to(h.dtype).flatten(1)  # (m, Cin·k·k)
            z = (kernel @ cols).unflatten(-1, (h.shape[-2] // block[0], h.shape[-1] // block[1]))
        else:
            z = h if seg.psf is None else seg.psf(h)
            z = z if block is None else F.avg_pool2d(z, block)
        if seg.affine is not None:
            gain, offset = seg.affine.gain, seg.affine.offset
            if z.dim() != 4 or gain.shape != (z.shape[1], 1, 1) or offset.shape != gain.shape:
                raise _Unsupported
        out = z if seg.affine is None else seg.affine(z)  # an average of z·g + o is z̄·g + o
        if seg.chosen:
            seg_probes.append(out)
            segs.append((seg, z, cols))
        h, i = out, nxt + (block is not None)

    logits = h.reshape(n, -1)
    classes = logits.shape[1]
    seeds = torch.eye(classes, dtype=logits.dtype, device=logits.device)[:, None, :]
    deltas = torch.autograd.grad(
        logits,
        probes + seg_probes,
        seeds.expand(classes, n, classes),
        is_grads_batched=True,
        create_graph=create_graph,
        allow_unused=True,
    )
    deltas = [
        p.new_zeros(classes, *p.shape) if d is None else d
        for d, p in zip(deltas, probes + seg_probes, strict=True)
    ]
    terms = []  # deltas: the Linears', then the segments'
    for (w, b), a, d in zip(plan.linears.values(), inputs, deltas, strict=False):
        terms.append((d.transpose(0, 1).reshape(n, -1), None, a if w else None, b))
    for (seg, z, cols), d in zip(segs, deltas[len(inputs) :], strict=True):
        terms.extend(_segment_terms(seg, z, cols, d))
    return terms


def _segment_terms(seg: _Segment, z: Tensor, cols: Tensor | None, delta: Tensor) -> list[_Term]:
    """Terms of a segment's chosen parameters from δ (C, N, m, h, w) after it: per-sample
    gradients w.r.t. gain Σ δ z̄, offset Σ δ and the PSF kernel Σ_l (gain·δ)[l] cols[u, l]; the
    latter is pulled back to ``raw`` through the metric of `_psf_metric`."""
    n = z.shape[0]
    out: list[_Term] = []
    if seg.gain:
        out.append((torch.einsum("cnmhw,nmhw->nmc", delta, z).reshape(n, -1), None, None, True))
    if seg.offset:
        out.append((delta.sum(dim=(-2, -1)).transpose(0, 1).reshape(n, -1), None, None, True))
    if seg.raw:
        assert seg.psf is not None and cols is not None
        d = delta if seg.affine is None else delta * seg.affine.gain
        g = torch.einsum("cnml,nrl->nmrc", d.flatten(-2), cols)  # (N, m, Cin·k·k, C)
        w = _psf_metric(seg.psf).to(g.dtype)
        out.append(
            (g.reshape(n, -1), w.reshape(-1, 1).expand(-1, g.shape[-1]).reshape(-1), None, True)
        )
    return out


def _psf_metric(front: nn.Module) -> Tensor:
    """diag(J Jᵀ), J = ∂kernel/∂raw, when each raw entry moves at most one kernel entry.

    Then Σ_r (Jᵀ g_i)_r (Jᵀ g_j)_r = Σ_a g_i[a] w[a] g_j[a]: the PSF term is contracted over
    the m·Cin·k² kernel entries with weights w rather than over the raw entries after a pullback
    of every (sample, class). J is taken by jacrev through ``front.kernel`` itself (softplus,
    signed pairs), so w stays exact and differentiable whatever that map is; any other sparsity
    raises `_Unsupported` (the vmap path).
    """

    def kernel(raw: Tensor) -> Tensor:
        return functional_call(_KernelOf(front), {"front.raw": raw}, ())

    raw = front.raw
    jac = jacrev(kernel)(raw).reshape(-1, raw.numel())
    if bool(((jac != 0).sum(0) > 1).any()):
        raise _Unsupported
    return jac.square().sum(1)


def _factored_ntk_vmap(
    model: nn.Module,
    x: Tensor,
    params: Iterable[str] | None = None,
    *,
    x2: Tensor | None = None,
) -> Tensor:
    """The same exact kernel as `student_ntk`, without materialising Linear weights' Jacobians.

    For y = W a + b, ∂f_c/∂W = δ_c ⊗ a with δ_c = ∂f_c/∂y, so that layer contributes
    Σ_c ⟨δ_ic, δ_jc⟩ · (⟨a_i, a_j⟩ + 1 for the bias): Jacobians w.r.t. a zero "probe" added to
    each Linear output (a few dozen numbers) replace Jacobians w.r.t. its weights (tens of
    thousands), which is what makes the NTKD step affordable. Every other parameter goes through
    jacrev as in `student_ntk`. Each Linear must see one (1, in) input per sample.
    """
    check_batch_independent(model)
    chosen = _select_params(model, params)
    linears = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and f"{name}.weight" in chosen
    }
    if not linears:
        return student_ntk(model, x, params, x2=x2)
    factored = {f"{n}.weight" for n in linears}
    factored |= {f"{n}.bias" for n, m in linears.items() if m.bias is not None} & set(chosen)
    rest = {n: p for n, p in chosen.items() if n not in factored}
    fixed = {n: p for n, p in model.named_parameters() if n not in rest}
    fixed.update(dict(model.named_buffers()))
    state: dict[str, dict[str, Tensor]] = {}

    def probe(name: str):
        def hook(module, inputs, output):
            a = inputs[0]
            if a.dim() != 2 or a.shape[0] != 1:
                raise ValueError(f"{name}: a Linear input of shape {tuple(a.shape)} per sample")
            state["acts"][name] = a[0]
            return output + state["probes"][name]

        return hook

    def fn(rest_p, probes, sample):
        state["probes"], state["acts"] = probes, {}
        out = functional_call(model, (rest_p, fixed), (sample.unsqueeze(0),)).reshape(-1)
        return out, dict(state["acts"])

    like = next(iter(chosen.values()))
    zeros = {n: like.new_zeros(m.out_features) for n, m in linears.items()}
    jac = vmap(jacrev(fn, argnums=(0, 1), has_aux=True), in_dims=(None, None, 0))
    handles = [m.register_forward_hook(probe(n)) for n, m in linears.items()]
    try:
        (j_rest, j_probe), acts = jac(rest, zeros, x)
        (j_rest2, j_probe2), acts2 = (j_rest, j_probe), acts
        if x2 is not None:
            (j_rest2, j_probe2), acts2 = jac(rest, zeros, x2)
    finally:
        for h in handles:
            h.remove()
    total = _contract(j_rest, j_rest2) if rest else 0
    for name in linears:
        dd = torch.einsum("nco,mco->nm", j_probe[name], j_probe2[name])
        total = total + dd * (acts[name] @ acts2[name].T)
        if f"{name}.bias" in factored:
            total = total + dd
    return total


# ------------------------------------------------------------------------ projected (teacher) NTK


def kernel_from_features(phi_a: Tensor, phi_b: Tensor | None = None) -> Tensor:
    """Projected kernel ``(1/R) Σ_{c,r} φ_a[i,c,r] φ_b[j,c,r]`` from features ``(N, C, R)``."""
    phi_b = phi_a if phi_b is None else phi_b
    return torch.einsum("ncr,mcr->nm", phi_a, phi_b) / phi_a.shape[-1]


class ProjectedTeacher:
    """Teacher NTK by fixed random projections: forward-mode JVPs, no gradients, cacheable.

    Tangent ``r`` is drawn from ``N(0, I)`` over all the selected teacher parameters with a CPU
    ``torch.Generator`` seeded from ``(seed, r)``, so vector ``r`` is the same whatever the
    chunking, the device or the order in which projections are computed, and can be regenerated.

    Memory: the R tangents cost ``R · |θ|`` elements (resnet18, 11.2M parameters: 45 MB each at
    float32, 2.9 GB for R=64). They are kept only when that is at most ``max_tangent_bytes``;
    otherwise they are regenerated chunk by chunk on every call (~3 ms per million parameters per
    tangent on CPU), holding one chunk of ``chunk`` tangents at a time (on the CPU, plus a copy on
    the teacher's device); ``chunk`` defaults to what fits in ``max_chunk_bytes``. Each chunk is
    evaluated with ``vmap`` over its tangents of ``jvp(functional_call)``: the primal forward is
    shared by the chunk, and the JVP activations cost ``chunk`` times one forward's activations.
    On CPU (resnet18, batch 128, 8x8) chunks of 4-8 tangents beat a plain loop by ~30%.

    The teacher is put in eval mode (BatchNorm running statistics) so a sample's features do not
    depend on its batch.

    Accuracy: the estimate is unbiased with ``Var K̂_ij = (‖M_ij‖²_F + tr M_ij²) / R``,
    ``M_ij = Σ_c J_icᵀ J_jc``. When the class Jacobians are roughly orthogonal the RMS relative
    Frobenius error is about ``sqrt((1 + erank K) / (R · C))`` (``erank = tr² / ‖K‖²_F ≥ 1``):
    the trace over C classes helps, but at C=10 it is at least ~5.6% at R=64 and ~1.4% at
    R=1024 (image kernels are close to rank one and sit near that floor).
    """

    def __init__(
        self,
        teacher: nn.Module,
        projections: int = 64,
        seed: int = 0,
        *,
        params: Iterable[str] | None = None,
        chunk: int | None = None,
        max_chunk_bytes: int = 256 * 2**20,
        max_tangent_bytes: int = 512 * 2**20,
    ) -> None:
        if projections < 1:
            raise ValueError(f"projections must be >= 1, got {projections}")
        self.teacher = teacher.eval()
        check_batch_independent(self.teacher)
        self.projections = int(projections)
        self.seed = int(seed)
        named = dict(teacher.named_parameters())
        names = list(named) if params is None else list(params)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise KeyError(f"not parameters of the teacher: {unknown}")
        self._params = {n: named[n].detach() for n in names}
        self._fixed = {n: p.detach() for n, p in named.items() if n not in self._params}
        self._fixed.update({n: b.detach() for n, b in teacher.named_buffers()})
        self.num_params = sum(p.numel() for p in self._params.values())
        itemsize = next(iter(self._params.values())).element_size()
        per_tangent = self.num_params * itemsize
        self.chunk = (
            int(chunk) if chunk else max(1, min(projections, max_chunk_bytes // per_tangent))
        )
        self._stored: list[dict[str, Tensor]] | None = None
        if projections * per_tangent <= max_tangent_bytes:
            self._stored = [self._make_chunk(idx) for idx in self._chunk_ranges()]

    # -- tangents

    def _chunk_ranges(self) -> list[range]:
        step = self.chunk
        return [range(s, min(s + step, self.projections)) for s in range(0, self.projections, step)]

    def _make_chunk(self, idx: range) -> dict[str, Tensor]:
        """Tangents ``idx`` stacked per parameter, ``(T, *shape)``, written in place (no copies)."""
        out = {n: torch.empty((len(idx), *p.shape), dtype=p.dtype) for n, p in self._params.items()}
        for k, r in enumerate(idx):
            state = np.random.SeedSequence((self.seed, r)).generate_state(1, np.uint64)[0]
            gen = torch.Generator().manual_seed(int(state) & (2**63 - 1))
            for n, p in self._params.items():
                torch.randn(p.shape, generator=gen, dtype=p.dtype, out=out[n][k])
        return {n: t.to(self._params[n].device) for n, t in out.items()}

    def _chunks(self) -> Iterator[tuple[range, dict[str, Tensor]]]:
        for i, idx in enumerate(self._chunk_ranges()):
            yield idx, (self._stored[i] if self._stored is not None else self._make_chunk(idx))

    def tangent(self, r: int) -> dict[str, Tensor]:
        """Projection vector ``r`` as a parameter dict (for tests and inspection)."""
        if not 0 <= r < self.projections:
            raise IndexError(f"projection {r} of {self.projections}")
        if self._stored is not None:
            return {n: t[r % self.chunk] for n, t in self._stored[r // self.chunk].items()}
        return {n: t[0] for n, t in self._make_chunk(range(r, r + 1)).items()}

    # -- features

    def _jvp_chunk(self, x: Tensor, tangents: dict[str, Tensor]) -> Tensor:
        """J(x) v for a stack of tangents: (T, N, C)."""

        def forward(p: dict[str, Tensor]) -> Tensor:
            out = functional_call(self.teacher, (p, self._fixed), (x,))
            return out.reshape(out.shape[0], -1)

        def one(t: dict[str, Tensor]) -> Tensor:
            return jvp(forward, (self._params,), (t,))[1]

        # torch loads its forward-AD decompositions with jit.script (deprecated) on first use
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
            if next(iter(tangents.values())).shape[0] == 1:  # no vmap overhead for one tangent
                return one({n: t[0] for n, t in tangents.items()}).unsqueeze(0)
            return vmap(one)(tangents)

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """Projected features ``(N, C, R)``: ``φ[i, :, r] = J(x_i) v_r``."""
        x = x.to(next(iter(self._params.values())).device)
        parts = [self._jvp_chunk(x, t) for _, t in self._chunks()]
        return torch.cat(parts, dim=0).permute(1, 2, 0).contiguous()

    @torch.no_grad()
    def features_dataset(
        self,
        x_all: Tensor,
        batch_size: int = 128,
        progress: Callable[[int, int], None] | None = None,
        out_device: torch.device | str = "cpu",
    ) -> Tensor:
        """Features ``(N_all, C, R)`` of a whole data set, to cache once and index per minibatch.

        Loops over projection chunks outside and batches inside, so each tangent is generated once
        per call even when they are not stored. ``progress(done, total)`` counts (chunk, batch)
        steps.
        """
        device = next(iter(self._params.values())).device
        n = x_all.shape[0]
        starts = range(0, n, batch_size)
        n_chunks = -(-self.projections // self.chunk)
        total, done = n_chunks * len(starts), 0
        out: Tensor | None = None
        for idx, tangents in self._chunks():
            for s in starts:
                xb = x_all[s : s + batch_size].to(device)
                val = self._jvp_chunk(xb, tangents).permute(1, 2, 0)  # (B, C, T)
                if out is None:
                    out = torch.empty(
                        (n, val.shape[1], self.projections), dtype=val.dtype, device=out_device
                    )
                out[s : s + xb.shape[0], :, idx.start : idx.stop] = val.to(out_device)
                done += 1
                if progress is not None:
                    progress(done, total)
        assert out is not None
        return out

    def kernel(self, x: Tensor, x2: Tensor | None = None) -> Tensor:
        """Projected NTK of a batch (or cross-kernel with ``x2``), computed from scratch."""
        phi = self.features(x)
        return kernel_from_features(phi, None if x2 is None else self.features(x2))

    kernel_from_features = staticmethod(kernel_from_features)


# ------------------------------------------------------------------------ normalisation and losses


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
