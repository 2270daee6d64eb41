"""The teacher-feature cache against its JVP floor (resnet18), for 8x8 and 28x28 inputs.

    .venv/bin/python benchmarks/teacher_cache_speed.py [--repeats 3] [--batch 128]
        [--projections 64] [--projections-28 16]

Step times (KD, NTKD, CE) are `benchmarks/ntkd_speed.py`'s.

Cache rows: the time of `ProjectedTeacher` (tangents made once, chunks of tangents outside,
planned batches inside) computing the projected features of ``--batch`` samples, over the floor,
``R ×`` the time of one batched JVP (``jvp(functional_call)`` with one tangent over the same
samples in one batch). Below 1 the chunks' shared primal forward wins more than the rest costs;
the tangents' share is the time spent drawing them (once per call, whatever the number of
samples: over a whole training set it is a few percent). Inputs: the bundled digits (8x8) and
mnist5k (28x28, R = ``--projections-28``, 16 by default to finish in minutes on 2 cores).
Repeats are interleaved (floor, cache, next input); min and median over repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from hil.data.datasets import digits, mnist5k
from hil.models.teachers import resnet18
from hil.ntkd.projected import ProjectedTeacher


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def floor_time(teacher: torch.nn.Module, raw: torch.Tensor, projections: int) -> float:
    """R × one batched JVP: one tangent over all of ``raw`` in one batch (tangent drawn before)."""
    one = ProjectedTeacher(teacher, 1, seed=0)
    return projections * timed(lambda: one.features(raw, batch_size=len(raw)))[0]


def cache_time(teacher, raw, projections) -> tuple[float, float, torch.Tensor, str]:
    """Seconds of the whole cache (tangents included), of drawing the tangents, the features,
    and the plan (chunk x batch)."""
    drawing = [0.0]

    def run() -> tuple[ProjectedTeacher, torch.Tensor]:
        pt = ProjectedTeacher(teacher, projections, seed=0, max_tangent_bytes=0)
        make = pt._make_chunk

        def counted(idx: range, buffer=None) -> dict[str, torch.Tensor]:
            seconds, out = timed(lambda: make(idx, buffer))
            drawing[0] += seconds
            return out

        pt._make_chunk = counted
        return pt, pt.features(raw)

    seconds, (pt, phi) = timed(run)
    return seconds, drawing[0], phi, f"{pt.chunk} x {pt.plan_batch(raw)}"


def cache_rows(teacher, raws: dict[str, tuple[torch.Tensor, int]], repeats: int) -> dict:
    """Interleaved repeats of floor and cache per input; prints the table, returns features."""
    ProjectedTeacher(teacher, 2).features(next(iter(raws.values()))[0][:2])  # warm-up
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in raws}
    feats, plans = {}, {}
    for _ in range(repeats):
        for name, (raw, projections) in raws.items():
            floor = floor_time(teacher, raw, projections)
            cache, drawing, feats[name], plans[name] = cache_time(teacher, raw, projections)
            runs[name].append((cache, floor, drawing))
    print("| teacher input | R | samples | chunk x batch | cache (s) | R x JVP (s) |", end="")
    print(" cache / floor | tangents' share | ms per sample |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (raw, projections) in raws.items():
        cache, floor, drawing = zip(*runs[name], strict=True)
        ratio = [c / f for c, f in zip(cache, floor, strict=True)]
        share = [d / c for d, c in zip(drawing, cache, strict=True)]
        row = [name, projections, len(raw), plans[name], mm(cache), mm(floor), mm(ratio)]
        row += [mm(share), f"{1000 * statistics.median(cache) / len(raw):.1f}"]
        print("| " + " | ".join(str(v) for v in row) + " |")
    print("(min / median over", repeats, "interleaved repeats)")
    return feats


def mm(values) -> str:
    return f"{min(values):.3g} / {statistics.median(values):.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--projections", type=int, default=64)
    ap.add_argument("--projections-28", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    data, mnist = digits(), mnist5k()
    teacher = resnet18(1, 10).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print("teacher: resnet18 (random weights)")
    raws = {
        "digits 8x8": (torch.as_tensor(data.images[: args.batch]), args.projections),
        "mnist5k 28x28": (torch.as_tensor(mnist.images[: args.batch]), args.projections_28),
    }
    cache_rows(teacher, raws, args.repeats)


if __name__ == "__main__":
    main()
