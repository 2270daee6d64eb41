"""The training loop shared by teachers, simulated NTKD training and post-fabrication fine-tuning.

Seeded batch order per epoch (so a resumed run sees the batches an uninterrupted one would), an
atomic checkpoint after every epoch, metrics per epoch, and data parallelism when launched by
`torchrun` (gloo on CPU: each rank takes every world-th sample of a batch, DDP averages grads).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Settings:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless launched by torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), size) if size > 1 else (0, 1)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save through a temp file and a rename: an interrupt never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    was = model.training
    model.eval()
    correct = sum(
        int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
        for i in range(0, len(x), batch_size)
    )
    model.train(was)
    return correct / max(len(x), 1)


def fit(
    model: nn.Module,
    loss: Callable[[nn.Module, Batch], dict[str, torch.Tensor]],
    train: Batch,
    val: Batch,
    settings: Settings,
    *,
    batch_extras: Callable[[torch.Tensor], Batch] | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    extra_state: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train the parameters of `model` that require grad; returns the metrics of every epoch.

    `train` holds tensors indexed by sample ("x", "y", ...); `batch_extras(idx)` adds what the
    loss needs per batch (teacher logits or cached teacher features). With `resume` and an
    existing checkpoint, training continues after its last finished epoch.
    """
    rank, size = world()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    history: list[dict[str, float]] = []
    start = 0
    if resume and checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, start = list(state["history"]), int(state["epoch"]) + 1
    net = DistributedDataParallel(model) if size > 1 else model
    n = len(train["y"])
    for epoch in range(start, settings.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(settings.seed * 7919 + epoch)
        )
        sums: dict[str, float] = {}
        steps = 0
        model.train()
        for i in range(0, n, settings.batch_size):
            idx = order[i : i + settings.batch_size][rank::size]
            if len(idx) == 0:
                continue
            batch = {k: v[idx] for k, v in train.items()}
            if batch_extras is not None:
                batch |= batch_extras(idx)
            terms = loss(net, batch)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            steps += 1
        metrics = {"epoch": epoch, **{k: v / max(steps, 1) for k, v in sums.items()}}
        metrics["val_accuracy"] = accuracy(model, val["x"], val["y"])
        metrics["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(metrics)
        if checkpoint is not None and rank == 0:
            save_checkpoint(
                checkpoint,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                    "history": history,
                    **(extra_state or {}),
                },
            )
        if on_epoch is not None and rank == 0:
            on_epoch(metrics)
    if size > 1:
        dist.barrier()
    return history
