"""Reading an MVTec-style class folder: ``train/good``, ``test/<type>``, ``ground_truth/<type>`` masks by stem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_modules.base import AnomalyDataModule, Record, list_images, subdirs


def pair_masks(images: list[Path], masks: list[Path]) -> tuple[dict[Path, Path], list[Path]]:
    """Pair images with masks by stem; return ({image: mask}, masks left over).

    A mask belongs to an image when its stem equals the image stem or starts with it followed by a
    non-alphanumeric character (``000`` <- ``000.png``, ``000_mask.png``; never ``0001_mask.png``).
    The exact stem wins, then the shortest one; each mask is used once.
    """
    by_prefix: dict[str, list[Path]] = {}
    for m in masks:
        st = m.stem
        by_prefix.setdefault(st, []).append(m)
        for i, ch in enumerate(st):
            if i and not ch.isalnum():
                by_prefix.setdefault(st[:i], []).append(m)
    pairs: dict[Path, Path] = {}
    used: set[Path] = set()
    for img in images:
        cands = [m for m in by_prefix.get(img.stem, []) if m not in used]
        if cands:
            best = min(cands, key=lambda m: (m.stem != img.stem, len(m.stem), m.name))
            pairs[img] = best
            used.add(best)
    return pairs, [m for m in masks if m not in used]


def train_good(dm: AnomalyDataModule, cls_dir: Path, cls: str, extra: dict[str, Any] | None = None) -> list[Record]:
    """``<cls_dir>/train/good`` images as normal records; an empty folder is a problem."""
    folder = cls_dir / "train" / "good"
    images = list_images(folder)
    if not images:
        dm.problem(f"{folder}: empty class folder (no images in train/good). Check the download or drop the class.")
    return [Record(str(p), 0, cls, "good", extra=dict(extra or {})) for p in images]


def test_types(
    dm: AnomalyDataModule,
    cls_dir: Path,
    cls: str,
    masks_required: bool = True,
    extra: dict[str, Any] | None = None,
) -> list[Record]:
    """``test/<type>`` records; ``good`` is normal, every other type anomalous with a mask from
    ``ground_truth/<type>`` (required unless ``masks_required`` is False: then an unmasked anomaly gets no mask).
    """
    test, gt = cls_dir / "test", cls_dir / "ground_truth"
    types = subdirs(test)
    if not types:
        dm.problem(f"{test}: no test/<type> folders (expected test/good and test/<defect>).")
    records: list[Record] = []
    for tdir in types:
        images = list_images(tdir)
        if not images:
            dm.problem(f"{tdir}: empty folder (no images). Remove it or restore its images.")
            continue
        mask_dir = gt / tdir.name
        pairs, stray = pair_masks(images, list_images(mask_dir))
        for m in stray:
            dm.problem(f"{m}: mask without image (no {tdir}/{m.stem.split('_mask')[0]}.*). Restore or remove it.")
        label = 0 if tdir.name == "good" else 1
        for img in images:
            mask = pairs.get(img) if label else None
            if label and mask is None and masks_required:
                dm.problem(
                    f"{img}: anomalous test image without mask (expected {mask_dir}/{img.stem}.png or "
                    f"{img.stem}_mask.png). Restore the mask or remove the image."
                )
                continue
            records.append(Record(str(img), label, cls, tdir.name, str(mask) if mask else None, dict(extra or {})))
    known = {t.name for t in types}
    for mdir in subdirs(gt):
        if mdir.name not in known:
            for m in list_images(mdir):
                dm.problem(f"{m}: mask without image (there is no {test / mdir.name} folder). Restore or remove it.")
    return records
