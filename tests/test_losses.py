import math

import torch

from amoe.losses import (
    component_loss,
    cosine_distance,
    esb_loss,
    global_loss,
    patch_loss,
    scale_easy_gradient,
)


def test_hard_mining_scales_easy_gradients_only():
    # p = 0.5 over 4 points: k = 2, threshold = 2nd largest = 0.3; points below it are "easy" (Eq. 6)
    d = torch.tensor([[0.1, 0.2, 0.3, 0.4]], requires_grad=True)
    out = scale_easy_gradient(d, p=0.5, factor=0.1)
    torch.testing.assert_close(out, d.detach())  # values unchanged
    out.sum().backward()
    torch.testing.assert_close(d.grad, torch.tensor([[0.1, 0.1, 1.0, 1.0]]))


def test_patch_loss_is_pointwise_cosine_mean_over_groups():
    e = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, P=2, D=2)
    d1 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # distances 0 and 1 -> mean 0.5
    d2 = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])  # distances 1 and 0 -> mean 0.5
    d3 = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])  # 1 - 1/sqrt(2) and 0
    torch.testing.assert_close(patch_loss([e, e], [d1, d2]), torch.tensor([0.5]))
    torch.testing.assert_close(patch_loss([e], [d3]), torch.tensor([(1 - 1 / math.sqrt(2)) / 2]))


def test_component_loss_counts_only_present_components():
    # Eq. 7: rec of component 0 is orthogonal (distance 1), component 1 exact (0), component 2 absent
    target = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])
    rec = torch.tensor([[[0.0, 3.0], [0.0, 1.0], [-5.0, 5.0]]])
    present = torch.tensor([[True, True, False]])
    torch.testing.assert_close(component_loss(rec, target, present), torch.tensor([0.5]))
    torch.testing.assert_close(cosine_distance(rec, target)[0, 2], torch.tensor(1.0))


def test_global_loss_squared_error_plus_student():
    target = torch.zeros(1, 2, 1, 2)
    ae = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]]])  # squared errors 1, 4, 0, 1 -> mean 1.5
    student = ae + 2.0  # error 4 everywhere
    torch.testing.assert_close(global_loss(ae, target), torch.tensor([1.5]))
    torch.testing.assert_close(global_loss(ae, target, student), torch.tensor([5.5]))


def test_esb_terms_hand_computed_with_straight_through_load_gradient():
    # B=2, N=3, K=1; both samples pick expert 0.
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    topk = torch.tensor([[0], [0]])
    e = math.e
    p0 = [e**2 / (e**2 + 2), 1 / (e**2 + 2), 1 / (e**2 + 2)]
    p1 = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]
    mean_p = [(a + b) / 2 for a, b in zip(p0, p1)]
    capacity = 1.0 * 2 * 1 / 3
    terms = esb_loss(logits, topk, capacity_factor=1.0)
    torch.testing.assert_close(terms.importance, torch.tensor(3 * sum(p**2 for p in mean_p)))
    torch.testing.assert_close(terms.load, torch.tensor((2 - capacity) ** 2))  # hard count 2 on expert 0
    torch.testing.assert_close(terms.z, torch.tensor((4 + 1) / 6))
    torch.testing.assert_close(terms.total, terms.importance + terms.load + terms.z)
    # gradient of the load term: 2 (C_0 - cap) · d(K Σ_b p_b0)/d logit = 2 (C_0 - cap) · p_b0 (δ_0j - p_bj)
    (g,) = torch.autograd.grad(terms.load, logits)
    coef = 2 * (2 - capacity)
    expected = torch.tensor(
        [
            [coef * p0[0] * (1 - p0[0]), -coef * p0[0] * p0[1], -coef * p0[0] * p0[2]],
            [coef * p1[0] * (1 - p1[0]), -coef * p1[0] * p1[1], -coef * p1[0] * p1[2]],
        ]
    )
    torch.testing.assert_close(g, expected)


def test_esb_load_is_zero_under_capacity():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]], requires_grad=True)
    terms = esb_loss(logits, torch.tensor([[0], [1]]), capacity_factor=1.0)
    assert terms.load.item() == 0.0
