"""Tiny copies of the benchmark datasets in their exact on-disk layouts (see reference/DATASETS.md §9).

Each builder writes one dataset, with that dataset's quirks, under ``parent`` and returns the root to pass
as ``--data.root``. The test fixtures (``tests/fixtures_data.py``) and ``amoe reproduce --smoke`` use the
same builders, so the smoke reproduction reads exactly the layouts the data-module tests check. The counts
each tree holds are written next to each builder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


def noise(h: int = 24, w: int = 24, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w, channels) if channels > 1 else (h, w)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def box(h: int = 24, w: int = 24, value: int = 255, rows: slice = slice(8, 16), cols: slice = slice(8, 16)) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[rows, cols] = value
    return m


def save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    (im.convert(mode) if mode else im).save(path)
    return path


def touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def mvtec_ad(parent: Path) -> Path:
    """bottle (RGB; one RGBA train image): train 4, test good 2, broken_large 2, contamination 1.
    grid (grayscale; one 16-bit train image): train 3, test good 1, bent 1. 4 masks ``NNN_mask.png``."""
    root = Path(parent) / "mvtec_ad"
    b = root / "bottle"
    for i in range(3):
        save(b / "train/good" / f"{i:03d}.png", noise(seed=i))
    save(b / "train/good/003.png", np.dstack([noise(seed=3), np.full((24, 24), 200, np.uint8)]))  # RGBA
    for i in range(2):
        save(b / "test/good" / f"{i:03d}.png", noise(seed=10 + i))
        save(b / "test/broken_large" / f"{i:03d}.png", noise(seed=20 + i))
        save(b / "ground_truth/broken_large" / f"{i:03d}_mask.png", box(value=255, rows=slice(4 + 4 * i, 12 + 4 * i)))
    save(b / "test/contamination/000.png", noise(seed=30))
    save(b / "ground_truth/contamination/000_mask.png", box())
    g = root / "grid"
    for i in range(2):
        save(g / "train/good" / f"{i:03d}.png", noise(channels=1, seed=40 + i))
    save(g / "train/good/002.png", (noise(channels=1, seed=42).astype(np.uint16) * 257))  # 16-bit
    save(g / "test/good/000.png", noise(channels=1, seed=43))
    save(g / "test/bent/000.png", noise(channels=1, seed=44))
    save(g / "ground_truth/bent/000_mask.png", box())
    touch(root / "readme.txt", b"MVTec AD")
    touch(root / "license.txt", b"CC BY-NC-SA 4.0")
    return root


def _jpg(path: Path, seed: int, h: int = 30, w: int = 40) -> None:
    save(path, noise(h, w, seed=seed))


def visa_raw(parent: Path) -> Path:
    """The raw archive ``VisA_20220922`` (CRLF 1cls.csv, uppercase .JPG, masks with values 1/2).
    candle: train 3, test good 1, bad 2. capsules (3-digit names): train 2, test good 1, bad 1. 3 masks."""
    root = Path(parent) / "VisA_20220922"
    rows = [("object", "split", "label", "image", "mask")]
    for cls, normals, anomalies, digits in (("candle", 4, 2, 4), ("capsules", 3, 1, 3)):
        for i in range(normals):
            rel = f"{cls}/Data/Images/Normal/{i:0{digits}d}.JPG"
            _jpg(root / rel, seed=i)
            rows.append((cls, "train" if i < normals - 1 else "test", "normal", rel, ""))
        for i in range(anomalies):
            rel, mrel = f"{cls}/Data/Images/Anomaly/{i:03d}.JPG", f"{cls}/Data/Masks/Anomaly/{i:03d}.png"
            _jpg(root / rel, seed=50 + i)
            m = box(30, 40, value=1 + i)
            m[20:22, 30:32] = 2
            save(root / mrel, m)
            rows.append((cls, "test", "anomaly", rel, mrel))
        anno = ["image,label,mask"] + [f'{cls}/Data/Images/Anomaly/{i:03d}.JPG,"chunk of wax missing, other",'
                                       f"{cls}/Data/Masks/Anomaly/{i:03d}.png" for i in range(anomalies)]
        touch(root / cls / "image_anno.csv", "\r\n".join(anno).encode() + b"\r\n")
    touch(root / "split_csv/1cls.csv", "\r\n".join(",".join(r) for r in rows).encode() + b"\r\n")
    touch(root / "split_csv/2cls_fewshot.csv", b"object,split,label,image,mask\r\n")
    touch(root / "LICENSE-DATASET", b"CC BY 4.0")
    return root


def visa_1cls(parent: Path) -> Path:
    """spot-diff/anomalib 1cls conversion, 3-channel 0/255 masks. candle: train 2, test good 1, bad 1."""
    root = Path(parent) / "VisA"
    c = root / "candle"
    _jpg(c / "train/good/0000.JPG", 0)
    _jpg(c / "train/good/0001.JPG", 1)
    _jpg(c / "test/good/0002.JPG", 2)
    _jpg(c / "test/bad/000.JPG", 3)
    save(c / "ground_truth/bad/000.png", np.repeat(box(30, 40)[..., None], 3, axis=2))
    return root


LOCO_CONFIG = [
    {"defect_name": "missing_top_label", "pixel_value": 255, "saturation_threshold": 70400, "relative_saturation": False},
    {"defect_name": "damaged_label", "pixel_value": 252, "saturation_threshold": 1.0, "relative_saturation": True},
    {"defect_name": "contamination", "pixel_value": 247, "saturation_threshold": 1.0, "relative_saturation": True},
]


def mvtec_loco(parent: Path) -> Path:
    """juice_bottle (40×20, H×W): train 3, validation 2, test good 1, logical 2, structural 1.
    logical 000 has two region masks (values 255 and 247), the others one: 4 mask files."""
    root = Path(parent) / "mvtec_loco"
    j = root / "juice_bottle"
    for i in range(3):
        save(j / "train/good" / f"{i:03d}.png", noise(40, 20, seed=i))
    for i in range(2):
        save(j / "validation/good" / f"{i:03d}.png", noise(40, 20, seed=5 + i))
        save(j / "test/logical_anomalies" / f"{i:03d}.png", noise(40, 20, seed=10 + i))
    save(j / "test/good/000.png", noise(40, 20, seed=8))
    save(j / "test/structural_anomalies/000.png", noise(40, 20, seed=9))
    gt = j / "ground_truth"
    save(gt / "logical_anomalies/000/000.png", box(40, 20, 255, slice(2, 10), slice(2, 10)))
    save(gt / "logical_anomalies/000/001.png", box(40, 20, 247, slice(30, 38), slice(10, 18)))
    save(gt / "logical_anomalies/001/000.png", box(40, 20, 252, slice(12, 28), slice(4, 16)))
    save(gt / "structural_anomalies/000/000.png", box(40, 20, 255, slice(12, 28), slice(4, 16)))
    touch(j / "defects_config.json", json.dumps(LOCO_CONFIG).encode())
    touch(j / "license.txt", b"CC BY-NC-SA 4.0")
    touch(j / "readme.txt", b"MVTec LOCO AD")
    return root


def xyz_cloud(h: int = 24, w: int = 20, seed: int = 0) -> np.ndarray:
    """A float32 organised point cloud with missing points (0, 0, 0) in the top-left corner."""
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(0.1, 1.0, (h, w, 3)).astype(np.float32)
    xyz[:4, :4] = 0
    return xyz


def mvtec_3d(parent: Path) -> Path:
    """tire (24×20): train 2, validation 1, test good 1 (all-zero gt), cut 2 (gt 254), combined 1 (254+255)."""
    root = Path(parent) / "mvtec_3d"
    t = root / "tire"

    def sample(folder: Path, i: int, gt: np.ndarray | None = None) -> None:
        save(folder / "rgb" / f"{i:03d}.png", noise(24, 20, seed=i))
        folder.joinpath("xyz").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / "xyz" / f"{i:03d}.tiff", xyz_cloud(seed=i))
        if gt is not None:
            save(folder / "gt" / f"{i:03d}.png", gt)

    for i in range(2):
        sample(t / "train/good", i)
        sample(t / "test/cut", i, box(24, 20, 254))
    sample(t / "validation/good", 0)
    sample(t / "test/good", 0, np.zeros((24, 20), np.uint8))
    combined = box(24, 20, 254)
    combined[2:6, 2:6] = 255
    sample(t / "test/combined", 0, combined)
    touch(t / "class_ids.json", json.dumps({"255": "contamination", "254": "cut", "253": "hole", "0": "good"}).encode())
    cam = {"camera_type": "area_scan_division", "focus": 0, "kappa": 0, "sx": 1, "sy": 1, "cx": 10, "cy": 12,
           "image_width": 20, "image_height": 24}
    touch(t / "calibration/camera_parameters.json", json.dumps(cam).encode())
    return root


def _bmad_group(img_dir: Path, mask_dir: Path | None, names: list[str], anomalous: bool, seed: int) -> None:
    for k, n in enumerate(names):
        save(img_dir / n, noise(channels=1, seed=seed + k))
        if mask_dir is not None:
            save(mask_dir / n, box() if anomalous else np.zeros((24, 24), np.uint8))


def bmad_raw(parent: Path) -> Path:
    """The three BMAD zips extracted side by side (grayscale PNG, masks with the image's file name).

    Brain_AD/BraTS2021_slice (``split/<label>/{img,label}``, ``Ungood``, ``valid``): train 3,
      validation good 1 + Ungood 1, test good 2 (all-zero label masks) + Ungood 2.
    Liver_AD/hist_DIY (``split/{img,label}/<label>``, ``ungood``, ``valid``): train 2,
      validation good 1 + ungood 1, test good 1 + ungood 2.
    Retina_RESC_AD/RESC (``split/<label>/{img,label}``, ``ungood``, ``val``): train 2,
      validation good 1 + ungood 1, test good 1 + ungood 1.
    """
    root = Path(parent) / "BMAD_raw"
    b = root / "Brain_AD/BraTS2021_slice"
    _bmad_group(b / "train/good", None, ["00003_60.png", "00003_61.png", "00004_60.png"], False, 0)
    _bmad_group(b / "valid/good/img", b / "valid/good/label", ["00010_50.png"], False, 10)
    _bmad_group(b / "valid/Ungood/img", b / "valid/Ungood/label", ["00011_50.png"], True, 11)
    _bmad_group(b / "test/good/img", b / "test/good/label", ["00000_96.png", "00001_96.png"], False, 12)
    _bmad_group(b / "test/Ungood/img", b / "test/Ungood/label", ["00002_60.png", "00002_61.png"], True, 14)
    v = root / "Liver_AD/hist_DIY"
    _bmad_group(v / "train/good", None, ["0.png", "1.png"], False, 20)
    _bmad_group(v / "valid/img/good", None, ["5.png"], False, 22)
    _bmad_group(v / "valid/img/ungood", v / "valid/label/ungood", ["6.png"], True, 23)
    _bmad_group(v / "test/img/good", v / "test/label/good", ["7.png"], False, 24)
    _bmad_group(v / "test/img/ungood", v / "test/label/ungood", ["8.png", "9.png"], True, 25)
    r = root / "Retina_RESC_AD/RESC"
    _bmad_group(r / "train/good", None, ["a.png", "b.png"], False, 30)
    _bmad_group(r / "val/good/img", None, ["c.png"], False, 32)
    _bmad_group(r / "val/ungood/img", r / "val/ungood/label", ["d.png"], True, 33)
    _bmad_group(r / "test/good/img", None, ["e.png"], False, 34)
    _bmad_group(r / "test/ungood/img", r / "test/ungood/label", ["f.png"], True, 35)
    return root


def bmad_pack(parent: Path) -> Path:
    """The UniVAD MVTec-style pack ``BMAD/BrainMRI``: train 2, test good 1, Ungood 1 (mask same stem)."""
    root = Path(parent) / "BMAD"
    b = root / "BrainMRI"
    _bmad_group(b / "train/good", None, ["00003_60.png", "00003_61.png"], False, 0)
    _bmad_group(b / "test/good", None, ["00000_96.png"], False, 2)
    _bmad_group(b / "test/Ungood", b / "ground_truth/Ungood", ["00002_60.png"], True, 3)
    touch(b / "meta.json", b"{}")
    return root


PED2_M = """\
TestVideoFile = {};
% frame-level ground truth, 1-based inclusive
TestVideoFile{end+1}.gt_frame = [2:3];
TestVideoFile{end+1}.gt_frame = [1:1, 3:3];
"""


def ped2(parent: Path) -> Path:
    """``Ped2/UCSD_Anomaly_Dataset.v1p2/UCSDped2`` with macOS junk. Train001 (3 frames), Train002 (2);
    Test001 (4 frames, gt ``001.bmp``; anomalous 2-3), Test002 (3 frames, gt ``frame001.bmp``; anomalous 1, 3)."""
    root = Path(parent) / "Ped2"
    v = root / "UCSD_Anomaly_Dataset.v1p2"
    touch(v / "README.txt", b"UCSD Anomaly Detection Dataset")
    touch(v / "._README.txt", b"\x00\x05\x16\x07junk")
    touch(v / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    p = v / "UCSDped2"
    for clip, n in (("Train001", 3), ("Train002", 2)):
        for f in range(1, n + 1):
            save(p / "Train" / clip / f"{f:03d}.tif", noise(24, 36, channels=1, seed=f))
    touch(p / "Train/.DS_Store", b"\x00\x00\x00\x01Bud1")
    touch(p / "Train/Train001/._001.tif", b"\x00\x05\x16\x07junk")
    for clip, n, anomalous, gt_name in (("Test001", 4, {2, 3}, "{:03d}.bmp"), ("Test002", 3, {1, 3}, "frame{:03d}.bmp")):
        for f in range(1, n + 1):
            save(p / "Test" / clip / f"{f:03d}.tif", noise(24, 36, channels=1, seed=10 + f))
            mask = box(24, 36) if f in anomalous else np.zeros((24, 36), np.uint8)
            save(p / "Test" / f"{clip}_gt" / gt_name.format(f), mask)
    touch(p / "Test/UCSDped2.m", PED2_M.encode())
    touch(p / "Test/UCSDped2.m~", b"TestVideoFile{end+1}.gt_frame = [1:4];\n")  # stale editor backup: ignored
    touch(p / "Test/._UCSDped2.m", b"\x00\x05\x16\x07junk")
    touch(p / "Test/Test001_gt/.DS_Store", b"\x00\x00\x00\x01Bud1")
    return root


def folder(parent: Path) -> Path:
    """One class folder ``parts``: train 2, test good 1, scratch 2 (masks ``d.png`` and ``e_mask.png``)."""
    root = Path(parent) / "parts"
    save(root / "train/good/a.png", noise(seed=1))
    save(root / "train/good/b.png", noise(seed=2))
    save(root / "test/good/c.png", noise(seed=3))
    save(root / "test/scratch/d.png", noise(seed=4))
    save(root / "test/scratch/e.jpg", noise(seed=5))
    save(root / "ground_truth/scratch/d.png", box())
    save(root / "ground_truth/scratch/e_mask.png", box())
    return root


def folder_nogt(parent: Path) -> Path:
    """Two class folders, no ground_truth anywhere. widget: train 2, test good 1, dent 1; gadget: train 1, test dent 1."""
    root = Path(parent) / "own"
    save(root / "widget/train/good/x.png", noise(seed=1))
    save(root / "widget/train/good/y.png", noise(seed=2))
    save(root / "widget/test/good/z.png", noise(seed=3))
    save(root / "widget/test/dent/w.png", noise(seed=4))
    save(root / "gadget/train/good/x.bmp", noise(seed=5))
    save(root / "gadget/test/dent/q.tif", noise(seed=6))
    return root


def predict_images(parent: Path) -> Path:
    """Arbitrary images, nested: a.png, d.tif, sub/b.jpg, sub/deeper/c.bmp (plus junk that is ignored)."""
    root = Path(parent) / "incoming"
    save(root / "a.png", noise(seed=1))
    save(root / "sub/b.jpg", noise(seed=2))
    save(root / "sub/deeper/c.bmp", noise(seed=3))
    save(root / "d.tif", noise(seed=4))
    save(root / ".hidden.png", noise(seed=5))
    save(root / ".cache/x.png", noise(seed=6))
    touch(root / "._a.png", b"\x00\x05\x16\x07junk")
    touch(root / "notes.txt", b"not an image")
    return root


# The eight benchmark datasets of the paper: name -> builder of its tree (the three BMAD subsets share one).
BENCHMARK_TREES = {
    "mvtec_ad": mvtec_ad,
    "visa": visa_raw,
    "mvtec_loco": mvtec_loco,
    "brainmri": bmad_raw,
    "liverct": bmad_raw,
    "resc": bmad_raw,
    "mvtec_3d": mvtec_3d,
    "ped2": ped2,
}


def build_benchmark_trees(parent: Path, datasets: list[str] | None = None) -> dict[str, Path]:
    """Build the tiny trees of ``datasets`` (default: all eight) under ``parent``; -> {dataset: root}."""
    parent = Path(parent)
    built: dict = {}
    roots = {}
    for name in datasets or list(BENCHMARK_TREES):
        builder = BENCHMARK_TREES[name]
        if builder not in built:
            built[builder] = builder(parent)
        roots[name] = built[builder]
    return roots
