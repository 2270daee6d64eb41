"""The teacher's projected NTK features, computed once per training set and cached on disk.

The features φ(x) = J(x)·v_r of `hil.ntkd.projected.ProjectedTeacher` depend only on the teacher's
weights, the projections' seed and the images, so one file beside the teacher checkpoint serves
every training run; the file records all three and is recomputed when any of them differs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from hil.ntkd.losses import PooledLogits
from hil.ntkd.projected import ProjectedTeacher
from hil.training.loop import save_checkpoint

__all__ = ["teacher_features", "teacher_key"]


def teacher_key(teacher: torch.nn.Module, seed: int) -> str:
    """A digest of the teacher's weights and the projections' seed: cached features are only
    reused for the same teacher (a retrained one, even with the same name, is another)."""
    h = hashlib.sha256(str(seed).encode())
    for name, value in teacher.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def teacher_features(
    teacher: torch.nn.Module,
    raw: torch.Tensor,
    cache: Path | None,
    projections: int,
    seed: int,
    *,
    pool: int | None = None,
) -> torch.Tensor:
    """φ(x) = J(x)·v_r for every training image, (N, C, R); computed once and cached.

    With `pool` (segmentation) the outputs are the teacher's logit map pooled to pool x pool
    (`losses.pool_logits`), C = classes · pool², as the NTKD loss pools the student's.
    """
    key = teacher_key(teacher, seed)
    if cache is not None and cache.exists():
        state = torch.load(cache, map_location="cpu", weights_only=True)
        same = state["n"] == len(raw) and torch.equal(state["checksum"], raw.sum().reshape(1))
        same = same and state.get("teacher") == key
        if same and state.get("pool") == pool and state["features"].shape[-1] == projections:
            return state["features"]
    net = teacher if pool is None else PooledLogits(teacher.eval(), pool)
    projected = ProjectedTeacher(net, projections=projections, seed=seed)
    features = projected.features_dataset(raw, batch_size=128)
    if cache is not None:
        save_checkpoint(
            cache,
            {
                "features": features,
                "n": len(raw),
                "checksum": raw.sum().reshape(1),
                "pool": pool,
                "teacher": key,
            },
        )
    return features
