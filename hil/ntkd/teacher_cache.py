"""What the teacher says about a training set, computed once and cached on disk beside it.

KD needs the teacher's logits of every training image, NTKD its projected NTK features
φ(x) = J(x)·v_r (`hil.ntkd.projected.ProjectedTeacher`). Both depend only on the teacher's
weights and the images (the features also on the number of projections, their seed and the
pooled grid), never on the student or its training seed, so they are computed once per training
set, in eval mode and in batches, and every later run (another seed, another method) reads them.

The teacher sees the raw image, never the student's augmented one (`hil.ntkd.augment` redraws
the optic the *student* looks through), so the cached values are exactly what a per-step
teacher pass would give.

A cache file holds its key: the digest of the teacher's weights, the digest of the images (their
shape, dtype and bytes) and the settings. A file whose key differs (a retrained teacher, another
training set) is recomputed and replaced; one that cannot be read (damaged, foreign) is
recomputed too, with a warning, since it only ever holds what can be computed again. Writes are
atomic. `cache_file` names the files beside a teacher checkpoint, one per training set.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hil.device import to_device
from hil.errors import UserError
from hil.ntkd.losses import PooledLogits
from hil.ntkd.projected import ProjectedTeacher
from hil.output.torchfile import content_digest, load_checkpoint, save_checkpoint

__all__ = [
    "CACHE_FORMAT",
    "PROJECTION_SEED",
    "cache_file",
    "data_digest",
    "teacher_features",
    "teacher_logits",
    "weights_digest",
]

CACHE_FORMAT = "hil-teacher-cache"
# The teacher kernel's projections are seeded by this, not by a run's seed: every seed of a
# study (and KD, NTKD, fine-tuning) shares one sketch of the teacher and one cache file.
PROJECTION_SEED = 0
LOGITS_BATCH = 256

log = logging.getLogger("hil")


def weights_digest(teacher: torch.nn.Module) -> str:
    """SHA-256 of the teacher's state (names and values, wherever it lives): a retrained
    teacher, even under the same file name, is another teacher."""
    return content_digest(teacher.state_dict())


def data_digest(x: torch.Tensor) -> str:
    """SHA-256 of the images' shape, dtype and bytes: the training set the cache is of."""
    h = hashlib.sha256(f"{tuple(x.shape)} {x.dtype}".encode())
    h.update(memoryview(np.ascontiguousarray(x.detach().cpu().numpy())).cast("B"))
    return h.hexdigest()


def cache_file(beside: Path, kind: str, raw: torch.Tensor, **settings: Any) -> Path:
    """`<beside's stem>.<kind>[-<setting><value>...]-<data digest>.pt` beside `beside` (a
    teacher checkpoint): one file per training set, so the student's training set and a
    fine-tune's captured rows do not evict each other."""
    tags = "".join(f"-{k}{v}" for k, v in settings.items() if v is not None)
    return beside.with_name(f"{beside.stem}.{kind}{tags}-{data_digest(raw)[:16]}.pt")


def _read(path: Path, key: dict[str, Any]) -> torch.Tensor | None:
    """The cached value when `path` holds one for `key`; None when it holds another key, or
    when it cannot be read (warned: it is then recomputed and replaced)."""
    try:
        state = load_checkpoint(path, "hil teacher cache")
    except UserError as e:
        log.warning("%s; computing it again", e)
        return None
    if not isinstance(state, dict) or state.get("format") != CACHE_FORMAT:
        log.warning("%s: not a hil teacher cache; computing it again", path)
        return None
    if any(state.get(k) != v for k, v in key.items()) or "value" not in state:
        return None
    return state["value"]


def _cached(path: Path | None, key: dict[str, Any], compute: Callable[[], torch.Tensor]):
    """`compute()`, or what `path` holds for `key`; stored at `path` (atomically) when new."""
    if path is not None and path.exists():
        found = _read(path, key)
        if found is not None:
            return found
    value = compute()
    if path is not None:
        save_checkpoint(path, {"format": CACHE_FORMAT, **key, "value": value})
    return value


@torch.no_grad()
def _logits_of(
    teacher: torch.nn.Module, raw: torch.Tensor, device: torch.device | None, batch_size: int
) -> torch.Tensor:
    teacher = to_device(teacher.eval(), device)
    parts = [
        teacher(to_device(raw[s : s + batch_size], device)).cpu()
        for s in range(0, len(raw), batch_size)
    ]
    return torch.cat(parts)


def teacher_logits(
    teacher: torch.nn.Module,
    raw: torch.Tensor,
    cache: Path | None,
    *,
    device: torch.device | str | None = None,
    batch_size: int = LOGITS_BATCH,
) -> torch.Tensor:
    """The teacher's logits of every training image, (N, C) (logit maps (N, C, H, W) for
    segmentation), on the CPU; computed once on `device` (eval mode, no grad, batches of
    `batch_size`) and cached in the file `cache` (None: not cached)."""
    key = {"kind": "logits", "teacher": weights_digest(teacher), "data": data_digest(raw)}
    return _cached(cache, key, lambda: _logits_of(teacher, raw, device, batch_size))


def teacher_features(
    teacher: torch.nn.Module,
    raw: torch.Tensor,
    cache: Path | None,
    projections: int,
    seed: int = PROJECTION_SEED,
    *,
    pool: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """φ(x) = J(x)·v_r for every training image, (N, C, R), on the CPU; computed once on
    `device` and cached in the file `cache` (None: not cached). `seed` seeds the projections
    (not a run's seed: `PROJECTION_SEED` unless a study varies the sketch itself).

    With `pool` (segmentation) the outputs are the teacher's logit map pooled to pool x pool
    (`losses.pool_logits`), C = classes · pool², as the NTKD loss pools the student's.
    """
    key = {
        "kind": "ntk-features",
        "teacher": weights_digest(teacher),
        "data": data_digest(raw),
        "projections": int(projections),
        "seed": int(seed),
        "pool": pool,
    }

    def compute() -> torch.Tensor:
        net = to_device(teacher.eval(), device)
        net = net if pool is None else PooledLogits(net, pool)
        projected = ProjectedTeacher(net, projections=projections, seed=seed)
        return projected.features_dataset(raw)  # at the batch `plan_batch` finds fits

    return _cached(cache, key, compute)
