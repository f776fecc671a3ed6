"""MVTec LOCO AD: per-image mask folders ORed, region masks and defects_config kept, validation option."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures_data import box, save, small

from data_modules.base import DataError
from data_modules.mvtec_loco import MVTecLOCO


def test_region_masks_are_ored_and_kept(mvtec_loco_root):
    ds = small(MVTecLOCO, root=str(mvtec_loco_root), image_size=40, crop_size=40).split("test")
    rec = next(r for r in ds.records if r.defect_type == "logical_anomalies" and Path(r.path).stem == "000")
    gt = mvtec_loco_root / "juice_bottle/ground_truth/logical_anomalies/000"
    assert rec.extra["region_masks"] == [str(gt / "000.png"), str(gt / "001.png")]
    assert rec.extra["defects_config"] == str(mvtec_loco_root / "juice_bottle/defects_config.json")
    assert rec.extra["level"] == "logical" and rec.mask_path is None
    union = (box(40, 20, 1, slice(2, 10), slice(2, 10)) | box(40, 20, 1, slice(30, 38), slice(10, 18))) > 0
    mask = ds.load_mask(rec, (40, 20))
    assert mask.dtype == bool and np.array_equal(mask, union)
    levels = {r.defect_type: r.extra.get("level") for r in ds.records}
    assert levels == {"good": None, "logical_anomalies": "logical", "structural_anomalies": "structural"}


def test_validation_split_and_use_validation(mvtec_loco_root):
    plain = small(MVTecLOCO, root=str(mvtec_loco_root))
    assert len(plain.validation_records()) == 2 and len(plain.train_records()) == 3
    more = small(MVTecLOCO, root=str(mvtec_loco_root), use_validation=True)
    recs = more.train_records()
    assert len(recs) == 5 and sum(r.extra.get("split") == "validation" for r in recs) == 2


def test_flat_merged_masks_are_accepted(mvtec_loco_root):
    gt = mvtec_loco_root / "juice_bottle/ground_truth/structural_anomalies"
    (gt / "000/000.png").rename(gt / "000.png")
    (gt / "000").rmdir()
    recs = small(MVTecLOCO, root=str(mvtec_loco_root)).test_records()
    rec = next(r for r in recs if r.defect_type == "structural_anomalies")
    assert rec.mask_path == str(gt / "000.png") and rec.extra["region_masks"] == []


def test_missing_mask_folder_and_orphan_folder(mvtec_loco_root):
    gt = mvtec_loco_root / "juice_bottle/ground_truth/logical_anomalies"
    (gt / "001/000.png").unlink()
    (gt / "001").rmdir()
    with pytest.raises(DataError, match="logical_anomalies/001.png: anomalous test image without mask"):
        small(MVTecLOCO, root=str(mvtec_loco_root)).setup("test")
    save(gt / "001/000.png", box(40, 20))
    save(gt / "005/000.png", box(40, 20))
    with pytest.raises(DataError, match="logical_anomalies/005: mask without image"):
        small(MVTecLOCO, root=str(mvtec_loco_root)).setup("test")
