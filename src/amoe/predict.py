"""``amoe predict``: score a folder of images with a trained checkpoint and write, per run,

    results/predict/<run>/scores.csv          path, score, anomalous (true/false), anomalous_area, overlay, mask
    results/predict/<run>/overlays/<rel>.png  heat map over the image, threshold contour, original size
    results/predict/<run>/masks/<rel>.png     binary mask (255 = above the pixel threshold), original size
    results/predict/<run>/summary.json        thresholds used and where they came from, counts, skipped files
    results/predict/<run>/skipped.csv         files that could not be read (only with skip_bad_files: true)

Rows and images are written batch by batch (:class:`PredictionWriter`, a Lightning
``BasePredictionWriter``), so nothing is held in memory and a crash keeps what was done. A run
directory is never reused (:func:`amoe.results.make_run_dir`).

Thresholds: by default the checkpoint's, calibrated at the end of training on normal images held out
from ``train/good`` (``calib_fraction`` of the data module): the image threshold is the
``image_threshold_quantile`` (0.99) quantile of their image scores, the pixel threshold the
``pixel_threshold_quantile`` (0.999) quantile of their map values. ``--threshold`` /
``--pixel_threshold`` override them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from amoe.results import make_run_dir
from data_modules.base import read_rgb

log = logging.getLogger(__name__)

FIELDS = ("path", "score", "anomalous", "anomalous_area", "overlay", "mask")


def output_names(paths: list[str], relpaths: list[str] | None = None) -> dict[str, str]:
    """path -> output file name (relative, ``.png``) that mirrors the input tree and never collides.

    ``sub/b.jpg`` -> ``sub/b.png``; when two inputs share a stem (``a.png``, ``a.jpg``) both keep their
    extension in the name (``a_png.png``, ``a_jpg.png``).
    """
    if relpaths is None:
        common = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else ""
        relpaths = [os.path.relpath(os.path.abspath(p), common) for p in paths]
    stems: dict[str, int] = {}
    for r in relpaths:
        key = str(Path(r).with_suffix("")).lower()
        stems[key] = stems.get(key, 0) + 1
    out = {}
    for p, r in zip(paths, relpaths):
        rp = Path(r)
        base = rp.with_suffix("")
        if stems[str(base).lower()] > 1:
            base = base.with_name(f"{base.name}_{rp.suffix.lstrip('.').lower()}")
        out[p] = str(base) + ".png"
    return out


def to_original(amap: np.ndarray, orig_hw: tuple[int, int], image_size: int, crop_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Map (S, S) over the centre crop -> (H, W) on the original image, and the (H, W) bool of covered pixels.

    The transform resizes the image to ``image_size`` squared and centre-crops ``crop_size``: the map covers
    the central ``crop_size / image_size`` of each side; the border outside it has no prediction (0).
    """
    h, w = orig_hw
    off = (image_size - crop_size) / 2
    y0, y1 = round(off / image_size * h), round((off + crop_size) / image_size * h)
    x0, x1 = round(off / image_size * w), round((off + crop_size) / image_size * w)
    y1, x1 = max(y1, y0 + 1), max(x1, x0 + 1)
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    inner = F.interpolate(t, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0, 0].numpy()
    full = np.zeros((h, w), np.float32)
    covered = np.zeros((h, w), bool)
    full[y0:y1, x0:x1] = inner
    covered[y0:y1, x0:x1] = True
    return full, covered


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _save(run_dir: str, im: Image.Image, kind: str, name: str) -> None:
    path = os.path.join(run_dir, kind, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im.save(path)


def write_image_outputs(run_dir: str, path: str, name: str, rgb: np.ndarray, amap: np.ndarray, score: float,
                        thresholds: dict[str, float], geometry: tuple[int, int] | None) -> dict[str, str]:
    """Overlay (and mask, with a pixel threshold) of one image under ``run_dir``; returns its scores.csv row.
    Shared by the checkpoint path (:class:`PredictionWriter`) and the exported-model path (amoe.export)."""
    from amoe import viz

    img_thr, pix_thr = thresholds["image"], thresholds["pixel"]
    image_size, crop_size = geometry or (amap.shape[0], amap.shape[0])
    full, covered = to_original(amap, rgb.shape[:2], image_size, crop_size)
    if _finite(pix_thr):
        mask = (full > pix_thr) & covered
        vmin, vmax = 0.0, 2 * pix_thr if pix_thr > 0 else None
    else:
        mask, (vmin, vmax) = None, (None, None)
    over = viz.heat_overlay(rgb, full, vmin, vmax)
    over[~covered] = rgb[~covered]
    if mask is not None:
        over = viz.mask_contour(over, mask, colour=(255, 255, 255))
    _save(run_dir, Image.fromarray(over), "overlays", name)
    if mask is not None:
        _save(run_dir, Image.fromarray(mask.astype(np.uint8) * 255), "masks", name)
    anomalous = score > img_thr if _finite(img_thr) else None
    return {
        "path": path,
        "score": f"{score:.6g}",
        "anomalous": "" if anomalous is None else str(anomalous).lower(),
        "anomalous_area": f"{float(mask.mean()):.6g}" if mask is not None else "",
        "overlay": os.path.join("overlays", name),
        "mask": os.path.join("masks", name) if mask is not None else "",
    }


def write_summary(run_dir: str, source: dict[str, Any], counts: dict[str, float], skipped: list[str],
                  thresholds: dict[str, float], sources: dict[str, str]) -> dict[str, Any]:
    """summary.json (and skipped.csv when files were skipped) of a predict run; logs and prints one line."""
    if skipped:
        pd.DataFrame({"problem": skipped}).to_csv(os.path.join(run_dir, "skipped.csv"), index=False, encoding="utf-8")
    summary = {
        **source,
        "images": int(counts["images"]),
        "anomalous": int(counts["anomalous"]),
        "skipped": len(skipped),
        "image_threshold": thresholds["image"] if _finite(thresholds["image"]) else None,
        "image_threshold_source": sources["image"],
        "pixel_threshold": thresholds["pixel"] if _finite(thresholds["pixel"]) else None,
        "pixel_threshold_source": sources["pixel"],
        "overlay_colour_scale": "0 (blue) .. 2 x pixel_threshold (red); white contour = mask",
    }
    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    msg = (f"predict: {summary['images']} image(s), {summary['anomalous']} anomalous "
           f"(image threshold {summary['image_threshold']}), results in {run_dir}")
    if skipped:
        msg += f"; {len(skipped)} unreadable file(s) skipped, listed in skipped.csv"
    log.info(msg)
    print(msg)
    return summary


class PredictionWriter(BasePredictionWriter):
    """Writes prediction results batch by batch (see the module docstring).

    Args:
        results_root: outputs go to ``results_root/predict/<run>``.
        run_name: name of the run directory (default: a timestamp; never reuses an existing directory).
        image_threshold: overrides the checkpoint's image threshold (``--threshold``).
        pixel_threshold: overrides the checkpoint's pixel threshold (``--pixel_threshold``).
        checkpoint: path of the checkpoint, recorded in summary.json.
    """

    def __init__(
        self,
        results_root: str = "results",
        run_name: str | None = None,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        checkpoint: str | None = None,
    ):
        super().__init__(write_interval="batch")
        self.results_root, self.run_name, self.checkpoint = results_root, run_name, checkpoint
        self.override = {"image": image_threshold, "pixel": pixel_threshold}
        self.run_dir: str | None = None
        self.names: dict[str, str] = {}
        self.dataset, self.records = None, {}
        self.counts = {"images": 0, "anomalous": 0}
        self._csv = None

    # --- set-up --------------------------------------------------------------------------------
    def on_predict_start(self, trainer, pl_module) -> None:
        run_dir = make_run_dir(os.path.join(self.results_root, "predict"), self.run_name) if trainer.is_global_zero else None
        self.run_dir = trainer.strategy.broadcast(run_dir)
        sc = pl_module.model.scorer
        self.thresholds, self.sources = {}, {}
        for kind, buf, q in (("image", sc.image_threshold, sc.image_q), ("pixel", sc.pixel_threshold, sc.pixel_q)):
            if self.override[kind] is not None:
                self.thresholds[kind] = float(self.override[kind])
                self.sources[kind] = f"--{'threshold' if kind == 'image' else 'pixel_threshold'}"
            else:
                self.thresholds[kind] = float(buf)
                self.sources[kind] = (
                    f"checkpoint: {q} quantile of the held-out normal images' {'image scores' if kind == 'image' else 'map values'}"
                    if _finite(float(buf)) else "none (the checkpoint was never calibrated)"
                )
        if not _finite(self.thresholds["image"]):
            log.warning("no image threshold: the 'anomalous' column stays empty. Pass --threshold VALUE.")
        dm = trainer.datamodule
        t = getattr(dm, "transform", None)
        self.geometry = (t.image_size, t.crop_size) if t is not None else None
        self.dataset = dm.split("predict") if hasattr(dm, "split") else None
        records = self.dataset.records if self.dataset is not None else []
        self.records = {r.path: r for r in records}  # file metadata only; predictions are never kept
        if records:
            rel = [r.extra.get("relpath") for r in records]
            self.names = output_names([r.path for r in records], rel if all(rel) else None)
        self.skipped = list(getattr(dm, "problems", []))
        suffix = "" if trainer.world_size == 1 else f".rank{trainer.global_rank}"
        self._csv_path = os.path.join(self.run_dir, f"scores{suffix}.csv")
        self._csv = open(self._csv_path, "w", newline="", encoding="utf-8")
        pd.DataFrame(columns=FIELDS).to_csv(self._csv, index=False)  # the header; rows are appended per batch
        log.info("predict: writing to %s", self.run_dir)

    # --- per batch -----------------------------------------------------------------------------
    def write_on_batch_end(self, trainer, pl_module, prediction: dict[str, Any], batch_indices, batch, batch_idx, dataloader_idx) -> None:
        rows = []
        for i, path in enumerate(prediction["path"]):
            rec = self.records.get(path)
            rgb = self.dataset.load_rgb(rec) if rec is not None else read_rgb(path)  # as the model saw it
            name = self.names.get(path) or output_names([path])[path]
            row = write_image_outputs(self.run_dir, path, name, rgb, prediction["maps"][i].numpy(),
                                      float(prediction["scores"][i]), self.thresholds, self.geometry)
            self.counts["images"] += 1
            self.counts["anomalous"] += row["anomalous"] == "true"
            rows.append(row)
        pd.DataFrame(rows, columns=FIELDS).to_csv(self._csv, header=False, index=False)
        self._csv.flush()

    # --- end -----------------------------------------------------------------------------------
    def on_predict_end(self, trainer, pl_module) -> None:
        self._close()
        counts = {k: trainer.strategy.reduce(torch.tensor(float(v)), reduce_op="sum").item() for k, v in self.counts.items()}
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return
        if trainer.world_size > 1:  # merge the per-rank files (a padded repeat once), sorted by path
            parts = [os.path.join(self.run_dir, f"scores.rank{r}.csv") for r in range(trainer.world_size)]
            # the cells as written (strings): no float re-formatting, empty stays empty
            merged = pd.concat([pd.read_csv(p, dtype=str, keep_default_na=False) for p in parts], ignore_index=True)
            merged = merged.drop_duplicates("path", keep="last").sort_values("path", kind="stable")
            merged.to_csv(os.path.join(self.run_dir, "scores.csv"), index=False, encoding="utf-8")
            for p in parts:
                os.remove(p)
        write_summary(self.run_dir, {"checkpoint": self.checkpoint}, counts, self.skipped, self.thresholds, self.sources)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._csv is not None:
            self._csv.close()
            self._csv = None
