"""MVTec 3D-AD as distributed: ``<split>/<type>/{rgb,xyz,gt}``; the image is the RGB or a depth render."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_modules.base import AnomalyDataModule, AnomalyDataset, DataError, Record, list_images, subdirs
from data_modules.tree import pair_masks


def render_depth(path: str) -> np.ndarray:
    """xyz.tiff (float32 H×W×3) -> (H, W, 3) uint8: the z channel min-max normalised to [0, 255] over the
    valid points (finite and z != 0) of this image, invalid points 0; a constant depth renders as 0."""
    import tifffile

    try:
        xyz = np.asarray(tifffile.imread(path), dtype=np.float64)
    except Exception as e:  # tifffile raises several types for broken files
        raise DataError(f"{path}: cannot be read as an xyz TIFF ({type(e).__name__}: {e}). Replace the file.") from e
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise DataError(f"{path}: expected an H×W×3 point cloud, got shape {xyz.shape}.")
    z = xyz[..., 2]
    valid = np.isfinite(z) & (z != 0)
    out = np.zeros(z.shape, dtype=np.uint8)
    if valid.any():
        lo, hi = z[valid].min(), z[valid].max()
        scaled = (z[valid] - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros(int(valid.sum()))
        out[valid] = np.rint(scaled).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=2)


class DepthDataset(AnomalyDataset):
    """Samples whose image is the depth render of ``record.path`` (an xyz TIFF)."""

    def load_rgb(self, rec: Record) -> np.ndarray:
        return render_depth(rec.path)


class MVTec3D(AnomalyDataModule):
    """MVTec 3D-AD (10 classes), ``modality`` rgb (the RGB PNG) or depth (rendered from xyz/*.tiff).
    The gt PNGs hold class ids (253, 254, 255); any non-zero pixel is anomalous."""

    name = "mvtec_3d"
    download_page = "https://www.mvtec.com/company/research/datasets/mvtec-3d-ad"
    expected_layout = """\
  <root>/<cls>/train/good/{rgb/000.png, xyz/000.tiff}
  <root>/<cls>/validation/good/{rgb,xyz}/...
  <root>/<cls>/test/<good|defect>/{rgb/000.png, xyz/000.tiff, gt/000.png}"""

    def __init__(
        self,
        root: str | None = None,
        classes: list[str] | None = None,
        modality: str = "rgb",
        use_validation: bool = False,
        **kwargs,
    ):
        """``modality``: rgb | depth; ``use_validation``: add validation/good to the training data."""
        super().__init__(root=root, **kwargs)
        if modality not in ("rgb", "depth"):
            raise DataError(f"mvtec_3d: modality must be 'rgb' or 'depth', got '{modality}'.")
        self.classes = classes
        self.modality = modality
        self.use_validation = use_validation
        self.dataset_class = DepthDataset if modality == "depth" else AnomalyDataset

    def class_dirs(self) -> list[Path]:
        found = [d.name for d in subdirs(self.root)]
        return [Path(self.root) / c for c in self.pick_classes(found, self.classes)]

    def _images(self, folder: Path) -> list[Path]:
        """The modality's files of one ``<split>/<type>`` folder; an empty folder is a problem."""
        sub = folder / ("rgb" if self.modality == "rgb" else "xyz")
        images = list_images(sub)
        if not images:
            self.problem(f"{sub}: empty folder (no {'RGB' if self.modality == 'rgb' else 'xyz'} images).")
        return images

    def _extra(self, folder: Path, img: Path) -> dict[str, str]:
        return {"rgb": str(folder / "rgb" / f"{img.stem}.png"), "xyz": str(folder / "xyz" / f"{img.stem}.tiff")}

    def train_records(self) -> list[Record]:
        out = []
        for d in self.class_dirs():
            folder = d / "train" / "good"
            out += [Record(str(p), 0, d.name, "good", extra=self._extra(folder, p)) for p in self._images(folder)]
        return out + (self.validation_records() if self.use_validation else [])

    def validation_records(self) -> list[Record]:
        out = []
        for d in self.class_dirs():
            folder = d / "validation" / "good"
            out += [
                Record(str(p), 0, d.name, "good", extra=dict(self._extra(folder, p), split="validation"))
                for p in self._images(folder)
            ]
        return out

    def test_records(self) -> list[Record]:
        out = []
        for d in self.class_dirs():
            types = subdirs(d / "test")
            if not types:
                self.problem(f"{d / 'test'}: no test/<type> folders.")
            for tdir in types:
                images = self._images(tdir)
                pairs, stray = pair_masks(images, list_images(tdir / "gt"))
                for m in stray:
                    self.problem(f"{m}: mask without image (no {tdir}/*/{m.stem}.*). Restore or remove it.")
                label = 0 if tdir.name == "good" else 1
                for p in images:
                    if label and p not in pairs:
                        self.problem(f"{p}: anomalous test image without mask (expected {tdir / 'gt' / p.stem}.png).")
                        continue
                    mask = str(pairs[p]) if label else None
                    out.append(Record(str(p), label, d.name, tdir.name, mask, self._extra(tdir, p)))
        return out
