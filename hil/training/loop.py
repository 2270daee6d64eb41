"""The training loop shared by teachers, simulated NTKD training and post-fabrication fine-tuning.

Seeded batch order per epoch (so a resumed run sees the batches an uninterrupted one would), an
atomic resume state after every epoch (weights, optimizer, epoch, history: not a model file, which
`hil.models.checkpoint` writes when a run finishes), metrics per epoch, and data parallelism when
launched by `torchrun` (gloo on CPU: each rank takes every size-th sample of a batch, DDP
averages grads). The validation metric is a hook: accuracy for classification, mIoU for
segmentation.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hil.device import to_device
from hil.errors import UserError
from hil.output.torchfile import load_checkpoint, save_checkpoint

Batch = dict[str, torch.Tensor]
Metric = Callable[[nn.Module, torch.Tensor, torch.Tensor], float]

# Label of a pixel that no loss or metric counts: torch's cross-entropy default, used for the parts
# of the display outside the placed image, where the student's mask has no ground truth.
IGNORE = -100


@dataclass(frozen=True)
class Settings:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"  # a name `hil.device.resolve_device` gave: model and batches go there


def ddp_rank_size(device: torch.device | str = "cpu") -> tuple[int, int]:
    """(rank, number of processes): (0, 1) unless launched by torchrun, whose process group is
    joined on first call: NCCL when training on CUDA, gloo otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return (dist.get_rank(), size) if size > 1 else (0, 1)


def rank_device(device: torch.device, size: int, local_rank: int) -> torch.device:
    """Where this process trains: under torchrun each rank gets its own GPU (`cuda` means
    cuda:LOCAL_RANK; an explicit cuda:N is kept), everything else is shared as asked."""
    if size > 1 and device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


RESUME_FORMAT = "hil-resume"


def resume_path(out: Path | str) -> Path:
    """Where the resume state of a run writing the model file `out` lives: `onn.pt` ->
    `onn.resume.pt`. It exists only while the run is unfinished (the finished run removes it),
    so its presence says a run was interrupted; resuming a finished run starts over, and with
    seeded batches and a constant learning rate that ends where continuing would have."""
    out = Path(out)
    return out.with_name(f"{out.stem}.resume.pt")


def load_resume(path: Path) -> dict[str, Any]:
    """A resume state written by `fit`, or one UserError line saying what the file is instead."""
    state = load_checkpoint(path, "hil resume state")
    if not (isinstance(state, dict) and state.get("format") == RESUME_FORMAT):
        raise UserError(f"{path}: not a hil resume state (remove it to start over)")
    return state


def model_device(model: nn.Module) -> torch.device:
    """Where `model`'s parameters (or buffers) are; the CPU for a model without either."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor, batch_size: int = 512):
    """(start, argmax over classes (dim 1)) batch by batch, in eval mode, on the CPU: each
    batch goes to the model's device and its predictions come back."""
    was = model.training
    model.eval()
    device = model_device(model)
    try:
        for i in range(0, len(x), batch_size):
            yield i, model(to_device(x[i : i + batch_size], device)).argmax(1).cpu()
    finally:
        model.train(was)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of samples classified right; for masks (N, H, W), of pixels not labelled IGNORE."""
    if y.ndim == 1:
        correct = sum(
            int((p == y[i : i + batch_size]).sum()) for i, p in predictions(model, x, batch_size)
        )
        return correct / max(len(x), 1)
    correct = valid = 0
    for i, p in predictions(model, x, batch_size):
        t = y[i : i + batch_size]
        correct += int(((p == t) & (t != IGNORE)).sum())
        valid += int((t != IGNORE).sum())
    return correct / max(valid, 1)


def iou_counts(pred: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, 2) intersections and unions of label maps, pixels labelled IGNORE left out."""
    keep = target != IGNORE
    p, t = pred[keep], target[keep]
    inter = torch.bincount(t[p == t], minlength=classes)[:classes]
    union = torch.bincount(p, minlength=classes)[:classes]
    union = union + torch.bincount(t, minlength=classes)[:classes] - inter
    return torch.stack([inter, union], dim=1)


def mean_iou(counts: torch.Tensor) -> float:
    """Mean over classes of intersection / union; a class absent from both prediction and truth
    (union 0) has no IoU and is left out rather than counted as 0 or 1."""
    inter, union = counts[:, 0].double(), counts[:, 1].double()
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else 0.0


def miou(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int, batch_size: int = 64
) -> float:
    """mIoU over a whole split: intersections and unions summed over every image first, so
    a class's IoU is not an average of per-image ratios (small objects would dominate)."""
    counts = torch.zeros(classes, 2, dtype=torch.int64)
    for i, p in predictions(model, x, batch_size):
        counts += iou_counts(p.cpu(), y[i : i + batch_size].cpu(), classes)
    return mean_iou(counts)


