"""MVTec 3D-AD: rgb and depth modalities, class-id gt binarised, all-zero good gt."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from fixtures_data import small

from data_modules.base import DataError, read_mask
from data_modules.mvtec_3d import DepthDataset, MVTec3D, render_depth


def test_depth_render_hand_checked(tmp_path):
    xyz = np.zeros((2, 3, 3), np.float32)
    xyz[..., 2] = [[0.0, 1.0, 2.0], [5.0, np.nan, 3.0]]  # 0 and NaN are invalid; valid z spans [1, 5]
    xyz[..., 0] = 7.0  # x and y are ignored
    path = tmp_path / "000.tiff"
    tifffile.imwrite(path, xyz)
    out = render_depth(str(path))
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    expected = np.array([[0, 0, 64], [255, 0, 128]], np.uint8)  # (z-1)/4*255: 2 -> 63.75, 3 -> 127.5 (rounded)
    assert np.array_equal(out[..., 0], expected) and (out[..., 0] == out[..., 2]).all()


def test_depth_render_edge_cases(tmp_path):
    tifffile.imwrite(tmp_path / "empty.tiff", np.zeros((4, 4, 3), np.float32))
    assert render_depth(str(tmp_path / "empty.tiff")).max() == 0
    tifffile.imwrite(tmp_path / "flat.tiff", np.zeros((4, 4), np.float32))
    with pytest.raises(DataError, match="flat.tiff.*H×W×3"):
        render_depth(str(tmp_path / "flat.tiff"))


def test_depth_modality_reads_the_xyz_tiff(mvtec_3d_root):
    dm = small(MVTec3D, root=str(mvtec_3d_root), modality="depth", image_size=24, crop_size=20)
    ds = dm.split("test")
    assert isinstance(ds, DepthDataset) and all(r.path.endswith(".tiff") for r in ds.records)
    rec = ds.records[0]
    assert rec.extra["rgb"].endswith(".png") and rec.extra["xyz"] == rec.path
    depth = ds.load_rgb(rec)
    assert depth.shape == (24, 20, 3) and depth[:4, :4].max() == 0 and depth.max() == 255


def test_rgb_modality_and_gt_class_ids(mvtec_3d_root):
    recs = small(MVTec3D, root=str(mvtec_3d_root)).test_records()
    assert all(r.path.endswith(".png") and "/rgb/" in r.path for r in recs)
    cut = next(r for r in recs if r.defect_type == "cut")
    assert cut.mask_path.endswith("test/cut/gt/000.png") and read_mask(cut.mask_path).sum() == 64
    combined = next(r for r in recs if r.defect_type == "combined")
    assert read_mask(combined.mask_path).sum() == 64 + 16  # 254 box and 255 corner
    good = next(r for r in recs if r.defect_type == "good")
    assert good.label == 0 and good.mask_path is None  # its gt/000.png is all zero


def test_options(mvtec_3d_root):
    with pytest.raises(DataError, match="modality must be 'rgb' or 'depth'"):
        MVTec3D(root=str(mvtec_3d_root), modality="pointcloud")
    assert len(small(MVTec3D, root=str(mvtec_3d_root), use_validation=True).train_records()) == 3


def test_missing_gt_is_a_problem(mvtec_3d_root):
    (mvtec_3d_root / "tire/test/cut/gt/001.png").unlink()
    with pytest.raises(DataError, match="cut/rgb/001.png: anomalous test image without mask"):
        small(MVTec3D, root=str(mvtec_3d_root)).setup("test")
