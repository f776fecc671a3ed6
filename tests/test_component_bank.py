import torch

from amoe.component_bank import ComponentBank, masked_average_pool


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
    assert bank.class_index(["new"], feats.flip(-1)[None]).tolist() == [1]
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
