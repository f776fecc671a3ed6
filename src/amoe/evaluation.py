"""Test-time collection: per-class buffering of group maps, fusion, metrics and result files.

Samples arrive sorted by class. The collector keeps only the current class (grid-resolution group
maps, evaluation-size masks, small thumbnails for figures); when the class changes it normalises and
fuses the maps (with training statistics, or the class's own min–max for ``map_norm: test_minmax``),
feeds the streaming metric evaluator, records per-image rows and figure candidates, and frees the class.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from amoe.metrics import DatasetEvaluator
from amoe.model import GROUPS, AnomalyMoE, ModelOutput
from amoe.results import make_run_dir, write_results
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
    def __init__(
        self,
        dataset: str,
        model: AnomalyMoE,
        map_norm: str = "train_quantile",
        results_root: str = "results",
        run_name: str | None = None,
        num_figure_images: int = 2,
        is_global_zero: bool = True,
    ):
        self.dataset, self.model, self.map_norm = dataset, model, map_norm
        self.results_root, self.run_name, self.num_figure_images = results_root, run_name, num_figure_images
        self.is_global_zero = is_global_zero
        spro = dataset == "mvtec_loco"
        self.evaluator = DatasetEvaluator(dataset, pixel=True, aupro=True, spro=spro, eval_size=model.config.eval_size)
        self.buffer: _ClassBuffer | None = None
        self.rows: list[dict[str, Any]] = []
        self.gates: dict[str, np.ndarray] = {}  # class -> mean gate mass per group (G,)
        self.figures: dict[str, list[dict[str, Any]]] = {"overlays": [], "expert_maps": []}

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
            extra = batch["extra"][i] if "extra" in batch else {}
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
        thr = float(sc.image_threshold)
        for m, s, g in zip(buf.meta, scores.tolist(), mass.tolist()):
            row = {k: m[k] for k in ("path", "dataset", "cls", "defect_type", "label")}
            row.update(score=s, anomalous=bool(s > thr) if np.isfinite(thr) else None)
            row.update({f"gate_{name}": v for name, v in zip(GROUPS, g)})
            row["experts"] = " ".join(map(str, m["experts"]))
            self.rows.append(row)
        self.gates[buf.cls] = mass.mean(0).numpy()
        order = torch.argsort(scores, descending=True).tolist()
        k = self.num_figure_images
        for rank, idx in enumerate(order[:k] + order[-k:]):
            self.figures["overlays"].append(
                {"cls": buf.cls, "which": "highest" if rank < k else "lowest", "score": scores[idx].item(),
                 "thumb": buf.thumbs[idx][0], "map": maps[idx], "mask": masks[idx], "path": buf.meta[idx]["path"]}
            )
        anomalous = [i for i in order if buf.meta[i]["label"] == 1][:k]
        for idx in anomalous:
            per_group = sc.postprocess(normalised[idx])[0]  # (G, S, S) each group map, normalised
            self.figures["expert_maps"].append(
                {"cls": buf.cls, "thumb": buf.thumbs[idx][0], "groups": per_group, "final": maps[idx],
                 "mask": masks[idx], "mass": mass[idx].tolist(), "path": buf.meta[idx]["path"]}
            )

    def finish(self, trainer=None) -> dict | None:
        """Finalise metrics and write the results directory (rank 0). Returns the metrics dict."""
        self.flush()
        result = self.evaluator.compute()
        result = {"dataset": self.dataset, **result}
        if not self.is_global_zero:
            return result
        run_dir = make_run_dir(os.path.join(self.results_root, self.dataset), self.run_name)
        write_results(run_dir, result, self.rows, self.gates, self.figures)
        self.run_dir = run_dir
        return result
