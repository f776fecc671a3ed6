"""Frozen DINOv2 encoder (timm): middle-layer tokens for the experts, last-block CLS for the router.

Weights come from, in order: a local file (``weights: PATH``, .pth/.pt/.bin/.safetensors, timm or
original DINOv2 key names), or the timm/Hugging Face cache or hub (``pretrained: true``). With neither
reachable the run stops with :class:`EncoderWeightsError` saying how to supply the file. A random encoder
is only used when the config says ``pretrained: false`` and then a loud warning is logged.
"""

from __future__ import annotations

import logging
import math
import os
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from amoe.linear import use_onednn_linears

log = logging.getLogger(__name__)


class EncoderWeightsError(RuntimeError):
    """The encoder weights could not be found or do not fit the configured encoder."""


class EncoderOutput(NamedTuple):
    layers: list[torch.Tensor]  # per selected block: (B, P + h*w, D) residual stream, no final norm
    cls: torch.Tensor  # (B, D) CLS token of the last block, before the final norm
    num_prefix: int  # P: CLS + register tokens at the front of each layer
    grid: tuple[int, int]  # (h, w) patch grid


def how_to_supply_weights(name: str) -> str:
    return (
        f"Encoder weights for '{name}' are not available offline.\n"
        "Supply them in one of these ways:\n"
        f"  1. Download once on a machine with internet: python -c \"import timm; timm.create_model('{name}', "
        "pretrained=True)\" and copy the Hugging Face cache (~/.cache/huggingface) to this machine, or\n"
        "  2. download the original DINOv2 checkpoint (e.g. dinov2_vitb14_reg4_pretrain.pth from "
        "https://github.com/facebookresearch/dinov2) or a timm .safetensors file and pass "
        "--model.config.weights /path/to/file, or\n"
        "  3. for a smoke run only, set --model.config.pretrained false (random encoder: results are meaningless)."
    )


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Load a weights file safely (safetensors, or torch.load with weights_only=True)."""
    if not os.path.isfile(path):
        raise EncoderWeightsError(f"Encoder weights file '{path}' does not exist. Check --model.config.weights.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refused by weights_only, or not a torch file
        raise EncoderWeightsError(
            f"'{path}' is not a loadable weights file ({type(e).__name__}: {e}). "
            "Use a .pth/.safetensors state dict of a DINOv2 ViT."
        ) from e
    for key in ("model", "state_dict", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise EncoderWeightsError(f"'{path}' holds a {type(sd).__name__}, not a state dict.")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}


def resample_pos_embed_dinov2(pos: torch.Tensor, grid: tuple[int, int], offset: float = 0.1) -> torch.Tensor:
    """DINOv2's own position-embedding interpolation (what the release runs at every forward): bicubic,
    no anti-aliasing, scale factor (h + offset) / M from its M×M pre-training grid.

    pos: (1, T + M*M, D) with T prefix slots (0 or the CLS slot) -> (1, T + h*w, D).
    """
    m = math.isqrt(pos.shape[1])
    prefix, patch = pos[:, : pos.shape[1] - m * m], pos[:, pos.shape[1] - m * m :]
    x = rearrange(patch.float(), "1 (m n) d -> 1 d m n", m=m)
    x = F.interpolate(x, scale_factor=((grid[0] + offset) / m, (grid[1] + offset) / m), mode="bicubic", antialias=False)
    if tuple(x.shape[-2:]) != tuple(grid):
        raise EncoderWeightsError(f"pos_embed: DINOv2 interpolation of a {m}×{m} grid gave {tuple(x.shape[-2:])}, not {grid}.")
    return torch.cat([prefix, rearrange(x, "1 d h w -> 1 (h w) d").to(pos.dtype)], dim=1)


class FrozenEncoder(nn.Module):
    """DINOv2 ViT from timm, frozen: ``requires_grad=False``, always ``eval()``, forward under ``no_grad``.

    Args:
        name: timm model name (``vit_base_patch14_reg4_dinov2.lvd142m`` in the paper setting).
        layers: 0-based blocks whose outputs feed the experts (blocks 2..9 of ViT-B in the paper).
        img_size: input side (392 in the paper: a 28×28 token grid with patch 14).
        pretrained: load weights (from ``weights`` if given, else timm's cache/hub).
        weights: local weights file; timm or original DINOv2 key names.
        arch: overrides for timm's constructor (``embed_dim``, ``depth``, ``num_heads``, ``patch_size``…)
            used by tiny test/demo encoders.
        pos_embed_resample: how loaded position embeddings are fitted to the token grid: ``timm`` (bicubic,
            anti-aliased, at load) or ``dinov2`` (DINOv2's own interpolation, as the release runs it).
    """

    def __init__(
        self,
        name: str = "vit_base_patch14_reg4_dinov2.lvd142m",
        layers: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 9),
        img_size: int = 392,
        pretrained: bool = True,
        weights: str | None = None,
        arch: dict | None = None,
        pos_embed_resample: str = "timm",
    ):
        super().__init__()
        if pos_embed_resample not in ("timm", "dinov2"):
            raise ValueError(f"pos_embed_resample must be timm or dinov2, got '{pos_embed_resample}'.")
        self.name, self.pretrained, self.weights = name, pretrained, weights
        self.pos_embed_resample = pos_embed_resample
        self.vit = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0, **(arch or {}))
        use_onednn_linears(self.vit)  # fp32 inference on AVX2 CPUs: oneDNN's GEMM (amoe.linear)
        depth = len(self.vit.blocks)
        if any(i < 0 or i >= depth for i in layers):
            raise ValueError(f"encoder layers {list(layers)} out of range for a {depth}-block '{name}'.")
        self.layers = tuple(layers)
        self.last = depth - 1
        self.dim = self.vit.embed_dim
        self.num_prefix = self.vit.num_prefix_tokens
        self.grid = tuple(self.vit.patch_embed.grid_size)
        self.weights_loaded = False
        self.requires_grad_(False)
        self.eval()

    def load_weights(self) -> None:
        """Load the configured weights, or stop with a message saying how to supply them."""
        if self.weights_loaded:
            return
        if self.weights:
            sd = load_state_dict_file(self.weights)
            self._load_checked(sd, self.weights)
        elif self.pretrained:
            try:
                ref = timm.create_model(self.name, pretrained=True, num_classes=0)
            except Exception as e:
                raise EncoderWeightsError(f"{how_to_supply_weights(self.name)}\n(timm said: {type(e).__name__}: {e})") from e
            self._load_checked(ref.state_dict(), f"timm:{self.name}")
        else:
            log.warning(
                "!!! RANDOM ENCODER: '%s' runs with random weights (pretrained: false). Fine for tests and the "
                "offline synthetic demo; results are NOT comparable to the paper. !!!",
                self.name,
            )
        self.weights_loaded = True

    def _load_checked(self, sd: dict[str, torch.Tensor], source: str) -> None:
        from timm.models.vision_transformer import checkpoint_filter_fn

        sd = dict(sd)
        grid = tuple(self.vit.patch_embed.grid_size)
        if self.pos_embed_resample == "dinov2" and "pos_embed" in sd and math.isqrt(sd["pos_embed"].shape[1]) != grid[0]:
            sd["pos_embed"] = resample_pos_embed_dinov2(sd["pos_embed"], grid)
        try:
            sd = checkpoint_filter_fn(sd, self.vit)  # original DINOv2 names -> timm; pos-embed resample (timm's)
        except Exception as e:
            raise EncoderWeightsError(f"{source}: cannot convert weights for '{self.name}' ({e}).") from e
        own = self.vit.state_dict()
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        missing = sorted(set(own) - set(sd))
        bad_shape = sorted(k for k in sd if k in own and sd[k].shape != own[k].shape)
        if missing or bad_shape:
            detail = [f"missing keys: {missing[:5]}{'…' if len(missing) > 5 else ''}"] if missing else []
            detail += [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in bad_shape[:5]]
            raise EncoderWeightsError(
                f"{source} does not fit encoder '{self.name}' (wrong model?):\n  " + "\n  ".join(detail)
                + "\nUse weights of the configured architecture, or change --model.config.encoder."
            )
        self.vit.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True)
        log.info("encoder weights loaded from %s", source)

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)  # frozen: stays in eval mode whatever the caller asks

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """x: (B, 3, H, W) ImageNet-normalised -> selected block outputs and the last block's CLS.

        The same blocks as timm's ``forward_intermediates``, without its split/re-concatenation of the
        prefix tokens. When the last block is not a selected layer, only its CLS output is computed
        (the router's input): the other tokens enter it only as keys/values (``_last_block_cls``).
        """
        vit = self.vit
        t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))  # (B, P + h*w, D)
        kept = {}
        for i, block in enumerate(vit.blocks[: self.last]):
            t = block(t)
            if i in self.layers:
                kept[i] = t
        last = vit.blocks[self.last]
        if self.last in self.layers or not _cls_only_supported(last):
            kept[self.last] = t = last(t)
            cls = t[:, 0]
        else:
            cls = _last_block_cls(last, t)
        h, w = x.shape[-2] // vit.patch_embed.patch_size[0], x.shape[-1] // vit.patch_embed.patch_size[1]
        return EncoderOutput(
            layers=[kept[i] for i in self.layers],  # each (B, P + h*w, D)
            cls=cls,
            num_prefix=self.num_prefix,
            grid=(h, w),
        )


def _cls_only_supported(block: nn.Module) -> bool:
    """A plain pre-norm timm ViT block (DINOv2): x + ls1(attn(norm1 x)), then + ls2(mlp(norm2 x))."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    attn = getattr(block, "attn", None)
    return (
        type(block) is Block
        and type(attn) is Attention
        and getattr(attn, "gate", None) is None
        and isinstance(block.drop_path1, nn.Identity)
        and isinstance(block.drop_path2, nn.Identity)
    )


def _last_block_cls(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLS token of ``block(x)`` (B, D) computing only what it depends on: keys/values of all tokens,
    the CLS query, and the projection/MLP of the CLS alone (~85 % less work than the full block)."""
    attn = block.attn
    b, n, d = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, N, d_h)
    q, k = attn.q_norm(q[:, :, :1]), attn.k_norm(k)
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, attn.attn_dim)  # CLS query only
    cls = x[:, :1] + block.ls1(attn.proj_drop(attn.proj(attn.norm(y))))
    cls = cls + block.ls2(block.mlp(block.norm2(cls)))
    return cls[:, 0]
