"""Exact empirical neural tangent kernels (the student's side of NTKD), by ``vmap(jacrev)``.

The kernel of a network ``f(x; θ)`` with ``C`` outputs is traced over classes and parameters::

    Θ(x_i, x_j) = Σ_c Σ_p ∂f_c(x_i)/∂θ_p · ∂f_c(x_j)/∂θ_p

`student_ntk` is exact and differentiable w.r.t. the student's parameters (the NTKD loss is
backpropagated through the Jacobians: double backward); `hil.ntkd.factored.factored_ntk` is the
same kernel from closed-form per-sample gradients, and `hil.ntkd.projected` the teacher's
estimate. All of them need a network whose output for one sample does not depend on the rest of
the batch: BatchNorm in eval mode (running statistics) and no active dropout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

__all__ = ["check_batch_independent", "contract", "ntk_of", "select_params", "student_ntk"]


def check_batch_independent(model: nn.Module) -> None:
    """Raise if ``model`` has a layer whose output for one sample depends on its batch.

    The student kernel calls the model on one sample at a time (inside ``vmap``) and the teacher's
    cached features must not depend on which batch a sample was in, so BatchNorm must use running
    statistics and dropout must be off.
    """
    for name, module in model.named_modules():
        if module.training and isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"{name or type(module).__name__}: BatchNorm in training mode uses batch "
                "statistics; call .eval() on it (or the whole model) before taking its NTK"
            )
        if module.training and isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            raise ValueError(
                f"{name or type(module).__name__}: dropout is active; call .eval() before the NTK"
            )


def select_params(model: nn.Module, params: Iterable[str] | None) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
    else:
        names = list(params)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise KeyError(f"not parameters of the model: {unknown}; known: {list(named)}")
        chosen = {n: named[n] for n in names}
    if not chosen:
        raise ValueError("no parameters to take the NTK over")
    return chosen


def contract(jac_a: Mapping[str, Tensor], jac_b: Mapping[str, Tensor]) -> Tensor:
    """Σ over parameter tensors of J_a J_bᵀ, traced over outputs: (Na, C, *p) x (Nb, C, *p)."""
    total = None
    for name, ja in jac_a.items():
        jb = jac_b[name]
        term = torch.einsum("ncp,mcp->nm", ja.flatten(2), jb.flatten(2))
        total = term if total is None else total + term
    assert total is not None
    return total


def ntk_of(
    fn: Callable[[dict[str, Tensor], Tensor], Tensor],
    params: Mapping[str, Tensor],
    x: Tensor,
    x2: Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Exact class-traced empirical NTK of ``fn(params, sample)`` over the rows of ``x`` (``x2``).

    ``fn`` maps a parameter dict and ONE sample (no batch dimension) to its outputs (any shape;
    flattened to C). The result is differentiable w.r.t. the tensors in ``params`` (nothing is
    detached). Peak memory is the full Jacobian: ``N · C · Σ|θ|`` elements, kept alive for the
    backward pass when gradients flow. ``chunk_size`` bounds vmap's working set, not the result.
    """
    params = dict(params)

    def flat(p: dict[str, Tensor], sample: Tensor) -> Tensor:
        return fn(p, sample).reshape(-1)

    jac_fn = vmap(jacrev(flat), in_dims=(None, 0), chunk_size=chunk_size)
    jac_a = jac_fn(params, x)
    jac_b = jac_a if x2 is None else jac_fn(params, x2)
    return contract(jac_a, jac_b)


def student_ntk(
    model: nn.Module,
    x: Tensor,
    params: Iterable[str] | None = None,
    *,
    x2: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Exact empirical NTK ``(N, N)`` (or ``(N, N2)`` with ``x2``) of ``model`` over its parameters.

    ``params``: names of the parameters to differentiate (e.g. the backend only, for compensation
    after fabrication); default: every parameter with ``requires_grad``. The other parameters and
    the buffers are passed through unchanged, so a loss on the kernel still backpropagates into
    them where they shape the Jacobian (e.g. a frontend feeding the backend).

    The model is called on one sample at a time, so it must not have batch-dependent layers:
    BatchNorm in eval mode is fine, BatchNorm in training mode or active dropout raises.
    """
    check_batch_independent(model)
    chosen = select_params(model, params)
    fixed = {n: p for n, p in model.named_parameters() if n not in chosen}
    fixed.update(dict(model.named_buffers()))

    def fn(p: dict[str, Tensor], sample: Tensor) -> Tensor:
        return functional_call(model, (p, fixed), (sample.unsqueeze(0),))

    return ntk_of(fn, chosen, x, x2, chunk_size=chunk_size)
