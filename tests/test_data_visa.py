"""VisA: raw archive (CRLF csv, .JPG, masks 1/2) and the 1cls conversion, detected automatically."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_data import small

from data_modules.base import DataError, read_mask
from data_modules.visa import VisA


def test_raw_fixture_really_has_the_quirks(visa_raw_root):
    assert b"\r\n" in (visa_raw_root / "split_csv/1cls.csv").read_bytes()
    assert (visa_raw_root / "candle/Data/Images/Anomaly/000.JPG").is_file()
    from PIL import Image

    assert set(np.unique(np.asarray(Image.open(visa_raw_root / "candle/Data/Masks/Anomaly/001.png")))) == {0, 2}


@pytest.mark.parametrize("parent", [False, True])
def test_raw_layout_detected_from_archive_or_its_parent(visa_raw_root, parent):
    dm = small(VisA, root=str(visa_raw_root.parent if parent else visa_raw_root))
    assert dm.layout == ("raw", visa_raw_root)
    test = dm.test_records()
    anomalous = [r for r in test if r.label == 1]
    assert len(anomalous) == 3 and all(r.defect_type == "bad" and r.mask_path.endswith(".png") for r in anomalous)
    assert all(r.path.endswith(".JPG") for r in test + dm.train_records())


def test_small_mask_values_are_binarised(visa_raw_root):
    ds = small(VisA, root=str(visa_raw_root), classes=["candle"], image_size=40, crop_size=30).split("test")
    for i, r in enumerate(ds.records):
        if r.label:
            assert read_mask(r.mask_path).sum() == 68  # 8x8 box (value 1 or 2) + a 2x2 patch (value 2)
            assert ds[i]["mask"].sum() > 0 and set(ds[i]["mask"].unique().tolist()) == {0.0, 1.0}


def test_1cls_layout_with_3_channel_masks(visa_1cls_root):
    dm = small(VisA, root=str(visa_1cls_root))
    assert dm.layout == ("1cls", visa_1cls_root)
    ds = dm.split("test")
    i = next(i for i, r in enumerate(ds.records) if r.label)
    assert ds[i]["mask"].sum() > 0


def test_missing_mask_and_unreferenced_mask_are_problems(visa_raw_root):
    (visa_raw_root / "candle/Data/Masks/Anomaly/001.png").rename(visa_raw_root / "candle/Data/Masks/Anomaly/009.png")
    with pytest.raises(DataError, match="Anomaly/001.JPG: anomalous test image without mask"):
        small(VisA, root=str(visa_raw_root)).setup("test")
    dm = small(VisA, root=str(visa_raw_root), skip_bad_files=True)
    dm.setup("test")
    assert len(dm.split("test")) == 4 and any("009.png: mask without image" in p for p in dm.problems)


def test_neither_layout(tmp_path):
    (tmp_path / "VisA" / "stuff").mkdir(parents=True)
    with pytest.raises(DataError, match="(?s)neither the raw layout.*spot-diff"):
        small(VisA, root=str(tmp_path / "VisA")).setup()
