import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amoe.losses import (
    component_loss,
    cosine_distance,
    esb_loss,
    gather_batch,
    global_loss,
    patch_loss,
    scale_easy_gradient,
    scale_gradient,
)

WORKER = Path(__file__).parent / "esb_ddp_worker.py"


def test_hard_mining_scales_easy_gradients_only():
    # p = 0.5 over 4 points: k = 2, threshold = 2nd largest = 0.3; points below it are "easy" (Eq. 6)
    d = torch.tensor([[0.1, 0.2, 0.3, 0.4]], requires_grad=True)
    out = scale_easy_gradient(d, p=0.5, factor=0.1)
    torch.testing.assert_close(out, d.detach())  # values unchanged
    out.sum().backward()
    torch.testing.assert_close(d.grad, torch.tensor([[0.1, 0.1, 1.0, 1.0]]))
    # inference: nothing to scale, the distances come back untouched (no top-k over the batch)
    plain = d.detach()
    assert scale_easy_gradient(plain, p=0.5) is plain


def test_patch_loss_is_pointwise_cosine_mean_over_groups():
    e = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, P=2, D=2)
    d1 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # distances 0 and 1 -> mean 0.5
    d2 = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])  # distances 1 and 0 -> mean 0.5
    d3 = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])  # 1 - 1/sqrt(2) and 0
    torch.testing.assert_close(patch_loss([cosine_distance(e, d1), cosine_distance(e, d2)]), torch.tensor([0.5]))
    torch.testing.assert_close(patch_loss([cosine_distance(e, d3)]), torch.tensor([(1 - 1 / math.sqrt(2)) / 2]))


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
    torch.testing.assert_close(terms.z, torch.tensor((4 + 1) / 2))  # Eq. 3: (1/B)·Σ_{b,j} logit²
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


def test_z_loss_hand_computed_paper_and_release():
    # Eq. 3: L_z = (1/B)·Σ_{b,j} logit²; B=2, N=3: (1+4+9 + 0+1+4)/2 = 9.5. The release: mean over B·N = 19/6.
    logits = torch.tensor([[1.0, -2.0, 3.0], [0.0, 1.0, -2.0]])
    topk = torch.tensor([[2], [1]])
    assert esb_loss(logits, topk).z.item() == 9.5
    torch.testing.assert_close(esb_loss(logits, topk, z_mean="all").z, torch.tensor(19 / 6))
    with pytest.raises(ValueError, match="z_loss_mean"):
        esb_loss(logits, topk, z_mean="sum")


def test_scale_gradient_keeps_value_and_scales_gradient():
    x = torch.tensor([2.0, -1.0], requires_grad=True)
    y = scale_gradient(x.pow(2).sum(), 4.0)
    assert y.item() == 5.0
    y.backward()
    torch.testing.assert_close(x.grad, torch.tensor([16.0, -8.0]))


def test_gather_batch_is_identity_outside_ddp():
    x = torch.randn(3, 2)
    out, world = gather_batch(x)
    assert out is x and world == 1


# --- ESB over the global batch under DDP (Eq. 3 "for a training batch of size B") ----------------------

def test_esb_over_the_global_ddp_batch_equals_one_process_on_the_concatenated_batch(tmp_path):
    """2 gloo processes × 4 samples (the paper: 4 GPUs × 4): the ESB value on every rank and the router's
    DDP-averaged gradient equal one process on the concatenated batch of 8."""
    world, per_rank = 2, 4
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = [sys.executable, str(WORKER), "{}", str(world), str(per_rank), port, str(tmp_path)]
    procs = [subprocess.Popen([a.format(r) for a in run], env=env) for r in (0, 1, -1)]
    assert [p.wait(timeout=240) for p in procs] == [0, 0, 0]

    single = torch.load(tmp_path / "rank-1.pt")
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for a, b in zip(got["esb"], single["esb"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        for a, b in zip(got["grads"], single["grads"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in single["grads"])


def test_local_esb_differs_from_the_global_one():
    """The release's per-rank ESB (esb_batch: local) is another loss: on 4 of the 8 samples its load term
    sees capacity 1.25·4·3/9 = 1.67 instead of 3.33."""
    from esb_ddp_worker import esb_and_router_grad

    glob, _ = esb_and_router_grad(2, 4, None)
    half, _ = esb_and_router_grad(1, 4, None)  # the first 4 samples alone, as one rank would see them
    assert not torch.allclose(half[3], glob[3])
