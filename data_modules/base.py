"""What every amoe data module shares: the sample schema, image reading, transforms, loaders.

A data module lists its files as :class:`Record` rows (one per image); :class:`AnomalyDataset` turns a
row into a sample dict with the schema below, and :class:`AnomalyDataModule` builds the loaders.

Sample schema (every module, every split)::

    image        float32 (3, S, S)   ImageNet-normalised, resize R -> centre-crop S (448 -> 392 by default)
    mask         float32 (1, S, S)   {0, 1}, nearest-resized; all zero for normal images
    label        int                 0 normal, 1 anomalous
    dataset      str                 e.g. "mvtec_ad" (per record in the unified module: its ``extra["dataset"]``)
    cls          str                 class name, e.g. "bottle" ("mvtec_ad/bottle" in the unified module)
    defect_type  str                 "good" for normal images
    path         str                 the image file
    extra        dict                what a metric needs at full resolution (LOCO region masks, Ped2 clip/frame)
                                     and ``sample_id`` (the index in its split)
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, RandomSampler

from amoe.inference import ImageReadError, to_rgb8

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DataError(RuntimeError):
    """A dataset problem the user must fix (the message says which file or setting, and what to do)."""


@dataclass
class Record:
    """One image of a split: where it is and what it is."""

    path: str
    label: int
    cls: str
    defect_type: str = "good"
    mask_path: str | None = None  # one binary mask file, or None (normal, or masks given in extra)
    extra: dict[str, Any] = field(default_factory=dict)


def is_image_file(path: str | os.PathLike) -> bool:
    name = os.path.basename(str(path))
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Sorted image files of a folder (any case of extension; dotfiles, hidden folders and macOS `._*` ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in it
        if p.is_file() and is_image_file(p) and not any(s.startswith(".") for s in p.relative_to(folder).parts)
    )


def subdirs(folder: str | os.PathLike) -> list[Path]:
    """Sorted sub-folders of a folder (hidden ones ignored); [] when it is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_child(folder: str | os.PathLike, *names: str) -> Path | None:
    """The first existing child of ``folder`` named like one of ``names`` (exact case first, then any case)."""
    folder = Path(folder)
    for name in names:
        if (folder / name).exists():
            return folder / name
    if folder.is_dir():
        lower = {n.lower() for n in names}
        for p in sorted(folder.iterdir()):
            if p.name.lower() in lower:
                return p
    return None


def _to_uint8_rgb(arr: np.ndarray, path: str) -> np.ndarray:
    """Any decoded array (H,W), (H,W,1|2|3|4), uint8/uint16/float -> (H,W,3) uint8 (rules shared with the
    torch-free reader of exported models: :func:`amoe.inference.to_rgb8`)."""
    try:
        return to_rgb8(arr, path)
    except ImageReadError as e:
        raise DataError(str(e)) from e


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read any image file as (H, W, 3) uint8: gray, 16-bit, RGBA, palette and TIFF included.

    Raises :class:`DataError` naming the file when it is empty, truncated or not an image.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found.")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: zero-byte file; re-copy it or remove it (or set skip_bad_files: true).")
    try:
        if path.lower().endswith((".tif", ".tiff")):
            import tifffile

            try:
                return _to_uint8_rgb(np.asarray(tifffile.imread(path)), path)
            except (ValueError, tifffile.TiffFileError):
                pass  # not a plain TIFF for tifffile: fall through to PIL
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                return _to_uint8_rgb(np.asarray(im, dtype=np.uint16 if "16" in im.mode else np.int32), path)
            if im.mode == "F":
                return _to_uint8_rgb(np.asarray(im, dtype=np.float32), path)
            return np.array(im.convert("RGB"))
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(
            f"{path}: cannot be read as an image ({type(e).__name__}: {e}); the file is truncated or not an "
            "image. Replace or remove it (or set skip_bad_files: true to skip it with a logged count)."
        ) from e


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a mask file as (H, W) bool: any non-zero pixel is anomalous (VisA masks hold values like 1, 2)."""
    path = str(path)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise DataError(f"{path}: mask file missing or empty.")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot be read as a mask image ({e}). Replace the file.") from e
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    return arr > 0


@dataclass
class Transform:
    """Resize (R×R) -> centre-crop (S×S) -> ImageNet normalisation. Masks: nearest, same geometry."""

    image_size: int = 448
    crop_size: int = 392

    def _geometry(self, t: torch.Tensor, mode: str) -> torch.Tensor:
        # t: (C, H, W)
        kw = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
        t = F.interpolate(t[None], size=(self.image_size, self.image_size), mode=mode, **kw)[0]
        off = (self.image_size - self.crop_size) // 2
        return t[:, off : off + self.crop_size, off : off + self.crop_size]

    def image(self, rgb: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
        t = self._geometry(t, "bilinear").clamp_(0, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (t - mean) / std

    def mask(self, mask: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(mask.astype(np.float32))[None]  # (1, H, W)
        return (self._geometry(t, "nearest") > 0.5).float()


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """(…, 3, H, W) ImageNet-normalised -> [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1)


