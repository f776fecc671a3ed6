"""Any MVTec-style tree (``train/good``, ``test/<type>``, optional ``ground_truth/<type>``) and
prediction on an arbitrary folder of images."""

from __future__ import annotations

from pathlib import Path

from data_modules.base import AnomalyDataModule, DataError, Record, list_images, subdirs
from data_modules.tree import test_types, train_good


class Folder(AnomalyDataModule):
    """Your own data. ``root`` is one class folder (holding ``train``/``test``) or a folder of class folders.
    Masks ``ground_truth/<type>/<stem>.png`` or ``<stem>_mask.*``. When the dataset has no ``ground_truth``
    folder at all, anomalous images need no mask (all-zero mask, ``extra["has_mask"] = False``).
    ``path``: a folder of images (searched recursively) to predict on; no root needed then.
    """

    name = "folder"
    download_page = "(your own data; no download)"
    expected_layout = """\
  <root>/[<cls>/]train/good/*.png|jpg|bmp|tif
  <root>/[<cls>/]test/good/...            (normal)
  <root>/[<cls>/]test/<defect>/...        (anomalous)
  <root>/[<cls>/]ground_truth/<defect>/<stem>.png or <stem>_mask.png   (optional as a whole)"""

    def __init__(
        self, root: str | None = None, classes: list[str] | None = None, path: str | None = None, **kwargs
    ):
        """``classes``: a subset of class folders; ``path``: folder of images for ``predict``."""
        super().__init__(root=root, **kwargs)
        self.classes = classes
        self.path = path

    def class_dirs(self) -> list[tuple[str, Path]]:
        root = Path(self.root)
        if (root / "train").is_dir() or (root / "test").is_dir():
            return [(root.resolve().name, root)]
        found = [d.name for d in subdirs(root)]
        return [(c, root / c) for c in self.pick_classes(found, self.classes)]

    def has_masks(self) -> bool:
        return any((d / "ground_truth").is_dir() for _, d in self.class_dirs())

    def train_records(self) -> list[Record]:
        extra = {"has_mask": self.has_masks()}
        return [r for c, d in self.class_dirs() for r in train_good(self, d, c, extra)]

    def test_records(self) -> list[Record]:
        has = self.has_masks()
        return [r for c, d in self.class_dirs() for r in test_types(self, d, c, has, {"has_mask": has})]

    def check_predict(self) -> None:
        if self.path is None:
            return self.check_root()
        if not Path(self.path).is_dir():
            raise DataError(f"folder: predict path '{self.path}' is not a folder. Pass --data.path DIR of images.")

    def predict_records(self) -> list[Record]:
        if self.path is None:
            return self.test_records()
        base = Path(self.path)
        images = list_images(base, recursive=True)
        if not images:
            raise DataError(f"folder: no images (png/jpg/bmp/tif) under '{base}'.")
        extra = {"has_mask": False}
        return [Record(str(p), 0, base.resolve().name, "unknown", extra=dict(extra, relpath=str(p.relative_to(base))))
                for p in images]
