"""Numeric oracles for the kernels of hil.ntkd: exact kernels against per-sample autograd loops, the
projected teacher kernel against its own closed-form error, and the loss pieces against closed
forms."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from hil.ntkd.alignment import cka, normalise, ntk_alignment_loss, ntk_mse
from hil.ntkd.exact import ntk_of, student_ntk
from hil.ntkd.factored import factored_ntk, ntk_and_outputs
from hil.ntkd.projected import ProjectedTeacher, kernel_from_features

F64 = torch.float64


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 10)
    ).to(F64)


def cnn() -> nn.Module:
    """Conv + BatchNorm (eval, with non-trivial running stats) + pooling: ~1.4k parameters."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 10),
    ).to(F64)
    bn = net[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def images(n: int, seed: int = 0, positive: bool = False, size: int = 8) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if positive:  # like real intensity images in [0, 1]
        return torch.rand(n, 1, size, size, generator=g, dtype=F64)
    return torch.randn(n, 1, size, size, generator=g, dtype=F64)


def jacobian_loop(model: nn.Module, x: Tensor, names: list[str] | None = None) -> Tensor:
    """(N, C, P): one autograd.grad per sample and per output class."""
    params = [p for n, p in model.named_parameters() if names is None or n in names]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1]).reshape(-1)
        per_class = []
        for c in range(out.shape[0]):
            grads = torch.autograd.grad(out[c], params, retain_graph=True)
            per_class.append(torch.cat([g.reshape(-1) for g in grads]))
        rows.append(torch.stack(per_class))
    return torch.stack(rows)


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- exact student kernel


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
def test_student_ntk_matches_jacobian_loop(make):
    model, x = make(), images(6)
    J = jacobian_loop(model, x)
    K_loop = torch.einsum("ncp,mcp->nm", J, J)
    K = student_ntk(model, x)
    assert K.shape == (6, 6)
    assert rel(K, K_loop) < 1e-5


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
def test_student_ntk_parameter_subset(make):
    model, x = make(), images(5, seed=1)
    names = [n for n, _ in model.named_parameters()][-3:]  # e.g. "the backend only"
    J = jacobian_loop(model, x, names)
    K = student_ntk(model, x, params=names)
    assert rel(K, torch.einsum("ncp,mcp->nm", J, J)) < 1e-5
    assert rel(K, student_ntk(model, x)) > 1e-3  # really a different kernel


