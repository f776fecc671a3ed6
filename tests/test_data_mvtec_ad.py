"""MVTec AD: mask pairing by stem, grayscale classes, class subsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures_data import box, save, small

from data_modules.base import DataError, read_rgb
from data_modules.mvtec_ad import MVTecAD
from data_modules.tree import pair_masks


def test_masks_pair_with_their_image_by_stem(mvtec_ad_root):
    recs = {(r.cls, r.defect_type, Path(r.path).name): r for r in small(MVTecAD, root=str(mvtec_ad_root)).test_records()}
    assert Path(recs["bottle", "broken_large", "001.png"].mask_path).name == "001_mask.png"
    assert recs["bottle", "broken_large", "001.png"].mask_path.endswith("ground_truth/broken_large/001_mask.png")
    assert recs["bottle", "good", "000.png"].mask_path is None and recs["bottle", "good", "000.png"].label == 0
    assert recs["grid", "bent", "000.png"].label == 1


def test_mask_content_follows_the_pairing(mvtec_ad_root):
    ds = small(MVTecAD, root=str(mvtec_ad_root), image_size=24, crop_size=24).split("test")
    by_name = {(r.defect_type, Path(r.path).name): i for i, r in enumerate(ds.records) if r.cls == "bottle"}
    for i in range(2):  # the fixture shifts the box of mask i down by 4*i rows
        mask = ds[by_name["broken_large", f"00{i}.png"]]["mask"][0].numpy()
        assert np.array_equal(mask > 0, box(rows=slice(4 + 4 * i, 12 + 4 * i)) > 0)


def test_grayscale_and_16bit_class_become_3_channels(mvtec_ad_root):
    dm = small(MVTecAD, root=str(mvtec_ad_root), classes=["grid"])
    for r in dm.train_records():
        rgb = read_rgb(r.path)
        assert rgb.shape == (24, 24, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert dm.class_names == ["grid"]


def test_unknown_class_lists_available(mvtec_ad_root):
    with pytest.raises(DataError, match=r"\['cable'\].*available: \['bottle', 'grid'\]"):
        small(MVTecAD, root=str(mvtec_ad_root), classes=["cable"]).setup()


def test_root_without_class_folders(tmp_path):
    (tmp_path / "mvtec_ad").mkdir()
    with pytest.raises(DataError, match="(?s)no class folders.*mvtec.com"):
        small(MVTecAD, root=str(tmp_path / "mvtec_ad")).setup()


def test_pair_masks_prefers_exact_stem_and_never_a_longer_number(tmp_path):
    images = [tmp_path / "000.png", tmp_path / "0001.png", tmp_path / "a_b.png"]
    masks = [tmp_path / "000_mask.png", tmp_path / "0001_mask.png", tmp_path / "a_b.png", tmp_path / "a_b_mask.png"]
    pairs, stray = pair_masks(images, masks)
    assert pairs == {images[0]: masks[0], images[1]: masks[1], images[2]: masks[2]}
    assert stray == [masks[3]]


def test_mask_with_another_size_is_resized(mvtec_ad_root):
    save(mvtec_ad_root / "bottle/ground_truth/contamination/000_mask.png", box(48, 48, rows=slice(16, 32), cols=slice(16, 32)))
    ds = small(MVTecAD, root=str(mvtec_ad_root), classes=["bottle"], image_size=24, crop_size=24).split("test")
    i = next(i for i, r in enumerate(ds.records) if r.defect_type == "contamination")
    assert np.array_equal(ds[i]["mask"][0].numpy() > 0, box() > 0)
