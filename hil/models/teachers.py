"""Electronic teachers, adapted to the small images an optical frontend sees (8-64 px).

The ImageNet stems (7x7 stride 2 + max-pool, or 11x11 stride 4) would shrink an 8-32 px image to
nothing, so the stems here keep resolution; channel counts follow the originals.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn


def resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool."""
    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


class LeNet(nn.Module):
    """LeNet-5 shape: two conv-pool stages, three fully connected layers; any input size ≥ 8."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(6, 16, 5, padding=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 16, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallAlexNet(nn.Module):
    """AlexNet's five conv layers and three FC layers, with 3x3 stride-1 convolutions."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()

        def conv(i: int, o: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            conv(in_channels, 64),
            nn.MaxPool2d(2, ceil_mode=True),
            conv(64, 192),
            nn.MaxPool2d(2, ceil_mode=True),
            conv(192, 384),
            conv(384, 256),
            conv(256, 256),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(256 * 4, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class UNet(nn.Module):
    """A three-level U-Net for segmentation: (N, C, H, W) → (N, classes, H, W) logits.

    Inputs whose sides are not multiples of 4 are zero-padded for the two poolings and the
    logits cropped back, so any image size ≥ 1 works.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(inplace=True),
                nn.Conv2d(o, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(inplace=True),
            )

        w = width
        self.down1, self.down2, self.bottom = (
            block(in_channels, w),
            block(w, 2 * w),
            block(2 * w, 4 * w),
        )
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = block(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = block(2 * w, w)
        self.head = nn.Conv2d(w, num_classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = nn.functional.pad(x, (0, -w % 4, 0, -h % 4))
        d1 = self.down1(x)
        d2 = self.down2(self.pool(d1))
        b = self.bottom(self.pool(d2))
        u2 = self.dec2(torch.cat([self.up2(b), d2], dim=1))
        return self.head(self.dec1(torch.cat([self.up1(u2), d1], dim=1)))[..., :h, :w]


TEACHERS = {
    "resnet18": resnet18,
    "lenet": LeNet,
    "alexnet": SmallAlexNet,
    "unet": UNet,
}


def build_teacher(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    if arch not in TEACHERS:
        raise ValueError(f"unknown teacher {arch!r}; choose from {', '.join(TEACHERS)}")
    return TEACHERS[arch](in_channels, num_classes)