class AnomalyDataset(Dataset):
    """Records -> samples (schema in the module docstring).

    Reading a record that fails raises :class:`DataError` naming the file. With ``skip_bad_files`` the
    unreadable records are found up front by :meth:`drop_bad_files`, logged by name and counted.
    A record's ``extra["dataset"]`` (set by the unified module) overrides the dataset name it emits.
    """

    def __init__(self, records: Sequence[Record], dataset: str, transform: Transform):
        self.records = list(records)
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def load_rgb(self, rec: Record) -> np.ndarray:
        return read_rgb(rec.path)

    def load_mask(self, rec: Record, shape: tuple[int, int]) -> np.ndarray:
        if rec.mask_path is None:
            if rec.label == 1 and "region_masks" in rec.extra:
                masks = [read_mask(p) for p in rec.extra["region_masks"]]
                out = np.zeros(shape, dtype=bool)
                for m in masks:
                    out |= _fit_mask(m, shape, p=rec.path)
                return out
            return np.zeros(shape, dtype=bool)
        return _fit_mask(read_mask(rec.mask_path), shape, p=rec.mask_path)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        rgb = self.load_rgb(rec)
        mask = self.load_mask(rec, rgb.shape[:2])
        return {
            "image": self.transform.image(rgb),
            "mask": self.transform.mask(mask),
            "label": int(rec.label),
            "dataset": rec.extra.get("dataset", self.dataset),
            "cls": rec.cls,
            "defect_type": rec.defect_type,
            "path": rec.path,
            "extra": dict(rec.extra, orig_size=tuple(rgb.shape[:2]), sample_id=i),  # index: DDP de-duplication
        }

    def drop_bad_files(self) -> list[str]:
        """Remove records whose image or mask cannot be read; return their messages (logged by the caller)."""
        keep, bad = [], []
        for rec in self.records:
            try:
                rgb = self.load_rgb(rec)
                self.load_mask(rec, rgb.shape[:2])
                keep.append(rec)
            except DataError as e:
                bad.append(str(e))
        self.records = keep
        return bad


_warned_mask_sizes: set[str] = set()


def _fit_mask(mask: np.ndarray, shape: tuple[int, int], p: str) -> np.ndarray:
    """A mask whose size differs from its image is nearest-resized to it, with one warning per file."""
    if mask.shape == tuple(shape):
        return mask
    if p not in _warned_mask_sizes:
        _warned_mask_sizes.add(p)
        log.warning("%s: mask size %s differs from image size %s; resized (nearest).", p, mask.shape, shape)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.interpolate(t, size=shape, mode="nearest")[0, 0] > 0.5).numpy()


