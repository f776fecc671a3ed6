"""AnomalyMoE (Gu et al., AAAI 2026) in plain PyTorch.

Frozen DINOv2 encoder -> router (top-K over all experts) -> three groups of experts that reconstruct
the encoder's features at three semantic levels:
  patch      (N_p) noisy bottleneck + linear-attention decoder    -> pixel map S_p    (Eq. 5–6)
  component  (N_c) MLP autoencoders over k-means part vectors     -> part map S_c     (Eq. 7)
  global     (N_g) convolutional AE (+ student) from the image    -> global map S_g   (Eq. 8)
Training loss: Σ_{j∈topK} G_j L_rec^(j) + λ_ESB L_ESB + λ_EIR L_EIR (Eq. 9).

Dimension legend: B batch, D encoder width, P prefix tokens (CLS + registers), h×w token grid,
N = N_p + N_c + N_g experts, K router top-k, C component centres per class, G = 3 expert groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from einops import rearrange
from torch import nn

from amoe.club import EIR, representation
from amoe.component_bank import ComponentBank, masked_average_pool
from amoe.component_experts import ComponentExpert
from amoe.encoder import EncoderOutput, FrozenEncoder
from amoe.global_experts import GlobalExpert
from amoe.losses import (
    ESBTerms,
    component_loss,
    cosine_distance,
    esb_loss,
    gather_batch,
    global_loss,
    patch_loss,
    scale_gradient,
)
from amoe.patch_experts import PatchExpert, fuse_layers
from amoe.router import Router, RouterOutput
from amoe.scoring import Scorer

GROUPS = ("patch", "component", "global")


@dataclass
class AnomalyMoEConfig:
    """Every model hyper-parameter, with the paper's values as defaults."""

    # encoder
    encoder: str = "vit_base_patch14_reg4_dinov2.lvd142m"
    pretrained: bool = True
    weights: str | None = None
    encoder_arch: dict | None = None  # timm overrides for tiny encoders (embed_dim, depth, num_heads, patch_size)
    img_size: int = 392
    pos_embed_resample: str = "timm"  # timm: bicubic anti-aliased at load | dinov2: DINOv2's interpolation (the release)
    layers: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 7, 8, 9])
    fuse_groups: list[list[int]] = field(default_factory=lambda: [[0, 1, 2, 3], [4, 5, 6, 7]])
    # router
    num_patch_experts: int = 6
    num_component_experts: int = 6
    num_global_experts: int = 6
    top_k: int = 3
    router_hidden: int = 256
    router_input: str = "cls"  # cls (the paper) | patch_mean (mean patch token: for random encoders, whose CLS is near constant)
    # patch experts
    decoder_depth: int = 8
    decoder_heads: int = 12
    bottleneck_dropout: float = 0.2
    feature_noise: float = 0.0
    hard_mining_p: float = 0.9
    hard_mining_factor: float = 0.1
    # component experts
    num_components: int = 8
    component_hidden: int = 256
    component_bottleneck: int = 64
    # global experts
    global_expert: str = "ae_student"
    global_width: int = 128
    global_code: int = 128
    student_channels: list[int] = field(default_factory=lambda: [256, 512])
    ae_jitter: float = 0.2
    # losses
    group_scales: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.1])  # patch, component, global
    use_esb: bool = True
    lambda_esb: float = 0.01
    capacity_factor: float = 1.25
    lambda_importance: float = 1.0
    lambda_load: float = 1.0
    lambda_z: float = 1.0
    z_loss_mean: str = "all"  # all: mean over B·N logits (design spec, release) | batch: (1/B)·Σ_{b,j} logit² (Eq. 3; paper.yaml)
    esb_batch: str = "global"  # global: ESB over the batch of all DDP ranks (Eq. 3) | local: per rank (the release)
    use_eir: bool = True
    lambda_eir: float = 1e-4
    # scoring
    eval_size: int = 256
    blur_sigma: float = 4.0
    blur_kernel: int = 5
    top_ratio: float = 0.01
    map_norm: str = "train_quantile"  # train_quantile | test_minmax (the reference's transductive norm) | none
    norm_quantiles: list[float] = field(default_factory=lambda: [0.001, 0.999])
    image_threshold_quantile: float = 0.99
    pixel_threshold_quantile: float = 0.999

    @property
    def num_experts(self) -> int:
        return self.num_patch_experts + self.num_component_experts + self.num_global_experts

    def validate(self) -> None:
        n = self.num_experts
        if n == 0 or not 1 <= self.top_k <= n:
            raise ValueError(f"top_k={self.top_k} must be in [1, {n}] (the total number of experts).")
        flat = sorted(i for g in self.fuse_groups for i in g)
        if flat and (flat[0] < 0 or flat[-1] >= min(len(self.layers), self.decoder_depth)):
            raise ValueError(
                f"fuse_groups {self.fuse_groups} index {len(self.layers)} encoder layers and "
                f"{self.decoder_depth} decoder blocks; indices must be below both."
            )
        if self.map_norm not in ("train_quantile", "test_minmax", "none"):
            raise ValueError(f"map_norm must be train_quantile, test_minmax or none, got '{self.map_norm}'.")
        if self.router_input not in ("cls", "patch_mean"):
            raise ValueError(f"router_input must be cls or patch_mean, got '{self.router_input}'.")
        if self.z_loss_mean not in ("batch", "all"):
            raise ValueError(f"z_loss_mean must be batch (Eq. 3) or all (the release), got '{self.z_loss_mean}'.")
        if self.esb_batch not in ("global", "local"):
            raise ValueError(f"esb_batch must be global (Eq. 3) or local (per DDP rank, the release), got '{self.esb_batch}'.")
        if len(self.group_scales) != 3:
            raise ValueError("group_scales needs three values: patch, component, global.")


