"""Component knowledge base: per-class k-means centres of normal patch embeddings (faiss), patch-to-
component assignment and masked average pooling (the component experts' inputs, paper Eq. 7).

The bank is built once before training from the normal training images of each class and is saved in
the checkpoint (``get_extra_state``), so a checkpoint alone is enough for testing and prediction.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def masked_average_pool(feats: torch.Tensor, assign: torch.Tensor, k: int, eps: float = 1e-8):
    """c_k = Σ_p M_k(p) F(p) / (Σ_p M_k(p) + eps) for the hard masks M_k = [assign == k].

    feats: (B, P, D), assign: (B, P) in [0, k) -> pooled (B, k, D), present (B, k) bool.
    """
    masks = F.one_hot(assign, k).to(feats.dtype)  # (B, P, k)
    area = masks.sum(dim=1)  # (B, k)
    pooled = torch.einsum("bpk,bpd->bkd", masks, feats) / (area[..., None] + eps)
    return pooled, area > 0


class ComponentBank(nn.Module):
    """Per-class centres (C, K, D), L2-normalised (spherical k-means: cosine assignment)."""

    def __init__(self, num_components: int = 8, dim: int = 768):
        super().__init__()
        self.num_components, self.dim = num_components, dim
        self.classes: list[str] = []
        self.register_buffer("centres", torch.zeros(0, num_components, dim), persistent=False)

    @property
    def is_built(self) -> bool:
        return len(self.classes) > 0

    def build(self, features: dict[str, torch.Tensor], seed: int = 0, niter: int = 25) -> None:
        """features: class -> (M, D) normal patch embeddings. Runs faiss k-means per class."""
        import faiss

        centres = []
        for cls in sorted(features):
            x = F.normalize(features[cls].float(), dim=-1).cpu().numpy().astype(np.float32)
            if len(x) < self.num_components:
                raise ValueError(
                    f"class '{cls}': {len(x)} patches for {self.num_components} components; "
                    "lower model.config.num_components or add training images."
                )
            km = faiss.Kmeans(
                self.dim, self.num_components, niter=niter, seed=seed, spherical=True, verbose=False,
                min_points_per_centroid=1, max_points_per_centroid=1024,
            )
            km.train(np.ascontiguousarray(x))
            centres.append(torch.from_numpy(km.centroids.copy()))
            log.info("component bank: class %s, %d patches -> %d centres", cls, len(x), self.num_components)
        self.classes = sorted(features)
        self.centres = F.normalize(torch.stack(centres), dim=-1).to(self.centres.device)

    def class_index(self, classes: list[str], feats: torch.Tensor) -> torch.Tensor:
        """Bank row per sample: by class name; for a class the bank does not know (predict on new
        images), the bank whose centres fit the sample's patches best (highest mean max-cosine)."""
        known = {c: i for i, c in enumerate(self.classes)}
        idx = torch.tensor([known.get(c, -1) for c in classes], device=feats.device)
        unknown = (idx < 0).nonzero().flatten()
        if len(unknown):
            f = F.normalize(feats[unknown], dim=-1)  # (U, P, D)
            fit = torch.einsum("upd,ckd->upck", f, self.centres.to(f.dtype)).amax(-1).mean(1)  # (U, C)
            idx[unknown] = fit.argmax(-1)
        return idx

    def assign(self, feats: torch.Tensor, classes: list[str]) -> torch.Tensor:
        """feats: (B, P, D) -> nearest centre (cosine) per patch, (B, P) long."""
        if not self.is_built:
            raise RuntimeError("component bank is empty: it is built at the start of `fit` (or loaded from a checkpoint).")
        rows = self.centres[self.class_index(classes, feats)].to(feats.dtype)  # (B, K, D)
        return torch.einsum("bpd,bkd->bpk", F.normalize(feats, dim=-1), rows).argmax(-1)

    def get_extra_state(self) -> dict:
        return {"classes": list(self.classes), "centres": self.centres.detach().cpu()}

    def set_extra_state(self, state: dict) -> None:
        centres = state["centres"]
        if centres.numel() and centres.shape[1:] != (self.num_components, self.dim):
            raise ValueError(
                f"checkpoint component bank has shape {tuple(centres.shape[1:])}, the model expects "
                f"({self.num_components}, {self.dim}): num_components or the encoder differ."
            )
        self.classes = list(state["classes"])
        self.centres = centres.to(self.centres.device)
