"""Tiny encoder and model fixtures (embed 32, depth 4, 56 px): everything runs on CPU in seconds."""

import pytest
import torch

from amoe.model import AnomalyMoE, AnomalyMoEConfig


def tiny_config(**overrides) -> AnomalyMoEConfig:
    """A complete AnomalyMoE at toy size: 4-block ViT (dim 32, patch 14, 56 px -> 4×4 grid), 2/2/2 experts."""
    kw = dict(
        encoder="vit_small_patch14_reg4_dinov2",
        pretrained=False,
        encoder_arch={"embed_dim": 32, "depth": 4, "num_heads": 2, "init_values": 1.0},
        img_size=56,
        layers=[0, 1, 2, 3],
        fuse_groups=[[0, 1], [2, 3]],
        num_patch_experts=2,
        num_component_experts=2,
        num_global_experts=2,
        top_k=2,
        router_hidden=16,
        decoder_depth=4,
        decoder_heads=2,
        num_components=3,
        component_hidden=16,
        component_bottleneck=8,
        global_width=16,
        global_code=16,
        student_channels=[8, 16],
        eval_size=32,
    )
    kw.update(overrides)
    return AnomalyMoEConfig(**kw)


def tiny_model(**overrides) -> AnomalyMoE:
    """A tiny model with its component bank built on random images (classes 'a' and 'b')."""
    torch.manual_seed(0)
    model = AnomalyMoE(tiny_config(**overrides))
    if model.config.num_component_experts:
        x = torch.randn(4, 3, 56, 56)
        emb = model.patch_embeddings(x).flatten(0, 1)
        model.component_bank.build({"a": emb, "b": emb.flip(0)})
    return model


@pytest.fixture
def model() -> AnomalyMoE:
    return tiny_model()