class ModelOutput(NamedTuple):
    router: RouterOutput
    expert_losses: torch.Tensor  # (B, N) per-sample reconstruction loss of each expert (0 where not run)
    group_maps: torch.Tensor  # (B, G, h, w) gate-weighted mean map of each group's selected experts
    group_mass: torch.Tensor  # (B, G) gate mass of each group (sums to 1 over groups)
    reps: list[torch.Tensor] | None  # per group (E_g, B, D) LayerNorm'd expert representations (training)
    expert_maps: torch.Tensor | None = None  # (B, N, h, w) map of every expert that ran (0 where it did not)


class Losses(NamedTuple):
    total: torch.Tensor
    reconstruction: torch.Tensor
    esb: ESBTerms
    eir: torch.Tensor
    per_group: torch.Tensor  # (G,) gate-weighted reconstruction loss of each group, batch mean


def color_jitter(image: torch.Tensor, strength: float) -> torch.Tensor:
    """One of brightness / contrast / saturation (±strength) per sample, on an ImageNet-normalised batch."""
    mean = torch.tensor([0.485, 0.456, 0.406], device=image.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=image.device).view(1, 3, 1, 1)
    x = image * std + mean  # (B, 3, H, W) in [0, 1]
    b = x.shape[0]
    factor = 1 + (torch.rand(b, 1, 1, 1, device=x.device) * 2 - 1) * strength
    kind = torch.randint(0, 3, (b, 1, 1, 1), device=x.device)
    gray = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # (B, 1, H, W)
    brightness = x * factor
    contrast = (x - gray.mean((2, 3), keepdim=True)) * factor + gray.mean((2, 3), keepdim=True)
    saturation = (x - gray) * factor + gray
    x = torch.where(kind == 0, brightness, torch.where(kind == 1, contrast, saturation)).clamp(0, 1)
    return (x - mean) / std


