"""Time of a KD and an NTKD step over a CE step, in one run (resnet18 teacher, batch 128).

    .venv/bin/python benchmarks/ntkd_speed.py [--steps 10] [--batch 128] [--device auto]
        [--inputs digits,28x28]

CE is training without a teacher. KD needs the teacher's logits of the batch: `hil train`
reads them from a cache computed once per training set (`hil.ntkd.teacher_cache`), so its step
is a CE step plus a softmax; the column "KD, teacher every step" is the old way (a forward pass
of the teacher on the raw images per step), kept for comparison. NTKD needs the teacher's
projected Jacobian features, also cached once per training set, so its step costs the student's
exact kernel instead (`hil.ntkd.factored`: closed-form per-sample gradients over every trainable
parameter, PSFs included, and the double backward through them). The student is the same in
every column (8 signed 7x7 kernels + fc2 on the 32x32 display); the teacher's raw images are
the bundled digits (8x8) and, at the paper's MNIST scale, 28x28 images. Every loss runs full
optimiser steps, in turn so that all see the same machine load (the old KD way after them, on
its own); each time is the median over ``--steps`` steps after two warm-ups. The cache columns
are the one-off cost per sample.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from hil.data.datasets import digits
from hil.data.placement import to_display
from hil.device import add_device_argument
from hil.models.onn import ONN, StudentSpec
from hil.models.teachers import resnet18
from hil.ntkd.losses import CE, KD, NTKD
from hil.ntkd.teacher_cache import teacher_features, teacher_logits

ROWS = {"digits": "digits 8x8", "28x28": "28x28 (MNIST scale)"}


def stepper(model, loss, batch, extras) -> Callable[[], None]:
    """One optimiser step of ``loss`` on a fresh copy of the student."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        terms = loss(model, batch | extras())
        opt.zero_grad()
        terms["total"].backward()
        opt.step()

    return step


def step_times(steps: dict[str, Callable[[], None]], n: int, device) -> dict[str, float]:
    """Median seconds per step of each, run in turn (two warm-up rounds not counted)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(n + 2):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def per_sample_ms(compute: Callable[[], torch.Tensor], n: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    value = compute()
    return value, 1000 * (time.perf_counter() - t0) / n


def row(name: str, raw: torch.Tensor, batch, teacher, args) -> str:
    """One table row: the steps of every loss with the teacher's inputs `raw`."""
    device = args.device
    feats, feat_ms = per_sample_ms(
        lambda: teacher_features(teacher, raw, None, args.projections, device=device), len(raw)
    )
    logits, logit_ms = per_sample_ms(
        lambda: teacher_logits(teacher, raw, None, device=device), len(raw)
    )
    idx = torch.arange(len(raw))  # the batch's dataset indices into the caches (on the CPU)
    raw_on = raw.to(device)

    def every_step() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"teacher_logits": teacher(raw_on)}

    def cached(key: str, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: rows[idx].to(device)}  # as the training loop reads a cache per batch

    def student() -> ONN:
        return ONN(StudentSpec()).to(device)

    t = step_times(
        {
            "ce": stepper(student(), CE(), batch, dict),
            "kd": stepper(student(), KD(), batch, lambda: cached("teacher_logits", logits)),
            "ntkd": stepper(student(), NTKD(), batch, lambda: cached("teacher_features", feats)),
        },
        args.steps,
        device,
    )
    # timed on its own: a resnet18 forward between the others' steps would evict their caches
    t |= step_times({"kd-every": stepper(student(), KD(), batch, every_step)}, args.steps, device)
    ms = {k: f"{1000 * v:.1f}" for k, v in t.items()}
    ratios = [f"{t[k] / t['ce']:.2f}" for k in ("kd-every", "kd", "ntkd")]
    cells = [name, ms["ce"], ms["kd-every"], ms["kd"], ms["ntkd"], *ratios]
    return "| " + " | ".join([*cells, f"{feat_ms:.1f}", f"{logit_ms:.2f}"]) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--projections", type=int, default=64)
    ap.add_argument("--inputs", default="digits,28x28", help="rows: digits, 28x28 or both")
    add_device_argument(ap)
    args = ap.parse_args()
    names = [n.strip() for n in args.inputs.split(",")]
    if any(n not in ROWS for n in names):
        ap.error(f"--inputs {args.inputs!r}: choose from {', '.join(ROWS)}")
    torch.manual_seed(0)
    data = digits()
    device = args.device
    batch = {
        "x": torch.as_tensor(to_display(data.images[: args.batch], (32, 32))).to(device),
        "y": torch.as_tensor(data.labels[: args.batch]).to(device),
    }
    teacher = resnet18(1, 10).eval().to(device)
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
        f"batch {args.batch}"
    )
    print("student: 8 signed 7x7 PSF kernels + fc2 backend on 32x32; teacher: resnet18")
    print(
        "| teacher input | CE step (ms) | KD step, teacher every step (ms) | KD step (ms) "
        "| NTKD step (ms) | KD every step / CE | KD / CE | NTKD / CE "
        "| feature cache (ms/sample) | logits cache (ms/sample) |"
    )
    print("| --- |" + " ---: |" * 9)
    raws = {
        "digits": torch.as_tensor(data.images[: args.batch]),
        "28x28": torch.rand(args.batch, 1, 28, 28),
    }
    for name in names:
        print(row(ROWS[name], raws[name], batch, teacher, args), flush=True)


if __name__ == "__main__":
    main()
