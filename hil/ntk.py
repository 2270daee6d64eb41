"""Empirical neural tangent kernels for NTK distillation (NTKD).

The kernel of a network ``f(x; θ)`` with ``C`` outputs is traced over classes and parameters::

    Θ(x_i, x_j) = Σ_c Σ_p ∂f_c(x_i)/∂θ_p · ∂f_c(x_j)/∂θ_p

Two estimators, because the two sides of NTKD have very different sizes:

- **student** (:func:`student_ntk`): exact, ``vmap(jacrev(...))`` per sample, differentiable w.r.t.
  the student's parameters (the loss is backpropagated through the Jacobians: double backward).
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
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vmap

__all__ = [
    "ProjectedTeacher",
    "check_batch_independent",
    "cka",
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
