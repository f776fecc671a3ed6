"""Several datasets as one (the paper's "all" setting): classes become ``<dataset>/<cls>``."""

from __future__ import annotations

import inspect
import os
from dataclasses import replace
from typing import Any

import numpy as np

from data_modules.base import AnomalyDataModule, AnomalyDataset, DataError, Record, Transform


class UnifiedDataset(AnomalyDataset):
    """Records of several datasets; each is read by its own dataset's reader (e.g. the 3D depth render)."""

    def __init__(
        self, records: list[Record], dataset: str, transform: Transform, readers: dict[str, AnomalyDataset]
    ):
        super().__init__(records, dataset, transform)
        self.readers = readers

    def _child(self, rec: Record) -> tuple[AnomalyDataset, Record]:
        """The child's reader and the record as the child listed it (class name without prefix)."""
        name = rec.extra["dataset"]
        return self.readers[name], replace(rec, cls=rec.cls.removeprefix(f"{name}/"))

    def load_rgb(self, rec: Record) -> np.ndarray:
        reader, rec = self._child(rec)
        return reader.load_rgb(rec)

    def load_mask(self, rec: Record, shape: tuple[int, int]) -> np.ndarray:
        reader, rec = self._child(rec)
        return reader.load_mask(rec, shape)


class Unified(AnomalyDataModule):
    """Concatenation of data modules from ``DATAMODULES``. ``datasets``: names (default roots under
    ``root``) or dicts ``{"name": "visa", "root": "data/VisA", ...other init args}``; None = all eight.
    Each sample's ``dataset`` is its child's name (also in ``extra["dataset"]``)."""

    name = "unified"
    default_root = "data"
    download_page = "(see each dataset's page)"
    expected_layout = "  <root>/<each dataset's default folder> (see the per-dataset layouts)"

    def __init__(self, root: str | None = None, datasets: list[dict[str, Any] | str] | None = None, **kwargs):
        super().__init__(root=root, **kwargs)
        from data_modules import DATAMODULES, canonical_name  # here: data_modules imports this module

        specs = datasets or ["mvtec_ad", "visa", "mvtec_loco", "brainmri", "liverct", "resc", "mvtec_3d", "ped2"]
        shared = {"image_size": self.transform.image_size, "crop_size": self.transform.crop_size,
                  "skip_bad_files": self.skip_bad_files, "seed": self.seed}
        self.members: list[AnomalyDataModule] = []
        for spec in specs:
            args = {"name": spec} if isinstance(spec, str) else dict(spec)
            name = canonical_name(args.pop("name", None))
            if name not in DATAMODULES or name == self.name:
                raise DataError(f"unified: unknown dataset {name!r}; choose from {sorted(set(DATAMODULES) - {self.name})}.")
            accepted = inspect.signature(DATAMODULES[name].__init__).parameters
            takes_all = any(a.kind is a.VAR_KEYWORD for a in accepted.values())
            child = DATAMODULES[name](**{k: v for k, v in shared.items() if takes_all or k in accepted}, **args)
            if "root" not in args:  # the child's default root, moved under this root
                child.root = os.path.join(self.root, os.path.relpath(child.root, "data"))
            self.members.append(child)
        names = [c.name for c in self.members]
        if len(set(names)) != len(names):
            raise DataError(f"unified: each dataset may appear once, got {names}.")

    def check_root(self) -> None:
        for child in self.members:
            child.check_root()

    def _gather(self, method: str) -> list[Record]:
        out = []
        for child in self.members:
            child.collect_problems, child.problems = self.collect_problems, self.problems
            out += [
                replace(r, cls=f"{child.name}/{r.cls}", extra=dict(r.extra, dataset=child.name))
                for r in getattr(child, method)()
            ]
        return out

    def train_records(self) -> list[Record]:
        return self._gather("train_records")

    def test_records(self) -> list[Record]:
        return self._gather("test_records")

    def validation_records(self) -> list[Record]:
        return self._gather("validation_records")

    def _dataset(self, records: list[Record], split: str) -> AnomalyDataset:
        readers = {c.name: c._dataset([], split) for c in self.members}
        return UnifiedDataset(records, self.name, self.transform, readers)