def test_student_ntk_default_skips_frozen_parameters():
    model, x = mlp(), images(4)
    model[1].requires_grad_(False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert torch.allclose(student_ntk(model, x), student_ntk(model, x, params=trainable))


def test_student_ntk_cross_kernel_is_a_block_of_the_joint_kernel():
    model, x = cnn(), images(7, seed=2)
    joint = student_ntk(model, x)
    assert torch.allclose(student_ntk(model, x[:3], x2=x[3:]), joint[:3, 3:])
    assert torch.allclose(student_ntk(model, x, chunk_size=2), joint)


def test_student_ntk_rejects_batch_dependent_layers():
    model = cnn().train()
    with pytest.raises(ValueError, match="BatchNorm"):
        student_ntk(model, images(3))
    with pytest.raises(KeyError):
        student_ntk(cnn(), images(3), params=["nope.weight"])


def test_gradcheck_through_the_kernel():
    """Double backward through jacrev: gradcheck of ntk_mse(NTK(θ), K_fixed) w.r.t. θ."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    x = torch.randn(5, 3, dtype=F64)
    K_fixed = torch.randn(5, 7, dtype=F64)
    K_fixed = K_fixed @ K_fixed.T
    names = [n for n, _ in net.named_parameters()]
    inputs = tuple(p.detach().clone().requires_grad_(True) for p in net.parameters())

    def loss(*theta: Tensor) -> Tensor:
        def fn(p, sample):
            return functional_call(net, p, (sample.unsqueeze(0),))

        K = ntk_of(fn, dict(zip(names, theta, strict=True)), x)
        return ntk_mse(K, K_fixed, "diag") + ntk_alignment_loss(K, K_fixed)

    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7)


def test_student_ntk_gradient_matches_finite_difference():
    """The module entry point: loss.backward() fills .grad with the true directional derivative."""
    model, x = cnn(), images(4, seed=4)
    K_fixed = student_ntk(mlp(), images(4, seed=5)).detach()
    backend = ["3.weight", "3.bias", "6.weight", "6.bias"]  # differentiate w.r.t. these only
    loss = ntk_mse(student_ntk(model, x, params=backend), K_fixed, "frobenius")
    loss.backward()
    # the frontend gets gradients too (it shapes the backend's Jacobian); the last bias does not:
    # its Jacobian is the identity whatever θ is
    assert [n for n, p in model.named_parameters() if p.grad is None] == ["6.bias"]
    params = [p for p in model.parameters() if p.grad is not None]
    g = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=g, dtype=F64) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction, strict=True))
    eps, values = 1e-5, []
    with torch.no_grad():
        for sign in (1, -1):
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * eps * d)
            values.append(ntk_mse(student_ntk(model, x, params=backend), K_fixed, "frobenius"))
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(analytic - numeric) < 1e-6 * max(1.0, abs(numeric))


# --------------------------------------------------------------------------- projected teacher


def predicted_error(J: Tensor, R: int) -> float:
    """RMS relative Frobenius error of the R-projection estimate, in closed form.

    With v ~ N(0, I), K̂_ij = (1/R) Σ_r vᵀ M_ij v, M_ij = Σ_c J_icᵀ J_jc, so
    Var K̂_ij = (‖M_ij‖² + tr(M_ij²)) / R; both are sums of products of G = J Jᵀ entries.
    """
    G = torch.einsum("icp,jdp->icjd", J, J)
    K = torch.einsum("icjc->ij", G)
    var = torch.einsum("icid,jcjd->", G, G) + torch.einsum("jcid,jdic->", G, G)
    return (var / R).sqrt().item() / K.norm().item()


def projected_errors(model: nn.Module, x: Tensor, R: int, seeds=(0, 1, 2)) -> list[float]:
    K = student_ntk(model, x).detach()
    return [rel(kernel_from_features(ProjectedTeacher(model, R, s).features(x)), K) for s in seeds]


def rms(values: list[float]) -> float:
    return (sum(v * v for v in values) / len(values)) ** 0.5


@pytest.mark.parametrize(
    "make, positive", [(mlp, False), (cnn, False), (cnn, True)], ids=["mlp", "cnn", "cnn-images"]
)
def test_projected_kernel_error_matches_theory(make, positive):
    """R=64 and R=1024 errors agree with the closed form and fall like 1/sqrt(R).

    The closed form has a floor: with C classes the RMS error is at least about
    sqrt((1 + erank K) / (R·C)) ≥ sqrt(2 / (R·C)) = 5.6% at R=64, C=10 — see the report; a fixed 5%
    bound at R=64 is below what any Gaussian projection estimate can promise.
    """
    model, x = make(), images(16, seed=6, positive=positive)
    J = jacobian_loop(model, x)
    figures = {}
    for R in (64, 1024):
        errs = projected_errors(model, x, R)
        pred = predicted_error(J, R)
        figures[R] = (pred, errs)
        assert 0.4 * pred < rms(errs) < 1.5 * pred, (R, pred, errs)
    print({R: (round(p, 4), [round(e, 4) for e in es]) for R, (p, es) in figures.items()})
    assert rms(figures[1024][1]) < rms(figures[64][1]) / 2
    if positive:  # near rank-one image kernel: the error is at the floor, as the brief expects
        assert rms(figures[64][1]) < 0.07 and rms(figures[1024][1]) < 0.02


def test_features_deterministic_and_batch_independent():
    model, x = cnn(), images(12, seed=7)
    a = ProjectedTeacher(model, 10, seed=3)
    phi = a.features(x)
    assert phi.shape == (12, 10, 10)
    assert torch.equal(phi, ProjectedTeacher(model, 10, seed=3).features(x))
    assert not torch.allclose(phi, ProjectedTeacher(model, 10, seed=4).features(x))
    # sample i's features do not depend on which batch it came in (BatchNorm running stats)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a.features(x[perm]), phi[perm], rtol=1e-10, atol=1e-12)
    assert torch.allclose(a.features(x[5:6]), phi[5:6], rtol=1e-10, atol=1e-12)
    # nor on chunking, or on whether the tangents are stored or regenerated
    for kw in ({"chunk": 1}, {"chunk": 4, "max_tangent_bytes": 0}, {"chunk": 10}):
        assert torch.allclose(ProjectedTeacher(model, 10, 3, **kw).features(x), phi, atol=1e-12)
    assert model.training is False


def test_features_dataset_matches_features_and_reports_progress():
    model, x = cnn(), images(11, seed=8)
    pt = ProjectedTeacher(model, 6, seed=1, chunk=4, max_tangent_bytes=0)
    calls = []
    phi = pt.features_dataset(x, batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert torch.allclose(phi, pt.features(x), atol=1e-12)
    assert calls[-1] == (6, 6) and len(calls) == 6  # 2 chunks x 3 batches
    K = pt.kernel(x)
    assert torch.allclose(K, kernel_from_features(phi), atol=1e-12)
    assert torch.allclose(
        kernel_from_features(phi[:3], phi[3:]), K[:3, 3:], atol=1e-12
    )  # cross kernel of cached features
    assert torch.allclose(
        pt.tangent(2)["0.weight"], ProjectedTeacher(model, 6, 1).tangent(2)["0.weight"]
    )


def test_projected_teacher_takes_no_gradients():
    model = cnn().train()
    pt = ProjectedTeacher(model, 4)
    assert not model.training
    phi = pt.features(images(3))
    assert not phi.requires_grad
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.skipif(not os.environ.get("HIL_NTK_TIMING"), reason="timing; set HIL_NTK_TIMING=1")
def test_resnet18_features_timing():
    import torchvision

    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    x = torch.rand(128, 1, 8, 8)
    pt = ProjectedTeacher(net, 64, seed=0)
    pt.features(x[:2])
    t = time.perf_counter()
    phi = pt.features(x)
    print(f"resnet18 features, batch 128, R=64, chunk {pt.chunk}: {time.perf_counter() - t:.2f} s")
    assert phi.shape == (128, 10, 64)


# ------------------------------------------------------------------------ normalisation and losses


def random_psd(n: int, seed: int) -> Tensor:
    a = torch.randn(n, n + 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return a @ a.T


def test_normalise_closed_forms():
    K = torch.tensor([[2.0, 1.0], [1.0, 4.0]], dtype=F64)
    assert torch.equal(normalise(K, "none"), K)
    assert torch.allclose(normalise(K, "diag"), K / 3)
    assert torch.allclose(normalise(K, "frobenius"), K * 2 / (4 + 1 + 1 + 16) ** 0.5)
    n = 9
    assert torch.allclose(
        normalise(torch.eye(n, dtype=F64), "frobenius"), 3 * torch.eye(n, dtype=F64)
    )
    ones = torch.full((n, n), 7.0, dtype=F64)
    assert torch.allclose(normalise(ones, "frobenius"), torch.ones(n, n, dtype=F64))
    assert torch.allclose(
        normalise(random_psd(n, 0), "frobenius").pow(2).mean(), torch.tensor(1.0, dtype=F64)
    )
    with pytest.raises(ValueError):
        normalise(K, "trace")


def test_ntk_mse_is_scale_free_after_normalising():
    K1, K2 = random_psd(6, 1), random_psd(6, 2)
    assert ntk_mse(K1, 50 * K1, "diag").item() < 1e-24
    assert ntk_mse(K1, 50 * K1, "frobenius").item() < 1e-24
    assert torch.allclose(ntk_mse(K1, K2, "none"), (K1 - K2).pow(2).mean())


def test_cka_properties():
    K1, K2 = random_psd(8, 3), random_psd(8, 4)
    one = torch.tensor(1.0, dtype=F64)
    assert torch.allclose(cka(K1, K1), one)
    assert torch.allclose(cka(K1, 0.01 * K1), one)
    assert torch.allclose(cka(K1, K1 + 5.0), one)  # centring removes a constant
    assert 0.0 <= cka(K1, K2).item() <= 1.0
    assert torch.allclose(ntk_alignment_loss(K1, 3 * K1), torch.zeros((), dtype=F64), atol=1e-12)
    # HSIC form with an explicit centring matrix
    H = torch.eye(8, dtype=F64) - 1 / 8
    hsic = lambda a, b: torch.trace(a @ H @ b @ H)  # noqa: E731
    assert torch.allclose(cka(K1, K2), hsic(K1, K2) / (hsic(K1, K1) * hsic(K2, K2)).sqrt())


def test_projected_kernel_within_five_percent_at_64_projections_on_a_wide_output_network():
    """The issue's 5% at R = 64, where the estimator can promise it: the floor is
    sqrt((1 + erank K) / (R·C)), so a small image network with C = 32 outputs sits near 3%."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 32)
    ).double()
    x = images(16, seed=6, positive=True)
    errors = projected_errors(model, x, 64)
    assert max(errors) < 0.05, errors


