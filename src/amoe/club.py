"""Expert Information Repulsion (paper Eq. 4): a CLUB upper bound on the mutual information between
the representations of experts of the same group, summed over all pairs within each group.

The variational network q_θ(z_k | z_j) = N(μ(z_j), diag exp(logvar(z_j))) is trained by maximum
likelihood (full Gaussian log-likelihood, log-variance term included) with its own optimiser.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


def representation(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine) of an expert's output representation: (B, D) -> (B, D)."""
    return F.layer_norm(x.float(), x.shape[-1:])


class GaussianCLUB(nn.Module):
    """q_θ(y | x) for one expert group: μ and log-variance MLPs D -> D/2 -> D."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim // 2
        self.mu = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.logvar = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.Tanh())

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean over samples of log q(y_n | x_n) (Gaussian, constant dropped): (B, D), (B, D) -> ()."""
        mu, logvar = self.mu(x), self.logvar(x)
        return (-0.5 * (mu - y).pow(2) / logvar.exp() - 0.5 * logvar).sum(-1).mean()

    def upper_bound(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """CLUB (Eq. 4): E_n[log q(y_n|x_n)] − E_n E_{m≠n}[log q(y_m|x_n)]: (B, D), (B, D) -> ().

        The negative term averages over all B(B−1) non-matched pairs (no sampling; the matched pair is
        not a sample of p(z_j)p(z_k)). A batch of one has no non-matched pair: the bound is 0.
        """
        b = x.shape[0]
        if b < 2:
            return x.new_zeros(())
        mu, logvar = self.mu(x), self.logvar(x)
        inv_var = (-logvar).exp()  # (B, D)
        positive = -0.5 * ((mu - y).pow(2) * inv_var).sum(-1)  # (B,)
        every = -0.5 * ((mu[:, None] - y[None]).pow(2) * inv_var[:, None]).sum(-1)  # (B, B): pair (n, m)
        negative = (every.sum(1) - every.diagonal()) / (b - 1)  # (B,) mean over m ≠ n
        return (positive - negative).mean()


class EIR(nn.Module):
    """One CLUB estimator per expert group; the regulariser sums CLUB over all pairs (j < k) of each group."""

    def __init__(self, dim: int, num_groups: int = 3):
        super().__init__()
        self.estimators = nn.ModuleList(GaussianCLUB(dim) for _ in range(num_groups))

    @staticmethod
    def _pairs(reps: torch.Tensor):
        return itertools.combinations(range(reps.shape[0]), 2)

    def forward(self, reps: list[torch.Tensor]) -> torch.Tensor:
        """reps: per group (E_g, B, D) -> L_EIR, the sum of CLUB bounds over all within-group pairs.

        float32 also under autocast: the bound is a difference of two large sums (cancellation in bf16).
        """
        with torch.autocast(reps[0].device.type, enabled=False):
            terms = [q.upper_bound(r[j].float(), r[k].float()) for q, r in zip(self.estimators, reps) for j, k in self._pairs(r)]
            return torch.stack(terms).sum() if terms else reps[0].new_zeros(())

    def estimator_loss(self, reps: list[torch.Tensor]) -> torch.Tensor:
        """Negative log-likelihood of q_θ on detached representations (its own optimiser minimises it); float32."""
        with torch.autocast(reps[0].device.type, enabled=False):
            terms = [
                -q.log_likelihood(r[j].detach().float(), r[k].detach().float())
                for q, r in zip(self.estimators, reps)
                for j, k in self._pairs(r)
            ]
            return torch.stack(terms).mean() if terms else reps[0].new_zeros((), requires_grad=True)
