"""The teacher's side of NTKD: its kernel estimated by fixed random projections, cacheable.

A ResNet-18 Jacobian at batch 128 and 10 classes is ~56 GB, so the teacher's kernel is estimated
without gradients, ``Θ ≈ (1/R) Σ_r (J v_r)(J v_r)ᵀ`` with ``v_r ~ N(0, I)``. The projections are
fixed by a seed, so the projected features ``φ(x) = [J(x) v_1 … J(x) v_R]`` of each sample can be
cached once per data set (`hil.ntkd.teacher_cache`) and any minibatch kernel is a cheap
contraction of cached features (`kernel_from_features`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from hil.ntkd.exact import check_batch_independent

__all__ = ["ProjectedTeacher", "kernel_from_features"]


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
