"""Views of a model: modules that run it with extra steps but keep its parameter names."""

from __future__ import annotations

from torch import nn

__all__ = ["SharedView"]


class SharedView(nn.Module):
    """A module that runs `inner` with extra steps but exposes its children under the same
    parameter names (no `inner.` prefix), so `params` lists, checkpoints and functional_call
    (which swaps parameters on the shared submodules) work on the view as on `inner` itself."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        if (
            next(inner.parameters(recurse=False), None) is not None
            or next(inner.buffers(recurse=False), None) is not None
        ):
            raise ValueError(f"{type(inner).__name__} holds tensors outside its submodules")
        for name, child in inner.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "inner", inner)  # not registered: names stay inner's
        self.training = inner.training

    def train(self, mode: bool = True):
        self.inner.train(mode)
        return super().train(mode)
