"""From group maps to the final anomaly map and image score (paper "Inference"; SPEC §2.10).

Each expert group's map is normalised with statistics of NORMAL held-out training images (quantiles
stored in the checkpoint), the groups are fused by their gate mass, the map is resized to the
evaluation size, blurred (Gaussian, σ=4) and the image score is the mean of its top 1 % of pixels.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ScoreOutput(NamedTuple):
    maps: torch.Tensor  # (B, S, S) final anomaly map at the evaluation size
    scores: torch.Tensor  # (B,) image anomaly score


def gaussian_kernel(sigma: float, size: int) -> torch.Tensor:
    """Normalised 2-D Gaussian kernel (size, size)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    k = torch.outer(g, g)
    return (k / k.sum()).float()


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0, size: int = 5) -> torch.Tensor:
    """(B, H, W) -> (B, H, W), reflect padding (the reference pads with zeros, darkening borders)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel(sigma, size).to(maps)
    x = F.pad(maps[:, None], (size // 2,) * 4, mode="reflect")
    return F.conv2d(x, k[None, None])[:, 0]


def top_ratio_score(maps: torch.Tensor, ratio: float = 0.01) -> torch.Tensor:
    """Mean of the top ``ratio`` of each map's pixels: (B, H, W) -> (B,)."""
    flat = maps.flatten(1)
    k = max(1, int(flat.shape[1] * ratio))
    return flat.topk(k, dim=1).values.mean(1)


def fuse(group_maps: torch.Tensor, mass: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Σ_g mass_g · (S_g − lo_g) / (hi_g − lo_g).  group_maps (B, G, h, w), mass (B, G), lo/hi (G,) -> (B, h, w)."""
    norm = (group_maps - lo.view(1, -1, 1, 1)) / (hi - lo).clamp_min(1e-12).view(1, -1, 1, 1)
    return (mass[:, :, None, None] * norm).sum(1)


class Scorer(nn.Module):
    """Normalisation statistics, thresholds and the post-processing that turns group maps into scores."""

    def __init__(
        self,
        num_groups: int = 3,
        eval_size: int = 256,
        blur_sigma: float = 4.0,
        blur_kernel: int = 5,
        top_ratio: float = 0.01,
        norm_quantiles: tuple[float, float] = (0.001, 0.999),
        image_threshold_quantile: float = 0.99,
        pixel_threshold_quantile: float = 0.999,
    ):
        super().__init__()
        self.eval_size, self.blur_sigma, self.blur_kernel, self.top_ratio = eval_size, blur_sigma, blur_kernel, top_ratio
        self.norm_quantiles = tuple(norm_quantiles)
        self.image_q, self.pixel_q = image_threshold_quantile, pixel_threshold_quantile
        self.register_buffer("lo", torch.zeros(num_groups))
        self.register_buffer("hi", torch.ones(num_groups))
        self.register_buffer("image_threshold", torch.tensor(float("nan")))
        self.register_buffer("pixel_threshold", torch.tensor(float("nan")))
        self.register_buffer("calibrated", torch.tensor(False))

    def postprocess(self, fused: torch.Tensor) -> ScoreOutput:
        """fused (B, h, w) -> resized, blurred (B, S, S) map and its top-ratio image score.

        Always float32, also when called under autocast (bf16-mixed test/predict steps): a bf16 blur
        would quantise the scores (ties in AUROC).
        """
        with torch.autocast(fused.device.type, enabled=False):
            m = F.interpolate(fused[:, None].float(), size=(self.eval_size, self.eval_size), mode="bilinear", align_corners=False)
            m = gaussian_blur(m[:, 0], self.blur_sigma, self.blur_kernel)
            return ScoreOutput(m, top_ratio_score(m, self.top_ratio))

    def forward(self, group_maps: torch.Tensor, mass: torch.Tensor) -> ScoreOutput:
        with torch.autocast(group_maps.device.type, enabled=False):
            return self.postprocess(fuse(group_maps.float(), mass.float(), self.lo.float(), self.hi.float()))

    @torch.no_grad()
    def calibrate(self, group_maps: torch.Tensor, mass: torch.Tensor) -> None:
        """Fit normalisation quantiles per group and the image/pixel thresholds on normal images.

        group_maps: (N, G, h, w), mass: (N, G) from held-out normal training images.
        """
        lo_q, hi_q = self.norm_quantiles
        gm = group_maps.float().cpu().numpy()
        used = mass.cpu().numpy() > 0
        lo, hi = torch.zeros_like(self.lo), torch.ones_like(self.hi)
        for g in range(gm.shape[1]):
            vals = gm[used[:, g], g].ravel()
            if vals.size:
                a, b = np.quantile(vals, [lo_q, hi_q])
                lo[g], hi[g] = float(a), float(max(b, a + 1e-6))
        self.lo.copy_(lo)
        self.hi.copy_(hi)
        out = self(group_maps.to(self.lo.device), mass.to(self.lo.device))
        self.image_threshold.fill_(float(torch.quantile(out.scores.float(), self.image_q)))
        pix = out.maps.flatten().cpu().numpy()
        self.pixel_threshold.fill_(float(np.quantile(pix, self.pixel_q)))
        self.calibrated.fill_(True)
