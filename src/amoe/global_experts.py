"""Global experts: a convolutional autoencoder from the image to the encoder's feature map (paper Eq. 8),
optionally with an EfficientAD-style student CNN that regresses the AE output (``ae_student``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from amoe.hardware import conv_memory_format


class GlobalOutput(NamedTuple):
    ae: torch.Tensor  # (B, D, h, w) autoencoder reconstruction of the encoder features
    student: torch.Tensor | None  # (B, D, h, w) student regression of ``ae`` (ae_student mode)


def _conv(cin: int, cout: int, k: int, stride: int = 1, pad: int | None = None) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2 if pad is None else pad)


def _relu() -> nn.ReLU:
    # in place: the student's first activations are B×256×H×W (1.2 GB at batch 8, 392², fp32); a second
    # buffer of that size costs allocation and page faults. Safe: no conv backward needs its output.
    return nn.ReLU(inplace=True)


class GlobalAutoencoder(nn.Module):
    """Image (B, 3, H, W) -> global code (B, code, 1, 1) -> features (B, D, h, w).

    Encoder: three stride-2 convs, a conv, pooling to 4×4 and a linear squeeze to ``code`` channels.
    Decoder: bilinear upsampling 3, 7, 15, … up to the token grid, each followed by conv + ReLU + dropout.
    """

    def __init__(self, dim: int, grid: tuple[int, int], width: int = 128, code: int = 128, dropout: float = 0.2):
        super().__init__()
        self.grid = grid
        self.encoder = nn.Sequential(
            _conv(3, 32, 4, 2, 1), _relu(), _conv(32, 64, 4, 2, 1), _relu(),
            _conv(64, width, 4, 2, 1), _relu(), _conv(width, width, 3), _relu(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(width * 16, code),
        )
        sizes, s = [], 3
        while s < max(grid):
            sizes.append(s)
            s = 2 * s + 1
        self.sizes = sizes
        self.up = nn.ModuleList(
            nn.Sequential(_conv(code if i == 0 else width, width, 3), _relu(), nn.Dropout(dropout))
            for i in range(len(sizes))
        )
        self.head = nn.Sequential(_conv(width if sizes else code, width, 3), _relu(), _conv(width, dim, 3))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.encoder(image)[..., None, None]  # (B, code, 1, 1)
        for size, layer in zip(self.sizes, self.up):
            x = layer(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False))
        x = F.interpolate(x, size=self.grid, mode="bilinear", align_corners=False)
        return self.head(x)  # (B, D, h, w)


class StudentCNN(nn.Module):
    """PDN-like CNN: image (B, 3, H, W) -> (B, D, H/patch, W/patch)."""

    def __init__(self, dim: int, patch: int, channels: tuple[int, int] = (256, 512)):
        super().__init__()
        if patch % 2:
            raise ValueError(f"the student CNN needs an even patch size, got {patch}.")
        c1, c2 = channels
        self.net = nn.Sequential(
            _conv(3, c1, 3), _relu(), nn.AvgPool2d(2),
            _conv(c1, c2, 3), _relu(), nn.AvgPool2d(patch // 2),
            _conv(c2, c2, 1), _relu(), _conv(c2, c2, 3), _relu(), _conv(c2, dim, 3), _relu(), _conv(dim, dim, 1),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


class GlobalExpert(nn.Module):
    """``ae``: AE only (the paper text); ``ae_student``: AE + student (the released code)."""

    def __init__(
        self,
        dim: int,
        grid: tuple[int, int],
        patch: int,
        mode: str = "ae_student",
        width: int = 128,
        code: int = 128,
        student_channels: tuple[int, int] = (256, 512),
    ):
        super().__init__()
        if mode not in ("ae", "ae_student"):
            raise ValueError(f"global_expert must be 'ae' or 'ae_student', got '{mode}'.")
        self.ae = GlobalAutoencoder(dim, grid, width, code)
        self.student = StudentCNN(dim, patch, student_channels) if mode == "ae_student" else None

    def forward(self, image: torch.Tensor) -> GlobalOutput:
        """image (B, 3, H, W) -> GlobalOutput of (B, D, h, w) maps (channels-last except in AVX2 training)."""
        # channels-last (NHWC) is oneDNN's fast layout for convolutions, about 2x in bf16 for the
        # student's 256->512 conv at 196² that dominates this expert, but 2.8x slower in its AVX2
        # backward (amoe.hardware.conv_memory_format); values are the same either way.
        image = image.contiguous(memory_format=conv_memory_format(image))
        ae = self.ae(image)
        return GlobalOutput(ae, self.student(image) if self.student is not None else None)
