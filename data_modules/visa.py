"""VisA, raw (``split_csv/1cls.csv``) or converted to the 1cls MVTec-like layout; detected automatically."""

from __future__ import annotations

import csv
from functools import cached_property
from pathlib import Path

from data_modules.base import AnomalyDataModule, DataError, Record, list_images, subdirs
from data_modules.tree import test_types, train_good


class VisA(AnomalyDataModule):
    """VisA (12 classes). Raw masks hold small non-zero values (1, 2, ...) and are binarised ``> 0``."""

    name = "visa"
    default_root = "data/VisA"
    download_page = "https://github.com/amazon-science/spot-diff (archive: VisA_20220922.tar)"
    expected_layout = """\
  raw archive:   <root>/split_csv/1cls.csv
                 <root>/<cls>/Data/Images/{Normal,Anomaly}/0000.JPG ...
                 <root>/<cls>/Data/Masks/Anomaly/000.png ...
  or 1cls form:  <root>/<cls>/{train/good, test/good, test/bad, ground_truth/bad/<stem>.png}"""

    def __init__(self, root: str | None = None, classes: list[str] | None = None, **kwargs):
        """``classes``: a subset (all when None). ``root`` may also be the folder above the archive's."""
        super().__init__(root=root, **kwargs)
        self.classes = classes

    @cached_property
    def layout(self) -> tuple[str, Path]:
        """("raw", folder holding split_csv) or ("1cls", folder holding the class folders)."""
        root = Path(self.root)
        for base in (root, root / "VisA_20220922"):
            if (base / "split_csv" / "1cls.csv").is_file():
                return "raw", base
        for base in (root, root / "1cls", root / "VisA_pytorch" / "1cls", root / "visa_pytorch"):
            if any((d / "train").is_dir() for d in subdirs(base)):
                return "1cls", base
        raise DataError(
            f"visa: '{root}' holds neither the raw layout (split_csv/1cls.csv) nor the 1cls layout "
            f"(<cls>/train/good).\nExpected layout:\n{self.expected_layout}\nDownload page: {self.download_page}"
        )

    @cached_property
    def rows(self) -> list[dict[str, str]]:
        """The rows of split_csv/1cls.csv (object, split, label, image, mask); CRLF-safe."""
        path = self.layout[1] / "split_csv" / "1cls.csv"
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in csv.DictReader(f)]

    def class_names_on_disk(self) -> list[str]:
        kind, base = self.layout
        if kind == "raw":
            return sorted({r["object"] for r in self.rows})
        return [d.name for d in subdirs(base)]

    def train_records(self) -> list[Record]:
        return self._records("train")

    def test_records(self) -> list[Record]:
        return self._records("test")

    def _records(self, split: str) -> list[Record]:
        kind, base = self.layout
        classes = self.pick_classes(self.class_names_on_disk(), self.classes)
        if kind == "1cls":
            read = train_good if split == "train" else test_types
            return [r for c in classes for r in read(self, base / c, c)]
        return [r for c in classes for r in self._raw(base, c, split)]

    def _raw(self, base: Path, cls: str, split: str) -> list[Record]:
        csv_path = base / "split_csv" / "1cls.csv"
        rows = [r for r in self.rows if r["object"] == cls and r["split"] == split]
        if not rows:
            self.problem(f"{csv_path}: class '{cls}' has no {split} rows (empty class).")
        out, used = [], set()
        for r in rows:
            img = base / r["image"]
            if not img.is_file():
                self.problem(f"{img}: listed in {csv_path} but missing. Re-extract the archive.")
                continue
            if r["label"] == "normal":
                out.append(Record(str(img), 0, cls, "good"))
                continue
            mask = base / r["mask"] if r.get("mask") else None
            if mask is None or not mask.is_file():
                self.problem(f"{img}: anomalous test image without mask ({mask or 'empty mask column'}). "
                             "Re-extract the archive or remove the row.")
                continue
            used.add(mask)
            out.append(Record(str(img), 1, cls, "bad", str(mask)))
        if split == "test":
            for m in list_images(base / cls / "Data" / "Masks" / "Anomaly"):
                if m not in used:
                    self.problem(f"{m}: mask without image (not referenced by {csv_path}).")
        return out
