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
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from hil.ntkd.exact import check_batch_independent

__all__ = ["ProjectedTeacher", "default_budget", "kernel_from_features"]

# CPU budgets, measured on resnet18 (8x8 and 28x28 inputs, 2-core EPYC): steps whose activations
# outgrow the caches run up to 1.5x slower per JVP, and chunks of 6-8 tangents beat 16-32
CPU_CHUNK_BYTES = 360 * 2**20  # 8 resnet18 tangents (44.7 MB each)
CPU_ACTIVATION_BYTES = 64 * 2**20
CPU_TANGENT_BYTES = 512 * 2**20
LIVE_ACTIVATIONS = 4  # live tensors of the largest activation's size in one JVP stream (estimate)


def kernel_from_features(phi_a: Tensor, phi_b: Tensor | None = None) -> Tensor:
    """Projected kernel ``(1/R) Σ_{c,r} φ_a[i,c,r] φ_b[j,c,r]`` from features ``(N, C, R)``."""
    phi_b = phi_a if phi_b is None else phi_b
    return torch.einsum("ncr,mcr->nm", phi_a, phi_b) / phi_a.shape[-1]


def default_budget(device: torch.device, cpu_bytes: int) -> int:
    """A memory budget on ``device``: a quarter of the free memory of a CUDA device, else
    ``cpu_bytes`` (a CPU's free memory is shared with everything else on the machine)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) // 4
    return int(cpu_bytes)


def _images(x: Tensor | Iterable) -> Tensor:
    """A tensor of images from a tensor or an iterable of batches (images first in each item)."""
    if isinstance(x, Tensor):
        return x
    parts = [b[0] if isinstance(b, tuple | list) else b for b in x]
    return torch.cat([torch.as_tensor(p) for p in parts])


class ProjectedTeacher:
    """Teacher NTK by fixed random projections: forward-mode JVPs, no gradients, cacheable.

    Tangent ``r`` is drawn from ``N(0, I)`` over all the selected teacher parameters with a CPU
    ``torch.Generator`` seeded from ``(seed, r)`` (counter-based), so vector ``r`` is the same
    whatever the chunking, the batching, the device or the order in which projections are
    computed, and any chunk of tangents can be regenerated on its own.

    Cost, at the JVP floor: one call computes ``R`` batched JVPs per batch, ``chunk`` tangents at
    a time (``vmap`` over the chunk of ``jvp(functional_call)``: the primal forward is shared by
    the chunk, computed ``R / chunk`` times per batch). The chunk loop is outside and the batch
    loop inside, so each tangent is made once per call whatever the number of samples: call
    `features` once on the whole data set, not once per batch. Sharing the primal across chunks
    as well (``torch.func.linearize``) was measured not to pay on CPU: tracing resnet18 costs ~7 s
    per batch, more than the ~8% the repeated primal costs at chunks of 8.

    Memory, in three budgets: all R tangents (``R · |θ|`` elements; resnet18, 11.2M parameters:
    45 MB each at float32, 2.9 GB for R=64) are kept when they fit ``max_tangent_bytes``,
    otherwise each chunk is redrawn once per call (~30 ms per resnet18 tangent on 2 cores); a
    chunk's tangents fit ``chunk_bytes``; a step's activations (``chunk + 1`` JVP streams over a
    batch, estimated from one sample's largest layer output) fit ``activation_bytes``, which sets
    the batch. On a CUDA device each defaults to a quarter of its free memory; on CPU to 512 MiB,
    360 MiB and 64 MiB, sizes measured to run fastest there (cache-sized steps, chunks of ~8).

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
        chunk_bytes: int | None = None,
        activation_bytes: int | None = None,
        max_tangent_bytes: int | None = None,
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
        self.device = next(iter(self._params.values())).device
        self.num_params = sum(p.numel() for p in self._params.values())
        self.tangent_bytes = self.num_params * next(iter(self._params.values())).element_size()
        budget = {
            "chunk": (chunk_bytes, CPU_CHUNK_BYTES),
            "activation": (activation_bytes, CPU_ACTIVATION_BYTES),
            "tangent": (max_tangent_bytes, CPU_TANGENT_BYTES),
        }
        self.budgets = {
            k: default_budget(self.device, cpu) if v is None else int(v)
            for k, (v, cpu) in budget.items()
        }
        fit = max(1, self.budgets["chunk"] // self.tangent_bytes)
        self.chunk = min(self.projections, int(chunk) if chunk else fit)
        self._stored: list[dict[str, Tensor]] | None = None
        if self.projections * self.tangent_bytes <= self.budgets["tangent"]:
            self._stored = [self._make_chunk(idx) for idx in self._chunk_ranges()]

    # -- tangents

    def _chunk_ranges(self) -> list[range]:
        step = self.chunk
        return [range(s, min(s + step, self.projections)) for s in range(0, self.projections, step)]

    def _draw(self, out: dict[str, Tensor], k: int, r: int) -> None:
        """Tangent ``r`` into row ``k`` of ``out``, from its own counter-seeded generator."""
        state = np.random.SeedSequence((self.seed, r)).generate_state(1, np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state) & (2**63 - 1))
        for n, p in self._params.items():
            torch.randn(p.shape, generator=gen, dtype=p.dtype, out=out[n][k])

    def _make_chunk(self, idx: range, buffer: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Tangents ``idx`` stacked per parameter, ``(T, *shape)``, drawn in place (into the first
        rows of ``buffer`` when given) by one thread per tangent: one generator is serial, and
        reusing a buffer spares the page faults of a fresh one (~2.5x faster on 2 cores)."""
        out = buffer or {
            n: torch.empty((len(idx), *p.shape), dtype=p.dtype) for n, p in self._params.items()
        }
        out = {n: t[: len(idx)] for n, t in out.items()}
        workers = min(len(idx), torch.get_num_threads())
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda kr: self._draw(out, *kr), enumerate(idx)))
        else:
            for k, r in enumerate(idx):
                self._draw(out, k, r)
        return {n: t.to(self.device) for n, t in out.items()}

    def _chunks(self) -> Iterator[tuple[range, dict[str, Tensor]]]:
        """Each chunk of tangents in turn: stored, or redrawn into one buffer (so a chunk is
        valid only until the next one is drawn)."""
        if self._stored is not None:
            yield from zip(self._chunk_ranges(), self._stored, strict=True)
            return
        buffer = {
            n: torch.empty((self.chunk, *p.shape), dtype=p.dtype) for n, p in self._params.items()
        }
        for idx in self._chunk_ranges():
            yield idx, self._make_chunk(idx, buffer)

    def tangent(self, r: int) -> dict[str, Tensor]:
        """Projection vector ``r`` as a parameter dict (for tests and inspection)."""
        if not 0 <= r < self.projections:
            raise IndexError(f"projection {r} of {self.projections}")
        if self._stored is not None:
            return {n: t[r % self.chunk] for n, t in self._stored[r // self.chunk].items()}
        return {n: t[0] for n, t in self._make_chunk(range(r, r + 1)).items()}

    # -- planning

    @torch.no_grad()
    def sample_bytes(self, sample: Tensor) -> int:
        """Estimated live activation bytes of one JVP stream per sample: ``LIVE_ACTIVATIONS``
        times the largest layer output of one forward of ``sample`` (no-grad JVPs free the rest)."""
        largest = sample[:1].numel() * sample.element_size()

        def hook(_module: nn.Module, _inputs: object, out: object) -> None:
            nonlocal largest
            if isinstance(out, Tensor):
                largest = max(largest, out[:1].numel() * out.element_size())

        handles = [m.register_forward_hook(hook) for m in self.teacher.modules()]
        try:
            self.teacher(sample[:1].to(self.device))
        finally:
            for h in handles:
                h.remove()
        return LIVE_ACTIVATIONS * largest

    def plan_batch(self, sample: Tensor) -> int:
        """The largest batch whose ``chunk + 1`` JVP streams fit ``activation_bytes``."""
        streams = (self.chunk + 1) * self.sample_bytes(sample)
        return max(1, self.budgets["activation"] // streams)

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
    def features(
        self,
        x: Tensor | Iterable,
        *,
        batch_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        out_device: torch.device | str | None = None,
    ) -> Tensor:
        """Projected features ``(N, C, R)``, ``φ[i, :, r] = J(x_i) v_r``, of a batch or a whole
        data set (a tensor, or an iterable of batches such as a DataLoader, re-batched here).

        Tangent chunks outside, batches inside: each chunk is made once and applied to every
        batch. ``batch_size`` defaults to `plan_batch`, evened out over the batches;
        ``progress(done, total)`` counts (chunk, batch) steps; the result lies on ``out_device``
        (default: the teacher's).
        """
        x_all = _images(x)
        n = x_all.shape[0]
        step = batch_size or self.plan_batch(x_all)
        if not batch_size:  # as many batches as planned, of equal sizes (no small tail)
            step = -(-n // -(-n // step)) if n else 1
        starts = range(0, n, step)
        total, done = len(self._chunk_ranges()) * len(starts), 0
        out: Tensor | None = None
        for idx, tangents in self._chunks():
            for s in starts:
                val = self._jvp_chunk(x_all[s : s + step].to(self.device), tangents)  # (T, B, C)
                if out is None:
                    shape = (n, val.shape[2], self.projections)
                    out = torch.empty(shape, dtype=val.dtype, device=out_device or self.device)
                out[s : s + val.shape[1], :, idx.start : idx.stop] = val.permute(1, 2, 0)
                done += 1
                if progress is not None:
                    progress(done, total)
        assert out is not None
        return out

    def features_dataset(
        self,
        x_all: Tensor,
        batch_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        out_device: torch.device | str = "cpu",
    ) -> Tensor:
        """`features` of a whole data set, kept on ``out_device`` (CPU), to cache once and index
        per minibatch."""
        return self.features(x_all, batch_size=batch_size, progress=progress, out_device=out_device)

    def kernel(self, x: Tensor, x2: Tensor | None = None) -> Tensor:
        """Projected NTK of a batch (or cross-kernel with ``x2``), computed from scratch."""
        phi = self.features(x)
        return kernel_from_features(phi, None if x2 is None else self.features(x2))

    kernel_from_features = staticmethod(kernel_from_features)
