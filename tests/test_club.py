import math

import torch

from amoe.club import EIR, GaussianCLUB


def _identity_club(logvar: float) -> GaussianCLUB:
    """μ(x) = ReLU(x) (= x for x >= 0), log-variance ≡ ``logvar``."""
    q = GaussianCLUB(dim=2, hidden=2)
    with torch.no_grad():
        for lin in (q.mu[0], q.mu[2]):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
        q.logvar[2].weight.zero_()
        q.logvar[2].bias.fill_(math.atanh(logvar))
    return q


def test_club_upper_bound_hand_computed():
    # Eq. 4 with μ(x)=x, σ²=1: positive_n = -½||x_n - y_n||², negative_n = mean_{m≠n} -½||x_n - y_m||²
    q = _identity_club(0.0)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # positives 0, 0; negatives (only m ≠ n): n=0 -> -1, n=1 -> -1  => bound = 1
    torch.testing.assert_close(q.upper_bound(x, x.clone()), torch.tensor(1.0))
    # B=3, 1-D points 0, 1, 3 with y = x: negatives n=0: -(1+9)/4, n=1: -(1+4)/4, n=2: -(9+4)/4 -> mean -28/12
    q1 = _identity_club(0.0)
    x3 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    torch.testing.assert_close(q1.upper_bound(x3, x3.clone()), torch.tensor(28 / 12))
    assert q.upper_bound(x[:1], x[:1]).item() == 0.0  # no non-matched pair in a batch of one


def test_club_log_likelihood_includes_log_variance():
    q = _identity_club(0.5)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    # n=0: -½·1/e^0.5 - ½·2·0.5 ; n=1: 0 - ½·2·0.5
    expected = ((-0.5 / math.exp(0.5) - 0.5) + (-0.5)) / 2
    torch.testing.assert_close(q.log_likelihood(x, y), torch.tensor(expected))


def test_eir_sums_all_pairs_of_each_group():
    torch.manual_seed(0)
    eir = EIR(dim=4)
    reps = [torch.randn(3, 5, 4), torch.randn(2, 5, 4), torch.randn(1, 5, 4)]
    expected = sum(eir.estimators[0].upper_bound(reps[0][j], reps[0][k]) for j, k in [(0, 1), (0, 2), (1, 2)])
    expected = expected + eir.estimators[1].upper_bound(reps[1][0], reps[1][1])  # group 2 has no pair
    torch.testing.assert_close(eir(reps), expected)


def test_estimator_loss_trains_q_not_experts():
    eir = EIR(dim=4)
    reps = [torch.randn(2, 6, 4, requires_grad=True)]
    eir.estimator_loss(reps).backward()
    assert reps[0].grad is None
    assert all(p.grad is not None for p in eir.estimators[0].parameters())
