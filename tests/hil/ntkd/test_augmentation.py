"""Fabrication-error augmentation: off changes nothing, on draws errors of the configured sizes
that act as sim/'s fabrication physics does, and gradients still reach the designed PSFs."""

from __future__ import annotations

import numpy as np
import torch

from hil.data.datasets import digits
from hil.models.onn import ONN, StudentSpec
from hil.ntkd.augment import FabricatedStudent, FabricationAugment, draw_optic
from hil.ntkd.factored import factored_ntk
from hil.ntkd.losses import build_loss
from hil.training.loop import Settings
from hil.training.student import train_student
from sim.fabrication import perturb_psfs, warp_image
from sim.params import FabricationParams
from sim.psf_frontend import PSFFrontend

F64 = torch.float64
SPEC = StudentSpec(kernels=3, kernel_size=5, image_size=12, hidden=8)
OFF = FabricationAugment(gain=0, shift_px=0, rotation_deg=0, kernel_error=0, noise=0)


def only(**sizes) -> FabricationAugment:
    return FabricationAugment(**(OFF.to_dict() | sizes))


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed), dtype=F64)


def view(augment: FabricationAugment, x: torch.Tensor, idx=(0, 1, 2)):
    """A float64 student seen through the optic drawn for batch `idx`; its training input."""
    net = FabricatedStudent(ONN(SPEC).double(), augment).train()
    return net, net.redraw(torch.tensor(idx), x)


