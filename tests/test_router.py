import math

import torch

from amoe.router import Router, top_k_gate


def test_top_k_gate_hand_computed():
    # Eq. 2 on logits [1, 3, 2, 0] with K=2: experts 1 and 2, softmax([3, 2]) = [e/(e+1), 1/(e+1)]
    weights, idx = top_k_gate(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), k=2)
    e = math.e
    assert idx.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.0, e / (e + 1), 1 / (e + 1), 0.0]]))


def test_router_output_shapes_and_sums():
    torch.manual_seed(0)
    r = Router(dim=8, hidden=4, num_experts=6, top_k=3)
    out = r(torch.randn(5, 8))
    assert out.logits.shape == out.weights.shape == out.probs.shape == (5, 6)
    assert out.topk.shape == (5, 3)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(5))
    assert ((out.weights > 0).sum(-1) == 3).all()
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(5))


def test_forced_route_keeps_gradient_to_router():
    r = Router(dim=8, hidden=4, num_experts=6, top_k=2)
    out = r(torch.randn(3, 8), force=torch.tensor([[0, 1], [2, 3], [4, 5]]))
    assert out.topk.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert ((out.weights > 0).sum(0) == 1).all()  # every expert chosen once
    out.weights[:, 0].sum().backward()
    assert r.mlp[0].weight.grad is not None and r.mlp[0].weight.grad.abs().sum() > 0
