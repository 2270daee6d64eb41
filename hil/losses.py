"""Training losses in a registry; each returns a dict of named terms with the sum under "total".

`ce` (no transfer), `kd` (Hinton: soft teacher logits at a temperature), `ntkd` (α·CE + β·a
distance between the normalised student and teacher neural tangent kernels of the batch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hil import ntk

Batch = dict[str, torch.Tensor]


class CE:
    """Cross-entropy on the labels: training without a teacher."""

    needs: frozenset[str] = frozenset()

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(model(batch["x"]), batch["y"])
        return {"ce": ce, "total": ce}


class KD:
    """(1 − w)·CE + w·T²·KL(teacher ‖ student) at temperature T (Hinton et al. 2015)."""

    needs = frozenset({"teacher_logits"})

    def __init__(self, temperature: float = 4.0, weight: float = 0.9) -> None:
        self.temperature, self.weight = temperature, weight

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits, t = model(batch["x"]), self.temperature
        ce = F.cross_entropy(logits, batch["y"])
        kl = F.kl_div(
            F.log_softmax(logits / t, dim=1),
            F.log_softmax(batch["teacher_logits"] / t, dim=1),
            log_target=True,
            reduction="batchmean",
        ) * (t * t)
        return {"ce": ce, "kd": kl, "total": (1 - self.weight) * ce + self.weight * kl}


class NTKD:
    """α·CE + β·L_NTK, where L_NTK compares the student's exact NTK of the batch with the
    teacher's projected one (cached per sample), both normalised (`norm`), by mean squared
    difference (`variant="mse"`) or by 1 − CKA (`variant="cka"`).

    `params` names the student parameters the kernel is taken over (after fabrication: the
    backend's); by default every trainable one.
    """

    needs = frozenset({"teacher_features"})

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        norm: str = "diag",
        variant: str = "mse",
        params: list[str] | None = None,
    ) -> None:
        if variant not in ("mse", "cka"):
            raise ValueError(f"unknown NTKD variant {variant!r} (mse or cka)")
        self.alpha, self.beta, self.norm, self.variant = alpha, beta, norm, variant
        self.params = params

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits = model(batch["x"])
        ce = F.cross_entropy(logits, batch["y"])
        core = getattr(model, "module", model)  # the kernel is per sample: no DDP wrapper
        k_student = ntk.factored_ntk(core, batch["x"], self.params)
        k_teacher = ntk.kernel_from_features(batch["teacher_features"])
        if self.variant == "mse":
            term = ntk.ntk_mse(k_student, k_teacher, self.norm)
        else:
            term = ntk.ntk_alignment_loss(k_student, k_teacher)
        return {"ce": ce, "ntk": term, "total": self.alpha * ce + self.beta * term}


LOSSES: dict[str, Callable[..., object]] = {"ce": CE, "none": CE, "kd": KD, "ntkd": NTKD}


def build_loss(method: str, **options):
    if method not in LOSSES:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(LOSSES)}")
    return LOSSES[method](**options)
