"""Folder: own MVTec-style trees (with or without ground_truth) and prediction on any folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_data import small

from data_modules.base import DataError
from data_modules.folder import Folder


def test_masks_by_stem_or_stem_mask(folder_root):
    recs = {Path(r.path).name: r for r in small(Folder, root=str(folder_root)).test_records()}
    assert Path(recs["d.png"].mask_path).name == "d.png" and Path(recs["e.jpg"].mask_path).name == "e_mask.png"
    assert recs["c.png"].label == 0 and all(r.extra["has_mask"] for r in recs.values())


def test_no_ground_truth_anywhere_allows_unmasked_anomalies(folder_nogt_root):
    ds = small(Folder, root=str(folder_nogt_root)).split("test")
    for i, r in enumerate(ds.records):
        assert r.extra["has_mask"] is False and r.mask_path is None and ds[i]["mask"].sum() == 0
    assert sorted((r.cls, r.label) for r in ds.records) == [("gadget", 1), ("widget", 0), ("widget", 1)]


def test_ground_truth_present_makes_masks_required(folder_root):
    (folder_root / "ground_truth/scratch/e_mask.png").unlink()
    with pytest.raises(DataError, match="scratch/e.jpg: anomalous test image without mask"):
        small(Folder, root=str(folder_root)).setup("test")


def test_predict_on_any_folder_recursively(predict_dir, tmp_path):
    dm = small(Folder, root=str(tmp_path / "no_such_root"), path=str(predict_dir))
    ds = dm.split("predict")
    assert [r.extra["relpath"] for r in ds.records] == ["a.png", "d.tif", "sub/b.jpg", "sub/deeper/c.bmp"]
    assert {(r.label, r.defect_type, r.cls) for r in ds.records} == {(0, "unknown", "incoming")}
    batch = next(iter(dm.predict_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32)


def test_predict_errors(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        small(Folder, path=str(tmp_path / "missing")).setup("predict")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        small(Folder, path=str(tmp_path / "empty")).setup("predict")


def test_predict_without_path_uses_the_test_split(folder_root):
    assert len(small(Folder, root=str(folder_root)).split("predict")) == 3
