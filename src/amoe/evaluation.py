"""Test-time collection: per-class buffering of group maps, fusion, metrics and result files.

Samples arrive sorted by class. The collector keeps only the current class (grid-resolution group
maps, evaluation-size masks, small thumbnails for figures); when the class changes it normalises and
fuses the maps (with training statistics, or the class's own min–max for ``map_norm: test_minmax``),
feeds the streaming metric evaluator, records per-image rows and figure candidates, and frees the class.

DDP (``world_size > 1``): every rank streams its share of the test set into a
:class:`~amoe.metrics.DatasetEvaluator` in distributed mode, which spills raw per-class shards into a
directory shared by all ranks (``shard_dir``). At the end each rank dumps its manifest, rows and figure
candidates there, one barrier, and rank 0 computes the exact metrics from all shards (samples repeated by
the ``DistributedSampler`` padding are dropped by ``extra["sample_id"]``), merges the rows and figures and
writes the results. No map is all-gathered, and no rank holds more than one class of maps.

Image AUROC/AP/F1-max are also fed, class by class, to an optional torchmetrics
:class:`~amoe.image_metrics.ImageMetrics` (``image_metrics``), which the LightningModule syncs and logs.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from amoe.image_metrics import ImageMetrics
from amoe.metrics import DatasetEvaluator
from amoe.model import GROUPS, AnomalyMoE, ModelOutput
from amoe.results import make_run_dir, paper_table, write_results
from amoe.scoring import fuse

log = logging.getLogger(__name__)

THUMB = 128  # side of the thumbnails kept for figures


@dataclass
class _ClassBuffer:
    cls: str
    group_maps: list[torch.Tensor] = field(default_factory=list)  # (b, G, h, w)
    mass: list[torch.Tensor] = field(default_factory=list)  # (b, G)
    masks: list[torch.Tensor] = field(default_factory=list)  # (b, S, S) bool
    thumbs: list[torch.Tensor] = field(default_factory=list)  # (b, 3, THUMB, THUMB) uint8
    meta: list[dict[str, Any]] = field(default_factory=list)


def _thumbnail(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) ImageNet-normalised -> (B, 3, THUMB, THUMB) uint8."""
    mean = torch.tensor([0.485, 0.456, 0.406], device=image.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=image.device).view(1, 3, 1, 1)
    x = (image.float() * std + mean).clamp(0, 1)
    x = F.interpolate(x, size=(THUMB, THUMB), mode="bilinear", align_corners=False, antialias=True)
    return (x * 255).round().to(torch.uint8).cpu()


