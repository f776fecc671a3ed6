"""Sparse inference (SPEC §2.11) equals dense execution and really skips experts; bf16 autocast works."""

import pytest
import torch
from fixtures_model import tiny_model

CLASSES = ["a", "b", "a", "b", "a", "c"]  # "c": unknown to the bank (nearest bank by fit)


def _batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 56, 56, generator=g)


@pytest.fixture(scope="module")
def moe():
    """3 experts per group, K=3: routings can mix groups or stay inside one."""
    return tiny_model(num_patch_experts=3, num_component_experts=3, num_global_experts=3, top_k=3).eval()


def _random_route(b, n, k, seed, exclude=()):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(n) if i not in exclude])
    return torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(b)])


def _assert_same(model, x, classes, route):
    with torch.no_grad():
        dense = model(x, classes, sparse=False, route=route)
        sparse = model(x, classes, sparse=True, route=route)
        sd, ss = model.score(dense), model.score(sparse)
    torch.testing.assert_close(sparse.group_maps, dense.group_maps, rtol=0, atol=1e-5)
    torch.testing.assert_close(sparse.group_mass, dense.group_mass, rtol=0, atol=0)
    torch.testing.assert_close(ss.maps, sd.maps, rtol=0, atol=1e-5)
    torch.testing.assert_close(ss.scores, sd.scores, rtol=0, atol=1e-5)
    assert ss.scores.dtype == torch.float32 and ss.maps.dtype == torch.float32
    chosen = torch.zeros_like(dense.router.weights, dtype=torch.bool).scatter_(1, route, True)
    torch.testing.assert_close(sparse.expert_losses[chosen], dense.expert_losses[chosen], rtol=0, atol=1e-5)
    assert (sparse.expert_losses[~chosen] == 0).all()
    return sparse


@pytest.mark.parametrize("seed", range(4))
def test_sparse_equals_dense_for_random_routings(moe, seed):
    n, k = moe.config.num_experts, moe.config.top_k
    _assert_same(moe, _batch(seed=seed), CLASSES, _random_route(6, n, k, seed))


def test_sparse_equals_dense_with_the_learnt_router(moe):
    x = _batch(seed=7)
    with torch.no_grad():
        route = moe(x, CLASSES).router.topk
    _assert_same(moe, x, CLASSES, route)


@pytest.mark.parametrize("unused", [(0,), (4,), (8,), (0, 3, 6), (1, 2, 4, 5)])
def test_expert_selected_by_no_sample(moe, unused):
    n, k = moe.config.num_experts, moe.config.top_k
    route = _random_route(6, n, k, seed=sum(unused), exclude=unused)
    assert not any((route == u).any() for u in unused)
    _assert_same(moe, _batch(seed=3), CLASSES, route)


def test_a_whole_group_unused_has_zero_mass_and_map(moe):
    route = torch.tensor([[0, 1, 2]] * 6)  # patch experts only
    out = _assert_same(moe, _batch(seed=5), CLASSES, route)
    assert (out.group_mass[:, 1:] == 0).all() and (out.group_maps[:, 1:] == 0).all()


def test_sparse_runs_each_selected_expert_once_on_its_sub_batch(moe):
    experts = [*moe.patch_experts, *moe.component_experts, *moe.global_experts]
    seen: dict[int, list[int]] = {i: [] for i in range(len(experts))}
    hooks = [
        e.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0].shape[0])) for i, e in enumerate(experts)
    ]
    route = torch.tensor([[0, 3, 6], [0, 4, 7], [1, 3, 6], [0, 1, 2], [0, 3, 4], [1, 6, 7]])  # 2, 5, 8 unused
    try:
        with torch.no_grad():
            moe(_batch(), CLASSES, sparse=True, route=route)
            sparse_calls = {i: list(v) for i, v in seen.items()}
            for v in seen.values():
                v.clear()
            moe(_batch(), CLASSES, sparse=False, route=route)
    finally:
        for h in hooks:
            h.remove()
    counts = torch.zeros(len(experts), dtype=torch.long).scatter_add_(0, route.flatten(), torch.ones(route.numel(), dtype=torch.long))
    assert sparse_calls == {i: ([int(c)] if c else []) for i, c in enumerate(counts)}
    assert seen == {i: [6] for i in range(len(experts))}  # dense: every expert, whole batch


def test_bad_route_is_refused(moe):
    x = _batch(2)
    with pytest.raises(ValueError, match="route"):
        moe(x, ["a", "b"], route=torch.tensor([[0, 1]]))  # wrong shape
    with pytest.raises(ValueError, match="outside"):
        moe(x, ["a", "b"], route=torch.tensor([[0, 1, 9], [0, 1, 2]]))
    with pytest.raises(ValueError, match="twice"):
        moe(x, ["a", "b"], route=torch.tensor([[0, 0, 1], [0, 1, 2]]))


def test_bf16_autocast_forward_is_finite_and_close_to_fp32(moe):
    x = _batch(seed=11)
    route = torch.tensor([[0, 3, 6], [1, 4, 7], [2, 5, 8], [0, 4, 8], [1, 5, 6], [2, 3, 7]])  # all experts
    with torch.no_grad():
        ref = moe(x, CLASSES, sparse=True, route=route)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = moe(x, CLASSES, sparse=True, route=route)
            s_low = moe.score(low)  # scoring inside the autocast region must still be float32
        s_ref = moe.score(ref)
    assert low.router.logits.dtype == torch.float32  # the router runs in float32 (no bf16 top-K flips)
    assert s_low.scores.dtype == torch.float32 and s_low.maps.dtype == torch.float32
    assert torch.isfinite(s_low.scores).all() and torch.isfinite(low.group_maps).all()
    torch.testing.assert_close(low.group_maps, ref.group_maps, rtol=0.05, atol=0.02)
    torch.testing.assert_close(s_low.scores, s_ref.scores, rtol=0.05, atol=0.02)


def test_bf16_autocast_training_step_is_finite():
    model = tiny_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_batch(4), CLASSES[:4])
        losses = model.loss(out)
        club = model.eir.estimator_loss(out.reps)
    assert losses.total.dtype == torch.float32 and losses.eir.dtype == torch.float32
    assert torch.isfinite(losses.total) and torch.isfinite(club)
    losses.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.trainable_parameters() if p.grad is not None)
