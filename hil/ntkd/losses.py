"""Training losses in a registry; each returns a dict of named terms with the sum under "total".

`ce` (no transfer), `kd` (Hinton: soft teacher logits at a temperature), `ntkd` (α·CE + β·a
distance between the normalised student and teacher neural tangent kernels of the batch).

Segmentation (logits (N, C, H, W), masks (N, H, W)): CE and KD are per pixel over the pixels not
labelled IGNORE (the display outside the placed image); the NTK is traced over pooled logits,
the logit map of the image's region averaged to a `pool` x `pool` grid, so it stays batch x batch
and matches the teacher's features, which are cached per sample for the same pooled grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hil.data.placement import Region
from hil.errors import UserError
from hil.models.views import SharedView
from hil.ntkd.alignment import ntk_alignment_loss, ntk_mse
from hil.ntkd.factored import factored_ntk, ntk_and_outputs
from hil.ntkd.projected import kernel_from_features
from hil.training.loop import IGNORE

Batch = dict[str, torch.Tensor]


def pool_logits(logits: torch.Tensor, pool: int, region: Region | None = None) -> torch.Tensor:
    """(N, C, H, W) → (N, C·pool²): the region's logits averaged over a pool x pool grid."""
    if region is not None:
        top, left, h, w = region
        logits = logits[..., top : top + h, left : left + w]
    return F.adaptive_avg_pool2d(logits, pool).flatten(1)


class PooledLogits(SharedView):
    """`inner` with its logit map pooled (`pool_logits`): what a segmentation NTK is taken of."""

    def __init__(self, inner: nn.Module, pool: int, region: Region | None = None) -> None:
        super().__init__(inner)
        # odd names: the view shares its namespace with inner's children (a UNet has a `pool`)
        self.view_grid, self.view_region = int(pool), region

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_logits(self.inner(x), self.view_grid, self.view_region)


def pooled_ntk(
    model: nn.Module,
    x: torch.Tensor,
    pool: int,
    region: Region | None = None,
    params: list[str] | None = None,
) -> torch.Tensor:
    """Exact NTK (N, N) of a segmentation model traced over its pooled logits: in closed form
    where `ntk_and_outputs` covers the model, else through the view's generic kernel."""
    kernel = ntk_and_outputs(model, x, params, pool=pool, region=region)[0]
    return (
        kernel if kernel is not None else factored_ntk(PooledLogits(model, pool, region), x, params)
    )


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
        return self.of_logits(model(batch["x"]), batch)

    def of_logits(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        t = self.temperature
        ce = F.cross_entropy(logits, batch["y"])
        kl = F.kl_div(
            F.log_softmax(logits / t, dim=1),
            F.log_softmax(batch["teacher_logits"] / t, dim=1),
            log_target=True,
            reduction="none",
        ).sum(1)  # per sample, or per pixel for logit maps
        if kl.ndim > 1:  # segmentation: the mean over the pixels that have a label
            valid = (batch["y"] != IGNORE).to(kl.dtype)
            kl = (kl * valid).sum() / valid.sum().clamp_min(1)
        else:
            kl = kl.mean()
        kl = kl * (t * t)
        return {"ce": ce, "kd": kl, "total": (1 - self.weight) * ce + self.weight * kl}


class NTKD:
    """α·CE + β·L_NTK, where L_NTK compares the student's exact NTK of the batch with the
    teacher's projected one (cached per sample), both normalised (`norm`), by mean squared
    difference (`variant="mse"`) or by 1 − CKA (`variant="cka"`).

    `params` names the student parameters the kernel is taken over (after fabrication: the
    backend's); by default every trainable one. For logit maps the kernel is traced over
    `pool_logits(logits, pool, region)`; the teacher's features must be of the same pooled grid.
    """

    def __init__(  # noqa: PLR0913  the loss's knobs, each named where it is built
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        norm: str = "diag",
        variant: str = "mse",
        params: list[str] | None = None,
        pool: int = 4,
        region: Region | None = None,
        kd_weight: float = 0.0,
    ) -> None:
        if variant not in ("mse", "cka"):
            raise ValueError(f"unknown NTKD variant {variant!r} (mse or cka)")
        self.alpha, self.beta, self.norm, self.variant = alpha, beta, norm, variant
        self.params, self.pool = params, int(pool)
        self.region = None if region is None else tuple(int(v) for v in region)
        # kd_weight > 0: CE becomes KD's mix (`KD`, T = 4) and the NTK term is added to it
        self.kd = KD(weight=kd_weight) if kd_weight > 0 else None
        self.needs = frozenset({"teacher_features"} | ({"teacher_logits"} if self.kd else set()))

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        core = getattr(model, "module", model)  # the kernel is per sample: no DDP wrapper
        if core is model:  # the kernel and the logits from one forward, where it can
            k_student, logits = ntk_and_outputs(
                model, batch["x"], self.params, pool=self.pool, region=self.region
            )
        else:  # DDP syncs the gradients only of outputs its own forward made
            k_student, logits = None, model(batch["x"])
        if k_student is None and logits.ndim > 2:
            k_student = pooled_ntk(core, batch["x"], self.pool, self.region, self.params)
        elif k_student is None:
            k_student = factored_ntk(core, batch["x"], self.params)
        k_teacher = kernel_from_features(batch["teacher_features"])
        if self.variant == "mse":
            term = ntk_mse(k_student, k_teacher, self.norm)
        else:
            term = ntk_alignment_loss(k_student, k_teacher)
        if self.kd is not None:  # KD's terms on the logits the kernel's forward made
            terms = self.kd.of_logits(logits, batch)
            return terms | {"ntk": term, "total": self.alpha * terms["total"] + self.beta * term}
        ce = F.cross_entropy(logits, batch["y"])
        return {"ce": ce, "ntk": term, "total": self.alpha * ce + self.beta * term}


LOSSES: dict[str, Callable[..., object]] = {"ce": CE, "none": CE, "kd": KD, "ntkd": NTKD}
FINETUNE_METHODS = ("ce", "kd", "ntkd")  # `hil finetune`'s names (`none` is train's for ce)
NORMS = ("none", "diag", "frobenius")
VARIANTS = ("mse", "cka")


def _choices(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def check_method(method: str, choices: Sequence[str] = tuple(LOSSES)) -> str:
    """`method` when it is one of `choices` (default: every loss), else one line naming them:
    the one place a training method is validated (`hil train`, `hil finetune`, `build_loss`)."""
    if method not in choices:
        raise UserError(f"--method {method!r}: choose {_choices(list(choices))}")
    return method


def loss_options(
    method: str,
    *,
    choices: Sequence[str] = tuple(LOSSES),
    temperature: float = 4.0,
    beta: float = 1.0,
    norm: str = "diag",
    variant: str = "mse",
) -> dict[str, Any]:
    """The keyword arguments of `build_loss(method, ...)` from the command line's options: the
    temperature for kd; the NTK weight, normalisation and variant for ntkd; none otherwise.
    `choices`: the methods the command offers (`check_method`)."""
    check_method(method, choices)
    if method == "kd":
        return {"temperature": temperature}
    if method != "ntkd":
        return {}
    if norm not in NORMS:
        raise UserError(f"--norm {norm!r}: choose {_choices(NORMS)}")
    if variant not in VARIANTS:
        raise UserError(f"--variant {variant!r}: choose {_choices(VARIANTS)}")
    return {"beta": beta, "norm": norm, "variant": variant}


def build_loss(method: str, **options):
    """The loss `method` (a key of LOSSES) with `options` (see `loss_options`)."""
    return LOSSES[check_method(method)](**options)
