import math

import torch

from amoe.scoring import Scorer, fuse, gaussian_blur, gaussian_kernel, top_ratio_score


def test_gaussian_kernel_hand_computed():
    k = gaussian_kernel(sigma=1.0, size=3)
    g = [math.exp(-0.5), 1.0, math.exp(-0.5)]
    s = sum(g)
    expected = torch.tensor([[a * b / s**2 for b in g] for a in g])
    torch.testing.assert_close(k, expected)
    assert abs(k.sum().item() - 1) < 1e-6


def test_blur_keeps_constant_maps_and_spreads_a_peak():
    const = torch.full((1, 8, 8), 3.0)
    torch.testing.assert_close(gaussian_blur(const, 4.0, 5), const)  # reflect padding: no dark border
    peak = torch.zeros(1, 9, 9)
    peak[0, 4, 4] = 1.0
    out = gaussian_blur(peak, 4.0, 5)
    assert out[0, 4, 4] < 1 and out[0, 4, 6] > 0 and out[0, 4, 7] == 0
    torch.testing.assert_close(out.sum(), torch.tensor(1.0))


def test_top_ratio_score_is_mean_of_top_pixels():
    m = torch.arange(100.0).view(1, 10, 10)
    torch.testing.assert_close(top_ratio_score(m, 0.05), torch.tensor([(99 + 98 + 97 + 96 + 95) / 5]))
    torch.testing.assert_close(top_ratio_score(m, 0.001), torch.tensor([99.0]))  # at least one pixel


def test_fuse_weights_normalised_group_maps_by_gate_mass():
    maps = torch.stack([torch.full((2, 2), 3.0), torch.full((2, 2), 10.0), torch.full((2, 2), 0.5)])[None]
    mass = torch.tensor([[0.5, 0.25, 0.25]])
    lo, hi = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([5.0, 20.0, 1.0])
    # 0.5·(3-1)/4 + 0.25·10/20 + 0.25·0.5/1 = 0.25 + 0.125 + 0.125
    torch.testing.assert_close(fuse(maps, mass, lo, hi), torch.full((1, 2, 2), 0.5))


def test_calibration_uses_quantiles_of_used_groups_only():
    torch.manual_seed(0)
    sc = Scorer(num_groups=3, eval_size=8, blur_sigma=0, norm_quantiles=(0.0, 1.0), image_threshold_quantile=1.0)
    maps = torch.rand(10, 3, 4, 4)
    maps[:, 2] += 100  # group 2 is never selected: its values must not matter
    mass = torch.tensor([[0.6, 0.4, 0.0]]).repeat(10, 1)
    sc.calibrate(maps, mass)
    torch.testing.assert_close(sc.lo[:2], maps[:, :2].amin(dim=(0, 2, 3)))
    torch.testing.assert_close(sc.hi[:2], maps[:, :2].amax(dim=(0, 2, 3)))
    assert sc.lo[2] == 0 and sc.hi[2] == 1 and bool(sc.calibrated)
    scores = sc(maps, mass).scores
    torch.testing.assert_close(sc.image_threshold, scores.max())
