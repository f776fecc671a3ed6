"""The speed-ups of docs/PERFORMANCE.md compute the same numbers as the plain formulations."""

import warnings

import pytest
import torch

from amoe.encoder import FrozenEncoder
from amoe.global_experts import GlobalExpert

ARCH = {"embed_dim": 32, "depth": 4, "num_heads": 2}


def _encoder(layers=(0, 1, 2)) -> FrozenEncoder:
    torch.manual_seed(0)
    enc = FrozenEncoder("vit_small_patch14_reg4_dinov2", layers, 56, False, None, ARCH)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.2)  # non-trivial weights (layer scale etc.)
    return enc


def _timm_reference(enc: FrozenEncoder, x: torch.Tensor):
    wanted = sorted(set(enc.layers) | {enc.last})
    outs = enc.vit.forward_intermediates(
        x, indices=wanted, norm=False, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
    )
    by_block = {i: torch.cat([prefix, tokens], dim=1) for i, (tokens, prefix) in zip(wanted, outs)}
    return [by_block[i] for i in enc.layers], by_block[enc.last][:, 0]


@pytest.mark.parametrize("layers", [(0, 1, 2), (1, 3)])  # last block not selected (CLS only) / selected (full)
def test_encoder_matches_timm_forward_intermediates(layers):
    enc = _encoder(layers)
    x = torch.randn(2, 3, 56, 56)
    out = enc(x)
    ref_layers, ref_cls = _timm_reference(enc, x)
    for a, b in zip(out.layers, ref_layers):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(out.cls, ref_cls, rtol=1e-5, atol=1e-6)


def test_encoder_under_autocast_matches_timm():
    enc = _encoder()
    x = torch.randn(2, 3, 56, 56)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(x)
        ref_layers, ref_cls = _timm_reference(enc, x)
    for a, b in zip(out.layers, ref_layers):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(out.cls, ref_cls, rtol=2e-2, atol=2e-2)  # CLS-only last block: bf16 rounding


def test_global_expert_channels_last_matches_contiguous_execution():
    torch.manual_seed(0)
    expert = GlobalExpert(dim=16, grid=(4, 4), patch=14, width=8, code=8, student_channels=(8, 16)).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = expert(x)
        ae, student = expert.ae(x.contiguous()), expert.student(x.contiguous())  # plain NCHW path
    torch.testing.assert_close(out.ae, ae, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.student, student, rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("aupro", [True, False])
def test_pixel_metrics_counting_path_equals_the_sort_of_all_normal_pixels(aupro):
    """evaluate/pixel_metrics count normal pixels per anomalous score instead of sorting them: the same
    integer counts, so bit-identical metrics (ties, float64 maps, pieces, all-normal, all-anomalous)."""
    import numpy as np

    from amoe.metrics import _pixel_split_metrics, _split_pixels, pixel_metrics

    rng = np.random.default_rng(0)
    cases = []
    for trial in range(12):
        n, s = int(rng.integers(1, 40)), int(rng.integers(4, 20))
        maps = rng.random((n, s, s), dtype=np.float32)
        if trial % 3 == 0:
            maps = (rng.integers(0, 12, (n, s, s)) / 4).astype(np.float32)  # many ties, also with normal pixels
        if trial % 4 == 1:
            maps = maps.astype(np.float64)  # float32-exact float64 takes the same path
        masks = rng.random((n, s, s)) < (0.1, 0.3, 0.02)[trial % 3]
        cases.append(([maps], [masks]))
        cases.append(([maps[: n // 2 + 1], maps[n // 2 + 1 :]], [masks[: n // 2 + 1], masks[n // 2 + 1 :]]))  # pieces
    maps = rng.random((3, 8, 8), dtype=np.float32)
    cases += [([maps], [np.zeros_like(maps, bool)]), ([maps], [np.ones_like(maps, bool)])]
    for maps_l, masks_l in cases:
        maps_l = [m for m in maps_l if len(m)]
        masks_l = [k for k in masks_l if len(k)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # undefined metrics (no normal / no anomalous pixel)
            got = pixel_metrics(maps_l, masks_l, aupro=aupro)
            neg, pos, sizes = _split_pixels(maps_l, masks_l, regions=aupro)
            ref = _pixel_split_metrics(neg, pos, sizes if aupro else None, 0.3)
        assert str(got) == str(ref)  # bit-identical, NaN included


def test_deferred_finite_check_stops_training_at_the_next_check(tmp_path, monkeypatch, capsys):
    """On an accelerator training_step reads its NaN/Inf flags every FINITE_CHECK_EVERY steps (no host sync
    per step). Emulated on CPU with a check every 4 steps: a NaN loss at step 1 stops the fit at step 3."""
    import math

    from test_bad_input import _ckpts, _fit

    from amoe.model import AnomalyMoE
    from amoe.module import AnomalyMoEModule

    loss, calls = AnomalyMoE.loss, []

    def nan_loss(self, out):  # the second training step's loss (step 1) is NaN, and so is every update after it
        calls.append(1)
        losses = loss(self, out)
        return losses._replace(total=losses.total * math.nan) if len(calls) == 2 else losses

    monkeypatch.setattr(AnomalyMoE, "loss", nan_loss)
    monkeypatch.setattr(AnomalyMoEModule, "FINITE_CHECK_EVERY", 4)
    monkeypatch.setattr(AnomalyMoEModule, "_finite_check_due", lambda self: (self.global_step + 1) % 4 == 0)
    assert _fit(tmp_path, "--trainer.max_steps", "8") == 1
    err = capsys.readouterr().err
    assert "steps 0..2" in err and "NaN/Inf" in err
    for p in _ckpts(tmp_path):  # any checkpoint written holds finite weights (non-finite ones are refused)
        ck = torch.load(p, weights_only=True)
        assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if torch.is_tensor(v) and v.is_floating_point())


def test_linear_attention_fast_phi_matches_elu_plus_one_with_gradients():
    """φ = exp(min(t, 0)) + max(t, 0) on q and k's contiguous rows: the outputs and gradients of F.elu(q) + 1."""
    import torch.nn.functional as F
    from einops import rearrange

    from amoe.patch_experts import LinearAttention

    torch.manual_seed(0)
    attn = LinearAttention(32, 4)
    x = torch.randn(2, 9, 32, requires_grad=True)

    def plain(x):
        q, k, v = rearrange(attn.qkv(x), "b t (three h d) -> three b h t d", three=3, h=attn.num_heads)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kv = torch.einsum("bhtd,bhte->bhde", k, v)
        z = 1.0 / (torch.einsum("bhtd,bhd->bht", q, k.sum(dim=2)) + attn.eps)
        return attn.proj(rearrange(torch.einsum("bhtd,bhde->bhte", q, kv) * z[..., None], "b h t d -> b t (h d)"))

    out, ref = attn(x), plain(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    g_out = torch.autograd.grad(out.square().sum(), [x, *attn.parameters()])
    g_ref = torch.autograd.grad(ref.square().sum(), [x, *attn.parameters()])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
