"""Fixture trees in the exact on-disk layouts of the benchmark datasets (see reference/DATASETS.md §9).

Each fixture builds a tiny copy of one dataset under ``tmp_path`` with that dataset's quirks, and returns
the root to pass as ``root``. The trees are built by :mod:`amoe.fixture_trees`, which ``amoe reproduce
--smoke`` shares. The counts the trees hold are written next to each fixture.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from amoe import fixture_trees as trees
from amoe.fixture_trees import LOCO_CONFIG, PED2_M, box, noise, save, touch, xyz_cloud  # noqa: F401  (re-exported)


def small(cls: type, **kwargs: Any):
    """A data module with test-sized transforms and no worker processes."""
    kwargs = {"image_size": 32, "crop_size": 32, "batch_size": 2, "eval_batch_size": 4, "num_workers": 0, **kwargs}
    return cls(**kwargs)


def tally(records) -> dict[str, int]:
    """{cls: number of records}."""
    return dict(sorted(Counter(r.cls for r in records).items()))


def tally_types(records) -> dict[str, dict[str, int]]:
    """{cls: {defect_type: number of records}}."""
    out: dict[str, Counter] = {}
    for r in records:
        out.setdefault(r.cls, Counter())[r.defect_type] += 1
    return {c: dict(sorted(n.items())) for c, n in sorted(out.items())}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under root: to check that nothing the user gave is modified."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def mvtec_ad_root(tmp_path: Path) -> Path:
    """bottle (RGB; one RGBA train image): train 4, test good 2, broken_large 2, contamination 1.
    grid (grayscale; one 16-bit train image): train 3, test good 1, bent 1. 4 masks ``NNN_mask.png``."""
    return trees.mvtec_ad(tmp_path)


@pytest.fixture
def visa_raw_root(tmp_path: Path) -> Path:
    """The raw archive ``VisA_20220922`` (CRLF 1cls.csv, uppercase .JPG, masks with values 1/2).
    candle: train 3, test good 1, bad 2. capsules (3-digit names): train 2, test good 1, bad 1. 3 masks."""
    return trees.visa_raw(tmp_path)


@pytest.fixture
def visa_1cls_root(tmp_path: Path) -> Path:
    """spot-diff/anomalib 1cls conversion, 3-channel 0/255 masks. candle: train 2, test good 1, bad 1."""
    return trees.visa_1cls(tmp_path)


@pytest.fixture
def mvtec_loco_root(tmp_path: Path) -> Path:
    """juice_bottle (40×20, H×W): train 3, validation 2, test good 1, logical 2, structural 1.
    logical 000 has two region masks (values 255 and 247), the others one: 4 mask files."""
    return trees.mvtec_loco(tmp_path)


@pytest.fixture
def mvtec_3d_root(tmp_path: Path) -> Path:
    """tire (24×20): train 2, validation 1, test good 1 (all-zero gt), cut 2 (gt 254), combined 1 (254+255)."""
    return trees.mvtec_3d(tmp_path)


@pytest.fixture
def bmad_root(tmp_path: Path) -> Path:
    """The three BMAD zips extracted side by side (grayscale PNG, masks with the image's file name).

    Brain_AD/BraTS2021_slice (``split/<label>/{img,label}``, ``Ungood``, ``valid``): train 3,
      validation good 1 + Ungood 1, test good 2 (all-zero label masks) + Ungood 2.
    Liver_AD/hist_DIY (``split/{img,label}/<label>``, ``ungood``, ``valid``): train 2,
      validation good 1 + ungood 1, test good 1 + ungood 2.
    Retina_RESC_AD/RESC (``split/<label>/{img,label}``, ``ungood``, ``val``): train 2,
      validation good 1 + ungood 1, test good 1 + ungood 1.
    """
    return trees.bmad_raw(tmp_path)


@pytest.fixture
def bmad_pack_root(tmp_path: Path) -> Path:
    """The UniVAD MVTec-style pack ``BMAD/BrainMRI``: train 2, test good 1, Ungood 1 (mask same stem)."""
    return trees.bmad_pack(tmp_path)


@pytest.fixture
def ped2_root(tmp_path: Path) -> Path:
    """``Ped2/UCSD_Anomaly_Dataset.v1p2/UCSDped2`` with macOS junk. Train001 (3 frames), Train002 (2);
    Test001 (4 frames, gt ``001.bmp``; anomalous 2-3), Test002 (3 frames, gt ``frame001.bmp``; anomalous 1, 3)."""
    return trees.ped2(tmp_path)


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    """One class folder ``parts``: train 2, test good 1, scratch 2 (masks ``d.png`` and ``e_mask.png``)."""
    return trees.folder(tmp_path)


@pytest.fixture
def folder_nogt_root(tmp_path: Path) -> Path:
    """Two class folders, no ground_truth anywhere. widget: train 2, test good 1, dent 1; gadget: train 1, test dent 1."""
    return trees.folder_nogt(tmp_path)


@pytest.fixture
def predict_dir(tmp_path: Path) -> Path:
    """Arbitrary images, nested: a.png, d.tif, sub/b.jpg, sub/deeper/c.bmp (plus junk that is ignored)."""
    return trees.predict_images(tmp_path)
