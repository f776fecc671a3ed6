import pytest
import torch
from fixtures_model import tiny_config, tiny_model

from amoe.model import AnomalyMoE


def _batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 56, 56, generator=g)


def test_forward_named_output_shapes(model):
    model.train()
    out = model(_batch(), ["a", "b", "a"])
    n = model.config.num_experts
    assert out.router.weights.shape == (3, n) and out.expert_losses.shape == (3, n)
    assert out.group_maps.shape == (3, 3, 4, 4) and out.group_mass.shape == (3, 3)
    torch.testing.assert_close(out.group_mass.sum(1), torch.ones(3))
    assert [r.shape for r in out.reps] == [torch.Size([2, 3, 32])] * 3
    losses = model.loss(out)
    assert torch.isfinite(losses.total) and losses.total.ndim == 0


def test_every_trainable_parameter_gets_a_gradient_and_no_frozen_one_does(model):
    model.train()
    route = torch.tensor([[0, 1], [2, 3], [4, 5]])  # every expert selected by one sample
    out = model(_batch(), ["a", "b", "a"], route=route)
    model.loss(out).total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    missing = [n for n in missing if not n.startswith("eir.")]  # CLUB has its own optimiser and loss
    assert missing == []
    assert all(p.grad is None for p in model.encoder.parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert not any(id(p) in trainable for p in model.encoder.parameters())
    assert not any(id(p) in trainable for p in model.eir.parameters())


def test_unselected_experts_get_no_reconstruction_gradient():
    model = AnomalyMoE(tiny_config(use_eir=False, use_esb=False)).train()
    model.component_bank.build({"a": torch.randn(40, 32)})
    out = model(_batch(2), ["a", "a"], route=torch.tensor([[0, 1], [0, 1]]))  # only patch experts 0, 1
    model.loss(out).total.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.global_experts.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.patch_experts[0].parameters())


def test_eval_is_deterministic_and_uses_no_jitter():
    model = tiny_model(ae_jitter=0.5).eval()
    x = _batch()
    a = model.score(model(x, ["a", "b", "a"]))
    b = model.score(model(x, ["a", "b", "a"]))
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)


@pytest.mark.parametrize("groups", [(2, 0, 0), (2, 2, 0), (2, 0, 2), (0, 2, 2)])
def test_ablation_group_subsets_run(groups):
    p, c, g = groups
    model = tiny_model(num_patch_experts=p, num_component_experts=c, num_global_experts=g)
    model.train()
    out = model(_batch(2), ["a", "b"])
    assert torch.isfinite(model.loss(out).total)
    empty = [i for i, n in enumerate(groups) if n == 0]
    assert (out.group_mass[:, empty] == 0).all()


def test_bad_config_is_refused_with_the_setting_named():
    with pytest.raises(ValueError, match="top_k"):
        tiny_model(top_k=7)
    with pytest.raises(ValueError, match="fuse_groups"):
        tiny_model(fuse_groups=[[0, 1], [2, 9]])


@pytest.mark.parametrize("router_input", ["cls", "patch_mean"])
def test_router_input_is_the_last_cls_or_the_mean_patch_token(router_input):
    model = tiny_model(router_input=router_input).eval()
    x = _batch()
    seen = []
    model.router.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(x, ["a", "b", "a"])
        enc = model.encoder(x)
        expected = enc.cls if router_input == "cls" else model.patch_embeddings(x).mean(1)  # (B, D)
    torch.testing.assert_close(seen[0], expected)
    with pytest.raises(ValueError, match="router_input"):
        tiny_model(router_input="mean")


def test_component_experts_learn_on_synthetic_data():
    """The release never trained its component experts (masks not found); here their loss must fall."""
    from data_modules.synthetic import SyntheticDataModule

    torch.manual_seed(0)
    dm = SyntheticDataModule(classes=["pcb", "pushpins"], num_train=12, size=64, image_size=56, crop_size=56, calib_fraction=0)
    train = dm.split("train")
    batch = [train[i] for i in range(len(train))]
    images, classes = torch.stack([s["image"] for s in batch]), [s["cls"] for s in batch]
    model = AnomalyMoE(tiny_config(num_components=4))
    emb = model.patch_embeddings(images)
    model.component_bank.build({c: emb[[i for i, k in enumerate(classes) if k == c]].flatten(0, 1) for c in set(classes)})
    comp = model.group_slices[1]
    route = torch.tensor([[i % 2, 2 + i % 2] for i in range(len(images))])  # a patch and a component expert each

    def component_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(images, classes, route=route).expert_losses[:, comp].mean().item()

    before = component_loss()
    opt = torch.optim.Adam(model.trainable_parameters(), lr=2e-3)
    for step in range(20):
        model.train()
        idx = torch.arange(8) + (8 * step) % len(images)
        idx = idx % len(images)
        out = model(images[idx], [classes[i] for i in idx], route=route[idx])
        opt.zero_grad()
        model.loss(out).total.backward()
        opt.step()
    after = component_loss()
    assert after < before - 0.1, (before, after)  # cosine distance: from ≈1 (random AE) clearly down