def init_linear(module: nn.Module) -> None:
    """Reference init: Linear weights ~ truncated normal (std 0.01, ±0.03), biases 0; LayerNorm 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class AnomalyMoE(nn.Module):
    def __init__(self, config: AnomalyMoEConfig | None = None):
        super().__init__()
        cfg = self.config = config or AnomalyMoEConfig()
        cfg.validate()
        self.encoder = FrozenEncoder(
            cfg.encoder, tuple(cfg.layers), cfg.img_size, cfg.pretrained, cfg.weights, cfg.encoder_arch, cfg.pos_embed_resample
        )
        dim, grid = self.encoder.dim, self.encoder.grid
        patch = self.encoder.vit.patch_embed.patch_size[0]
        self.router = Router(dim, cfg.router_hidden, cfg.num_experts, cfg.top_k)
        self.patch_experts = nn.ModuleList(
            PatchExpert(dim, cfg.decoder_depth, cfg.decoder_heads, cfg.fuse_groups, cfg.bottleneck_dropout, cfg.feature_noise)
            for _ in range(cfg.num_patch_experts)
        )
        self.component_bank = ComponentBank(cfg.num_components, dim)
        self.component_experts = nn.ModuleList(
            ComponentExpert(dim, cfg.component_hidden, cfg.component_bottleneck) for _ in range(cfg.num_component_experts)
        )
        self.global_experts = nn.ModuleList(
            GlobalExpert(dim, grid, patch, cfg.global_expert, cfg.global_width, cfg.global_code, tuple(cfg.student_channels))
            for _ in range(cfg.num_global_experts)
        )
        self.eir = EIR(dim)
        self.scorer = Scorer(
            len(GROUPS), cfg.eval_size, cfg.blur_sigma, cfg.blur_kernel, cfg.top_ratio, tuple(cfg.norm_quantiles),
            cfg.image_threshold_quantile, cfg.pixel_threshold_quantile,
        )
        for m in (self.router, self.patch_experts, self.component_experts):
            init_linear(m)
        n_p, n_c = cfg.num_patch_experts, cfg.num_component_experts
        self.group_slices = [slice(0, n_p), slice(n_p, n_p + n_c), slice(n_p + n_c, cfg.num_experts)]

    @torch.no_grad()
    def patch_embeddings(self, image: torch.Tensor) -> torch.Tensor:
        """F̄: mean of the selected encoder layers' patch tokens, (B, 3, H, W) -> (B, h*w, D)."""
        enc = self.encoder(image)
        return fuse_layers(enc.layers)[:, enc.num_prefix :]

    def forward(
        self, image: torch.Tensor, classes: list[str], sparse: bool = False, route: torch.Tensor | None = None
    ) -> ModelOutput:
        """image: (B, 3, H, W) ImageNet-normalised; classes: B class names (for the component bank).

        ``sparse``: run each expert once, on the sub-batch of samples whose top-K holds it (inference;
        SPEC §2.11); otherwise all experts see the whole batch (training, as in the release). Both give
        the same maps and losses for the selected experts. ``route``: optional forced (B, K) expert choice.

        Under ``torch.autocast`` (bf16-mixed) the heavy parts (encoder, experts) run in low precision;
        the router, the component assignment/pooling and everything after the expert maps stay float32.
        """
        cfg = self.config
        b = image.shape[0]
        if route is not None:
            self._check_route(route, b)
        enc = self.encoder(image)
        (h, w), p = enc.grid, enc.num_prefix
        fused, enc_groups, router_in = self.fuse(enc)
        target = fused[:, p:]  # F̄ (B, h*w, D)
        router = self.router(router_in, force=route)
        selected = torch.zeros_like(router.weights, dtype=torch.bool).scatter_(1, router.topk, True)  # (B, N)

        ae_image, ae_target = image, target
        if self.training and cfg.ae_jitter > 0 and len(self.global_experts):
            ae_image = color_jitter(image, cfg.ae_jitter)
            ae_target = self.patch_embeddings(ae_image)
        ae_target = rearrange(ae_target, "b (h w) d -> b d h w", h=h, w=w)

        if len(self.component_experts):
            with torch.autocast(image.device.type, enabled=False):  # cheap; keeps part assignment exact in bf16
                t32 = target.float()
                assign = self.component_bank.assign(t32, classes)  # (B, h*w) in [0, C)
                parts, present = masked_average_pool(t32, assign, cfg.num_components)  # (B, C, D), (B, C)

        losses = image.new_zeros(b, cfg.num_experts)
        maps = image.new_zeros(b, cfg.num_experts, h * w)
        reps: list[list[torch.Tensor]] = [[], [], []]
        experts = [*self.patch_experts, *self.component_experts, *self.global_experts]
        for i, expert in enumerate(experts):
            group = next(g for g, s in enumerate(self.group_slices) if s.start <= i < s.stop)
            idx = slice(None)
            if sparse:
                rows = selected[:, i].nonzero().flatten()
                if rows.numel() == 0:
                    continue  # selected by no sample: never run
                if rows.numel() < b:
                    idx = rows  # a sub-batch (a whole batch stays a view: no gather copies)
            if group == 0:  # patch expert: pointwise cosine distance per fusion group (Eq. 6)
                dec = expert(fused[idx])
                dists = [cosine_distance(e[idx], d[:, p:]) for e, d in zip(enc_groups, dec)]  # per group (b, h*w)
                loss = patch_loss(dists, cfg.hard_mining_p, cfg.hard_mining_factor)
                amap = torch.stack(dists).mean(0)  # (b, h*w)
                rep = dec[-1][:, p:].mean(1)
            elif group == 1:  # component expert: part vectors (Eq. 7)
                rec = expert(parts[idx])  # (b, C, D)
                loss = component_loss(rec, parts[idx], present[idx])
                amap = cosine_distance(rec, parts[idx]).gather(1, assign[idx])  # part score painted on its patches
                rep = (rec * present[idx, :, None]).sum(1) / present[idx].sum(1, keepdim=True).clamp(min=1)
            else:  # global expert: feature map from the image (Eq. 8)
                out = expert(ae_image[idx])
                loss = global_loss(out.ae, ae_target[idx], out.student)
                ref = out.student if out.student is not None else ae_target[idx]
                amap = rearrange((out.ae.float() - ref.float()).pow(2).mean(1), "b h w -> b (h w)")
                rep = (out.student if out.student is not None else out.ae).mean((2, 3))
            losses[idx, i] = loss.to(losses.dtype)
            maps[idx, i] = amap.to(maps.dtype)
            if self.training:
                reps[group].append(representation(rep))

        group_maps, mass = self.fuse_expert_maps(maps, router.weights)
        return ModelOutput(
            router=router,
            expert_losses=losses,
            group_maps=rearrange(group_maps, "b g (h w) -> b g h w", h=h, w=w),
            group_mass=mass,
            reps=[torch.stack(r) for r in reps if r] if self.training else None,
            expert_maps=rearrange(maps, "b n (h w) -> b n h w", h=h, w=w),
        )

    def fuse(self, enc: EncoderOutput) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Encoder output -> bottleneck input F (B, P + h*w, D; mean of the selected layers), the fusion groups'
        targets [(B, h*w, D)] and the router input (B, D: the CLS token or the mean patch token)."""
        p = enc.num_prefix
        fused = fuse_layers(enc.layers)
        enc_groups = [fuse_layers([enc.layers[i] for i in g])[:, p:] for g in self.config.fuse_groups]
        router_in = enc.cls if self.config.router_input == "cls" else fused[:, p:].mean(1)
        return fused, enc_groups, router_in

    def fuse_expert_maps(self, maps: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate-weighted mean map of each group and the group's gate mass.

        maps: (B, N, ...) per-expert maps, weights: (B, N) gates -> (B, G, ...) group maps, (B, G) mass.
        Unselected experts have weight 0, so their (possibly never computed) maps do not matter.
        """
        weights = weights.to(maps.dtype)
        extra = (None,) * (maps.ndim - 2)
        mass = torch.stack([weights[:, s].sum(1) for s in self.group_slices], dim=1)  # (B, G)
        group_maps = torch.stack(
            [
                (weights[:, s][(...,) + extra] * maps[:, s]).sum(1) / mass[:, g][(...,) + extra].clamp_min(1e-12)
                for g, s in enumerate(self.group_slices)
            ],
            dim=1,
        )
        return group_maps, mass

    def _check_route(self, route: torch.Tensor, batch: int) -> None:
        n, k = self.config.num_experts, self.config.top_k
        if route.ndim != 2 or route.shape != (batch, k) or route.dtype.is_floating_point:
            raise ValueError(f"route must be a ({batch}, {k}) integer tensor of expert indices, got {tuple(route.shape)} {route.dtype}.")
        if route.min() < 0 or route.max() >= n:
            raise ValueError(f"route holds an expert index outside [0, {n}).")
        if (route.sort(1).values.diff(dim=1) == 0).any():
            raise ValueError("route selects the same expert twice for one sample.")

    def loss(self, out: ModelOutput) -> Losses:
        """Eq. 9: Σ_{j∈topK} G_j · s_group(j) · L_rec^(j) per sample, batch mean, + λ_ESB L_ESB + λ_EIR L_EIR."""
        cfg = self.config
        weights = out.router.weights
        scales = torch.cat([torch.full((s.stop - s.start,), c) for s, c in zip(self.group_slices, cfg.group_scales)])
        weighted = weights * out.expert_losses * scales.to(weights)  # (B, N)
        per_group = torch.stack([weighted[:, s].sum(1).mean() for s in self.group_slices])
        rec = weighted.sum(1).mean()
        logits, topk, world = out.router.logits, out.router.topk, 1
        if cfg.use_esb and cfg.esb_batch == "global":  # under DDP: Importance, Count, Capacity of the global batch
            (logits, world), (topk, _) = gather_batch(logits), gather_batch(topk)
        esb = esb_loss(logits, topk, cfg.capacity_factor, cfg.lambda_importance, cfg.lambda_load, cfg.lambda_z, cfg.z_loss_mean)
        eir = self.eir(out.reps) if (cfg.use_eir and out.reps) else rec.new_zeros(())
        # DDP averages the ranks' gradients, each holding only its own samples' share of the global ESB: ×W
        esb_term = scale_gradient(esb.total, world) if cfg.use_esb else 0.0
        total = rec + cfg.lambda_esb * esb_term + cfg.lambda_eir * eir
        return Losses(total, rec, esb, eir, per_group)

    def score(self, out: ModelOutput):
        """Final anomaly map (B, S, S) and image score (B,) from the group maps (SPEC §2.10), in float32."""
        return self.scorer(out.group_maps, out.group_mass)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything the main optimiser updates (not the encoder, not the CLUB estimators)."""
        mods = [self.router, self.patch_experts, self.component_experts, self.global_experts]
        return [p for m in mods for p in m.parameters()]
