import torch
import torch.nn.functional as F

from amoe.patch_experts import LinearAttention, PatchExpert


def test_linear_attention_matches_explicit_formula():
    torch.manual_seed(0)
    attn = LinearAttention(dim=8, num_heads=2, eps=0.0)
    x = torch.randn(2, 5, 8)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)  # (B, H, T, d) each
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    out = torch.zeros(2, 2, 5, 4)
    for b in range(2):
        for h in range(2):
            for s in range(5):
                sim = torch.stack([fq[b, h, s] @ fk[b, h, t] for t in range(5)])  # (T,)
                out[b, h, s] = (sim[:, None] * v[b, h]).sum(0) / sim.sum()
    expected = attn.proj(out.permute(0, 2, 1, 3).reshape(2, 5, 8))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_linear_attention_eps_prevents_division_by_zero():
    attn = LinearAttention(dim=4, num_heads=1, eps=1e-6)
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.bias.fill_(-1e4)  # φ(q) = φ(k) = ELU(-1e4)+1 = 0 exactly in float32
    assert torch.isfinite(attn(torch.randn(1, 3, 4))).all()


def test_patch_expert_groups_pair_reversed_decoder_blocks():
    torch.manual_seed(0)
    expert = PatchExpert(dim=8, depth=4, num_heads=2, groups=[[0, 1], [2, 3]], dropout=0.0).eval()
    x = torch.randn(2, 6, 8)
    outs, h = [], expert.bottleneck(x)
    for blk in expert.blocks:
        h = blk(h)
        outs.append(h)
    g0, g1 = expert(x)
    torch.testing.assert_close(g0, (outs[3] + outs[2]) / 2)  # deepest decoder blocks <-> first encoder group
    torch.testing.assert_close(g1, (outs[1] + outs[0]) / 2)
