import pytest
import torch

from amoe.component_bank import ComponentBank, PatchSample, masked_average_pool


def test_masked_average_pool_hand_computed():
    feats = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]]])
    pooled, present = masked_average_pool(feats, torch.tensor([[0, 0, 1, 1]]), k=3)
    torch.testing.assert_close(pooled, torch.tensor([[[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]]]))
    assert present.tolist() == [[True, True, False]]


def test_bank_finds_clusters_assigns_and_round_trips():
    torch.manual_seed(0)
    dirs = torch.eye(4)[:2]  # two well separated directions
    feats = torch.cat([dirs[0] + 0.05 * torch.randn(50, 4), dirs[1] + 0.05 * torch.randn(50, 4)])
    bank = ComponentBank(num_components=2, dim=4)
    bank.build({"x": feats, "y": feats.flip(-1)})
    assert bank.classes == ["x", "y"] and bank.centres.shape == (2, 2, 4)
    assign = bank.assign(torch.stack([dirs[0], dirs[1]])[None], ["x"])  # (1, 2)
    assert assign[0, 0] != assign[0, 1]
    # unknown class: the bank whose centres fit best ("y" centres live in dims 2, 3)
    unknown = feats.flip(-1)[None]  # (1, 100, 4)
    assert bank.class_index(["x", "new"]).tolist() == [0, -1]
    assert torch.equal(bank.assign(unknown, ["new"]), bank.assign(unknown, ["y"]))
    assert bank.best_fitting_rows(unknown).tolist() == [1]
    assert torch.equal(bank.assign_rows(unknown, torch.tensor([1])), bank.assign(unknown, ["y"]))
    other = ComponentBank(num_components=2, dim=4)
    other.load_state_dict(bank.state_dict())
    assert other.classes == bank.classes and torch.equal(other.centres, bank.centres)


def test_bank_refuses_mismatching_shapes():
    bank = ComponentBank(num_components=2, dim=4)
    bank.build({"x": torch.randn(20, 4)})
    wrong = ComponentBank(num_components=3, dim=4)
    try:
        wrong.load_state_dict(bank.state_dict())
    except ValueError as e:
        assert "num_components" in str(e)
    else:
        raise AssertionError("a bank of another shape was accepted")


def test_patch_sample_draws_evenly_from_every_image():
    # class "x": 10 images of 16 patches, budget 30 -> 3 patches from each image; image i's patches hold i
    sample = PatchSample({"x": 10, "y": 2}, budget=30, seed=0)
    for i in range(10):
        sample.add("x", torch.full((16, 4), float(i)))
    for i in range(2):
        sample.add("y", torch.full((16, 4), float(i)) + 100 * torch.arange(16.0)[:, None])
    out = sample.result()
    x = out["x"][:, 0]
    assert len(x) == 30 and torch.bincount(x.long()).tolist() == [3] * 10  # all images, 3 each
    # "y": ⌈30/2⌉ = 15 of 16 patches from each of the 2 images, 30 in all, each patch once
    y = out["y"][:, 0]
    assert len(y) == 30 and len(set(y.tolist())) == 30
    with pytest.raises(KeyError, match="'z'"):
        sample.add("z", torch.zeros(1, 4))


def test_patch_sample_trims_to_the_budget_and_is_seeded():
    def draw(seed):
        s = PatchSample({"x": 4}, budget=10, seed=seed)  # ⌈10/4⌉ = 3 per image -> 12, trimmed to 10
        for i in range(4):
            s.add("x", torch.arange(8.0)[:, None] + 8 * i)
        return s.result()["x"]

    assert len(draw(0)) == 10 and torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    with pytest.raises(ValueError, match="bank_patches_per_class"):
        PatchSample({"x": 1}, budget=0)
