"""Unified: several datasets as one, classes prefixed, each sample keeps its dataset and its reader."""

from __future__ import annotations

import pytest
from fixtures_data import small

from data_modules.base import DataError
from data_modules.unified import Unified


@pytest.fixture
def unified(mvtec_ad_root, mvtec_3d_root, ped2_root):
    return small(Unified, datasets=[
        {"name": "mvtec_ad", "root": str(mvtec_ad_root), "classes": ["bottle"]},
        {"name": "mvtec_3d", "root": str(mvtec_3d_root), "modality": "depth"},
        {"name": "ped2", "root": str(ped2_root)},
    ])


def test_classes_are_prefixed_and_counts_add_up(unified):
    assert unified.class_names == ["mvtec_3d/tire", "mvtec_ad/bottle", "ped2/pedestrian"]
    assert len(unified.train_records()) == 4 + 2 + 5 and len(unified.test_records()) == 5 + 4 + 7
    assert len(unified.validation_records()) == 1
    assert all(m.transform == unified.transform for m in unified.members)


def test_samples_keep_their_dataset_and_reader(unified):
    ds = unified.split("test")
    seen = {}
    for i, r in enumerate(ds.records):
        s = ds[i]
        assert s["dataset"] == r.extra["dataset"] == s["cls"].split("/")[0]
        assert (s["mask"].sum() > 0) == bool(s["label"])
        seen[s["dataset"]] = s
    assert set(seen) == {"mvtec_ad", "mvtec_3d", "ped2"}
    assert seen["mvtec_3d"]["path"].endswith(".tiff")  # rendered by the depth reader
    batch = next(iter(unified.test_dataloader()))
    assert batch["dataset"][0] == "mvtec_ad"


def test_names_default_roots_and_errors(tmp_path):
    dm = Unified(root=str(tmp_path), datasets=["visa", "brainmri"])
    assert [c.root for c in dm.members] == [str(tmp_path / "VisA"), str(tmp_path / "BMAD/BrainMRI")]
    assert [c.name for c in Unified().members] == [
        "mvtec_ad", "visa", "mvtec_loco", "brainmri", "liverct", "resc", "mvtec_3d", "ped2"]
    with pytest.raises(DataError, match="each dataset may appear once"):
        Unified(datasets=["visa", "visa"])
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        Unified(datasets=["imagenet"])
    with pytest.raises(DataError, match="(?s)visa: dataset root .*VisA' does not exist.*spot-diff"):
        dm.setup("fit")
