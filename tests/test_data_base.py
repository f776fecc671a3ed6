"""Shared checks run on every dataset family: exact counts, the sample schema, errors, read_rgb."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import noise, save, small, snapshot, touch
from PIL import Image

from data_modules import DATAMODULES
from data_modules.base import DataError, read_rgb
from data_modules.inspect import inspect_module

# (id, DATAMODULES name, fixture, root below the fixture, kwargs, expected report)
CASES = [
    ("mvtec_ad", "mvtec_ad", "mvtec_ad_root", ".", {}, {
        "train": {"bottle": 4, "grid": 3}, "validation": {},
        "test": {"bottle": {"broken_large": 2, "contamination": 1, "good": 2}, "grid": {"bent": 1, "good": 1}},
        "masks": 4}),
    ("visa_raw", "visa", "visa_raw_root", ".", {}, {
        "train": {"candle": 3, "capsules": 2}, "validation": {},
        "test": {"candle": {"bad": 2, "good": 1}, "capsules": {"bad": 1, "good": 1}}, "masks": 3}),
    ("visa_1cls", "visa", "visa_1cls_root", ".", {}, {
        "train": {"candle": 2}, "validation": {}, "test": {"candle": {"bad": 1, "good": 1}}, "masks": 1}),
    ("mvtec_loco", "mvtec_loco", "mvtec_loco_root", ".", {}, {
        "train": {"juice_bottle": 3}, "validation": {"juice_bottle": 2},
        "test": {"juice_bottle": {"good": 1, "logical_anomalies": 2, "structural_anomalies": 1}}, "masks": 4}),
    ("mvtec_3d_rgb", "mvtec_3d", "mvtec_3d_root", ".", {}, {
        "train": {"tire": 2}, "validation": {"tire": 1}, "test": {"tire": {"combined": 1, "cut": 2, "good": 1}},
        "masks": 3}),
    ("mvtec_3d_depth", "mvtec_3d", "mvtec_3d_root", ".", {"modality": "depth"}, {
        "train": {"tire": 2}, "validation": {"tire": 1}, "test": {"tire": {"combined": 1, "cut": 2, "good": 1}},
        "masks": 3}),
    ("brainmri", "brainmri", "bmad_root", "Brain_AD", {}, {
        "train": {"BrainMRI": 3}, "validation": {"BrainMRI": 2}, "test": {"BrainMRI": {"Ungood": 2, "good": 2}},
        "masks": 3}),
    ("liverct", "liverct", "bmad_root", ".", {}, {
        "train": {"LiverCT": 2}, "validation": {"LiverCT": 2}, "test": {"LiverCT": {"good": 1, "ungood": 2}},
        "masks": 3}),
    ("resc", "resc", "bmad_root", "Retina_RESC_AD/RESC", {}, {
        "train": {"RESC": 2}, "validation": {"RESC": 2}, "test": {"RESC": {"good": 1, "ungood": 1}}, "masks": 2}),
    ("brainmri_pack", "brainmri", "bmad_pack_root", ".", {}, {
        "train": {"BrainMRI": 2}, "validation": {}, "test": {"BrainMRI": {"Ungood": 1, "good": 1}}, "masks": 1}),
    ("ped2", "ped2", "ped2_root", ".", {}, {
        "train": {"pedestrian": 5}, "validation": {}, "test": {"pedestrian": {"anomaly": 4, "good": 3}}, "masks": 4}),
    ("folder", "folder", "folder_root", ".", {}, {
        "train": {"parts": 2}, "validation": {}, "test": {"parts": {"good": 1, "scratch": 2}}, "masks": 2}),
    ("folder_nogt", "folder", "folder_nogt_root", ".", {}, {
        "train": {"gadget": 1, "widget": 2}, "validation": {},
        "test": {"gadget": {"dent": 1}, "widget": {"dent": 1, "good": 1}}, "masks": 0}),
]


def build(request: pytest.FixtureRequest, case: tuple, **kwargs):
    _, name, fixture, below, kw, _ = case
    root = request.getfixturevalue(fixture) / below
    return small(DATAMODULES[name], root=str(root), **kw, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_exact_counts(request, case):
    report = inspect_module(build(request, case))
    assert report == {**case[5], "problems": []}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sample_schema(request, case):
    dm = build(request, case, calib_fraction=0.5)
    train, calib = dm.split("train").records, dm.split("calib").records
    assert not {r.path for r in train} & {r.path for r in calib}
    assert len(train) + len(calib) == sum(case[5]["train"].values())
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (3, 32, 32) and batch["image"].dtype == torch.float32
    assert (batch["label"] == 0).all() and batch["mask"].sum() == 0
    has_masks = case[0] != "folder_nogt"
    for batch in dm.test_dataloader():
        assert batch["image"].shape[1:] == (3, 32, 32) and batch["mask"].shape[1:] == (1, 32, 32)
        assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
        assert set(batch["dataset"]) == {dm.name}
        assert all(Path(p).is_file() for p in batch["path"])
        for label, mask, t in zip(batch["label"].tolist(), batch["mask"], batch["defect_type"]):
            assert (t == "good") == (label == 0)
            assert (mask.sum() > 0) == (label == 1 and has_masks)


@pytest.mark.parametrize("name", sorted(set(DATAMODULES) - {"synthetic"}))
def test_missing_root_names_dataset_layout_and_page(tmp_path, name):
    dm = DATAMODULES[name](root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as e:
        dm.setup("fit")
    msg = str(e.value)
    child = DATAMODULES["mvtec_ad"] if name == "unified" else type(dm)  # unified reports its first dataset
    assert child.name in msg and "does not exist" in msg and "Expected layout" in msg
    assert child.download_page in msg and "--data.root" in msg


@pytest.mark.parametrize("kind", ["zero_byte", "truncated", "not_an_image"])
def test_unreadable_file_is_named_or_skipped_with_count(mvtec_ad_root, caplog, kind):
    bad = mvtec_ad_root / "bottle/test/good/001.png"
    data = bad.read_bytes()
    bad.write_bytes({"zero_byte": b"", "truncated": data[: len(data) // 3], "not_an_image": b"<html>"}[kind])
    dm = small(DATAMODULES["mvtec_ad"], root=str(mvtec_ad_root))
    with pytest.raises(DataError, match="001.png") as e:
        list(dm.test_dataloader())
    assert str(bad) in str(e.value) and "skip_bad_files" in str(e.value)
    with caplog.at_level(logging.WARNING):
        dm = small(DATAMODULES["mvtec_ad"], root=str(mvtec_ad_root), skip_bad_files=True)
        assert len(dm.split("test")) == 6
    assert "skipped 1 file" in caplog.text and str(bad) in caplog.text


@pytest.mark.parametrize(
    "breakage, words",
    [
        ("remove_mask", ["broken_large/001.png", "anomalous test image without mask"]),
        ("stray_mask", ["ground_truth/broken_large/007_mask.png", "mask without image"]),
        ("stray_mask_folder", ["ground_truth/crack/000_mask.png", "mask without image"]),
        ("empty_class", ["cable", "empty class folder"]),
        ("empty_type", ["test/crack", "empty folder"]),
    ],
)
def test_pairing_problems_raise_or_skip(mvtec_ad_root, caplog, breakage, words):
    b = mvtec_ad_root / "bottle"
    if breakage == "remove_mask":
        (b / "ground_truth/broken_large/001_mask.png").unlink()
    elif breakage == "stray_mask":
        save(b / "ground_truth/broken_large/007_mask.png", np.zeros((24, 24), np.uint8))
    elif breakage == "stray_mask_folder":
        save(b / "ground_truth/crack/000_mask.png", np.zeros((24, 24), np.uint8))
    elif breakage == "empty_class":
        (mvtec_ad_root / "cable/train/good").mkdir(parents=True)
    else:
        (b / "test/crack").mkdir()
    with pytest.raises(DataError) as e:
        small(DATAMODULES["mvtec_ad"], root=str(mvtec_ad_root)).setup()
    assert all(w in str(e.value) for w in words)
    with caplog.at_level(logging.WARNING):
        small(DATAMODULES["mvtec_ad"], root=str(mvtec_ad_root), skip_bad_files=True).setup()
    assert "skipped 1 file" in caplog.text and all(w in caplog.text for w in words)


def test_nothing_the_user_gave_is_modified(request):
    roots = [request.getfixturevalue(c[2]) for c in CASES]
    before = [snapshot(r) for r in roots]
    for case in CASES:
        dm = build(request, case)
        list(dm.test_dataloader())
        list(dm.train_dataloader())
    assert [snapshot(r) for r in roots] == before


def test_read_rgb_gray_16bit_rgba_palette(tmp_path):
    gray = noise(channels=1)
    rgb = read_rgb(save(tmp_path / "g.png", gray))
    assert rgb.shape == (24, 24, 3) and rgb.dtype == np.uint8 and (rgb == gray[..., None]).all()
    deep = read_rgb(save(tmp_path / "d.png", gray.astype(np.uint16) * 257))
    assert Image.open(tmp_path / "d.png").mode.startswith("I") and (deep == gray[..., None]).all()
    color = noise()
    rgba = read_rgb(save(tmp_path / "a.png", np.dstack([color, np.zeros((24, 24), np.uint8)])))
    assert (rgba == color).all()
    pal = read_rgb(save(tmp_path / "p.png", color, mode="P"))
    assert pal.shape == (24, 24, 3) and pal.dtype == np.uint8
    tif = read_rgb(save(tmp_path / "t.tif", gray))
    assert (tif == gray[..., None]).all()


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_read_rgb_names_the_bad_file(tmp_path):
    for name, data in (("empty.png", b""), ("fake.jpg", b"not a jpeg"), ("fake.tif", b"II*\x00broken")):
        with pytest.raises(DataError, match=name):
            read_rgb(touch(tmp_path / name, data))