@pytest.mark.parametrize("backend", ["fc2", "conv"])
@pytest.mark.parametrize("subset", [None, "backend"])
def test_factored_kernel_equals_the_jacobian_kernel_with_its_gradients(backend, subset):
    from hil.models.onn import ONN, StudentSpec

    model = ONN(StudentSpec(kernels=3, kernel_size=5, image_size=12, hidden=8, backend=backend))
    model = model.double()
    names = None if subset is None else [n for n, _ in model.named_parameters() if "backend" in n]
    x = images(6, seed=3, positive=True, size=12)
    exact, fast = student_ntk(model, x, names), factored_ntk(model, x, names)
    assert rel(fast, exact) < 1e-10
    params = list(model.parameters())
    g_exact = torch.autograd.grad(exact.square().sum(), params, allow_unused=True)
    g_fast = torch.autograd.grad(fast.square().sum(), params, allow_unused=True)
    for a, b in zip(g_exact, g_fast, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel(b, a) < 1e-9


# ------------------------------------------------------- batched closed-form kernel (factored_ntk)


def onn(**spec) -> nn.Module:
    from hil.models.onn import ONN, StudentSpec

    base = {"kernels": 3, "kernel_size": 5, "image_size": 12, "hidden": 6}
    return ONN(StudentSpec(**(base | spec))).double()


def no_fallback(monkeypatch) -> None:
    """Make the per-sample vmap path fail, so a passing test ran the batched closed forms."""
    import hil.ntkd.factored

    def fail(*args, **kwargs):
        raise AssertionError("fell back to the vmap path")

    monkeypatch.setattr(hil.ntkd.factored, "_factored_ntk_vmap", fail)


SUBSETS = {
    "all": None,
    "backend": lambda n: "backend" in n,
    "psf": lambda n: n == "frontend.raw",
    "psf+gain+fc": lambda n: n in ("frontend.raw", "backend.0.gain") or n.endswith("3.weight"),
    "offset+bias": lambda n: n.endswith("offset") or n.endswith("3.bias"),
}


# (image size, backend, signed, subset): at 12 px the fc backends pool 4x4 blocks, the fast
# case; at 14 px the 3x3 pool is uneven and the frontend runs at full size
BATCHED_CASES = [
    *[(12, "fc2", signed, subset) for signed in (True, False) for subset in SUBSETS],
    *[(12, "fc3", signed, subset) for signed in (True, False) for subset in ("all", "backend")],
    (14, "fc2", True, "all"),
    (14, "fc2", True, "psf+gain+fc"),
    (14, "fc3", False, "all"),
]


@pytest.mark.parametrize("size, backend, signed, subset", BATCHED_CASES)
def test_batched_kernel_equals_the_jacobian_kernel_with_its_gradients(
    monkeypatch, size, backend, signed, subset
):
    """PSF frontend + fc backends through the closed forms: kernel, cross-kernel and the
    gradients of both w.r.t. every parameter (frontend, map gains, backend) agree with
    student_ntk, whichever parameters the kernel is taken over."""
    model = onn(backend=backend, signed=signed, image_size=size)
    pick = SUBSETS[subset]
    names = None if pick is None else [n for n, _ in model.named_parameters() if pick(n)]
    x = images(6, seed=3, positive=True, size=size)
    x2 = images(4, seed=4, positive=True, size=size)
    exact = student_ntk(model, x, names)
    exact2 = student_ntk(model, x, names, x2=x2)
    calls = []
    model.frontend.register_forward_hook(lambda *args: calls.append(1))
    no_fallback(monkeypatch)
    fast, fast2 = factored_ntk(model, x, names), factored_ntk(model, x, names, x2=x2)
    # at 12 px the fc backend pools 4x4 blocks: the frontend runs pooled, never at full size
    assert (len(calls) == 0) == (size == 12)
    assert fast2.shape == (6, 4)
    assert rel(fast, exact) < 1e-10 and rel(fast2, exact2) < 1e-10
    params = list(model.parameters())
    for e, f in ((exact, fast), (exact2, fast2)):
        loss_e, loss_f = (ntk_mse(k, k.detach().flip(0), "diag") for k in (e, f))
        # a parameter the kernel does not depend on gets None or zeros: both mean zero
        g_exact = torch.autograd.grad(loss_e, params, allow_unused=True, materialize_grads=True)
        g_fast = torch.autograd.grad(loss_f, params, allow_unused=True, materialize_grads=True)
        scale = torch.stack([a.norm() for a in g_exact]).norm()
        for a, b in zip(g_exact, g_fast, strict=True):
            # some blocks are zero up to rounding: a floor from the whole
            assert (b - a).norm() <= 1e-9 * a.norm() + 1e-13 * scale


@pytest.mark.parametrize("size", [12, 14])
def test_the_kernel_and_the_logits_from_one_forward_equal_both_taken_apart(monkeypatch, size):
    """`ntk_and_outputs`: the kernel is `student_ntk`'s and the logits the model's own, and a
    loss of both (CE + NTK, as NTKD's) has the gradients of the two computed separately."""
    model = onn(image_size=size)
    x, y = images(6, seed=7, positive=True, size=size), torch.arange(6) % 10
    params = list(model.parameters())

    def loss(k: Tensor, logits: Tensor) -> Tensor:
        return nn.functional.cross_entropy(logits, y) + ntk_mse(k, k.detach().flip(0), "diag")

    k_apart, logits_apart = student_ntk(model, x), model(x)
    g_apart = torch.autograd.grad(loss(k_apart, logits_apart), params)
    no_fallback(monkeypatch)
    k, logits = ntk_and_outputs(model, x)
    assert rel(k, k_apart) < 1e-10 and rel(logits, logits_apart) < 1e-12
    for a, b in zip(g_apart, torch.autograd.grad(loss(k, logits), params), strict=True):
        assert (b - a).norm() <= 1e-9 * a.norm() + 1e-14


def test_one_forward_leaves_logit_maps_to_the_caller():
    """A model whose outputs are maps gets no kernel (its NTK is taken of pooled logits) and
    its outputs exactly."""
    model = nn.Sequential(onn().frontend)  # the closed form covers it; its outputs are maps
    x = images(2, seed=1, size=12)
    k, out = ntk_and_outputs(model, x)
    assert k is None and torch.equal(out, model(x))


@pytest.mark.parametrize("head", ["relu", "tanh", "sigmoid", "gelu"])
def test_every_backend_head_gives_the_jacobian_kernel_and_its_gradients(monkeypatch, head):
    """The δ walked back through a head of Linear and ReLU / Tanh / Sigmoid, and the autograd
    δ where the walk stops (GELU), give student_ntk's kernel and gradients alike."""
    from hil.models.onn import MapAffine

    torch.manual_seed(2)
    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}[head]
    front = onn().frontend
    model = nn.Sequential(
        front,
        MapAffine(front.kernels),
        nn.AdaptiveAvgPool2d(3),
        nn.Flatten(),
        nn.Linear(3 * 9, 7),
        act(),
        nn.Dropout(0.5),
        nn.Linear(7, 4),
    ).double()
    model.eval()
    x = images(5, seed=8, positive=True, size=12)
    exact = student_ntk(model, x)
    no_fallback(monkeypatch)
    import hil.ntkd.factored

    walked, walk = [], hil.ntkd.factored._walked_deltas
    monkeypatch.setattr(
        hil.ntkd.factored, "_walked_deltas", lambda *a: walked.append(walk(*a)) or walked[-1]
    )
    fast = factored_ntk(model, x)
    assert (walked[0] is None) == (head == "gelu")  # the walk knows every layer but GELU
    assert rel(fast, exact) < 1e-10
    params = list(model.parameters())
    g = [
        torch.autograd.grad(
            ntk_mse(k, k.detach().flip(0), "diag"),
            params,
            allow_unused=True,
            materialize_grads=True,
        )
        for k in (exact, fast)
    ]
    for a, b in zip(*g, strict=True):
        assert (b - a).norm() <= 1e-9 * a.norm() + 1e-14


