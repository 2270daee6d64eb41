"""A segmentation NTKD epoch against a CE epoch: shapes, 56 signed 3x3 kernels + the decoder.

    .venv/bin/python benchmarks/segmentation_speed.py [--repeats 3] [--pool 4] [--device auto]

The student of `benchmarks/ntkd_table.py --dataset shapes` (kernel over every parameter, logits
pooled to pool x pool cells of the image's region), one epoch of the 600 training images at batch
8 through the training loop, validation included. The teacher's cached features are a random
tensor of their shape, which costs the same as real ones. Each repeat trains CE then NTKD for
two epochs and times the second (the first warms the caches); the ratio is per repeat.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hil.data.datasets import shapes
from hil.data.placement import display_region
from hil.device import add_device_argument
from hil.models.onn import ONN, StudentSpec
from hil.ntkd.losses import build_loss
from hil.training.loop import Settings, fit, task_metric
from hil.training.student import student_inputs

SPEC = StudentSpec(kernels=56, kernel_size=3, backend="updecoder", classes=2, image_size=32)
PROJECTIONS = 64


def epoch_seconds(method: str, pool: int, device: torch.device, seed: int = 0) -> float:
    """Wall seconds of the second of two epochs of `method` ("ce" or "ntkd")."""
    data = shapes()
    train, val = (student_inputs(data, s, SPEC) for s in ("train", "val"))
    extras, options = None, {}
    if method == "ntkd":
        region = display_region(data.images.shape[-2:], (SPEC.image_size, SPEC.image_size))
        options = {"pool": pool, "region": region}
        g = torch.Generator().manual_seed(seed)
        feats = torch.randn(len(train["x"]), SPEC.classes * pool * pool, PROJECTIONS, generator=g)
        extras = lambda idx: {"teacher_features": feats[idx]}  # noqa: E731
    name, metric = task_metric(data.task, data.classes)
    stamps: list[float] = []
    fit(
        ONN(SPEC),
        build_loss(method, **options),
        {"x": train["x"], "y": train["y"]},
        val,
        Settings(epochs=2, lr=1e-2, batch_size=8, seed=seed, device=str(device)),
        batch_extras=extras,
        on_epoch=lambda _: stamps.append(time.perf_counter()),
        metric=metric,
        metric_name=name,
    )
    return stamps[1] - stamps[0]


def epoch_ratios(repeats: int, pool: int, device: torch.device) -> tuple[list[float], float]:
    """(NTKD epoch / CE epoch per repeat, the fastest CE epoch in seconds)."""
    out, ce_best = [], float("inf")
    for r in range(repeats):
        ce = epoch_seconds("ce", pool, device, r)
        out.append(epoch_seconds("ntkd", pool, device, r) / ce)
        ce_best = min(ce_best, ce)
    return out, ce_best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pool", type=int, default=4, help="the kernel's pooled logit grid")
    add_device_argument(ap)
    args = ap.parse_args()
    found, ce = epoch_ratios(args.repeats, args.pool, args.device)
    print(f"shapes, pool {args.pool}, batch 8, device {args.device}, CE epoch {ce:.2f} s at best")
    print(f"NTKD epoch / CE epoch: min {min(found):.3f}, median {statistics.median(found):.3f}")


if __name__ == "__main__":
    main()
