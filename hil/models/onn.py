"""Optical students: a frontend from `sim/` (the physics the bench runs) and a digital backend.

After fabrication only the backend trains, on feature maps captured from the real frontend, so the
backend takes feature maps (N, m, H, W) directly and `ONN.forward` is `backend(frontend(x))`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from sim.fourier4f import Fourier4fFrontend
from sim.psf_frontend import PSFFrontend


class MapAffine(nn.Module):
    """A gain and offset per feature map: the first thing a fabricated frontend gets wrong."""

    def __init__(self, maps: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(maps, 1, 1))
        self.offset = nn.Parameter(torch.zeros(maps, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain + self.offset


def pool_size(image: int) -> int:
    """Side of the grid the fc backends average-pool each feature map to."""
    return max(1, image // 4)


def fc_backend(maps: int, image: int, classes: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """The published MNIST/CIFAR backends: pooled maps through 2 (`fc2`) or 3 (`fc3`) FC layers."""
    pooled = pool_size(image)
    layers: list[nn.Module] = [MapAffine(maps), nn.AdaptiveAvgPool2d(pooled), nn.Flatten()]
    width = maps * pooled * pooled
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def conv_backend(maps: int, image: int, classes: int) -> nn.Sequential:
    return nn.Sequential(
        MapAffine(maps),
        nn.Conv2d(maps, 16, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2, ceil_mode=True),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, classes),
    )


def updecoder_backend(maps: int, classes: int, width: int = 16) -> nn.Sequential:
    """Segmentation: down once, up once (up-convolution), a logit map at input resolution."""
    return nn.Sequential(
        MapAffine(maps),
        nn.Conv2d(maps, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(2 * width, width, 2, stride=2),
        nn.ReLU(),
        nn.Conv2d(width, classes, 1),
    )


FRONTENDS = ("psf", "4f")
BACKENDS = ("fc2", "fc3", "conv", "updecoder")


@dataclass(frozen=True)
class StudentSpec:
    """Everything needed to rebuild a student from a checkpoint (stored beside its weights)."""

    frontend: Literal["psf", "4f"] = "psf"
    kernels: int = 8
    kernel_size: int = 7
    signed: bool = True
    channels: int = 1
    image_size: int = 32
    backend: Literal["fc2", "fc3", "conv", "updecoder"] = "fc2"
    classes: int = 10
    hidden: int = 64
    seed: int = 0
    wavelength_nm: float = 550.0
    pitch_um: float = 8.0
    focal_mm: float = 50.0

    def __post_init__(self) -> None:
        for name, choices in (("frontend", FRONTENDS), ("backend", BACKENDS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} {getattr(self, name)!r}: choose {', '.join(choices)}")

    def to_dict(self) -> dict:
        return asdict(self)


class ONN(nn.Module):
    def __init__(self, spec: StudentSpec) -> None:
        super().__init__()
        self.spec = spec
        torch.manual_seed(spec.seed)
        if spec.frontend == "psf":
            self.frontend = PSFFrontend(
                spec.kernels, spec.kernel_size, spec.channels, spec.signed, seed=spec.seed
            )
        else:
            if spec.channels != 1:
                raise ValueError("the 4f frontend takes one input channel")
            self.frontend = Fourier4fFrontend(
                spec.kernels,
                (spec.image_size, spec.image_size),
                spec.wavelength_nm,
                spec.pitch_um,
                spec.focal_mm,
                seed=spec.seed,
            )
        m, s, c = spec.kernels, spec.image_size, spec.classes
        self.backend = {
            "fc2": lambda: fc_backend(m, s, c, (spec.hidden,)),
            "fc3": lambda: fc_backend(m, s, c, (2 * spec.hidden, spec.hidden)),
            "conv": lambda: conv_backend(m, s, c),
            "updecoder": lambda: updecoder_backend(m, c),
        }[spec.backend]()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the frontend puts on the sensor, as signed feature maps (N, m, H, W)."""
        return self.frontend(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend(self.features(x))

    def freeze_frontend(self) -> None:
        """After fabrication the frontend is glass: only the backend trains."""
        for p in self.frontend.parameters():
            p.requires_grad_(False)
