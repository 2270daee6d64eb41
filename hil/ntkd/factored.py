"""The exact student kernel from per-sample gradients in closed form (what the NTKD loss uses).

`factored_ntk` is the kernel of `hil.ntkd.exact.student_ntk` at about the cost of a forward and
backward pass of the student: a layer linear in its parameters enters the kernel through the
δ at its output and its input, so its weights' Jacobians are never formed. `hil.ntkd.plan` says
which layers the closed forms cover; a segmentation map's convolutions are walked in cell boxes
(`hil.ntkd.windows`); anything else takes the per-sample vmap path here.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from hil.ntkd.exact import check_batch_independent, contract, select_params, student_ntk
from hil.ntkd.plan import Plan, Segment, Unsupported, make_plan, uniform_block
from hil.ntkd.windows import (
    cell_axes,
    conv_factors,
    conv_of_maps,
    plain_conv,
    pointwise_slope,
    seeds,
    segment_sums,
    step_back,
)

__all__ = ["factored_ntk", "ntk_and_outputs"]


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
    plan = make_plan(model, select_params(model, params))
    if plan is not None:
        try:
            return _batched_ntk(plan, x, x2)[0]
        except Unsupported:
            pass
    return _factored_ntk_vmap(model, x, params, x2=x2)


def ntk_and_outputs(
    model: nn.Module,
    x: Tensor,
    params: Iterable[str] | None = None,
    *,
    pool: int | None = None,
    region: tuple[int, ...] | None = None,
) -> tuple[Tensor | None, Tensor]:
    """(`factored_ntk(model, x, params)`, `model(x)`), both differentiable, from one forward,
    where the closed form covers the model; otherwise (None, `model(x)`), for the caller's own
    kernel. Outputs (N, classes) give their kernel; logit maps (N, K, H, W) with `pool` give
    the kernel of `hil.ntkd.losses.pool_logits(outputs, pool, region)` (`_pooled_terms`).

    The closed form's forward already computes the outputs (through the pooled shifted inputs,
    which equal the pooled convolution exactly), so NTKD's CE term needs no second forward and
    backward of the student: they were half an NTKD step.
    """
    check_batch_independent(model)
    plan = make_plan(model, select_params(model, params))
    if plan is not None:
        try:
            return _batched_ntk(plan, x, None, flat=True, pooled=pool and (pool, region))
        except Unsupported:
            pass
    return None, model(x)


def _shifted_inputs(x: Tensor, k: int, block: tuple[int, int] | None, ones: bool = False) -> Tensor:
    """(N, L, Cin·k·k): the input under kernel offset u at output position l of a "same"
    convolution (conv2d_direct and conv2d_fft cut it alike), block-averaged when pooled; with
    `ones`, a last column of ones (the offset's "input"). Made in this layout with a single
    copy: both products it enters (the maps and δ's contraction) then read it as it lies.

    A PSF output is y_p[h] = Σ_u x[h - (k-1)//2 + u] · kernel_p[k-1-u], so ∂y_p[h]/∂kernel_p
    is this with the offsets flipped (`_flipped` flips the few kernel entries instead of the
    N·L columns), and the block average of y_p is the same sum over the block-averaged input
    taken with the block as stride.
    """
    lo = (k - 1) // 2
    xp = F.pad(x, (lo, k - 1 - lo, lo, k - 1 - lo))
    stride = (1, 1)
    if block is not None:
        xp = xp.unfold(2, block[0], 1).mean(-1).unfold(3, block[1], 1).mean(-1)
        stride = block
    cols = xp.unfold(2, k, stride[0]).unfold(3, k, stride[1])  # (N, Cin, h, w, k, k)
    n, cin, h, w = cols.shape[:4]
    out = xp.new_empty(n, h * w, cin * k * k + ones)
    out[..., : cin * k * k].unflatten(1, (h, w)).unflatten(-1, (cin, k, k)).copy_(
        cols.permute(0, 2, 3, 1, 4, 5)
    )
    if ones:
        out[..., -1] = 1
    return out


def _flipped(t: Tensor) -> Tensor:
    """Per-kernel-entry values (m, Cin, k, k) in the order of `_shifted_inputs`' offsets, flat
    per PSF: (m, Cin·k·k)."""
    return t.flip(-2, -1).flatten(1)


class _KernelOf(nn.Module):
    """``front.kernel`` as a forward, so functional_call can swap ``front.raw`` for a tensor."""

    def __init__(self, front: nn.Module) -> None:
        super().__init__()
        self.front = front

    def forward(self) -> Tensor:
        return self.front.kernel


class _Term(NamedTuple):
    """Per-sample factors of one batch whose kernel term is G ⊙ (a a'ᵀ) for a Linear's weight
    (a: its inputs, None otherwise), plus G if plain, where G is `_Gram`'s sum over g (N, C, F)
    with metric w (diagonal (F,) or full (F, F)) and low-rank part b."""

    g: Tensor
    w: Tensor | None
    b: Tensor | None
    a: Tensor | None
    plain: bool


class _Gram(torch.autograd.Function):
    """Σ_c g_c W g_cᵀ + Σ_c (g_c b)(g_c b)ᵀ over the classes c of g (N, C, F), with the
    backward of a symmetric product; W is diag(w) for w (F,), w itself for a symmetric (F, F),
    the identity for None; b None: no low-rank part.

    b (F, q) maps a class's F gradient entries to q more that are linear in them (a gain's
    gradient is its PSF's contracted with the kernel), so their Gram rides on this one: no
    separate product, and their gradient is accumulated into g's by the same addmm.
    Autograd would take g's gradient twice, once per factor; the two are one: with
    M = dK + dKᵀ, ∂/∂g = M g W + (M g b) bᵀ, ∂/∂w = ½ Σ_i g_i ⊙ (M g)_i (½ Σ_i,c g_icᵀ (M g)_ic
    for a full W) and ∂/∂b = Σ_i g_iᵀ (M g b)_i. Written with torch ops, so the backward is
    itself differentiable.
    """

    @staticmethod
    def forward(ctx, g: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
        n, c, f = g.shape
        flat = g.reshape(n, c * f)
        k = _metric(g, w).reshape(n, c * f) @ flat.T
        v = None
        if b is not None:
            v = (g.reshape(n * c, f) @ b).reshape(n, -1)
            k = k.addmm_(v, v.T)
        ctx.save_for_backward(g, w, b, v)
        return k

    @staticmethod
    def backward(ctx, dk: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        g, w, b, v = ctx.saved_tensors
        n, c, f = g.shape
        flat = g.reshape(n, c * f)
        m = dk + dk.T
        mg = m @ flat
        grad_w = grad_b = None
        if w is not None and w.dim() == 2 and ctx.needs_input_grad[1]:
            grad_w = 0.5 * g.reshape(n * c, f).T @ mg.reshape(n * c, f)
        elif w is not None and ctx.needs_input_grad[1]:
            grad_w = 0.5 * torch.linalg.vecdot(flat, mg, dim=0).reshape(c, f).sum(0)
        grad = _metric(mg.reshape(n, c, f), w).reshape(n * c, f)
        if b is not None:
            mv = (m @ v).reshape(n * c, -1)
            grad = grad.addmm_(mv, b.T)  # in place: the out-of-place addmm copies first
            if ctx.needs_input_grad[2]:
                grad_b = g.reshape(n * c, f).T @ mv
        return grad.reshape(n, c, f), grad_w, grad_b


class _Pairs(NamedTuple):
    """Per-sample gradients Σ_l d[l] ⊗ c[l] over each cell's box positions l, kept as their
    factors d (N, Q, L, K·X) and c (N, Q, L, F) (`conv_factors`): the Gram over positions
    Σ_q Σ_ll' (d d'ᵀ)(c c'ᵀ), summed over the K classes inside d, is smaller than the gradients
    (N, Q·K, X·F) when N·L² < K·X·F, as in a decoder's low-resolution middle."""

    d: Tensor
    c: Tensor


def _pair_kernel(t: _Pairs, t2: _Pairs) -> Tensor:
    """The kernel term of `_Pairs` t between its batch and t2's."""
    (n, q, length), n2 = t.d.shape[:3], t2.d.shape[0]

    def rows(f: Tensor) -> Tensor:  # (Q, N·L, ·)
        return f.transpose(0, 1).reshape(q, -1, f.shape[-1])

    d, c = rows(t.d), rows(t.c)
    d2, c2 = (d, c) if t2 is t else (rows(t2.d), rows(t2.c))
    both = (d @ d2.transpose(1, 2)) * (c @ c2.transpose(1, 2))  # (Q, N·L, N2·L)
    return both.reshape(q, n, length, n2, length).sum(dim=(0, 2, 4))


def _explicit(t: _Term | _Pairs) -> _Term:
    """`_Pairs` as the per-sample gradients they factor (classes and entries in one axis)."""
    if isinstance(t, _Term):
        return t
    return _Term((t.d.transpose(2, 3) @ t.c).reshape(t.d.shape[0], 1, -1), None, None, None, True)


def _conv_terms(
    layer: nn.Module, inp: Tensor | None, delta: Tensor, axes, weight: bool, bias: bool
) -> list[_Term | _Pairs]:
    """A convolution's weight term (as `_Pairs` where they are the smaller; from its input
    ``inp``) and bias term."""
    n, q, k, c = delta.shape[:4]
    out: list[_Term | _Pairs] = []
    if weight:
        assert inp is not None
        d, cols = conv_factors(layer, inp, delta, axes)
        pairs = _Pairs(d, cols)
        out.append(pairs if n * d.shape[2] ** 2 < d.shape[3] * cols.shape[3] else _explicit(pairs))
    if bias:
        out.append(_Term(delta.sum(dim=(-2, -1)).reshape(n, q * k, c), None, None, None, True))
    return out


def _metric(g: Tensor, w: Tensor | None) -> Tensor:
    """g (N, C, F) times `_Gram`'s W on its last axis."""
    if w is None:
        return g
    return g @ w if w.dim() == 2 else g * w


def _cross(t: _Term, t2: _Term) -> Tensor:
    """The kernel term of `_Term` t between two batches: `_Gram`'s sum with g' on the right."""
    n = t.g.shape[0]
    k = _metric(t.g, t.w).reshape(n, -1) @ t2.g.reshape(t2.g.shape[0], -1).T
    if t.b is not None:
        k = k + (t.g @ t.b).reshape(n, -1) @ (t2.g @ t.b).reshape(t2.g.shape[0], -1).T
    return k


def _batched_ntk(
    plan: Plan, x: Tensor, x2: Tensor | None, *, flat: bool = False, pooled: _Pooled = None
) -> tuple[Tensor, Tensor]:
    """(Σ over sites of per-sample gradient inner products, from `_sample_terms` of each side;
    the chain's outputs of ``x``). ``flat``: outputs other than (N, classes), unless pooled,
    are `Unsupported`."""
    outer = torch.is_grad_enabled()
    with torch.enable_grad():  # the δ are taken by autograd even under no_grad
        terms, outputs = _sample_terms(plan, x, outer, flat, pooled)
        terms2 = terms if x2 is None else _sample_terms(plan, x2, outer, pooled=pooled)[0]
        total: Tensor | int = 0
        for t, t2 in zip(terms, terms2, strict=True):
            if isinstance(t, _Pairs) and isinstance(t2, _Pairs):
                total = total + _pair_kernel(t, t2)
                continue
            t, t2 = _explicit(t), _explicit(t2)  # batches of other sizes may choose otherwise
            if x2 is None:
                gg = _Gram.apply(t.g, t.w, t.b)
                aa = None if t.a is None else _Gram.apply(t.a[:, None], None, None)
            else:
                gg, aa = _cross(t, t2), None if t.a is None else t.a @ t2.a.T
            if aa is not None:
                total = total + gg * aa
            if t.plain:
                total = total + gg
    assert isinstance(total, Tensor)
    return (total, outputs) if outer else (total.detach(), outputs.detach())


_Pooled = tuple[int, tuple[int, ...] | None] | None  # (pool, region) of a logit map's kernel


def _sample_terms(
    plan: Plan, x: Tensor, create_graph: bool, flat: bool = False, pooled: _Pooled = None
) -> tuple[list[_Term | _Pairs], Tensor]:
    """The kernel terms of batch ``x`` (`_Term`, `_Pairs`) in the plan's order, and its outputs.

    δ_c at every site is walked back from the outputs (`_walked_deltas`) or, where the walk
    meets a layer it does not know, comes from one backward pass of Σ_i f_c(x_i), batched over
    the classes: samples are independent, so its gradient at sample i's activations is sample
    i's own.
    """
    n = x.shape[0]
    outputs, inputs, probes, segs, steps = _forward(plan, x)
    if outputs.dim() == 4 and pooled is not None:
        return _pooled_terms(plan, outputs, segs, steps, *pooled), outputs
    if (flat and outputs.dim() != 2) or any(
        type(plan.chain[i]) is not nn.Linear for i in plan.layers
    ):
        raise Unsupported  # a convolution's δ are walked for pooled logit maps only
    logits = outputs.reshape(n, -1)
    sites = probes + [out for _, out in segs]
    classes = logits.shape[1]
    eye = torch.eye(classes, dtype=logits.dtype, device=logits.device)
    deltas = None
    if outputs.dim() == 2:
        deltas = _walked_deltas(steps, sites, eye.expand(n, classes, classes))
    if deltas is None:  # autograd's class-batched backward: (C, N, ...), made sample-major
        found = torch.autograd.grad(
            logits,
            sites,
            eye[:, None, :].expand(classes, n, classes),
            is_grads_batched=True,
            create_graph=create_graph,
            allow_unused=True,
        )
        deltas = [
            p.new_zeros(n, classes, *p.shape[1:]) if d is None else d.transpose(0, 1)
            for d, p in zip(found, sites, strict=True)
        ]
    terms = []  # deltas: the Linears', then the segments'
    for (w, b), a, d in zip(plan.layers.values(), inputs, deltas, strict=False):
        terms.append(_Term(d.reshape(n, 1, -1), None, None, a if w else None, b))
    for ((seg, z, cols), _), d in zip(segs, deltas[len(inputs) :], strict=True):
        terms.extend(_segment_terms(seg, z, cols, d))
    return terms, outputs


_SegmentSite = tuple[tuple[Segment, Tensor, Tensor | None], Tensor]  # (segment, z, cols), output


# (layer, its input, its output) of each step of the chain; None for a segment
_Step = tuple[nn.Module | None, Tensor, Tensor]


def _forward(
    plan: Plan, x: Tensor
) -> tuple[Tensor, list[Tensor], list[Tensor], list[_SegmentSite], list[_Step]]:
    """The chain's output, and what the δ are taken at: each chosen Linear's input and output,
    each chosen segment's maps z (before its affine), shifted inputs and output; every step."""
    chain, h = plan.chain, x
    inputs: list[Tensor] = []
    probes: list[Tensor] = []
    segs: list[_SegmentSite] = []
    steps: list[_Step] = []
    i = 0
    while i < len(chain):
        seg = plan.segments.get(i)
        if seg is None:
            out = chain[i](h)
            if i in plan.layers and type(chain[i]) is nn.Linear:
                if h.dim() != 2:
                    raise Unsupported  # per-sample weight gradients would sum over positions
                inputs.append(h)
                probes.append(out)
            steps.append((chain[i], h, out))
            h, i = out, i + 1
            continue
        out, z, cols, i = _segment_forward(chain, i, seg, h)
        if seg.chosen:
            segs.append(((seg, z, cols), out))
        steps.append((None, h, out))
        h = out
    return h, inputs, probes, segs, steps


def _walked_deltas(steps: list[_Step], sites: list[Tensor], seeds: Tensor) -> list[Tensor] | None:
    """δ (N, C, ...) at each site by walking the chain back from the outputs with plain tensor
    ops, or None where a layer before the first site is not one `_back` knows.

    The same δ as autograd's class-batched backward, but its ops are ordinary matmuls and
    products rather than vmapped backward kernels, so the double backward through them (the
    NTKD loss's gradient) is too: about a fifth of an NTKD step.
    """
    found: dict[int, Tensor] = {}
    wanted = {id(t) for t in sites}
    delta = seeds
    for layer, inp, out in reversed(steps):
        if id(out) in wanted:
            found[id(out)] = delta
            if len(found) == len(wanted):
                return [found[id(t)] for t in sites]
        delta = None if layer is None else _back(layer, inp, out, delta)
        if delta is None:
            return None
    return None


def _back(layer: nn.Module, inp: Tensor, out: Tensor, delta: Tensor) -> Tensor | None:
    """δ (N, C, ...) at `layer`'s input from δ at its output, for the layers a backend's head
    is made of."""
    kind = type(layer)
    if kind is nn.Linear:
        return delta @ layer.weight.to(delta.dtype)
    if kind in (nn.Flatten, nn.Unflatten):
        return delta.reshape(*delta.shape[:2], *inp.shape[1:])
    if kind in (nn.Identity, nn.Dropout):  # dropout is off: `check_batch_independent`
        return delta
    slope = pointwise_slope(layer, inp, out)
    return None if slope is None else delta * slope.unsqueeze(1)


def _segment_forward(
    chain: list[nn.Module], i: int, seg: Segment, h: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """(output, maps z before the affine, shifted inputs or None, next chain position) of the
    segment at chain[i], through the average pool after it when that pool is uniform."""
    nxt, block, cols = i + seg.length, None, None
    if seg.psf is not None and (h.dim() != 4 or h.shape[1] != seg.psf.channels):
        raise Unsupported  # the PSF's own forward says what is wrong
    if h.dim() == 4 and nxt < len(chain):  # a PSF's "same" output has its input's size
        block = uniform_block(chain[nxt], tuple(h.shape[-2:]))
    if seg.psf is not None and (block is not None or seg.raw):
        cols = _shifted_inputs(h, seg.psf.kernel_size, block, ones=seg.raw and seg.offset)
    if seg.psf is not None and block is not None:
        kernel = _flipped(seg.psf.kernel.to(h.dtype))  # (m, Cin·k·k)
        z = (cols[..., : kernel.shape[1]] @ kernel.T).transpose(1, 2)
        z = z.unflatten(-1, (h.shape[-2] // block[0], h.shape[-1] // block[1]))
    else:
        z = h if seg.psf is None else seg.psf(h)
        z = z if block is None else F.avg_pool2d(z, block)
    if seg.affine is not None:
        gain, offset = seg.affine.gain, seg.affine.offset
        if z.dim() != 4 or gain.shape != (z.shape[1], 1, 1) or offset.shape != gain.shape:
            raise Unsupported
    out = z if seg.affine is None else seg.affine(z)  # an average of z·g + o is z̄·g + o
    return out, z, cols, nxt + (block is not None)


def _segment_terms(seg: Segment, z: Tensor, cols: Tensor | None, delta: Tensor) -> list[_Term]:
    """Terms of a segment's chosen parameters from δ (N, C, m, h, w) after it: per-sample
    gradients w.r.t. gain Σ δ z̄, offset Σ δ and the PSF kernel gain·Σ_l δ[l] cols[u, l]; the
    latter is pulled back to ``raw`` through the metric of `_psf_metric`.

    With the kernel chosen, s = Σ_l δ[l] cols[u, l] is formed once (one batched matmul, δ read
    once) and serves all three: the kernel's gradient is gain·s; the offset's is the entry of a
    column of ones in cols, so PSF and offset share one weighted Gram (weights gain²·w and
    1); and, z being kernel @ cols, the gain's is Σ_u kernel[u] s[u], that Gram's low-rank part.
    """
    n, classes = delta.shape[:2]
    if not seg.raw:
        gains = torch.einsum("ncmhw,nmhw->ncm", delta, z) if seg.gain else None
        return _affine_terms(seg, gains, delta.sum(dim=(-2, -1)))
    assert cols is not None
    m, length = delta.shape[2], cols.shape[1]  # cols ends in the offset's ones when chosen
    s = delta.reshape(n, classes * m, length) @ cols  # (N, C·m, r): r kernel entries per map
    return [_psf_term(seg, s.reshape(n, classes, -1), m)]


def _affine_terms(seg: Segment, gains: Tensor | None, sums: Tensor) -> list[_Term]:
    """A map affine's terms without the PSF: per-sample gradients Σ δ z̄ (gain), Σ δ (offset)."""
    out = [_Term(gains, None, None, None, True)] if seg.gain else []
    return out + ([_Term(sums, None, None, None, True)] if seg.offset else [])


def _psf_term(seg: Segment, s: Tensor, m: int) -> _Term:
    """The PSF's term from s (N, C, m·r) (see `_segment_terms`), with the affine's riding on it."""
    assert seg.psf is not None
    kernel = _flipped(seg.psf.kernel.to(s.dtype))  # (m, Cin·k·k)
    w = _flipped(_psf_metric(seg.psf).reshape(seg.psf.kernel.shape)).to(s.dtype)
    if seg.affine is not None:  # (gain·s) W (gain·s)ᵀ = s (gain² W) sᵀ
        w = w * seg.affine.gain.reshape(-1, 1).square()
    if seg.offset:
        kernel = F.pad(kernel, (0, 1))
        w = F.pad(w, (0, 1), value=1.0)
    b = None
    if seg.gain:  # map p's gain gradient is kernel_p · s_p: b is block-diagonal (m·r, m)
        b = torch.eye(m, dtype=s.dtype, device=s.device)[:, None, :] * kernel[:, :, None]
        b = b.reshape(-1, m)
    return _Term(s, w.reshape(-1), b, None, True)


def _pooled_terms(
    plan: Plan,
    logits: Tensor,
    segs: list[_SegmentSite],
    steps: list[_Step],
    pool: int,
    region: tuple[int, ...] | None,
) -> list[_Term | _Pairs]:
    """The kernel terms of a logit map (N, K, H, W) traced over its pool x pool cells of
    `region`: δ of every (cell, class) walked back in cell boxes (`hil.ntkd.windows`) to each
    chosen convolution and segment, whose per-sample gradients sum over the boxes only.
    Each term's classes are the Q·K (cell, class) outputs."""
    axes = cell_axes(tuple(logits.shape[-2:]), pool, region)
    chosen = {id(plan.chain[i]): flags for i, flags in plan.layers.items()}
    if any(type(plan.chain[i]) is nn.Linear for i in plan.layers):
        raise Unsupported  # a Linear's input is a map here: its gradient sums over positions
    at_segment = {id(out): site for site, out in segs}
    left = len(chosen) + len(at_segment)
    delta, terms = seeds(logits, axes), []
    for j in range(len(steps) - 1, -1, -1):
        layer, inp, out = steps[j]
        site = at_segment.get(id(inp)) if j else None
        if site is not None and _fusable(layer, site, steps[j - 1]):
            terms += _fused_terms(layer, chosen.get(id(layer)), site, steps[j - 1][1], delta, axes)
            if left - (id(layer) in chosen) - 1 == 0:
                return terms
            raise Unsupported  # δ is not walked back through a segment
        if layer is None and id(out) in at_segment:
            seg, z, cols = at_segment[id(out)]
            gains, sums, s = segment_sums(delta, axes, z, cols if seg.raw else None, seg.gain)
            terms += [_psf_term(seg, s, z.shape[1])] if seg.raw else _affine_terms(seg, gains, sums)
            left -= 1
        elif layer is None:
            raise Unsupported  # δ is not walked back through a segment
        elif id(layer) in chosen:
            terms += _conv_terms(layer, inp, delta, axes, *chosen[id(layer)])
            left -= 1
        if left == 0:
            return terms
        delta, axes = step_back(layer, inp, out, delta, axes)
    raise Unsupported


def _fusable(layer: nn.Module | None, site: tuple[Segment, Tensor, Tensor | None], before) -> bool:
    """Whether the Conv2d `layer` reads a PSF segment's "same" output, whose r shifted inputs
    (with the offset's ones) are fewer than its maps: then `_fused_terms` applies."""
    seg, z, _ = site
    if type(layer) is not nn.Conv2d or seg.psf is None or before[1].shape[-2:] != z.shape[-2:]:
        return False
    return plain_conv(layer) and seg.psf.kernel[0].numel() + 1 < z.shape[1]


def _fused_terms(
    layer: nn.Conv2d,
    flags: tuple[bool, bool] | None,
    site: tuple[Segment, Tensor, Tensor | None],
    h: Tensor,
    delta: Tensor,
    axes,
) -> list[_Term | _Pairs]:
    """The terms of a Conv2d and the PSF segment before it, from δ at the Conv2d's output.

    The segment's output is a·cols, a (m, r) = [gain·kernel | offset] on its r shifted inputs
    cols (`_shifted_inputs` with ones, zero outside the map as the Conv2d's padding is), so
    with T = Σ δ ⊗ cols as the Conv2d reads them (`conv_of_maps`), its weight's per-sample
    gradient is T aᵀ, whose Gram is T (aᵀa) Tᵀ, and the segment's s = Σ δ_seg ⊗ cols is Wᵀ T:
    neither the m-map weight gradient nor δ at the m maps is formed (a third of the work).
    """
    seg, z, cols = site
    assert seg.psf is not None
    n, m = z.shape[:2]
    if cols is None or not (seg.raw and seg.offset):  # the forward's, when they end in ones
        cols = _shifted_inputs(h, seg.psf.kernel_size, None, ones=True)  # (N, H·W, r)
    kernel = _flipped(seg.psf.kernel.to(cols.dtype))
    gain, offset = cols.new_ones(m, 1), cols.new_zeros(m, 1)
    if seg.affine is not None:
        gain, offset = seg.affine.gain.reshape(m, 1), seg.affine.offset.reshape(m, 1)
    a = torch.cat([kernel * gain, offset], dim=1)
    maps = cols.transpose(1, 2).unflatten(-1, z.shape[-2:])  # (N, r, H, W)
    t = conv_of_maps(layer, maps, delta, axes)  # (N, Q·K, Cout·k², r)
    weight, bias = flags or (False, False)
    terms = [_Term(t.flatten(1, 2), a.T @ a, None, None, True)] if weight else []
    terms += _conv_terms(layer, None, delta, axes, False, bias)
    w = layer.weight.to(t.dtype).transpose(0, 1).reshape(m, -1)  # (m, Cout·k²)
    s = (w @ t.reshape(-1, *t.shape[2:])).reshape(n, t.shape[1], m, -1)  # (N, Q·K, m, r)
    if seg.raw:
        return terms + [_psf_term(seg, (s if seg.offset else s[..., :-1]).flatten(2), m)]
    gains = (s[..., :-1] * kernel).sum(-1) if seg.gain else None
    return terms + _affine_terms(seg, gains, s[..., -1])


def _psf_metric(front: nn.Module) -> Tensor:
    """diag(J Jᵀ), J = ∂kernel/∂raw, when each raw entry moves at most one kernel entry.

    Then Σ_r (Jᵀ g_i)_r (Jᵀ g_j)_r = Σ_a g_i[a] w[a] g_j[a]: the PSF term is contracted over
    the m·Cin·k² kernel entries with weights w rather than over the raw entries after a pullback
    of every (sample, class). With one entry per column, J's nonzeros are the vector-Jacobian
    product 1ᵀJ, so w is that squared and summed per kernel entry (`_moved_entry` says which):
    exact and differentiable whatever the map is (softplus, signed pairs); any other sparsity
    raises `Unsupported` (the vmap path).
    """
    (ones_j,) = torch.autograd.grad(front.kernel.sum(), front.raw, create_graph=True)
    entry = _moved_entry(front)
    w = ones_j.new_zeros(front.kernel.numel())
    return w.index_add(0, entry, ones_j.reshape(-1).square())


_MOVED: weakref.WeakKeyDictionary[nn.Module, tuple[torch.Size, Tensor]] = (
    weakref.WeakKeyDictionary()
)


def _moved_entry(front: nn.Module) -> Tensor:
    """For each raw entry, the one kernel entry it moves: J's sparsity, read once per frontend
    by jacrev at raw = 0, where a smooth map's derivatives are generic (no entry vanishes by
    accident of the values)."""
    cached = _MOVED.get(front)
    if cached is not None and cached[0] == front.raw.shape:
        return cached[1]

    def kernel(raw: Tensor) -> Tensor:
        return functional_call(_KernelOf(front), {"front.raw": raw}, ())

    with torch.enable_grad():
        jac = jacrev(kernel)(torch.zeros_like(front.raw.detach())).reshape(-1, front.raw.numel())
    moved = jac != 0
    if bool((moved.sum(0) != 1).any()):
        raise Unsupported
    entry = moved.to(torch.int8).argmax(0)
    _MOVED[front] = (front.raw.shape, entry)
    return entry


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
    chosen = select_params(model, params)
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
    like = next(iter(chosen.values()))
    zeros = {n: like.new_zeros(m.out_features) for n, m in linears.items()}
    (j_rest, j_probe), acts, (j_rest2, j_probe2), acts2 = _probed_jacobians(
        model, linears, rest, zeros, x, x2
    )
    total = contract(j_rest, j_rest2) if rest else 0
    for name in linears:
        dd = torch.einsum("nco,mco->nm", j_probe[name], j_probe2[name])
        total = total + dd * (acts[name] @ acts2[name].T)
        if f"{name}.bias" in factored:
            total = total + dd
    return total


def _probed_jacobians(
    model: nn.Module,
    linears: dict[str, nn.Module],
    rest: dict[str, Tensor],
    zeros: dict[str, Tensor],
    x: Tensor,
    x2: Tensor | None,
):
    """Per-sample Jacobians of the outputs w.r.t. ``rest`` and the ``zeros`` probing each
    Linear's output, with each Linear's input, for ``x`` and ``x2`` (the same ones when None)."""
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

    jac = vmap(jacrev(fn, argnums=(0, 1), has_aux=True), in_dims=(None, None, 0))
    handles = [m.register_forward_hook(probe(n)) for n, m in linears.items()]
    try:
        first, acts = jac(rest, zeros, x)
        second, acts2 = (first, acts) if x2 is None else jac(rest, zeros, x2)
    finally:
        for h in handles:
            h.remove()
    return first, acts, second, acts2
