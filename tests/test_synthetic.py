import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from data_modules.synthetic import LEVELS, SyntheticDataModule


def _dm(**kw) -> SyntheticDataModule:
    args = dict(num_train=12, num_test_good=6, num_test_per_level=6, size=96, image_size=56, crop_size=56)
    args.update(kw)
    return SyntheticDataModule(**args)


def test_counts_labels_masks_and_levels():
    dm = _dm()
    train, calib, test = dm.split("train"), dm.split("calib"), dm.split("test")
    classes = sorted(dm.assemblies)
    assert len(train) + len(calib) == 12 * len(classes) and len(calib) == round(0.1 * 12) * len(classes)
    assert len(test) == (6 + 3 * 6) * len(classes)
    for i in range(len(test)):
        s = test[i]
        assert s["image"].shape == (3, 56, 56) and s["mask"].shape == (1, 56, 56)
        assert set(s["mask"].unique().tolist()) <= {0.0, 1.0}
        if s["label"] == 1:
            assert s["defect_type"] in LEVELS and s["extra"]["level"] == s["defect_type"]
            assert s["mask"].sum() > 0, s["path"]
        else:
            assert s["mask"].sum() == 0 and s["defect_type"] == "good"


def test_generation_is_deterministic_and_seeded():
    a, b, c = _dm().split("test"), _dm().split("test"), _dm(seed=1).split("test")
    assert torch.equal(a[7]["image"], b[7]["image"]) and torch.equal(a[30]["mask"], b[30]["mask"])
    assert not torch.equal(a[7]["image"], c[7]["image"])
    train = _dm().split("train")
    assert not torch.equal(train[0]["image"], train[1]["image"])  # normal images vary


def _hist(rgb: np.ndarray) -> np.ndarray:
    return np.concatenate([np.histogram(rgb[..., ch], bins=16, range=(0, 256))[0] for ch in range(3)]) / rgb[..., 0].size


def test_anomalies_are_not_separable_by_global_colour_statistics():
    dm = SyntheticDataModule(num_train=20, num_test_good=15, num_test_per_level=15, size=96)
    train, test = dm.split("train"), dm.split("test")
    for cls in dm.assemblies:
        ref = np.mean([_hist(train.load_rgb(r)) for r in train.records if r.cls == cls], 0)
        recs = [r for r in test.records if r.cls == cls]
        score = np.array([np.abs(_hist(test.load_rgb(r)) - ref).sum() for r in recs])
        labels = np.array([r.label for r in recs])
        for level in ("component", "logical"):
            sel = [i for i, r in enumerate(recs) if r.label == 0 or r.extra["level"] == level]
            auroc = roc_auc_score(labels[sel], score[sel])
            assert auroc < 0.85, (cls, level, auroc)


def test_unknown_class_is_refused():
    import pytest

    with pytest.raises(ValueError, match="unknown classes"):
        SyntheticDataModule(classes=["nope"])