def test_gradcheck_through_the_batched_kernel(monkeypatch):
    """gradcheck of the NTKD losses w.r.t. every parameter of a tiny PSF + fc2 student (79
    numbers: PSFs through softplus, map gains and offsets, both Linear layers)."""
    model = onn(kernels=2, kernel_size=3, image_size=8, hidden=3, classes=3)
    names = [n for n, _ in model.named_parameters()]
    x = images(4, seed=5, positive=True)
    K_fixed = random_psd(4, 6)
    no_fallback(monkeypatch)

    class Kernel(nn.Module):
        def __init__(self, student: nn.Module) -> None:
            super().__init__()
            self.student = student

        def forward(self, x: Tensor) -> Tensor:
            return factored_ntk(self.student, x)

    def loss(*theta: Tensor) -> Tensor:
        p = {f"student.{n}": t for n, t in zip(names, theta, strict=True)}
        K = functional_call(Kernel(model), p, (x,))
        return ntk_mse(K, K_fixed, "diag") + ntk_alignment_loss(K, K_fixed)

    theta = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    assert torch.autograd.gradcheck(loss, theta, eps=1e-6, atol=1e-7)


def test_batched_kernel_without_gradients_and_with_a_frozen_frontend(monkeypatch):
    """Under no_grad (the NTK regression estimate) the kernel is the same and carries no graph;
    after fabrication (frozen frontend) the default kernel is the backend's."""
    model = onn()
    x = images(5, seed=7, positive=True, size=12)
    exact = student_ntk(model, x).detach()
    no_fallback(monkeypatch)
    with torch.no_grad():
        k = factored_ntk(model, x)
    assert not k.requires_grad and rel(k, exact) < 1e-10
    model.freeze_frontend()
    backend = [n for n, _ in model.named_parameters() if "backend" in n]
    assert rel(factored_ntk(model, x), student_ntk(model, x, backend)) < 1e-10


