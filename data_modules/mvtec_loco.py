"""MVTec LOCO AD as distributed: one mask FOLDER per anomalous test image, ORed into one binary mask."""

from __future__ import annotations

import logging
from pathlib import Path

from data_modules.base import AnomalyDataModule, Record, list_images, subdirs
from data_modules.tree import pair_masks, train_good

log = logging.getLogger(__name__)


class MVTecLOCO(AnomalyDataModule):
    """MVTec LOCO AD (5 classes). Anomalous records carry ``extra``: ``region_masks`` (one PNG per
    annotated region, for sPRO), ``defects_config`` (the class's JSON) and ``level`` (logical/structural).
    """

    name = "mvtec_loco"
    download_page = "https://www.mvtec.com/company/research/datasets/mvtec-loco"
    expected_layout = """\
  <root>/<cls>/train/good/000.png ...
  <root>/<cls>/validation/good/000.png ...
  <root>/<cls>/test/{good,logical_anomalies,structural_anomalies}/000.png ...
  <root>/<cls>/ground_truth/{logical,structural}_anomalies/000/000.png [001.png ...]
  <root>/<cls>/defects_config.json"""

    def __init__(
        self, root: str | None = None, classes: list[str] | None = None, use_validation: bool = False, **kwargs
    ):
        """``classes``: a subset (all when None); ``use_validation``: add validation/good to the training data."""
        super().__init__(root=root, **kwargs)
        self.classes = classes
        self.use_validation = use_validation

    def class_dirs(self) -> list[Path]:
        found = [d.name for d in subdirs(self.root)]
        return [Path(self.root) / c for c in self.pick_classes(found, self.classes)]

    def _config(self, cls_dir: Path) -> str | None:
        path = cls_dir / "defects_config.json"
        if path.is_file():
            return str(path)
        log.warning("%s missing: sPRO cannot be computed for class '%s'.", path, cls_dir.name)
        return None

    def train_records(self) -> list[Record]:
        out = [r for d in self.class_dirs() for r in train_good(self, d, d.name)]
        return out + (self.validation_records() if self.use_validation else [])

    def validation_records(self) -> list[Record]:
        out = []
        for d in self.class_dirs():
            folder = d / "validation" / "good"
            images = list_images(folder)
            if not images:
                self.problem(f"{folder}: empty folder (no validation images).")
            out += [Record(str(p), 0, d.name, "good", extra={"split": "validation"}) for p in images]
        return out

    def test_records(self) -> list[Record]:
        out = []
        for d in self.class_dirs():
            config = self._config(d)
            types = subdirs(d / "test")
            if not types:
                self.problem(f"{d / 'test'}: no test/<type> folders.")
            for tdir in types:
                out += self._type_records(d, tdir, config)
            for mdir in subdirs(d / "ground_truth"):
                if not (d / "test" / mdir.name).is_dir():
                    self.problem(f"{mdir}: masks without images (there is no {d / 'test' / mdir.name} folder).")
        return out

    def _type_records(self, cls_dir: Path, tdir: Path, config: str | None) -> list[Record]:
        images = list_images(tdir)
        if not images:
            self.problem(f"{tdir}: empty folder (no images).")
        if tdir.name == "good":
            extra = {"region_masks": [], "defects_config": config}
            return [Record(str(p), 0, cls_dir.name, "good", extra=dict(extra)) for p in images]
        gt = cls_dir / "ground_truth" / tdir.name
        folders = {m.name: m for m in subdirs(gt)}
        flat, stray = pair_masks([p for p in images if p.stem not in folders], list_images(gt))  # merged-mask form
        stray += [gt / n for n in folders if n not in {p.stem for p in images}]
        for m in stray:
            self.problem(f"{m}: mask without image (no {tdir}/{m.stem}.png). Restore or remove it.")
        level = "logical" if tdir.name.startswith("logical") else "structural"
        out = []
        for p in images:
            regions = [str(m) for m in list_images(folders[p.stem])] if p.stem in folders else []
            if not regions and p not in flat:
                self.problem(f"{p}: anomalous test image without mask (expected {gt / p.stem}/000.png).")
                continue
            extra = {"region_masks": regions, "defects_config": config, "level": level}
            mask = None if regions else str(flat[p])
            out.append(Record(str(p), 1, cls_dir.name, tdir.name, mask, extra))
        return out
