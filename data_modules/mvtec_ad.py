"""MVTec AD as distributed: ``<cls>/{train/good, test/<type>, ground_truth/<type>/NNN_mask.png}``."""

from __future__ import annotations

from pathlib import Path

from data_modules.base import AnomalyDataModule, Record, subdirs
from data_modules.tree import test_types, train_good


class MVTecAD(AnomalyDataModule):
    """MVTec AD (15 classes; grid, screw and zipper are grayscale and become 3-channel)."""

    name = "mvtec_ad"
    download_page = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
    expected_layout = """\
  <root>/<cls>/train/good/000.png ...
  <root>/<cls>/test/good/000.png ...
  <root>/<cls>/test/<defect>/000.png ...
  <root>/<cls>/ground_truth/<defect>/000_mask.png ..."""

    def __init__(self, root: str | None = None, classes: list[str] | None = None, **kwargs):
        """``classes``: a subset of the class folders (all when None)."""
        super().__init__(root=root, **kwargs)
        self.classes = classes

    def class_dirs(self) -> list[Path]:
        found = [d.name for d in subdirs(self.root)]
        return [Path(self.root) / c for c in self.pick_classes(found, self.classes)]

    def train_records(self) -> list[Record]:
        return [r for d in self.class_dirs() for r in train_good(self, d, d.name)]

    def test_records(self) -> list[Record]:
        return [r for d in self.class_dirs() for r in test_types(self, d, d.name)]
