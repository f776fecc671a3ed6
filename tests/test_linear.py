import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amoe import linear
from amoe.linear import Linear, conv_linear, onednn_is_faster, use_onednn_linears
from amoe.patch_experts import PatchExpert


def test_conv_linear_matches_a_hand_computed_linear():
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([0.5, 0.0, -1.0])
    # row 1: (1 + 0.5, 2, 1 + 2 - 1); row 2: (-1 + 0.5, 0.5, -1 + 0.5 - 1)
    expected = torch.tensor([[1.5, 2.0, 2.0], [-0.5, 0.5, -1.5]])
    torch.testing.assert_close(conv_linear(x, w, b), expected)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_linear_equals_f_linear_on_any_leading_shape_and_strided_input(bias):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(6, 5, generator=g), (torch.randn(6, generator=g) if bias else None)
    for x in (torch.randn(3, 4, 5, generator=g), torch.randn(2, 5, 4, 3, generator=g).transpose(1, 3)):
        out = conv_linear(x, w, b)
        assert out.shape == (*x.shape[:-1], 6)
        torch.testing.assert_close(out, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_onednn_path_only_for_fp32_cpu_inference_where_the_mode_allows(monkeypatch):
    x = torch.randn(4, 8)
    monkeypatch.setenv("AMOE_LINEAR", "onednn")
    with torch.no_grad():
        assert onednn_is_faster(x)
        assert not onednn_is_faster(x.double())
        assert not onednn_is_faster(torch.randn(8))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not onednn_is_faster(x)
    assert not onednn_is_faster(x)  # gradient enabled: training keeps F.linear
    monkeypatch.setenv("AMOE_LINEAR", "mkl")
    with torch.no_grad():
        assert not onednn_is_faster(x)
    monkeypatch.setenv("AMOE_LINEAR", "auto")
    for capability, avx2_only in (("AVX2", True), ("AVX512", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        with torch.no_grad():
            assert onednn_is_faster(x) is avx2_only
    monkeypatch.setenv("AMOE_LINEAR", "fast")
    with torch.no_grad(), pytest.raises(ValueError, match="AMOE_LINEAR='fast'"):
        onednn_is_faster(x)


def test_traced_export_keeps_a_plain_linear(monkeypatch):
    monkeypatch.setenv("AMOE_LINEAR", "onednn")
    layer = Linear(8, 4)
    with torch.no_grad():
        graph = torch.jit.trace(layer, torch.randn(2, 8)).inlined_graph
    kinds = {n.kind() for n in graph.nodes()}
    assert "aten::linear" in kinds
    assert not any("conv" in k for k in kinds)


@pytest.mark.parametrize("mode", ["onednn", "mkl"])
def test_compiled_graphs_call_the_onednn_gemm_as_one_opaque_op(monkeypatch, mode):
    """Under torch.compile the conv path is one ``amoe::conv_linear`` call (inductor does not lower it), in
    a single graph, with eager's values; ``AMOE_LINEAR=mkl`` keeps ``F.linear`` there too."""
    monkeypatch.setenv("AMOE_LINEAR", mode)
    torch.manual_seed(0)
    expert = PatchExpert(32, 2, 4, [[0], [1]]).eval()
    x = torch.randn(2, 10, 32)
    targets = []

    def record(gm, example_inputs):
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        ref = expert(x)
        out = torch.compile(expert, backend=record, fullgraph=True)(x)
    torch._dynamo.reset()
    opaque = [t for t in targets if t is torch.ops.amoe.conv_linear.default]
    assert len(opaque) == (10 if mode == "onednn" else 0)  # bottleneck 2 + 2 blocks × (qkv, proj, 2 MLP)
    assert (F.linear in targets) is (mode == "mkl")
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_use_onednn_linears_keeps_parameters_and_takes_the_conv_path(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        ref = net(x)
    assert use_onednn_linears(net) is net
    assert all(type(m) is Linear for m in (net[0], net[2]))
    assert net.state_dict().keys() == before.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    calls = []
    monkeypatch.setattr(linear, "conv_linear", lambda *a: calls.append(1) or conv_linear(*a))
    monkeypatch.setenv("AMOE_LINEAR", "onednn")
    with torch.no_grad():
        out = net(x)
    assert len(calls) == 2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_patch_expert_gives_the_same_reconstruction_on_either_gemm(monkeypatch):
    torch.manual_seed(0)
    expert = PatchExpert(dim=32, depth=2, num_heads=4, groups=[[0], [1]]).eval()
    x = torch.randn(2, 17, 32)
    calls = []
    monkeypatch.setattr(linear, "conv_linear", lambda *a: calls.append(1) or conv_linear(*a))
    outs = {}
    for mode in ("mkl", "onednn"):
        monkeypatch.setenv("AMOE_LINEAR", mode)
        with torch.no_grad():
            outs[mode] = expert(x)
        assert len(calls) == (0 if mode == "mkl" else 2 + 4 * 2)  # bottleneck fc1/fc2, then qkv/proj/fc1/fc2 per block
    for a, b in zip(outs["mkl"], outs["onednn"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
