"""Component knowledge base: per-class k-means centres of normal patch embeddings (faiss), patch-to-
component assignment and masked average pooling (the component experts' inputs, paper Eq. 7).

The bank is built once before training from the normal training images of each class and is saved in
the checkpoint (``get_extra_state``), so a checkpoint alone is enough for testing and prediction.
"""

from __future__ import annotations

import logging
import math

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


class PatchSample:
    """The k-means sample of each class, drawn uniformly from ALL its normal training images (Eq. 7: "all
    normal training samples of the class"): each image gives ⌈budget / n_images⌉ random patches (all of
    them if it has fewer); a class keeps at most ``budget`` patches.

    images_per_class: class -> number of its training images; feed every image once with :meth:`add`.
    """

    def __init__(self, images_per_class: dict[str, int], budget: int, seed: int = 0):
        if budget < 1:
            raise ValueError(f"bank_patches_per_class must be at least 1, got {budget}.")
        self.per_image = {c: math.ceil(budget / n) for c, n in images_per_class.items() if n > 0}
        self.budget = budget
        self.gen = torch.Generator().manual_seed(seed)
        self.chunks: dict[str, list[torch.Tensor]] = {}

    def add(self, cls: str, patches: torch.Tensor) -> None:
        """patches: (P, D) of one image of class ``cls``."""
        if cls not in self.per_image:
            raise KeyError(f"class '{cls}' is not among the training classes {sorted(self.per_image)}.")
        q = self.per_image[cls]
        if q < len(patches):
            patches = patches[torch.randperm(len(patches), generator=self.gen)[:q]]
        self.chunks.setdefault(cls, []).append(patches)

    def result(self) -> dict[str, torch.Tensor]:
        """class -> (M, D) with M ≤ budget."""
        out = {}
        for cls, chunks in self.chunks.items():
            x = torch.cat(chunks)
            if len(x) > self.budget:
                x = x[torch.randperm(len(x), generator=self.gen)[: self.budget]]
            out[cls] = x
        return out


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
            km = faiss.Kmeans(  # every sampled patch is used (faiss would otherwise keep 256 per centre)
                self.dim, self.num_components, niter=niter, seed=seed, spherical=True, verbose=False,
                min_points_per_centroid=1, max_points_per_centroid=math.ceil(len(x) / self.num_components),
            )
            km.train(np.ascontiguousarray(x))
            centres.append(torch.from_numpy(km.centroids.copy()))
            log.info("component bank: class %s, %d patches -> %d centres", cls, len(x), self.num_components)
        self.classes = sorted(features)
        self.centres = F.normalize(torch.stack(centres), dim=-1).to(self.centres.device)

    def class_index(self, classes: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """Bank row per class name, (B,) long; -1 for a class the bank does not know (predict on new images)."""
        known = {c: i for i, c in enumerate(self.classes)}
        return torch.tensor([known.get(c, -1) for c in classes], dtype=torch.long, device=device)

    def best_fitting_rows(self, feats: torch.Tensor) -> torch.Tensor:
        """feats: (B, P, D) -> (B,) the bank whose centres fit each sample's patches best (highest mean
        max-cosine): the row for a class the bank does not know."""
        f = F.normalize(feats, dim=-1)
        return torch.einsum("bpd,ckd->bpck", f, self.centres.to(f.dtype)).amax(-1).mean(1).argmax(-1)

    def assign_rows(self, feats: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """feats: (B, P, D), rows: (B,) bank rows -> nearest centre (cosine) per patch, (B, P) long.
        Tensor-only, so the export traces it as it is."""
        centres = self.centres[rows].to(feats.dtype)  # (B, K, D)
        return torch.einsum("bpd,bkd->bpk", F.normalize(feats, dim=-1), centres).argmax(-1)

    def assign(self, feats: torch.Tensor, classes: list[str]) -> torch.Tensor:
        """feats: (B, P, D), classes: B class names -> nearest centre (cosine) per patch, (B, P) long."""
        if not self.is_built:
            raise RuntimeError("component bank is empty: it is built at the start of `fit` (or loaded from a checkpoint).")
        rows = self.class_index(classes, feats.device)
        unknown = (rows < 0).nonzero().flatten()
        if len(unknown):  # only those samples pay for the fit over every bank
            rows[unknown] = self.best_fitting_rows(feats[unknown])
        return self.assign_rows(feats, rows)

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
