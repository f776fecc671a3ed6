"""Exactness of amoe.metrics against sklearn and independent, straightforward reference implementations."""

import json
import math
import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from amoe.metrics import (
    DatasetEvaluator,
    auspro,
    binary_metrics,
    evaluate,
    main_evaluate_maps,
    pixel_metrics,
    saturation_area,
)

# ---------------------------------------------------------------------------------------------------
# independent references (loops over thresholds, written for clarity, not speed)
# ---------------------------------------------------------------------------------------------------


def ref_f1max(scores, labels):
    """Brute force: F1 of (score >= t) for every distinct t."""
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        fp = np.sum(pred & (labels == 0))
        fn = np.sum(~pred & (labels == 1))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def ref_area(fprs, ys, limit):
    """Area under the polyline through (fprs, ys) from 0 to limit, linearly interpolated at limit, / limit."""
    area = 0.0
    for i in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], ys[i - 1], ys[i]
        if x0 >= limit:
            break
        if x1 > limit:  # cut the segment at the limit
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def ref_aupro(maps, masks, limit=0.3, connectivity=8):
    """Per-threshold loop over all distinct scores; regions from scipy with 8- (or 4-) connectivity."""
    structure = np.ones((3, 3)) if connectivity == 8 else None  # scipy's default is 4-connectivity
    regions = []  # (image index, boolean region mask)
    for i, k in enumerate(masks):
        lab, n = ndimage.label(k > 0, structure=structure)
        regions += [(i, lab == r) for r in range(1, n + 1)]
    ok = masks == 0
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append(np.sum(pred & ok) / np.sum(ok))
        pros.append(np.mean([np.sum(pred[i] & reg) / np.sum(reg) for i, reg in regions]))
    return ref_area(fprs, pros, limit)


def ref_auspro(maps, defects, limit):
    """defects: per image None or [(mask, sat)]; loop over all distinct scores."""
    flat = np.concatenate([m.ravel() for m in maps])
    n_ok = sum(
        np.sum(~np.any([d for d, _ in (ds or [])], axis=0)) if ds else m.size for m, ds in zip(maps, defects)
    )
    fprs, spros = [0.0], [0.0]
    for t in np.unique(flat)[::-1]:
        fp, vals = 0, []
        for m, ds in zip(maps, defects):
            pred = m >= t
            if not ds:
                fp += np.sum(pred)
                continue
            union = np.any([d for d, _ in ds], axis=0)
            fp += np.sum(pred & ~union)
            vals += [min(np.sum(pred & d) / sat, 1.0) for d, sat in ds]
        fprs.append(fp / n_ok)
        spros.append(np.mean(vals))
    return ref_area(fprs, spros, limit)


