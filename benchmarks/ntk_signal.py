"""Why the NTK term moves the student so little: its scale and gradient against CE, and where in
the kernel the student and teacher differ.

    HIL_TEACHERS=DIR .venv/bin/python benchmarks/ntk_signal.py [--dataset mnist5k]
        [--teacher lenet] [--epochs 30] [--batches 8]

For the paper's MNIST student (8 signed 7x7 kernels + fc2, seed 0), untrained and after NTKD
training, over `--batches` training batches of 128: CE and the NTK term (diag normalisation),
the norms of their gradients over every parameter and the cosine between those gradients; how the
NTK term's squared differences split between the diagonal, pairs of the same class and pairs of
different classes; and, for each kernel (student, teacher), the mean normalised entry of
same-class and of different-class pairs (the class structure the term could teach) and the CKA
of the two. The teacher is the stored one `ntkd_table.py` trained (`--teacher`, in
$HIL_TEACHERS), its features read from the cache beside it.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from hil.data.datasets import load_dataset
from hil.models.onn import ONN, StudentSpec
from hil.ntkd.alignment import cka, normalise
from hil.ntkd.factored import ntk_and_outputs
from hil.ntkd.projected import kernel_from_features
from hil.ntkd.teacher_cache import PROJECTION_SEED, cache_file, teacher_features
from hil.training.loop import Settings
from hil.training.student import student_inputs, train_student
from hil.training.teacher import load_teacher


def batch_figures(model: ONN, x, y, phi) -> dict[str, float]:
    """The figures of one batch (see the module docstring)."""
    params = [p for p in model.parameters() if p.requires_grad]
    k_s, logits = ntk_and_outputs(model, x)
    ce = F.cross_entropy(logits, y)
    k_t = kernel_from_features(phi)
    ns, nt = normalise(k_s, "diag"), normalise(k_t, "diag")
    sq = (ns - nt).pow(2)
    ntk = sq.mean()
    g_ce = torch.cat([g.flatten() for g in torch.autograd.grad(ce, params, retain_graph=True)])
    grads = torch.autograd.grad(ntk, params, allow_unused=True, materialize_grads=True)
    g_ntk = torch.cat([g.flatten() for g in grads])  # the last bias moves no kernel entry
    same = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool)
    diff = y[:, None] != y[None, :]
    diag = torch.eye(len(y), dtype=torch.bool)
    total = sq.sum().detach()
    ce, ntk = ce.detach(), ntk.detach()
    return {
        "CE": float(ce),
        "NTK term": float(ntk),
        "‖∇ NTK term‖ / ‖∇ CE‖": float(g_ntk.norm() / g_ce.norm()),
        "cos(∇ CE, ∇ NTK term)": float(F.cosine_similarity(g_ce, g_ntk, dim=0)),
        "share: diagonal": float(sq[diag].sum() / total),
        "share: same class": float(sq[same].sum() / total),
        "share: other class": float(sq[diff].sum() / total),
        "student: same class": float(ns[same].mean()),
        "student: other class": float(ns[diff].mean()),
        "teacher: same class": float(nt[same].mean()),
        "teacher: other class": float(nt[diff].mean()),
        "CKA(student, teacher)": float(cka(k_s, k_t)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--teacher", default="lenet")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--projections", type=int, default=64)
    args = ap.parse_args()
    data = load_dataset(args.dataset)
    teacher, info, path = load_teacher(args.teacher, args.dataset)
    spec = StudentSpec(seed=0)
    train = student_inputs(data, "train", spec)
    tags = {"R": args.projections, "p": PROJECTION_SEED, "pool": None}
    cache = cache_file(path, "ntk", train["raw"], **tags)
    phi = teacher_features(teacher, train["raw"], cache, args.projections)
    trained, _ = train_student(
        spec,
        data,
        "ntkd",
        Settings(epochs=args.epochs, lr=1e-2),
        teacher=teacher,
        teacher_cache=path,
        projections=args.projections,
    )
    students = {"untrained": ONN(spec), f"NTKD, {args.epochs} epochs": trained}
    order = torch.randperm(len(train["y"]), generator=torch.Generator().manual_seed(0))
    columns = {}
    for name, model in students.items():
        rows = []
        for b in range(args.batches):
            idx = order[b * 128 : (b + 1) * 128]
            rows.append(batch_figures(model.train(), train["x"][idx], train["y"][idx], phi[idx]))
        columns[name] = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    print(
        f"{args.dataset}, teacher {args.teacher} (test {info['test_accuracy']:.4f}), R = "
        f"{args.projections}, {args.batches} batches of 128, diag normalisation"
    )
    print("| figure | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for key in next(iter(columns.values())):
        print(f"| {key} | " + " | ".join(f"{c[key]:.4g}" for c in columns.values()) + " |")


if __name__ == "__main__":
    main()
