"""Numeric oracles for hil.ntkd.projected: the projected features against the Jacobian of an
autograd loop times each tangent drawn by the documented recipe, whatever the chunking, batching
and tangent storage; the draw and the cache pinned to the values of the first implementation; the
memory plan against its closed form."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import hil.ntkd.projected as projected
from hil.models.teachers import resnet18
from hil.ntkd.projected import ProjectedTeacher, default_budget

F64 = torch.float64


def cnn(dtype: torch.dtype = F64) -> nn.Module:
    """Conv + BatchNorm (eval, non-trivial running stats) + strided conv + linear: 477 params."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    ).to(dtype)
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def images(n: int, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)


def recipe_tangent(model: nn.Module, seed: int, r: int) -> Tensor:
    """Tangent r as the class docstring states it: N(0, I) from a CPU generator seeded by
    SeedSequence((seed, r)), drawn parameter by parameter in named_parameters order."""
    state = np.random.SeedSequence((seed, r)).generate_state(1, np.uint64)[0]
    gen = torch.Generator().manual_seed(int(state) & (2**63 - 1))
    parts = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]
    return torch.cat([p.reshape(-1) for p in parts])


def jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """(N, C, P) by one autograd.grad per sample and per output."""
    params = list(model.parameters())
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1]).reshape(-1)
        grads = [torch.autograd.grad(o, params, retain_graph=True) for o in out]
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in grads]))
    return torch.stack(rows)


def oracle(model: nn.Module, x: Tensor, projections: int, seed: int) -> Tensor:
    J = jacobian(model, x)
    V = torch.stack([recipe_tangent(model, seed, r) for r in range(projections)], dim=1)
    return J @ V  # (N, C, R)


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "regenerated"])
@pytest.mark.parametrize("chunk, batch", [(1, 1), (3, 4), (7, None), (2, 9)])
def test_features_are_the_jacobian_times_each_tangent(keep, chunk, batch):
    model, x = cnn(), images(9)
    want = oracle(model, x, 7, seed=3)
    pt = ProjectedTeacher(model, 7, seed=3, chunk=chunk, max_tangent_bytes=None if keep else 0)
    assert (pt._stored is not None) is keep
    phi = pt.features(x, batch_size=batch)
    assert phi.shape == (9, 5, 7)
    assert rel(phi, want) < 1e-10
    assert torch.equal(pt.tangent(4)["3.weight"].reshape(-1), recipe_tangent(model, 3, 4)[72:288])


def test_float32_features_match_the_oracle_to_float32_precision():
    model, x = cnn(torch.float32), images(6, torch.float32)
    V = torch.stack([recipe_tangent(model, 0, r) for r in range(5)], dim=1)  # float32 draws
    want = jacobian(copy.deepcopy(model).to(F64), x.to(F64)) @ V.to(F64)
    phi = ProjectedTeacher(model, 5, seed=0, chunk=2).features(x)
    assert phi.dtype == torch.float32
    assert rel(phi.to(F64), want) < 1e-5


def test_draw_and_cache_are_those_of_the_first_implementation():
    """Values computed by the implementation cached features were written with (chunks of 3,
    batches of 4, tangents regenerated): existing caches stay valid."""
    pt = ProjectedTeacher(cnn(), 7, seed=3, chunk=3, max_tangent_bytes=0)
    phi = pt.features_dataset(images(9), batch_size=4)
    pinned = {
        "t0": (
            pt.tangent(0)["0.weight"].flatten()[:3],
            [-0.847284660769, -0.325848234965, 0.0748074409],
        ),
        "t6": (pt.tangent(6)["6.bias"][:3], [0.347542122047, -1.876725161356, -0.262622386048]),
        "phi": (
            phi[[0, 4, 8], [0, 2, 4], [0, 3, 6]],
            [-3.832315479143, -1.161826651604, -2.7754935209],
        ),
        "sums": (torch.stack([phi.sum(), phi.abs().sum()]), [-8.170529441178, 612.435574699767]),
    }
    for name, (got, want) in pinned.items():
        assert torch.allclose(got, torch.tensor(want, dtype=F64), rtol=1e-9, atol=0), name


def test_each_chunk_is_made_once_per_call_whatever_the_batches(monkeypatch):
    model, x = cnn(), images(11)
    pt = ProjectedTeacher(model, 6, seed=1, chunk=4, max_tangent_bytes=0)
    made = []
    real = pt._make_chunk
    monkeypatch.setattr(pt, "_make_chunk", lambda idx, *a: made.append(idx) or real(idx, *a))
    steps = []
    phi = pt.features(x, batch_size=2, progress=lambda d, t: steps.append((d, t)))
    assert made == [range(0, 4), range(4, 6)]  # not once per batch of 2
    assert steps[-1] == (12, 12) and len(steps) == 12  # 2 chunks x 6 batches
    assert rel(phi, oracle(model, x, 6, seed=1)) < 1e-10


def test_planned_batches_are_even_and_give_the_same_features(monkeypatch):
    model, x = cnn(), images(15)
    pt = ProjectedTeacher(model, 3, seed=5, activation_bytes=2**19)
    assert pt.plan_batch(x) == 2**19 // (4 * projected.LIVE_ACTIVATIONS * 6 * 64 * 8) == 10
    sizes = []
    real = pt._jvp_chunk
    monkeypatch.setattr(pt, "_jvp_chunk", lambda xb, t: sizes.append(len(xb)) or real(xb, t))
    phi = pt.features(x)
    assert sizes == [8, 7]  # two batches, as planned, not 10 + 5
    assert rel(phi, oracle(model, x, 3, seed=5)) < 1e-10


def test_a_loader_gives_the_features_of_its_images():
    model, x = cnn(), images(10)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.arange(10)), batch_size=3
    )
    pt = ProjectedTeacher(model, 4, seed=2)
    phi = pt.features(loader)
    assert torch.allclose(phi, pt.features(x), rtol=0, atol=1e-12)
    assert torch.allclose(pt.features([x[:4], x[4:]], batch_size=5), phi, rtol=0, atol=1e-12)


def test_memory_plan_closed_form():
    """Chunk: the tangents that fit chunk_bytes; batch: the chunk + 1 JVP streams that fit
    activation_bytes; all tangents kept only when they fit max_tangent_bytes."""
    model, x = cnn(), images(3)
    tangent = 8 * 477  # float64 parameters
    sample = projected.LIVE_ACTIVATIONS * 6 * 8 * 8 * 8  # the conv/BatchNorm/ReLU outputs
    pt = ProjectedTeacher(model, 64, chunk_bytes=5 * tangent + 7, activation_bytes=2**20)
    assert pt.chunk == 5
    assert pt.sample_bytes(x) == sample
    assert pt.plan_batch(x) == 2**20 // (6 * sample) == 14
    assert ProjectedTeacher(model, 4, chunk_bytes=5 * tangent).chunk == 4
    tiny = ProjectedTeacher(model, 64, chunk=60, activation_bytes=2**18)
    assert tiny.plan_batch(x) == 1  # a step past its budget still runs, one sample at a time
    assert ProjectedTeacher(model, 64, max_tangent_bytes=64 * tangent)._stored is not None
    assert ProjectedTeacher(model, 64, max_tangent_bytes=64 * tangent - 1)._stored is None
    assert ProjectedTeacher(resnet18(1, 10), 64).chunk == 8  # the CPU default: 360 MiB


def test_default_budget_is_a_quarter_of_free_cuda_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (8 * 2**30, 16 * 2**30))
    assert default_budget(torch.device("cuda", 0), 123) == 2 * 2**30
    assert default_budget(torch.device("cpu"), 123) == 123
