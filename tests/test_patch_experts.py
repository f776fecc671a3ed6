import torch
import torch.nn.functional as F

from amoe.patch_experts import LinearAttention, PatchExpert, fuse_layers, phi


def test_phi_is_elu_plus_one_with_its_gradient():
    t = torch.tensor([-2.0, -0.5, 0.5, 3.0], requires_grad=True)
    out = phi(t)
    # hand values: e^-2 = 0.1353353, e^-0.5 = 0.6065307; t + 1 for t > 0
    torch.testing.assert_close(out, torch.tensor([0.1353353, 0.6065307, 1.5, 4.0]), rtol=0, atol=1e-7)
    out.sum().backward()
    torch.testing.assert_close(t.grad, torch.tensor([0.1353353, 0.6065307, 1.0, 1.0]), rtol=0, atol=1e-7)
    x = torch.randn(10_000) * 4
    torch.testing.assert_close(phi(x), F.elu(x) + 1, rtol=0, atol=1e-6)
    # bf16: φ stays within bf16 rounding (2^-8 relative) of the exact value; ELU + 1 rounds expm1 near -1
    # first, an absolute error up to 2^-8 (for t << 0 it returns 0 where e^t is ~1e-3)
    xb = x.bfloat16()
    exact = F.elu(xb.double()) + 1
    assert ((phi(xb).double() - exact).abs() <= exact * 2**-8).all()
    neg = xb < 0
    assert ((F.elu(xb[neg]) + 1).double() - exact[neg]).abs().max() <= 2**-8


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


def test_fuse_layers_is_the_elementwise_mean_in_the_layers_dtype():
    a, b, c = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -2.0]]), torch.tensor([[5.0, 6.0]])
    out = fuse_layers([a, b, c])
    torch.testing.assert_close(out, torch.tensor([[3.0, 2.0]]))
    assert a.tolist() == [[1.0, 2.0]]  # the accumulator is a copy: the first layer is not written
    assert fuse_layers([a]) is not a and fuse_layers([a]).tolist() == a.tolist()
    # bf16 layers are summed in float32 and rounded once: 1 + 2⁻⁸ + 2⁻⁸ would round to 1 in bf16 sums
    one, tiny = torch.ones(1, dtype=torch.bfloat16), torch.full((1,), 2.0**-8, dtype=torch.bfloat16)
    out = fuse_layers([one, tiny, tiny, tiny])
    assert out.dtype == torch.bfloat16
    assert out.item() == torch.tensor((1 + 3 * 2.0**-8) / 4).bfloat16().item()
    layers = [torch.randn(2, 7, 5) for _ in range(8)]
    torch.testing.assert_close(fuse_layers(layers), torch.stack(layers).mean(0))