class TestCollector:
    __test__ = False  # not a pytest test class

    def __init__(
        self,
        dataset: str,
        model: AnomalyMoE,
        map_norm: str = "train_quantile",
        results_root: str = "results",
        run_name: str | None = None,
        num_figure_images: int = 2,
        is_global_zero: bool = True,
        rank: int = 0,
        world_size: int = 1,
        shard_dir: str | None = None,
        image_metrics: ImageMetrics | None = None,
    ):
        self.dataset, self.model, self.map_norm = dataset, model, map_norm
        self.results_root, self.run_name, self.num_figure_images = results_root, run_name, num_figure_images
        self.is_global_zero, self.rank, self.world_size = is_global_zero, rank, world_size
        self.distributed = world_size > 1
        if self.distributed and shard_dir is None:
            raise ValueError("world_size > 1 needs a shard_dir that every rank can reach")
        self.shard_dir = shard_dir
        self.image_metrics = image_metrics  # torchmetrics: image AUROC/AP/F1-max, synced by torchmetrics
        if self.distributed and map_norm == "test_minmax":
            log.warning(
                "map_norm test_minmax under DDP normalises each class with the min/max of this rank's share "
                "of it, so the metrics differ from a 1-device run; use --trainer.devices 1 for parity runs."
            )
        spro = dataset in ("mvtec_loco", "unified")  # MVTec LOCO, alone or as part of a unified run
        self.evaluator = DatasetEvaluator(
            dataset, pixel=True, aupro=True, spro=spro, eval_size=model.config.eval_size,
            spill_dir=shard_dir if self.distributed else None, rank=rank, distributed=self.distributed,
        )
        self.buffer: _ClassBuffer | None = None
        self.rows: list[dict[str, Any]] = []  # one per test image; keys starting with "_" stay out of scores.csv
        self.figures: dict[str, list[dict[str, Any]]] = {"overlays": [], "expert_maps": []}  # candidates
        self.run_dir: str | None = None

    def add(self, batch: dict[str, Any], out: ModelOutput, masks: torch.Tensor) -> None:
        """One test batch: model output and its masks at the evaluation size (B, S, S) bool."""
        thumbs = _thumbnail(batch["image"])
        for i, cls in enumerate(batch["cls"]):
            if self.buffer is None or self.buffer.cls != cls:
                self.flush()
                self.buffer = _ClassBuffer(cls)
            buf = self.buffer
            buf.group_maps.append(out.group_maps[i : i + 1].float().cpu())
            buf.mass.append(out.group_mass[i : i + 1].float().cpu())
            buf.masks.append(masks[i : i + 1].cpu())
            buf.thumbs.append(thumbs[i : i + 1])
            extra = dict(batch["extra"][i]) if "extra" in batch else {}
            extra.setdefault("sample_id", batch["path"][i])  # dataset index (data modules) or the file
            buf.meta.append(
                {
                    "path": batch["path"][i],
                    "dataset": extra.get("dataset", batch["dataset"][i]),
                    "cls": cls,
                    "defect_type": batch["defect_type"][i],
                    "label": int(batch["label"][i]),
                    "level": extra.get("level"),
                    "extra": extra,
                    "experts": out.router.topk[i].tolist(),
                    "weights": out.router.weights[i].float().tolist(),
                }
            )

    def flush(self) -> None:
        buf, self.buffer = self.buffer, None
        if buf is None or not buf.meta:
            return
        group_maps, mass = torch.cat(buf.group_maps), torch.cat(buf.mass)  # (n, G, h, w), (n, G)
        sc = self.model.scorer
        if self.map_norm == "test_minmax":  # the reference's transductive per-class min–max (parity only)
            lo, hi = group_maps.amin(dim=(0, 2, 3)), group_maps.amax(dim=(0, 2, 3))
        elif self.map_norm == "none":
            lo, hi = torch.zeros(len(GROUPS)), torch.ones(len(GROUPS))
        else:
            lo, hi = sc.lo.cpu(), sc.hi.cpu()
        normalised = (group_maps - lo.view(1, -1, 1, 1)) / (hi - lo).clamp_min(1e-12).view(1, -1, 1, 1)
        maps, scores = sc.postprocess(fuse(group_maps, mass, lo, hi))  # (n, S, S), (n,)
        masks = torch.cat(buf.masks)
        labels = torch.tensor([m["label"] for m in buf.meta])
        self.evaluator.update(
            [buf.cls] * len(labels), scores, labels, maps, masks,
            levels=[m["level"] for m in buf.meta], extras=[m["extra"] for m in buf.meta],
        )
        if self.image_metrics is not None:
            self.image_metrics.update([buf.cls] * len(labels), scores, labels, [m["extra"]["sample_id"] for m in buf.meta])
        thr = float(sc.image_threshold)
        for m, s, g in zip(buf.meta, scores.tolist(), mass.tolist()):
            row = {k: m[k] for k in ("path", "dataset", "cls", "defect_type", "label")}
            row.update(score=s, anomalous=bool(s > thr) if np.isfinite(thr) else None)
            row.update({f"gate_{name}": v for name, v in zip(GROUPS, g)})
            row["experts"] = " ".join(map(str, m["experts"]))
            row.update(_sid=_jsonable_id(m["extra"]["sample_id"]), _weights=m["weights"])
            self.rows.append(row)
        # Figure candidates of this rank: its k highest- and k lowest-scoring images and its k highest-scoring
        # anomalies of the class; the final choice over all ranks is made in finish().
        order = torch.argsort(scores, descending=True).tolist()
        k = self.num_figure_images
        for idx in dict.fromkeys(order[:k] + order[-k:]):
            self.figures["overlays"].append(
                {"cls": buf.cls, "score": scores[idx].item(), "sid": _jsonable_id(buf.meta[idx]["extra"]["sample_id"]),
                 "thumb": buf.thumbs[idx][0], "map": maps[idx], "mask": masks[idx], "path": buf.meta[idx]["path"]}
            )
        anomalous = [i for i in order if buf.meta[i]["label"] == 1][:k]
        for idx in anomalous:
            per_group = sc.postprocess(normalised[idx])[0]  # (G, S, S) each group map, normalised
            self.figures["expert_maps"].append(
                {"cls": buf.cls, "score": scores[idx].item(), "sid": _jsonable_id(buf.meta[idx]["extra"]["sample_id"]),
                 "thumb": buf.thumbs[idx][0], "groups": per_group, "final": maps[idx],
                 "mask": masks[idx], "mass": mass[idx].tolist(), "path": buf.meta[idx]["path"]}
            )

    def finish(self, trainer=None) -> dict | None:
        """Finalise the metrics and write the results directory (rank 0).

        Returns the metrics dict on rank 0 and None on the other ranks of a DDP run.
        """
        self.flush()
        if self.distributed:
            self.evaluator.dump()
            torch.save({"rows": self.rows, "figures": self.figures},
                       os.path.join(self.shard_dir, f"collector_rank{self.rank}.pt"))
            _barrier(trainer)  # every rank's shards are on disk
            if not self.is_global_zero:
                return None
            result = DatasetEvaluator.compute_from_dumps(self.shard_dir)
            rows, figures = [], {"overlays": [], "expert_maps": []}
            for path in sorted(glob.glob(os.path.join(self.shard_dir, "collector_rank*.pt"))):
                part = torch.load(path, weights_only=True)  # tensors, lists, dicts, str, float
                rows += part["rows"]
                for key in figures:
                    figures[key] += part["figures"][key]
            shutil.rmtree(self.shard_dir, ignore_errors=True)
        else:
            if not self.is_global_zero:
                return None
            result = self.evaluator.compute()
            rows, figures = self.rows, self.figures
        rows = _dedupe_rows(rows)
        result = {"dataset": self.dataset, **result}
        gates, expert_gates = gate_means(rows, len(GROUPS))
        figures = select_figures(figures, self.num_figure_images, [r["cls"] for r in rows])
        run_dir = make_run_dir(os.path.join(self.results_root, self.dataset), self.run_name)
        groups = [s.stop - s.start for s in self.model.group_slices]
        write_results(run_dir, result, [_public(r) for r in rows], gates, figures, expert_gates, groups)
        self.run_dir = run_dir
        print(f"\n{paper_table(result)}\nmean: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(result["mean"].items()))
              + f"\nresults written to {run_dir}", flush=True)
        if trainer is not None:
            log_to_wandb(trainer, run_dir, result)
        return result