# ---------------------------------------------------------------------------------------------------
# image-level: AUROC / AP / F1-max
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ties", "large", "negative", "mixed"])
def test_binary_matches_sklearn(kind):
    rng = np.random.default_rng(hash(kind) % 2**32)
    n = 400
    y = rng.integers(0, 2, n)
    if kind == "ties":
        s = rng.integers(0, 5, n).astype(float) + y * rng.integers(0, 2, n)
    elif kind == "large":
        s = rng.normal(size=n) * 1e12 + y * 3e11
    elif kind == "negative":
        s = -np.abs(rng.normal(size=n)) * 50 + y
    else:
        s = np.round(rng.normal(size=n) * 1e3 + y * 500, -2)  # raw, outside [0, 1], heavy ties
    r = binary_metrics(s, y)
    assert r["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-4)
    assert r["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-4)
    assert r["f1max"] == pytest.approx(ref_f1max(s, y), abs=1e-4)


def test_binary_no_sigmoid_saturation():
    """Raw scores that a float32 sigmoid would collapse into ties keep their order."""
    s = np.array([20.0, 21.0, 22.0, 23.0, 24.0, 25.0])
    y = np.array([0, 1, 0, 1, 1, 1])
    assert binary_metrics(torch.tensor(s), torch.tensor(y))["auroc"] == pytest.approx(roc_auc_score(y, s))


def test_degenerate_gives_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="undefined"):
        r = evaluate(np.array([0.1, 0.5, 0.9]), np.zeros(3))
    assert all(math.isnan(r[k]) for k in ("image_auroc", "image_ap", "image_f1max"))
    maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    with pytest.warns(RuntimeWarning):
        r = evaluate(np.array([0.1, 0.9]), np.array([0, 1]), maps, np.zeros((2, 8, 8)))
    assert r["image_auroc"] == 1.0 and math.isnan(r["pixel_auroc"]) and math.isnan(r["pixel_aupro"])


# ---------------------------------------------------------------------------------------------------
# pixel-level
# ---------------------------------------------------------------------------------------------------


def _blobs(rng, n, h, w, p=0.5):
    masks = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        if rng.random() < p:
            for _ in range(rng.integers(1, 4)):
                cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(1, 4)
                yy, xx = np.ogrid[:h, :w]
                masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    return masks


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_matches_sklearn_and_reference(dtype):
    rng = np.random.default_rng(1)
    masks = _blobs(rng, 6, 16, 16)
    maps = (rng.normal(size=masks.shape) * 30 - 10 + masks * 25).astype(dtype)
    maps[:, :4] = np.round(maps[:, :4])  # ties
    r = pixel_metrics(maps, masks)
    y, s = masks.ravel(), maps.ravel().astype(np.float64)
    assert r["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-4)
    assert r["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-4)
    assert r["pixel_f1max"] == pytest.approx(ref_f1max(s, y), abs=1e-4)
    assert r["pixel_aupro"] == pytest.approx(ref_aupro(maps.astype(np.float64), masks), abs=1e-4)


def test_pixel_signed_zero_is_one_threshold():
    maps = np.array([[[0.0, -0.0, 1.0, -1.0]]], np.float32)
    masks = np.array([[[1, 0, 1, 0]]])
    r = pixel_metrics(maps, masks, aupro=False)
    assert r["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_aupro_hand_computed():
    """6 normal pixels, one region of 2 pixels (0.9 and 0.45).

    Curve: (0, .5) at 0.9, (1/6, .5) at 0.5, (1/6, 1) at 0.45, (2/6, 1) at 0.4.
    Area to 0.3 = 1/6 * .5 + (0.3 - 1/6) * 1 = 0.3 - 1/12; / 0.3 = 13/18.
    """
    maps = np.array([[[0.1, 0.2], [0.3, 0.4]], [[0.9, 0.45], [0.5, 0.05]]], np.float32)
    masks = np.array([[[0, 0], [0, 0]], [[1, 1], [0, 0]]])
    assert pixel_metrics(maps, masks)["pixel_aupro"] == pytest.approx(13 / 18, abs=1e-6)


def test_aupro_eight_connectivity():
    """Diagonal-only pixels form ONE region (8-connectivity), so the PRO differs from 4-connectivity."""
    masks = np.zeros((1, 6, 6), np.uint8)
    masks[0, 0, 0] = masks[0, 1, 1] = 1  # diagonal pair: one region of 2 under 8-connectivity
    masks[0, 4, 2:5] = 1  # a second region of 3
    maps = np.zeros((1, 6, 6), np.float32)
    maps[0, 0, 0] = 1.0  # one pixel of the diagonal pair detected first
    maps[0, 2:4] = np.linspace(0.2, 0.8, 12).reshape(2, 6)  # normal pixels ranked in between
    maps[0, 1, 1], maps[0, 4, 2:5] = 0.5, (0.9, 0.3, 0.1)
    got = pixel_metrics(maps, masks)["pixel_aupro"]
    assert got == pytest.approx(ref_aupro(maps, masks, connectivity=8), abs=1e-6)
    assert abs(got - ref_aupro(maps, masks, connectivity=4)) > 1e-3


def test_aupro_random_ties_matches_reference():
    rng = np.random.default_rng(7)
    masks = _blobs(rng, 5, 12, 12, p=0.8)
    maps = np.round(rng.random(masks.shape) * 8 + masks * 3).astype(np.float32) / 4  # many ties
    assert pixel_metrics(maps, masks)["pixel_aupro"] == pytest.approx(ref_aupro(maps, masks), abs=1e-4)


# ---------------------------------------------------------------------------------------------------
# LOCO sPRO
# ---------------------------------------------------------------------------------------------------


def test_saturation_rules():
    assert saturation_area(4, 2, relative=False) == 2  # min(threshold, area)
    assert saturation_area(1, 70400, relative=False) == 1
    assert saturation_area(3, 0.5, relative=True) == 1  # int(0.5 * 3), as in the official code
    assert saturation_area(10, 1.0, relative=True) == 10


def _loco_case(tmp_path):
    """A good 2x4 image and an anomalous one with defect A (abs. sat 2, 4 px) and B (rel. 0.5, 3 px).

    Curve: (0, .25) at .9, (0, .5) at .8, (1/9, .5) at .6, (2/9, .5) at .5, (2/9, 1) at .45.
    AU-sPRO(0.05) = 0.5; AU-sPRO(0.3) = (2/9 * .5 + (0.3 - 2/9)) / 0.3 = 17/27.
    """
    cfg = tmp_path / "defects_config.json"
    cfg.write_text(
        json.dumps(
            [
                {
                    "defect_name": "a",
                    "pixel_value": 255,
                    "saturation_threshold": 2,
                    "relative_saturation": False,
                },
                {
                    "defect_name": "b",
                    "pixel_value": 254,
                    "saturation_threshold": 0.5,
                    "relative_saturation": True,
                },
            ]
        )
    )
    a = np.zeros((2, 4), np.uint8)
    a[0] = 255
    b = np.zeros((2, 4), np.uint8)
    b[1, :3] = 254
    (tmp_path / "gt").mkdir()
    Image.fromarray(a).save(tmp_path / "gt" / "000.png")
    Image.fromarray(b).save(tmp_path / "gt" / "001.png")
    good = np.array([[0.5, 0.4, 0.3, 0.15], [0.05, 0.05, 0.05, 0.05]], np.float32)
    bad = np.array([[0.9, 0.8, 0.1, 0.1], [0.45, 0.2, 0.2, 0.6]], np.float32)
    extras = [
        {"orig_size": (2, 4)},
        {
            "orig_size": (2, 4),
            "region_masks": [str(tmp_path / "gt" / "000.png"), str(tmp_path / "gt" / "001.png")],
            "defects_config": str(cfg),
        },
    ]
    defects = [None, [(a > 0, 2), (b > 0, 1)]]
    return np.stack([good, bad]), extras, defects


def test_auspro_hand_computed(tmp_path):
    maps, extras, defects = _loco_case(tmp_path)
    got = auspro(list(maps), defects, limits=(0.05, 0.3, 1.0))
    assert got[0.05] == pytest.approx(0.5, abs=1e-6)
    assert got[0.3] == pytest.approx(17 / 27, abs=1e-6)
    assert got[1.0] == pytest.approx(ref_auspro(list(maps), defects, 1.0), abs=1e-6)
    ev = DatasetEvaluator("mvtec_loco", spro=True, eval_size=None)
    ev.update(["juice", "juice"], [0.5, 0.9], [0, 1], maps, np.zeros_like(maps), extras=extras)
    res = ev.compute()["per_class"]["juice"]
    assert res["pixel_auspro_0.05"] == pytest.approx(0.5, abs=1e-6)
    assert res["pixel_auspro_0.3"] == pytest.approx(17 / 27, abs=1e-6)


def test_auspro_random_matches_reference():
    rng = np.random.default_rng(3)
    maps, defects = [], []
    for i in range(5):
        h, w = rng.integers(6, 10, 2)
        m = np.round(rng.random((h, w)) * 30).astype(np.float32) / 30  # ties
        if i < 2:
            defects.append(None)
        else:
            ds = []
            for _ in range(rng.integers(1, 3)):
                d = np.zeros((h, w), bool)
                y0, x0 = rng.integers(0, h - 3), rng.integers(0, w - 3)
                d[y0 : y0 + 3, x0 : x0 + rng.integers(1, 4)] = True
                m[d] += 0.3
                ds.append((d, int(rng.integers(1, 8))))
            defects.append(ds)
        maps.append(m)
    got = auspro(maps, defects, limits=(0.05, 0.3, 1.0))
    for lim in (0.05, 0.3, 1.0):
        assert got[lim] == pytest.approx(ref_auspro(maps, defects, lim), abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auspro_partial_sweep_matches_reference(seed):
    """With limits <= 0.3 only the normal pixels above the FPR-0.3 score are counted exactly."""
    rng = np.random.default_rng(seed)
    maps, defects = [], []
    for i in range(4):
        m = rng.random((20, 24)).astype(np.float32)
        if seed == 2:
            m = np.round(m * 50) / 50  # many ties, also across the cutoff
        ds = None
        if i >= 2:
            d = np.zeros((20, 24), bool)
            d[5:12, 3:15] = True
            m[d] += rng.uniform(0.0, 0.4)
            ds = [(d, int(rng.integers(5, 120)))]
        maps.append(m)
        defects.append(ds)
    got = auspro(maps, defects, limits=(0.05, 0.3))
    for lim in (0.05, 0.3):
        assert got[lim] == pytest.approx(ref_auspro(maps, defects, lim), abs=1e-6)


def test_loco_levels_and_upsampling(tmp_path):
    """Per-level AU-sPRO = good images + that level; the reported value is their mean (official)."""
    maps, extras, defects = _loco_case(tmp_path)
    bad2 = maps[1][::-1, ::-1].copy()  # a second anomalous image, other level, same region files
    low = np.stack([maps[0], maps[1], bad2])
    ev = DatasetEvaluator("mvtec_loco", spro=True, eval_size=None)
    levels = [None, "logical", "structural"]
    ev.update(
        ["c"] * 3,
        [0.2, 0.8, 0.4],
        [0, 1, 1],
        low,
        np.zeros_like(low),
        levels=levels,
        extras=extras + [extras[1]],
    )
    res = ev.compute()["per_class"]["c"]
    want_l = ref_auspro([maps[0], maps[1]], defects, 0.3)
    want_s = ref_auspro([maps[0], bad2], defects, 0.3)
    assert res["pixel_auspro_0.3_logical"] == pytest.approx(want_l, abs=1e-6)
    assert res["pixel_auspro_0.3_structural"] == pytest.approx(want_s, abs=1e-6)
    assert res["pixel_auspro_0.3"] == pytest.approx((want_l + want_s) / 2, abs=1e-6)
    assert res["image_auroc_logical"] == 1.0 and res["image_auroc_structural"] == 1.0
    # maps at a lower resolution are upsampled (bilinear, half-pixel centres) to the GT size first
    small = np.stack([cv2.resize(m, (2, 1), interpolation=cv2.INTER_AREA) for m in low])
    ev = DatasetEvaluator("mvtec_loco", pixel=True, spro=True, eval_size=None)
    ev.update(
        ["c"] * 3,
        [0.2, 0.8, 0.4],
        [0, 1, 1],
        small,
        np.zeros_like(small),
        levels=levels,
        extras=extras + [extras[1]],
    )
    res = ev.compute()["per_class"]["c"]
    up = [
        torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(2, 4), mode="bilinear")[
            0, 0
        ].numpy()
        for m in small
    ]
    assert res["pixel_auspro_0.05_logical"] == pytest.approx(ref_auspro(up[:2], defects, 0.05), abs=1e-6)


def test_loco_bad_region_file_is_named(tmp_path):
    maps, extras, _ = _loco_case(tmp_path)
    Image.fromarray(np.full((2, 4), 7, np.uint8)).save(tmp_path / "gt" / "000.png")
    ev = DatasetEvaluator("mvtec_loco", spro=True, eval_size=None)
    ev.update(["c", "c"], [0.1, 0.9], [0, 1], maps, np.zeros_like(maps), extras=extras)
    with pytest.raises(ValueError, match="000.png"):
        ev.compute()


# ---------------------------------------------------------------------------------------------------
# streaming evaluator
# ---------------------------------------------------------------------------------------------------


def _dataset(rng, classes=("a", "b", "c"), n=14, size=16):
    """Samples sorted by class, with levels; -> list of (cls, score, label, map, mask, level)."""
    rows = []
    for c in classes:
        masks = _blobs(rng, n, size, size, p=0.5)
        maps = (rng.random((n, size, size)) + masks * rng.random() * 1.5).astype(np.float32)
        labels = (masks.reshape(n, -1).max(1) > 0).astype(int)
        labels[0], masks[0] = 0, 0  # at least one normal image
        scores = maps.reshape(n, -1).max(1) + rng.normal(size=n) * 0.3
        for i in range(n):
            level = None if not labels[i] else ("structural", "logical")[i % 2]
            rows.append((c, scores[i], labels[i], maps[i], masks[i], level))
    return rows


def _feed(ev, rows, batch=5):
    for i in range(0, len(rows), batch):
        b = rows[i : i + batch]
        ev.update(
            [r[0] for r in b],
            torch.tensor([r[1] for r in b]),
            torch.tensor([r[2] for r in b]),
            torch.from_numpy(np.stack([r[3] for r in b])),
            torch.from_numpy(np.stack([r[4] for r in b])).unsqueeze(1),
            levels=[r[5] for r in b],
            extras=[{"sample_id": f"{r[0]}/{j}"} for j, r in enumerate(b, start=i)],
        )


def _batch_eval(rows, cls):
    sel = [r for r in rows if r[0] == cls]
    return evaluate(
        np.array([r[1] for r in sel]),
        np.array([r[2] for r in sel]),
        np.stack([r[3] for r in sel]),
        np.stack([r[4] for r in sel]),
        levels=[r[5] for r in sel],
    )


def test_streaming_equals_batch_per_class():
    rows = _dataset(np.random.default_rng(11))
    ev = DatasetEvaluator("synthetic", eval_size=16)
    _feed(ev, rows)  # batches of 5 straddle the class boundaries (14 per class)
    out = ev.compute()
    assert list(out["per_class"]) == ["a", "b", "c"]
    for c in "abc":
        want = _batch_eval(rows, c)
        assert set(want) == set(out["per_class"][c])
        for k, v in want.items():
            assert out["per_class"][c][k] == pytest.approx(v, abs=1e-12), k
    for k in out["mean"]:
        assert out["mean"][k] == pytest.approx(np.mean([out["per_class"][c][k] for c in "abc"]))
    assert {"image_auroc_logical", "image_auroc_structural", "pixel_aupro"} <= set(out["mean"])


def test_per_level_auroc():
    rows = _dataset(np.random.default_rng(5), classes=("a",), n=30)
    s, y = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    lv = np.array([r[5] or "" for r in rows])
    r = evaluate(s, y, levels=[r[5] for r in rows])
    for level in ("logical", "structural"):
        sel = (y == 0) | (lv == level)
        assert r[f"image_auroc_{level}"] == pytest.approx(roc_auc_score(y[sel], s[sel]), abs=1e-12)


def test_class_reappearing_is_recomputed():
    rows = _dataset(np.random.default_rng(2), classes=("a", "b"))
    a = [r for r in rows if r[0] == "a"]
    b = [r for r in rows if r[0] == "b"]
    ev = DatasetEvaluator("synthetic", eval_size=16)
    with pytest.warns(UserWarning, match="not contiguous"):
        _feed(ev, a[:7] + b + a[7:])
    out = ev.compute()["per_class"]
    for k, v in _batch_eval(rows, "a").items():
        assert out["a"][k] == pytest.approx(v, abs=1e-12)
    ev = DatasetEvaluator("synthetic", eval_size=16, spill=False)
    with pytest.raises(RuntimeError, match="came back"):
        _feed(ev, a[:7] + b + a[7:])


def test_ddp_dumps_merge_exactly(tmp_path):
    """Two ranks with DistributedSampler-style interleaving and padding duplicates == one process."""
    rows = _dataset(np.random.default_rng(4))
    single = DatasetEvaluator("synthetic", eval_size=16)
    _feed(single, rows, batch=len(rows))
    want = single.compute()
    padded = rows + rows[:1]  # sampler padding repeats sample 0
    ids = list(range(len(rows))) + [0]
    for rank in (0, 1):
        ev = DatasetEvaluator("synthetic", eval_size=16, spill_dir=str(tmp_path), rank=rank, distributed=True)
        mine = [(padded[i], ids[i]) for i in range(rank, len(padded), 2)]
        for i in range(0, len(mine), 4):
            b = mine[i : i + 4]
            ev.update(
                [r[0] for r, _ in b],
                [r[1] for r, _ in b],
                [r[2] for r, _ in b],
                np.stack([r[3] for r, _ in b]),
                np.stack([r[4] for r, _ in b]),
                levels=[r[5] for r, _ in b],
                extras=[{"sample_id": j} for _, j in b],
            )
        ev.dump(rank=rank)
    got = DatasetEvaluator.compute_from_dumps(str(tmp_path))
    for c in want["per_class"]:
        for k, v in want["per_class"][c].items():
            assert got["per_class"][c][k] == pytest.approx(v, abs=1e-12), (c, k)


def test_ped2_frame_auroc_and_resize():
    rng = np.random.default_rng(9)
    ev = DatasetEvaluator("ped2", eval_size=8)
    s, y = rng.random(20), rng.integers(0, 2, 20)
    y[0], y[1] = 0, 1
    maps, masks = rng.random((20, 24, 36)).astype(np.float32), (rng.random((20, 24, 36)) > 0.9)
    ev.update(["pedestrian"] * 20, s, y, maps, masks)
    out = ev.compute()
    assert out["mean"]["frame_auroc"] == pytest.approx(roc_auc_score(y, s))
    assert np.isfinite(out["mean"]["pixel_auroc"])


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------


def test_evaluate_maps_cli_round_trip(tmp_path, capsys):
    rng = np.random.default_rng(6)
    masks = _blobs(rng, 4, 10, 10, p=1.0)
    maps = (rng.random(masks.shape) + masks).astype(np.float32)
    scores, labels = maps.reshape(4, -1).max(1), np.array([0, 1, 1, 1])
    for name, arr in dict(scores=scores, labels=labels, maps=maps, masks=masks).items():
        np.save(tmp_path / f"{name}.npy", arr)
    argv = [f"--{n}={tmp_path / n}.npy" for n in ("scores", "labels", "maps", "masks")]
    assert main_evaluate_maps(argv) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    got = json.loads(line)
    want = evaluate(scores, labels, maps, masks)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np.save(tmp_path / "labels.npy", np.zeros(4))
        assert main_evaluate_maps(argv[:2]) == 0
    assert json.loads(capsys.readouterr().out)["image_auroc"] is None


def test_evaluate_on_numpy_arrays_never_imports_torch():
    # torch's import is ~0.5 GB resident: a metrics-only process (evaluate on saved maps) must not pay it
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from amoe.metrics import evaluate\n"
        "rng = np.random.default_rng(0)\n"
        "masks = np.zeros((4, 16, 16), np.uint8); masks[2:, 4:9, 4:9] = 1\n"
        "maps = rng.random((4, 16, 16), dtype=np.float32) + masks\n"
        "out = evaluate(maps.reshape(4, -1).max(1), np.array([0, 0, 1, 1]), maps, masks)\n"
        "assert out['image_auroc'] == 1.0 and 'pixel_aupro' in out, out\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
