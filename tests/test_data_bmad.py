"""BMAD: subsets, root resolution, Ungood/ungood, valid/val, both nestings, the UniVAD pack."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_data import small

from data_modules import DATAMODULES
from data_modules.base import DataError
from data_modules.bmad import BMAD


@pytest.mark.parametrize("subset", ["brainmri", "BrainMRI", "BRAINMRI", "BraTS2021_slice"])
def test_subset_is_case_insensitive(subset):
    dm = BMAD(subset=subset)
    assert (dm.name, dm.cls, dm.root) == ("brainmri", "BrainMRI", "data/BMAD/BrainMRI")


def test_named_modules_bind_subsets():
    assert [(DATAMODULES[n]().cls, DATAMODULES[n]().root) for n in ("brainmri", "liverct", "resc")] == [
        ("BrainMRI", "data/BMAD/BrainMRI"), ("LiverCT", "data/BMAD/LiverCT"), ("RESC", "data/BMAD/RESC")]
    assert BMAD(subset="LIVERCT").name == "liverct"
    with pytest.raises(DataError, match="unknown subset 'chest'"):
        BMAD(subset="chest")


@pytest.mark.parametrize("below", [".", "Brain_AD", "Brain_AD/BraTS2021_slice"])
def test_root_may_be_the_folder_its_zip_folder_or_above(bmad_root, below):
    dm = small(BMAD, root=str(bmad_root / below), subset="brainmri")
    assert dm.layout == ("raw", bmad_root / "Brain_AD/BraTS2021_slice")


def test_masks_have_the_image_file_name_and_good_masks_are_ignored(bmad_root):
    for name, root in (("brainmri", bmad_root), ("liverct", bmad_root), ("resc", bmad_root)):
        dm = small(DATAMODULES[name], root=str(root))
        for r in dm.test_records() + dm.validation_records():
            if r.label:
                assert Path(r.mask_path).name == Path(r.path).name and "/label" in r.mask_path
                assert r.defect_type in ("Ungood", "ungood")
            else:
                assert r.mask_path is None and r.defect_type == "good"


def test_validation_split_keeps_labels(bmad_root):
    recs = small(DATAMODULES["resc"], root=str(bmad_root)).validation_records()
    assert sorted(r.label for r in recs) == [0, 1] and all(r.extra["split"] == "validation" for r in recs)


def test_univad_pack(bmad_pack_root):
    dm = small(DATAMODULES["brainmri"], root=str(bmad_pack_root))
    assert dm.layout == ("pack", bmad_pack_root / "BrainMRI") and dm.validation_records() == []
    (ungood,) = [r for r in dm.test_records() if r.label]
    assert ungood.mask_path.endswith("ground_truth/Ungood/00002_60.png")


def test_anomaly_without_label_mask(bmad_root):
    (bmad_root / "Liver_AD/hist_DIY/test/label/ungood/9.png").unlink()
    with pytest.raises(DataError, match="img/ungood/9.png: anomalous image without mask"):
        small(DATAMODULES["liverct"], root=str(bmad_root)).setup("test")


def test_no_data_under_root(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="(?s)no BMAD LiverCT data.*Liver_AD.*DorisBao/BMAD"):
        small(DATAMODULES["liverct"], root=str(tmp_path / "x")).setup()