def _jsonable_id(sid: Any) -> Any:
    return sid.item() if isinstance(sid, torch.Tensor | np.generic) else sid


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _barrier(trainer) -> None:
    if trainer is not None:
        trainer.strategy.barrier("amoe_test_results")
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _dedupe_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per sample (sampler padding repeats some under DDP), in dataset order when ids are indices."""
    seen: dict[Any, dict[str, Any]] = {}
    for r in rows:
        seen.setdefault(r["_sid"], r)
    out = list(seen.values())
    if all(isinstance(r["_sid"], int) for r in out):
        out.sort(key=lambda r: r["_sid"])
    return out


def gate_means(rows: list[dict[str, Any]], num_groups: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per class: mean gate mass per group (G,) and mean gate value per expert (N,) over its test images."""
    by_cls: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_cls.setdefault(r["cls"], []).append(r)
    groups = {c: np.array([[r[f"gate_{g}"] for g in GROUPS[:num_groups]] for r in rs]).mean(0) for c, rs in by_cls.items()}
    experts = {c: np.array([r["_weights"] for r in rs]).mean(0) for c, rs in by_cls.items()}
    return groups, experts


def select_figures(cands: dict[str, list[dict[str, Any]]], k: int, class_order: list[str]) -> dict[str, list[dict[str, Any]]]:
    """From (every rank's) candidates: per class the k highest- and k lowest-scoring images (overlays) and
    the k highest-scoring anomalies (expert maps), each image at most once."""
    classes = list(dict.fromkeys(class_order))
    out: dict[str, list[dict[str, Any]]] = {"overlays": [], "expert_maps": []}
    for cls in classes:
        mine = {c["sid"]: c for c in cands["overlays"] if c["cls"] == cls}
        order = sorted(mine.values(), key=lambda c: (-c["score"], str(c["sid"])))
        high = order[:k]
        low = [c for c in order[::-1] if all(c is not h for h in high)][:k]  # the lowest first
        out["overlays"] += [dict(c, which="highest") for c in high] + [dict(c, which="lowest") for c in low]
        anomalies = {c["sid"]: c for c in cands["expert_maps"] if c["cls"] == cls}
        out["expert_maps"] += sorted(anomalies.values(), key=lambda c: (-c["score"], str(c["sid"])))[:k]
    return out


def log_to_wandb(trainer, run_dir: str, result: dict) -> None:
    """When a WandbLogger is attached: the per-class metrics as a table, the figures as images."""
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not loggers:
        return
    names = sorted({k for m in result["per_class"].values() for k in m} | set(result["mean"]))
    data = [[c, *(finite_or_none(m.get(k)) for k in names)] for c, m in [*result["per_class"].items(), ("mean", result["mean"])]]
    overlays = sorted(glob.glob(os.path.join(run_dir, "overlays", "*.png")))
    for lg in loggers:
        try:
            lg.log_table("test/metrics_per_class", columns=["class", *names], data=data)
            for name in ("router_gates", "expert_maps"):
                path = os.path.join(run_dir, f"{name}.png")
                if os.path.isfile(path):
                    lg.log_image(f"test/{name}", [path])
            if overlays:
                lg.log_image("test/overlays", overlays, caption=[os.path.basename(p) for p in overlays])
            with open(os.path.join(run_dir, "table.md")) as f:
                lg.experiment.summary["test/table_md"] = f.read()
            lg.experiment.summary["test/results_dir"] = os.path.abspath(run_dir)
        except Exception as e:  # W&B must never fail a test run whose results are already on disk
            log.warning("W&B logging of the test results failed (%s: %s); they are in %s", type(e).__name__, e, run_dir)


def finite_or_none(v: Any) -> float | None:
    """A finite number as float; None for None, NaN and ±inf (JSON/CSV have no NaN)."""
    return float(v) if v is not None and np.isfinite(v) else None