def test_factored_kernel_falls_back_where_the_closed_forms_stop(monkeypatch):
    """4f masks and convolutional layers go through the vmap path; a 4f student's backend
    kernel (compensation) still takes the closed forms, with the 4f frontend run as it is."""
    import hil.ntkd.factored

    fourier = onn(frontend="4f", kernels=2, image_size=8)
    conv = onn(backend="conv")
    used = []
    vmap_path = hil.ntkd.factored._factored_ntk_vmap
    monkeypatch.setattr(
        hil.ntkd.factored,
        "_factored_ntk_vmap",
        lambda *a, **k: used.append(1) or vmap_path(*a, **k),
    )
    x8, x12 = images(4, seed=8, positive=True), images(4, seed=8, positive=True, size=12)
    backend = [n for n, _ in fourier.named_parameters() if "backend" in n]
    for model, x, names, falls_back in (
        (fourier, x8, None, True),
        (fourier, x8, backend, False),
        (conv, x12, None, True),
    ):
        used.clear()
        assert rel(factored_ntk(model, x, names), student_ntk(model, x, names)) < 1e-10
        assert bool(used) == falls_back


def test_batched_kernel_on_plain_chains(monkeypatch):
    """The closed forms are not tied to ONN: an nn.Sequential with an FFT-convolving PSF layer
    (13x13), an AvgPool2d instead of the adaptive pool, three input channels, no MapAffine."""
    from hil.models.onn import MapAffine
    from sim.psf_frontend import PSFFrontend

    torch.manual_seed(0)
    chains = [
        nn.Sequential(
            PSFFrontend(3, 13, method="fft"),
            MapAffine(3),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(3 * 36, 4),
            nn.Tanh(),
            nn.Linear(4, 3),
        ),
        nn.Sequential(
            PSFFrontend(2, 3, channels=3, signed=False),
            nn.AvgPool2d(3),
            nn.Flatten(),
            nn.Linear(2 * 16, 3),
        ),
    ]
    no_fallback(monkeypatch)
    for net, channels in zip(chains, (1, 3), strict=True):
        net = net.double()
        x = torch.rand(5, channels, 12, 12, generator=torch.Generator().manual_seed(1), dtype=F64)
        assert rel(factored_ntk(net, x), student_ntk(net, x)) < 1e-10
