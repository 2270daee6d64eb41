"""Time of an NTKD step over a KD step, in one run (resnet18 teacher, batch 128, CPU).

    .venv/bin/python benchmarks/ntkd_speed.py [--steps 10] [--batch 128]

KD needs the teacher's logits every step (a forward pass of the teacher on the raw images); NTKD
needs the teacher's projected Jacobian features, which are fixed per sample and cached once per
training set, so its step costs the student's exact kernel instead (`hil.ntkd.factored`:
closed-form per-sample gradients over every trainable parameter, PSFs included, and the double
backward through them). The student is the same in both rows (8 signed 7x7 kernels + fc2 on the
32x32 display); the teacher's raw images are the bundled digits (8x8) and, at the paper's MNIST
scale, 28x28 images. Both losses run full optimiser steps, alternating KD and NTKD so that both
see the same machine load; each time is the median over ``--steps`` steps after two warm-ups.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from hil.data.datasets import digits
from hil.data.placement import to_display
from hil.models.onn import ONN, StudentSpec
from hil.models.teachers import resnet18
from hil.ntkd.losses import KD, NTKD
from hil.ntkd.projected import ProjectedTeacher


def stepper(model, loss, batch, extras) -> Callable[[], None]:
    """One optimiser step of ``loss`` on a fresh copy of the student."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        terms = loss(model, batch | extras())
        opt.zero_grad()
        terms["total"].backward()
        opt.step()

    return step


def step_times(steps: dict[str, Callable[[], None]], n: int) -> dict[str, float]:
    """Median seconds per step of each, run in turn (two warm-up rounds not counted)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(n + 2):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--projections", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    data = digits()
    batch = {
        "x": torch.as_tensor(to_display(data.images[: args.batch], (32, 32))),
        "y": torch.as_tensor(data.labels[: args.batch]),
    }
    teacher = resnet18(1, 10).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print("student: 8 signed 7x7 PSF kernels + fc2 backend on 32x32; teacher: resnet18")
    print(
        "| teacher input | KD step (ms) | NTKD step (ms) | NTKD / KD | feature cache (ms/sample) |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    raws = {
        "digits 8x8": torch.as_tensor(data.images[: args.batch]),
        "28x28 (MNIST scale)": torch.rand(args.batch, 1, 28, 28),
    }
    for name, raw in raws.items():
        t0 = time.perf_counter()
        features = ProjectedTeacher(teacher, projections=args.projections).features(raw)
        cache_ms = 1000 * (time.perf_counter() - t0) / args.batch

        def logits(raw=raw):
            with torch.no_grad():
                return {"teacher_logits": teacher(raw)}

        t = step_times(
            {
                "kd": stepper(ONN(StudentSpec()), KD(), batch, logits),
                "ntkd": stepper(
                    ONN(StudentSpec()), NTKD(), batch, lambda f=features: {"teacher_features": f}
                ),
            },
            args.steps,
        )
        kd, ntkd = t["kd"], t["ntkd"]
        print(
            f"| {name} | {1000 * kd:.1f} | {1000 * ntkd:.1f} | {ntkd / kd:.2f} | {cache_ms:.1f} |"
        )


if __name__ == "__main__":
    main()
