"""Router: an MLP on the encoder's CLS token, joint top-K over all experts (paper Eq. 1–2)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class RouterOutput(NamedTuple):
    logits: torch.Tensor  # (B, N) raw router scores h(x)
    probs: torch.Tensor  # (B, N) dense softmax over all N logits (for the ESB importance term)
    weights: torch.Tensor  # (B, N) gate G(x): softmax over the K selected logits, zero elsewhere (Eq. 2)
    topk: torch.Tensor  # (B, K) indices of the selected experts


def top_k_gate(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2: G(x) = Softmax(TopK(h(x), k)); entries outside the top-k are zero.

    logits: (B, N) -> weights (B, N), indices (B, k).
    """
    vals, idx = logits.topk(k, dim=-1)  # (B, k)
    weights = torch.zeros_like(logits).scatter(-1, idx, F.softmax(vals, dim=-1))
    return weights, idx


class Router(nn.Module):
    """h(x) = W2 ReLU(W1 cls) (Eq. 1): (B, D) -> RouterOutput over N experts."""

    def __init__(self, dim: int = 768, hidden: int = 256, num_experts: int = 18, top_k: int = 3):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}].")
        self.top_k = top_k
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))

    def forward(self, cls: torch.Tensor, force: torch.Tensor | None = None) -> RouterOutput:
        """``force``: optional (B, K) expert indices that replace the learnt choice (benchmarks, tests).

        Always float32, also under autocast: a bf16 router would flip near-tied top-K choices.
        """
        with torch.autocast(cls.device.type, enabled=False):
            logits = self.mlp(cls.float())
            if force is None:
                weights, idx = top_k_gate(logits, self.top_k)
            else:
                idx = force.to(logits.device)
                weights = torch.zeros_like(logits).scatter(-1, idx, F.softmax(logits.gather(-1, idx), dim=-1))
            return RouterOutput(logits, F.softmax(logits, dim=-1), weights, idx)
