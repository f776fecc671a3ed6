"""BMAD (BrainMRI, LiverCT, RESC) as distributed, or as the UniVAD MVTec-style pack."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from data_modules.base import AnomalyDataModule, DataError, Record, find_child, list_images, subdirs
from data_modules.tree import pair_masks, test_types, train_good


def subset_info(subset: str) -> tuple[str, str, str, str]:
    """(name, class, folder, zip folder) of a BMAD subset given as brainmri | liverct | resc (any case)."""
    if subset == "livercT":
        from data_modules import canonical_name

        subset = canonical_name(subset)  # the old spelling: a deprecation warning
    for info in (
        ("brainmri", "BrainMRI", "BraTS2021_slice", "Brain_AD"),
        ("liverct", "LiverCT", "hist_DIY", "Liver_AD"),
        ("resc", "RESC", "RESC", "Retina_RESC_AD"),
    ):
        if subset.lower() in (info[0].lower(), info[2].lower()):
            return info
    raise DataError(f"bmad: unknown subset '{subset}'; choose brainmri, liverct or resc.")


class BMAD(AnomalyDataModule):
    """One BMAD subset; one class (BrainMRI, LiverCT or RESC). Tolerates ``Ungood``/``ungood``,
    ``valid``/``val`` and both nestings ``<split>/<label>/{img,label}`` and ``<split>/{img,label}/<label>``.
    """

    name = "bmad"
    download_page = (
        "https://github.com/DorisBao/BMAD (Google Drive: Brain_AD.zip, Liver_AD.zip, Retina_RESC_AD.zip; "
        "or the UniVAD MVTec-style pack linked from https://github.com/FantasticGNU/UniVAD)"
    )
    expected_layout = """\
  <root>/[Brain_AD/]BraTS2021_slice/train/good/*.png    (LiverCT: Liver_AD/hist_DIY, RESC: Retina_RESC_AD/RESC)
  <root>/[Brain_AD/]BraTS2021_slice/{valid|val}/{good,Ungood}/{img,label}/*.png
  <root>/[Brain_AD/]BraTS2021_slice/test/{good,Ungood}/{img,label}/*.png   (mask = same file name)
  or the UniVAD pack: <root>/BrainMRI/{train/good, test/{good,Ungood}, ground_truth/Ungood}"""

    def __init__(self, root: str | None = None, subset: str = "brainmri", **kwargs):
        """``subset``: brainmri | liverct | resc (any case); default root data/BMAD/<BrainMRI|LiverCT|RESC>."""
        name, cls, _, _ = subset_info(subset)
        super().__init__(root=root if root is not None else f"data/BMAD/{cls}", **kwargs)
        self.subset, self.name, self.cls = name, name, cls

    @cached_property
    def layout(self) -> tuple[str, Path]:
        """("pack", class folder) for the UniVAD pack or ("raw", folder holding train/valid/test)."""
        _, cls, folder, zipname = subset_info(self.subset)
        root = Path(self.root)
        for cand in (root, root / folder, root / zipname / folder, root / cls):
            if (cand / "ground_truth").is_dir() and (cand / "train").is_dir():
                return "pack", cand
            if find_child(cand, "train") is not None and find_child(cand, "test") is not None:
                return "raw", cand
        raise DataError(
            f"{self.name}: no BMAD {cls} data (train/ and test/) under '{root}'.\n"
            f"Expected layout:\n{self.expected_layout}\nDownload page: {self.download_page}"
        )

    def train_records(self) -> list[Record]:
        kind, base = self.layout
        if kind == "pack":
            return train_good(self, base, self.cls)
        good = find_child(find_child(base, "train") or base, "good") or base / "train" / "good"
        folder = find_child(good, "img") or good
        images = list_images(folder)
        if not images:
            self.problem(f"{folder}: empty class folder (no training images).")
        return [Record(str(p), 0, self.cls, "good") for p in images]

    def test_records(self) -> list[Record]:
        kind, base = self.layout
        if kind == "pack":
            return test_types(self, base, self.cls)
        return self._split(find_child(base, "test"))

    def validation_records(self) -> list[Record]:
        kind, base = self.layout
        split_dir = find_child(base, "valid", "val")
        if kind == "pack" or split_dir is None:
            return []
        return [Record(r.path, r.label, r.cls, r.defect_type, r.mask_path, {"split": "validation"})
                for r in self._split(split_dir)]

    def _groups(self, split_dir: Path) -> list[tuple[str, Path, Path | None]]:
        """(label folder name, image folder, mask folder) for both nestings."""
        img_root = find_child(split_dir, "img")
        if img_root is not None:
            mask_root = find_child(split_dir, "label")
            return [(d.name, d, find_child(mask_root, d.name) if mask_root else None) for d in subdirs(img_root)]
        return [(d.name, find_child(d, "img") or d, find_child(d, "label")) for d in subdirs(split_dir)]

    def _split(self, split_dir: Path | None) -> list[Record]:
        groups = self._groups(split_dir) if split_dir is not None else []
        if not groups:
            self.problem(f"{split_dir}: no good/ungood folders (expected {{good,Ungood}}/{{img,label}}).")
        out = []
        for label_name, img_dir, mask_dir in groups:
            images = list_images(img_dir)
            if not images:
                self.problem(f"{img_dir}: empty folder (no images).")
            pairs, stray = pair_masks(images, list_images(mask_dir) if mask_dir else [])
            for m in stray:
                self.problem(f"{m}: mask without image (no {img_dir}/{m.name}). Restore or remove it.")
            label = 0 if label_name.lower() == "good" else 1
            for p in images:
                if label and p not in pairs:
                    self.problem(f"{p}: anomalous image without mask (expected {mask_dir or img_dir.parent / 'label'}"
                                 f"/{p.name}). Restore the mask or remove the image.")
                    continue
                mask = str(pairs[p]) if label else None
                out.append(Record(str(p), label, self.cls, label_name if label else "good", mask))
        return out


class BrainMRI(BMAD):
    """BMAD BrainMRI (BraTS2021 slices)."""

    name = "brainmri"

    def __init__(self, root: str | None = None, **kwargs):
        super().__init__(root=root, subset="brainmri", **kwargs)


class LiverCT(BMAD):
    """BMAD LiverCT (BTCV + LiTS, folder hist_DIY)."""

    name = "liverct"

    def __init__(self, root: str | None = None, **kwargs):
        super().__init__(root=root, subset="liverct", **kwargs)


class RESC(BMAD):
    """BMAD RESC (retinal OCT)."""

    name = "resc"

    def __init__(self, root: str | None = None, **kwargs):
        super().__init__(root=root, subset="resc", **kwargs)