def task_metric(task: str, classes: int) -> tuple[str, Metric]:
    """The metric a task is judged by, and its name in records (`val_<name>`, `test_<name>`)."""
    if task == "segmentation":
        return "miou", partial(miou, classes=classes)
    return "accuracy", accuracy


def fit(  # noqa: PLR0913  the one training loop's hooks, keyword-only and named at each call
    model: nn.Module,
    loss: Callable[[nn.Module, Batch], dict[str, torch.Tensor]],
    train: Batch,
    val: Batch,
    settings: Settings,
    *,
    batch_extras: Callable[[torch.Tensor], Batch] | None = None,
    resume_state: Path | None = None,
    resume: bool = False,
    extra_state: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    metric: Metric = accuracy,
    metric_name: str = "accuracy",
    keep_best: bool = False,
) -> list[dict[str, float]]:
    """Train the parameters of `model` that require grad; returns the metrics of every epoch.

    `train` holds tensors indexed by sample ("x", "y", ...); `batch_extras(idx)` adds what the
    loss needs per batch (teacher logits or cached teacher features, or replaces "x"). The
    resume state is written to `resume_state` after every epoch; with `resume` and an existing
    one, training continues after its last finished epoch. After
    every epoch `metric(model, val x, val y)` is recorded as `val_<metric_name>`.

    The model moves to `settings.device` (and stays there), each batch with its extras goes
    there step by step; `train` and `val` stay where they are (the CPU).

    `keep_best`: the model ends with the weights of the epoch that scored best on val (the
    first of equals, `best_epoch(history)`; kept in the resume state too), otherwise with the
    last epoch's.
    """
    rank, size = ddp_rank_size(settings.device)
    device = rank_device(torch.device(settings.device), size, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = to_device(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    history: list[dict[str, float]] = []
    start, best = 0, None
    key = f"val_{metric_name}"
    if resume and resume_state is not None and Path(resume_state).exists():
        state = load_resume(resume_state)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            history, start = list(state["history"]), int(state["epoch"]) + 1
        except (KeyError, TypeError, ValueError, RuntimeError):
            raise UserError(
                f"{resume_state}: the resume state of another model or run (remove it to "
                "start over)"
            ) from None
        best = state.get("best")
    ids = [device.index] if device.type == "cuda" else None
    net = DistributedDataParallel(model, device_ids=ids) if size > 1 else model
    for epoch in range(start, settings.epochs):
        t0 = time.perf_counter()
        model.train()
        batches = _batches(len(train["y"]), settings, epoch, rank, size)
        means = _train_epoch(net, loss, optimizer, train, batches, batch_extras, device)
        metrics = {"epoch": epoch, **means}
        metrics[f"val_{metric_name}"] = metric(model, val["x"], val["y"])
        metrics["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(metrics)
        if keep_best and (best is None or metrics[key] > best["score"]):
            weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best = {"epoch": epoch, "score": metrics[key], "model": weights}
        if resume_state is not None and rank == 0:
            state = {"format": RESUME_FORMAT, "model": model.state_dict(), "best": best}
            state |= {"optimizer": optimizer.state_dict(), "epoch": epoch, "history": history}
            save_checkpoint(resume_state, state | (extra_state or {}))
        if on_epoch is not None and rank == 0:
            on_epoch(metrics)
    if keep_best and best is not None:
        model.load_state_dict(best["model"])
    if size > 1:
        dist.barrier()
    return history


def best_epoch(history: list[dict[str, float]], metric_name: str = "accuracy") -> int:
    """The epoch `fit(keep_best=True)` ends with: the first that scored best on val."""
    scores = [h[f"val_{metric_name}"] for h in history]
    return int(history[scores.index(max(scores))]["epoch"])


def _batches(n: int, settings: Settings, epoch: int, rank: int, size: int):
    """This rank's sample indices of each batch of an epoch, in the epoch's seeded order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed * 7919 + epoch))
    for i in range(0, n, settings.batch_size):
        idx = order[i : i + settings.batch_size][rank::size]
        if len(idx):
            yield idx


def _train_epoch(
    net: nn.Module,
    loss: Callable[[nn.Module, Batch], dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    train: Batch,
    batches,
    batch_extras: Callable[[torch.Tensor], Batch] | None,
    device: torch.device,
) -> dict[str, float]:
    """One optimizer step per batch on `device`; the mean of every loss term over the epoch."""
    sums: dict[str, float] = {}
    steps = 0
    for idx in batches:
        batch = {k: v[idx] for k, v in train.items()}
        if batch_extras is not None:
            batch |= batch_extras(idx)
        batch = to_device(batch, device)
        terms = loss(net, batch)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        steps += 1
    return {k: v / max(steps, 1) for k, v in sums.items()}