class EpochRandomSampler(RandomSampler):
    """A shuffle whose order is a function of ``(seed, epoch)`` only, not of what ran before.

    Lightning calls :meth:`set_epoch` before every training epoch, so a run resumed from a checkpoint
    sees exactly the epoch orders of an uninterrupted run. Under DDP Lightning replaces a RandomSampler
    by its DistributedSampler, which is seeded by (``seed_everything`` seed, epoch) the same way.
    """

    def __init__(self, data_source, seed: int = 0):
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
        yield from torch.randperm(len(self.data_source), generator=g).tolist()


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors and ints; keep strings and the per-sample ``extra`` dicts as lists."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        if isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], int | float) and not isinstance(vals[0], bool):
            out[key] = torch.tensor(vals)
        else:
            out[key] = vals
    return out


class AnomalyDataModule(L.LightningDataModule):
    """Base of every data module: splits -> loaders.

    Subclasses implement :meth:`train_records` and :meth:`test_records` (optionally
    :meth:`validation_records`, :meth:`check_root`, :attr:`dataset_class` or :meth:`_dataset`). A fraction
    of ``train/good`` (``calib_fraction``, seeded) is held out: it is never trained on and is used to
    compute map-normalisation statistics and thresholds on normal data only.

    Layout problems found while listing (an anomalous image without mask, a mask without image, an empty
    class folder) go through :meth:`problem`: it raises :class:`DataError` by default; with
    ``skip_bad_files`` (or ``collect_problems``, the inspection mode) it records the message, the caller
    skips the file, and :meth:`setup` logs the list and the count. Unreadable files (zero-byte, truncated,
    not an image) raise when loaded, naming the file; with ``skip_bad_files`` every file is decoded once
    in :meth:`setup` and the unreadable ones are dropped and logged the same way.
    """

    name: str = "dataset"
    download_page: str = ""
    expected_layout: str = ""
    default_root: str | None = None  # None -> data/<name>
    dataset_class: type[AnomalyDataset] = AnomalyDataset

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 448,
        crop_size: int = 392,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 4,
        calib_fraction: float = 0.1,
        skip_bad_files: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.root = root if root is not None else (self.default_root or os.path.join("data", self.name))
        self.transform = Transform(image_size, crop_size)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.calib_fraction = calib_fraction
        self.skip_bad_files = skip_bad_files
        self.seed = seed
        self.collect_problems = False  # inspection mode: record every problem, raise none
        self.problems: list[str] = []
        self._splits: dict[str, AnomalyDataset] = {}

    # --- what a subclass provides -------------------------------------------------------------
    def check_root(self) -> None:
        """Raise :class:`DataError` naming the dataset, expected layout and download page if absent."""
        if not os.path.isdir(self.root):
            raise DataError(self.missing_root_message())

    def check_predict(self) -> None:
        """What ``predict`` needs on disk (by default: the dataset root, as for test)."""
        self.check_root()

    def missing_root_message(self) -> str:
        return (
            f"{self.name}: dataset root '{self.root}' does not exist.\n"
            f"Expected layout (as distributed):\n{self.expected_layout}\n"
            f"Download it from {self.download_page} and pass --data.root PATH (or DATA_ROOT=PATH to make)."
        )

    def train_records(self) -> list[Record]:
        raise NotImplementedError

    def test_records(self) -> list[Record]:
        raise NotImplementedError

    def validation_records(self) -> list[Record]:
        """The dataset's own validation split (LOCO, 3D-AD, BMAD); [] when it has none."""
        return []

    def predict_records(self) -> list[Record]:
        return self.test_records()

    def _dataset(self, records: list[Record], split: str) -> AnomalyDataset:
        """Records -> dataset (override to read files differently; ``dataset_class`` is often enough)."""
        return self.dataset_class(records, self.name, self.transform)

    # --- problems ------------------------------------------------------------------------------
    def problem(self, msg: str) -> None:
        """A file that cannot be used: raise :class:`DataError`, or record it (skip_bad_files / inspection)."""
        if not (self.skip_bad_files or self.collect_problems):
            raise DataError(msg)
        self.problems.append(msg)

    def pick_classes(self, found: list[str], classes: list[str] | None) -> list[str]:
        """``classes`` (all ``found`` when None), checked against what is on disk."""
        if not found:
            raise DataError(
                f"{self.name}: no class folders found under '{self.root}'.\n"
                f"Expected layout (as distributed):\n{self.expected_layout}\nDownload page: {self.download_page}"
            )
        if classes is None:
            return list(found)
        missing = [c for c in classes if c not in found]
        if missing:
            raise DataError(f"{self.name}: class(es) {missing} not found under '{self.root}'; available: {found}.")
        return list(classes)

    # --- splits ------------------------------------------------------------------------------
    def _listed(self, list_records: Callable[[], list[Record]], split: str) -> list[Record]:
        """List a split; with skip_bad_files drop unreadable files too; log what was skipped."""
        start = len(self.problems)
        records = list_records()
        if self.skip_bad_files:
            ds = self._dataset(records, split)
            self.problems += ds.drop_bad_files()
            records = ds.records
        skipped = self.problems[start:]
        if skipped:
            log.warning(
                "%s/%s: skipped %d file(s) (skip_bad_files: true):\n  %s", self.name, split, len(skipped),
                "\n  ".join(skipped),
            )
        return records

    def split_train_calib(self, records: list[Record]) -> tuple[list[Record], list[Record]]:
        """Hold out ``calib_fraction`` of each class's normal training images (seeded, at least one)."""
        if self.calib_fraction <= 0:
            return records, []
        by_cls: dict[str, list[Record]] = {}
        for r in records:
            by_cls.setdefault(r.cls, []).append(r)
        train, calib = [], []
        rng = random.Random(self.seed)
        for cls in sorted(by_cls):
            recs = by_cls[cls]
            idx = list(range(len(recs)))
            rng.shuffle(idx)
            n = max(1, round(self.calib_fraction * len(recs))) if len(recs) > 1 else 0
            held = set(idx[:n])
            calib += [recs[i] for i in sorted(held)]
            train += [r for i, r in enumerate(recs) if i not in held]
        return train, calib

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            self.check_predict()
            if "predict" not in self._splits:
                self._splits["predict"] = self._dataset(self._listed(self.predict_records, "predict"), "predict")
            return
        self.check_root()
        if stage in (None, "fit", "validate") and "train" not in self._splits:
            train, calib = self.split_train_calib(self._listed(self.train_records, "train"))
            if not train:
                raise DataError(f"{self.name}: no training images found under '{self.root}'.\n{self.expected_layout}")
            self._splits["train"] = self._dataset(train, "train")
            self._splits["calib"] = self._dataset(calib or train[:1], "calib")
        if stage in (None, "test", "validate") and "test" not in self._splits:
            test = self._listed(self.test_records, "test")
            if not test:
                raise DataError(f"{self.name}: no test images found under '{self.root}'.\n{self.expected_layout}")
            self._splits["test"] = self._dataset(test, "test")

    def split(self, name: str) -> AnomalyDataset:
        if name not in self._splits:
            self.setup({"train": "fit", "calib": "fit", "test": "test", "predict": "predict"}[name])
        return self._splits[name]

    @property
    def class_names(self) -> list[str]:
        return sorted({r.cls for r in self.split("train").records})

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        # Shuffled order = f(seed, epoch) (EpochRandomSampler), so a resumed run sees the same order as an
        # uninterrupted one. The loader's own generator (worker base seeds) keeps creating an iterator from
        # drawing on the global torch RNG, whose state checkpoints carry for dropout and jitter.
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=EpochRandomSampler(ds, self.seed) if shuffle else None,
            drop_last=drop_last and len(ds) > batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.split("train"), self.batch_size, shuffle=True, drop_last=True)

    def calib_dataloader(self) -> DataLoader:
        return self._loader(self.split("calib"), self.eval_batch_size, shuffle=False)

    def bank_dataloader(self) -> DataLoader:
        """Normal training images in a fixed order, for building the component bank."""
        return self._loader(self.split("train"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.split("test"), self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.split("predict"), self.eval_batch_size, shuffle=False)
