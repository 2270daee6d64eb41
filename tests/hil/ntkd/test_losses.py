"""The NTKD loss's terms against their pieces computed apart."""

from __future__ import annotations

import pytest
import torch

from hil.data.datasets import digits
from hil.models.onn import ONN, StudentSpec
from hil.models.teachers import build_teacher
from hil.ntkd.alignment import ntk_mse
from hil.ntkd.factored import factored_ntk
from hil.ntkd.losses import KD, NTKD
from hil.ntkd.projected import kernel_from_features
from hil.training.loop import Settings
from hil.training.student import train_student

SMALL = StudentSpec(kernels=2, kernel_size=3, image_size=16, hidden=16)


def batch(n: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.rand(n, 1, 16, 16, generator=g),
        "y": torch.arange(n) % 10,
        "teacher_features": torch.randn(n, 10, 5, generator=g),
        "teacher_logits": torch.randn(n, 10, generator=g),
    }


@pytest.mark.parametrize("kd_weight", [0.0, 0.9])
def test_ntkd_is_its_label_term_plus_beta_times_the_kernel_distance(kd_weight):
    """CE (or, with kd_weight, KD's mix of CE and the softened KL) plus β · the MSE of the
    diag-normalised kernels, each computed by its own code."""
    torch.manual_seed(1)
    model, b = ONN(SMALL), batch()
    terms = NTKD(beta=3.0, kd_weight=kd_weight)(model, b)
    label = KD(weight=kd_weight)(model, b)["total"]  # weight 0: plain CE
    ntk = ntk_mse(factored_ntk(model, b["x"]), kernel_from_features(b["teacher_features"]))
    assert torch.allclose(terms["ntk"], ntk, rtol=1e-5)
    assert torch.allclose(terms["total"], label + 3.0 * ntk, rtol=1e-5)
    assert ("kd" in terms) == (kd_weight > 0)


def test_ntkd_with_kd_trains_on_cached_logits_and_features():
    """A student trained with NTK + KD reads both of the teacher's caches every step."""
    teacher = build_teacher("lenet", 1, 10)
    _, record = train_student(
        SMALL,
        digits(),
        "ntkd",
        Settings(epochs=1, batch_size=512),
        teacher=teacher,
        loss_options={"kd_weight": 0.9},
        projections=2,
    )
    epoch = record["history"][0]
    assert epoch["kd"] > 0 and epoch["ntk"] > 0
    assert epoch["total"] == pytest.approx(0.1 * epoch["ce"] + 0.9 * epoch["kd"] + epoch["ntk"])
