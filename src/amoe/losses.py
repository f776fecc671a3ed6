"""Reconstruction losses of the three expert groups (Eq. 6–8) and Expert Selection Balancing (Eq. 3)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pointwise 1 - cos over the last (channel) dim: (B, P, D), (B, P, D) -> (B, P)."""
    return 1.0 - F.cosine_similarity(a, b, dim=-1)


def scale_easy_gradient(d: torch.Tensor, p: float = 0.9, factor: float = 0.1) -> torch.Tensor:
    """Hard mining: same values; points below the batch p-quantile (the k-th largest distance,
    k = max(1, ⌊N(1-p)⌋), as in the reference) get their gradient multiplied by ``factor``.

    d: (B, P) distances over the whole batch. Without a gradient to shape (inference) ``d`` is returned as is.
    """
    if not d.requires_grad:
        return d
    flat = d.detach().flatten()
    k = max(1, int(flat.numel() * (1 - p)))
    thr = flat.topk(k).values[-1]
    easy = d.detach() < thr
    return torch.where(easy, factor * d + (1 - factor) * d.detach(), d)


def patch_loss(dists: list[torch.Tensor], p: float = 0.9, factor: float = 0.1) -> torch.Tensor:
    """Eq. 6: hard-mined pointwise cosine distance, mean over points, then over fusion groups.

    dists: per group (B, P) pointwise distances ``cosine_distance(enc, dec)`` (the same ones make the
    patch map, so they are computed once) -> (B,) per-sample loss.
    """
    per_group = [scale_easy_gradient(d, p, factor).mean(dim=1) for d in dists]
    return torch.stack(per_group).mean(0)


def component_loss(rec: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Eq. 7: mean over the components present in each image of 1 - cos(AE(c_k), c_k).

    rec, target: (B, K, D); present: (B, K) bool -> (B,).
    """
    d = cosine_distance(rec, target) * present  # (B, K)
    return d.sum(1) / present.sum(1).clamp(min=1)


def global_loss(ae: torch.Tensor, target: torch.Tensor, student: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 8: mean squared error of the AE to the encoder features (+ the student's error to the AE).

    ae, target, student: (B, D, h, w) -> (B,).
    """
    loss = (ae - target).pow(2).mean(dim=(1, 2, 3))
    if student is not None:
        loss = loss + (student - ae).pow(2).mean(dim=(1, 2, 3))
    return loss


class ESBTerms(NamedTuple):
    importance: torch.Tensor  # N · Σ_j P_j²
    load: torch.Tensor  # Σ_j max(C_j − capacity, 0)²
    z: torch.Tensor  # (1/B)·Σ_{b,j} logit² (Eq. 3; or the release's mean over B·N)
    total: torch.Tensor  # λ_imp·importance + λ_load·load + λ_z·z


def esb_loss(
    logits: torch.Tensor,
    topk: torch.Tensor,
    capacity_factor: float = 1.25,
    lambda_importance: float = 1.0,
    lambda_load: float = 1.0,
    lambda_z: float = 1.0,
    z_mean: str = "batch",
) -> ESBTerms:
    """Eq. 3, Expert Selection Balancing over one batch.

    logits: (B, N); topk: (B, K) selected experts.
    P_j = batch mean of the dense softmax; C_j = number of samples whose top-K holds j, made differentiable
    with a straight-through soft count (value of the hard count, gradient of K · Σ_b softmax_bj);
    capacity = capacity_factor · B · K / N.
    ``z_mean``: ``batch`` L_z = (1/B)·Σ_{b,j} logit² as Eq. 3 writes it; ``all``: the mean over all B·N
    logits as the release computes it (1/N of the paper's value).
    """
    if z_mean not in ("batch", "all"):
        raise ValueError(f"z_loss_mean must be batch (Eq. 3) or all (the release), got '{z_mean}'.")
    b, n = logits.shape
    k = topk.shape[1]
    probs = F.softmax(logits, dim=-1)
    importance = n * probs.mean(0).pow(2).sum()
    hard = torch.zeros_like(logits).scatter(-1, topk, 1.0).sum(0)  # (N,)
    soft = k * probs.sum(0)
    count = hard + soft - soft.detach()
    capacity = capacity_factor * b * k / n
    load = F.relu(count - capacity).pow(2).sum()
    z = logits.pow(2).sum(1).mean() if z_mean == "batch" else logits.pow(2).mean()
    return ESBTerms(importance, load, z, lambda_importance * importance + lambda_load * load + lambda_z * z)


def gather_batch(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x over the global batch: (b, ...) on each of W ranks -> (W·b, ..., in rank order), W.

    The local part keeps its graph; the other ranks' parts are constants (each rank back-propagates
    through its own samples only, so summing the ranks' gradients gives the gradient of the global loss).
    Outside torch.distributed (or with one process) x itself, 1. Every rank must hold the same b (the
    training loader drops the last incomplete batch).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 1
    world = dist.get_world_size()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts), world


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Same value, gradient multiplied by ``factor``."""
    return x if factor == 1 else x * factor - x.detach() * (factor - 1)