def test_zero_sized_errors_train_bit_for_bit_as_no_augmentation():
    data, settings = digits(), Settings(epochs=1, batch_size=256)
    small = StudentSpec(kernels=2, kernel_size=3, image_size=16, hidden=16)
    plain, r0 = train_student(small, data, "ce", settings)
    zero, r1 = train_student(small, data, "ce", settings, augment=OFF)
    for (name, a), b in zip(plain.state_dict().items(), zero.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert r0["test_accuracy"] == r1["test_accuracy"] and r1["augment"] == OFF.to_dict()


def test_eval_mode_sees_the_designed_optic():
    x = images(3)
    net, _ = view(FabricationAugment(noise=0.0), x)
    assert not torch.equal(net(x), net.inner(x))  # training: a perturbed optic
    net.eval()
    assert torch.equal(net(x), net.inner(x))


def test_drawn_errors_have_the_configured_sizes():
    augment = FabricationAugment(gain=0.1, shift_px=0.7, rotation_deg=0.5, kernel_error=0.2)
    gen = torch.Generator().manual_seed(0)
    draws = [draw_optic(augment, (6, 1, 5, 5), gen) for _ in range(4000)]
    gains = np.array([d.gain for d in draws])
    shifts = np.array([d.shift_px for d in draws])
    rotations = np.array([d.rotation_deg for d in draws])
    factors = torch.stack([d.psf_factor for d in draws])
    assert abs(gains.mean() - 1) < 0.01 and abs(gains.std() / 0.1 - 1) < 0.04
    assert np.all(np.abs(shifts.std(0) / 0.7 - 1) < 0.04) and np.all(np.abs(shifts.mean(0)) < 0.04)
    assert abs(rotations.std() / 0.5 - 1) < 0.04
    assert abs(factors.mean().item() - 1) < 0.005 and abs(factors.std().item() / 0.2 - 1) < 0.01
    # one draw's PSF factor varies pixel to pixel, not just from batch to batch
    assert abs(draws[0].psf_factor.std().item() / 0.2 - 1) < 0.3


def test_sensor_noise_is_the_configured_fraction_of_each_samples_rms():
    x = images(64, seed=1)
    net, packed = view(only(noise=0.05), x)
    clean = net.inner.features(x)
    eps = net.fabricated_features(packed) - clean
    rms = clean.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
    assert abs((eps / rms).std().item() / 0.05 - 1) < 0.02
    assert packed.shape == (64, 1 + SPEC.kernels, 12, 12)  # image, then ε's draws per map


def test_each_error_acts_as_the_fabrication_physics_does():
    x = images(3, seed=2)
    net, packed = view(only(gain=0.3), x)
    assert torch.allclose(net.fabricated_features(packed), net.draw.gain * net.inner.features(x))
    net, packed = view(only(shift_px=1.5, rotation_deg=2.0), x)
    d = net.draw
    assert d.shift_px != (0.0, 0.0)
    warped = warp_image(x, d.shift_px, d.rotation_deg)
    assert torch.allclose(net.fabricated_features(packed), net.inner.features(warped))
    # δ: the same draws make sim's fabricated PSFs (perturb_psfs after the 4 scalar draws)
    net, packed = view(only(kernel_error=0.15), x)
    entropy = np.random.SeedSequence([0, 0, 1, 2]).generate_state(1, np.uint64)[0]
    gen = torch.Generator().manual_seed(int(entropy) & (2**63 - 1))
    torch.randn(4, generator=gen, dtype=F64)
    psfs = net.inner.frontend.psfs.detach().float()  # the draws are float32 whatever the model
    fabricated = PSFFrontend(3, 5, psfs=perturb_psfs(psfs, 0.15, gen), trainable=False).double()
    assert torch.allclose(net.fabricated_features(packed), fabricated(x))


def test_gradients_reach_the_frontend_through_every_error():
    x, y = images(8, seed=3), torch.arange(8) % 10
    augment = FabricationAugment(gain=0.1, shift_px=0.5, rotation_deg=0.5, kernel_error=0.1)
    net, packed = view(augment, x, idx=range(8))
    loss = build_loss("ce")
    loss(net, {"x": packed, "y": y})["total"].backward()
    g_aug = net.inner.frontend.raw.grad.clone()
    net.zero_grad()
    loss(net.inner, {"x": x, "y": y})["total"].backward()
    g_plain = net.inner.frontend.raw.grad
    assert g_aug.abs().sum() > 0 and not torch.allclose(g_aug, g_plain, rtol=1e-3)


def test_the_kernel_through_a_fabricated_optic_equals_a_per_sample_loop():
    """NTKD's kernel is taken one sample at a time (vmap): it must see each sample's own noise."""
    x = images(4, seed=4)
    net, packed = view(FabricationAugment(shift_px=0.8, kernel_error=0.1, noise=0.05), x)
    params = list(net.parameters())
    rows = []
    for i in range(len(x)):
        out = net(packed[i : i + 1]).reshape(-1)
        grads = [torch.autograd.grad(o, params, retain_graph=True) for o in out]
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in grads]))
    jac = torch.stack(rows)
    expected = torch.einsum("ncp,mcp->nm", jac, jac)
    assert ((factored_ntk(net, packed) - expected).norm() / expected.norm()).item() < 1e-5
    names = [n for n, _ in net.named_parameters()]
    assert names == [n for n, _ in net.inner.named_parameters()]  # checkpoints carry over


def test_a_batch_draws_the_same_optic_whenever_it_comes_again():
    x = images(3)
    net, a = view(FabricationAugment(), x, idx=(5, 9, 2))
    first = net.draw
    b = net.redraw(torch.tensor([5, 9, 2]), x)
    assert torch.equal(a, b) and first.gain == net.draw.gain
    assert net.redraw(torch.tensor([5, 9, 3]), x)[:, 1:].ne(a[:, 1:]).any()


def test_sizes_from_a_bench_fabrication():
    params = FabricationParams(gain=0.8, shift_px=(3.0, -4.0), rotation_deg=-1.0)
    augment = FabricationAugment.from_fabrication(params, noise=0.02)
    assert abs(augment.gain - 0.2) < 1e-12
    assert abs(augment.shift_px - np.sqrt(12.5)) < 1e-12 and augment.rotation_deg == 1.0
    assert augment.kernel_error == params.kernel_error and augment.noise == 0.02
