"""UCSD Ped2: .tif frames, both gt namings, frame labels from UCSDped2.m, macOS junk ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_data import small

from data_modules.base import DataError
from data_modules.ped2 import Ped2, parse_gt_frames


def test_parse_gt_frames():
    text = "TestVideoFile{end+1}.gt_frame = [61:180];\n% c\nTestVideoFile{end+1}.gt_frame = [1:3, 7:8 10];\n"
    assert parse_gt_frames(text) == [set(range(61, 181)), {1, 2, 3, 7, 8, 10}]
    assert parse_gt_frames("TestVideoFile{end+1}.gt_frame = [1:2:7];") == [{1, 3, 5, 7}]


@pytest.mark.parametrize("below", [".", "UCSD_Anomaly_Dataset.v1p2", "UCSD_Anomaly_Dataset.v1p2/UCSDped2"])
def test_root_levels(ped2_root, below):
    assert small(Ped2, root=str(ped2_root / below)).base == ped2_root / "UCSD_Anomaly_Dataset.v1p2/UCSDped2"


def test_frame_labels_follow_the_m_file_ranges(ped2_root):
    recs = small(Ped2, root=str(ped2_root)).test_records()
    labels = {(r.extra["clip"], r.extra["frame"]): r.label for r in recs}
    # fixture .m: Test001 [2:3], Test002 [1:1, 3:3]
    assert labels == {("Test001", 1): 0, ("Test001", 2): 1, ("Test001", 3): 1, ("Test001", 4): 0,
                      ("Test002", 1): 1, ("Test002", 2): 0, ("Test002", 3): 1}
    masks = {(r.extra["clip"], r.extra["frame"]): r.mask_path and Path(r.mask_path).name for r in recs}
    assert masks[("Test001", 2)] == "002.bmp" and masks[("Test002", 3)] == "frame003.bmp"
    assert masks[("Test001", 1)] is None and all(r.cls == "pedestrian" for r in recs)


def test_train_frames_skip_junk(ped2_root):
    recs = small(Ped2, root=str(ped2_root)).train_records()
    assert [(r.extra["clip"], r.extra["frame"]) for r in recs] == [
        ("Train001", 1), ("Train001", 2), ("Train001", 3), ("Train002", 1), ("Train002", 2)]
    assert all(r.path.endswith(".tif") and not Path(r.path).name.startswith(".") for r in recs)


def test_frame_masks_and_grayscale_tif(ped2_root):
    ds = small(Ped2, root=str(ped2_root), image_size=24, crop_size=24).split("test")
    for i, r in enumerate(ds.records):
        s = ds[i]
        assert s["image"].shape == (3, 24, 24) and (s["mask"].sum() > 0) == bool(r.label)
        assert s["extra"]["orig_size"] == (24, 36)


def test_missing_m_file_and_missing_mask(ped2_root):
    test = ped2_root / "UCSD_Anomaly_Dataset.v1p2/UCSDped2/Test"
    (test / "Test002_gt/frame003.bmp").unlink()
    with pytest.raises(DataError, match="Test002/003.tif: anomalous frame"):
        small(Ped2, root=str(ped2_root)).setup("test")
    (test / "UCSDped2.m").unlink()
    with pytest.raises(DataError, match="UCSDped2.m is missing"):
        small(Ped2, root=str(ped2_root)).setup("test")
