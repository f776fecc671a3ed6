"""Patch experts: a noisy bottleneck and a linear-attention Transformer decoder (Dinomaly-style, Eq. 5–6).

Each expert reconstructs the encoder's fused middle-layer tokens; its pointwise cosine distance to the
encoder groups is the patch-level anomaly map S_p.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from amoe.linear import Linear


def fuse_layers(layers: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise mean of equally shaped layers (Eq. 5's fusion: F̄ and the fusion groups), summed in
    float32 in place, returned in the layers' dtype. ``torch.stack(layers).mean(0)`` copies every layer and
    reduces along the strided stack dim: 8–25× slower on CPU for eight (8, 789, 768) layers."""
    acc = layers[0].to(torch.float32, copy=True)
    for t in layers[1:]:
        acc += t
    return acc.div_(len(layers)).to(layers[0].dtype)


class NoisyBottleneck(nn.Module):
    """MLP D -> 4D -> D with dropout on input, hidden and output, plus optional Gaussian noise (Eq. 5)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.2, noise_std: float = 0.0):
        super().__init__()
        self.fc1, self.fc2 = Linear(dim, hidden), Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)
        self.noise_std = noise_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.noise_std > 0:
            x = x + self.noise_std * torch.randn_like(x)
        x = self.drop(x)
        x = self.drop(F.gelu(self.fc1(x)))
        return self.drop(self.fc2(x))


def phi(t: torch.Tensor) -> torch.Tensor:
    """φ(t) = ELU(t) + 1 (Dinomaly's feature map), written as exp(min(t, 0)) + max(t, 0): the same function
    on fast element-wise kernels. ``F.elu`` is 5.7× slower in bf16 and 1.8× in fp32 on a patch expert's q
    and k (docs/PERFORMANCE.md). In bf16 it is also the more exact of the two: ELU + 1 rounds expm1 near −1
    before adding 1 (absolute error up to 2⁻⁸), this stays within bf16 rounding of the exact value."""
    return torch.exp(t.clamp(max=0)) + t.clamp(min=0)


class LinearAttention(nn.Module):
    """Softmax-free attention with φ(t) = ELU(t) + 1 per head (Katharopoulos et al.; Dinomaly):

        out_s = φ(q_s)ᵀ Σ_s' φ(k_s') v_s'ᵀ / (φ(q_s) · Σ_s' φ(k_s') + eps)

    ``eps`` keeps the normaliser away from zero (the reference has none and can produce NaN).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads, self.eps = num_heads, eps
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = x.shape[-1]
        qkv = self.qkv(x)  # (B, T, 3D)
        q, k = rearrange(phi(qkv[..., : 2 * dim]), "b t (two h d) -> two b h t d", two=2, h=self.num_heads)
        v = rearrange(qkv[..., 2 * dim :], "b t (h d) -> b h t d", h=self.num_heads)
        kv = torch.einsum("bhtd,bhte->bhde", k, v)  # (B, H, d, d)
        z = 1.0 / (torch.einsum("bhtd,bhd->bht", q, k.sum(dim=2)) + self.eps)  # (B, H, T)
        out = torch.einsum("bhtd,bhde->bhte", q, kv) * z[..., None]  # (B, H, T, d)
        return self.proj(rearrange(out, "b h t d -> b t (h d)"))


class DecoderBlock(nn.Module):
    """Pre-norm Transformer block with linear attention: x + Attn(LN x), then + MLP(LN x)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, ln_eps: float = 1e-8):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=ln_eps), nn.LayerNorm(dim, eps=ln_eps)
        self.attn = LinearAttention(dim, num_heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(Linear(dim, hidden), nn.GELU(), Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchExpert(nn.Module):
    """Noisy bottleneck + ``depth`` decoder blocks. Returns one reconstruction per fusion group.

    The decoder's block outputs are reversed before grouping, so the deepest decoder blocks pair with
    the shallowest encoder layers (as in the reference implementation).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        groups: list[list[int]],
        dropout: float = 0.2,
        noise_std: float = 0.0,
    ):
        super().__init__()
        self.groups = groups
        self.bottleneck = NoisyBottleneck(dim, 4 * dim, dropout, noise_std)
        self.blocks = nn.ModuleList(DecoderBlock(dim, num_heads) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, T, D) fused encoder tokens -> per group (B, T, D) decoder reconstructions."""
        x = self.bottleneck(x)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        outs = outs[::-1]
        return [fuse_layers([outs[i] for i in g]) for g in self.groups]
