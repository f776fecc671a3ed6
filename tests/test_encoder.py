import pytest
import torch

from amoe.encoder import EncoderWeightsError, FrozenEncoder
from amoe.linear import Linear

ARCH = {"embed_dim": 32, "depth": 4, "num_heads": 2}


def _encoder(**kw) -> FrozenEncoder:
    args = dict(name="vit_small_patch14_reg4_dinov2", layers=(0, 1, 2, 3), img_size=56, pretrained=False, arch=ARCH)
    args.update(kw)
    return FrozenEncoder(**args)


def to_original_dinov2_names(sd: dict) -> dict:
    """timm ViT-reg state dict -> the key layout of facebookresearch/dinov2 checkpoints."""
    out = {k: v for k, v in sd.items() if k not in ("reg_token", "pos_embed")}
    out["register_tokens"] = sd["reg_token"]
    out["pos_embed"] = torch.cat([torch.zeros_like(sd["pos_embed"][:, :1]), sd["pos_embed"]], dim=1)  # + CLS slot
    out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return out


def test_encoder_is_frozen_and_stays_in_eval_mode():
    enc = _encoder()
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    x = torch.randn(2, 3, 56, 56, requires_grad=True)
    out = enc(x)
    assert not out.cls.requires_grad and all(not t.requires_grad for t in out.layers)
    assert out.grid == (4, 4) and out.num_prefix == 5
    assert [t.shape for t in out.layers] == [torch.Size([2, 21, 32])] * 4


@pytest.mark.parametrize("naming", ["timm", "dinov2"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_round_trip_through_a_local_file(tmp_path, naming, suffix):
    torch.manual_seed(1)
    src = _encoder()
    sd = {k: v.clone().contiguous() for k, v in src.vit.state_dict().items()}
    if naming == "dinov2":
        sd = to_original_dinov2_names(sd)
    path = str(tmp_path / f"w{suffix}")
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, path)
    else:
        torch.save({"model": sd}, path)
    torch.manual_seed(2)
    dst = _encoder(pretrained=True, weights=path)
    x = torch.randn(1, 3, 56, 56)
    assert not torch.allclose(dst(x).cls, src(x).cls)
    dst.load_weights()
    a, b = src(x), dst(x)
    torch.testing.assert_close(a.cls, b.cls)
    for la, lb in zip(a.layers, b.layers):
        torch.testing.assert_close(la, lb)


def test_missing_weights_stop_with_instructions(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    enc = _encoder(name="vit_small_patch14_reg4_dinov2.lvd142m", pretrained=True)
    with pytest.raises(EncoderWeightsError) as e:
        enc.load_weights()
    msg = str(e.value)
    assert "--model.config.weights" in msg and "vit_small_patch14_reg4_dinov2.lvd142m" in msg


def test_missing_weights_file_is_named():
    with pytest.raises(EncoderWeightsError, match="/no/such/file.pth"):
        _encoder(pretrained=True, weights="/no/such/file.pth").load_weights()


def test_weights_of_another_model_are_refused(tmp_path):
    other = FrozenEncoder("vit_small_patch14_reg4_dinov2", (0, 1), 56, False, None, {"embed_dim": 48, "depth": 2, "num_heads": 2})
    path = tmp_path / "other.pth"
    torch.save(other.vit.state_dict(), path)
    with pytest.raises(EncoderWeightsError, match="does not fit"):
        _encoder(pretrained=True, weights=str(path)).load_weights()


def test_pickled_non_tensor_file_is_refused_safely(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"obj": object()}, path)
    with pytest.raises(EncoderWeightsError, match="not a loadable weights file"):
        _encoder(pretrained=True, weights=str(path)).load_weights()


def test_random_encoder_warns_loudly(caplog):
    with caplog.at_level("WARNING"):
        _encoder().load_weights()
    assert "RANDOM ENCODER" in caplog.text


@pytest.mark.parametrize("naming", ["timm", "dinov2"])
def test_pos_embed_resampling_timm_or_dinov2(tmp_path, naming):
    """Weights of a 112-px (8×8 grid) ViT loaded into a 56-px (4×4) encoder: `dinov2` interpolates as DINOv2
    does (bicubic, no anti-aliasing, scale (4 + 0.1)/8), `timm` with timm's anti-aliased resampling."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(3)
    big = _encoder(img_size=112)
    sd = {k: v.clone() for k, v in big.vit.state_dict().items()}
    patch = sd["pos_embed"]  # (1, 64, 32): timm's reg4 ViT has no prefix slot in pos_embed
    torch.save(to_original_dinov2_names(sd) if naming == "dinov2" else sd, tmp_path / "w.pth")
    grid = patch.reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    expected = {
        "dinov2": torch.nn.functional.interpolate(grid, scale_factor=(4.1 / 8, 4.1 / 8), mode="bicubic", antialias=False)
        .permute(0, 2, 3, 1).reshape(1, 16, 32),
        "timm": resample_abs_pos_embed(patch, new_size=[4, 4], num_prefix_tokens=0),
    }
    loaded = {}
    for mode in ("dinov2", "timm"):
        enc = _encoder(pretrained=True, weights=str(tmp_path / "w.pth"), pos_embed_resample=mode)
        enc.load_weights()
        loaded[mode] = enc.vit.pos_embed.detach()
        torch.testing.assert_close(loaded[mode], expected[mode])
    assert not torch.allclose(loaded["dinov2"], loaded["timm"], atol=1e-4)
    with pytest.raises(ValueError, match="pos_embed_resample"):
        _encoder(pos_embed_resample="nearest")


def test_encoder_linears_take_the_onednn_gemm_with_the_same_features(monkeypatch):
    enc = _encoder()
    linears = [m for m in enc.vit.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is Linear for m in linears)
    x = torch.randn(2, 3, 56, 56)
    outs = {}
    for mode in ("mkl", "onednn"):
        monkeypatch.setenv("AMOE_LINEAR", mode)
        outs[mode] = enc(x)
    for a, b in zip(outs["mkl"].layers, outs["onednn"].layers, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["mkl"].cls, outs["onednn"].cls, atol=1e-5, rtol=1e-5)
