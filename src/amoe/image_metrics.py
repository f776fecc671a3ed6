"""Image-level test metrics as a ``torchmetrics.Metric``: AUROC, AP and F1-max per class, per dataset and
their unweighted means, synced across DDP ranks by torchmetrics and logged with ``self.log``.

The state is four flat ``cat`` lists (sample key, class index, label, score; all float64). After
torchmetrics has gathered them from every rank, samples repeated by ``DistributedSampler`` padding are
dropped: a (class, sample key) pair counts once, the copy of the lowest rank being kept (the same rule
as the streaming evaluator's shard merge). The curves are those of :func:`amoe.metrics.binary_metrics`
(exact, ties as one threshold, no sigmoid), so the values equal the evaluator's ``metrics.json``.

Why not ``torchmetrics.classification.BinaryAUROC(thresholds=None)`` alone: it passes raw scores outside
[0, 1] through a sigmoid (saturation creates ties; measured up to 0.087 AUROC off on scores of ±1e3),
it has no F1-max, and a plain instance counts the padded duplicates (docs/METRICS.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

from amoe.metrics import binary_metrics, summarise

_EXACT = 2**53  # integers below this are exact in float64


def sample_key(sid: Any) -> float:
    """A sample id (dataset index, or any other id such as the file path) -> a float64 key equal on every
    rank. Integers are used as they are; anything else is hashed (blake2b, 52 bits: same in every process)."""
    if isinstance(sid, torch.Tensor | np.generic):
        sid = sid.item()
    if isinstance(sid, int | np.integer) and not isinstance(sid, bool) and 0 <= sid < _EXACT:
        return float(sid)
    digest = hashlib.blake2b(repr(sid).encode(), digest_size=8).digest()
    return float(_EXACT + (int.from_bytes(digest, "little") >> 12))  # 2^53 + 52 bits: still exact


class ImageMetrics(Metric):
    """Exact image AUROC / AP / F1-max per class under DDP (see the module docstring).

    Args:
        classes: every class name of the test set, in report order, the same list on every rank (class
            names become indices in the state). ``None``: classes are added as they are seen — one
            process only, because the ranks could number them differently.
        datasets: the dataset of each class (``classes`` order); ``None``: every class is in ``dataset``.

    ``update(classes, scores, labels, sample_ids)`` per batch; ``compute()`` ->
    ``{"per_class": {cls: {"image_auroc", "image_ap", "image_f1max"}}, "per_dataset": {dataset: means},
    "mean": unweighted mean over the classes}``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, classes: Sequence[str] | None = None, datasets: Sequence[str] | None = None,
                 dataset: str = "dataset", **kwargs: Any):
        super().__init__(**kwargs)
        for name in ("sample_key", "class_index", "label", "score"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.set_classes(classes, datasets, dataset)

    def set_classes(self, classes: Sequence[str] | None, datasets: Sequence[str] | None = None,
                    dataset: str = "dataset") -> None:
        """Fix the class list and each class's dataset (``dataset`` for all when ``datasets`` is None, and for
        the classes added as they are seen when ``classes`` is None); forgets any data."""
        self.reset()
        self.fixed, self.dataset = classes is not None, dataset
        self.classes: list[str] = list(classes or [])
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"class names repeat: {self.classes}")
        if datasets is not None and len(datasets) != len(self.classes):
            raise ValueError(f"{len(datasets)} datasets for {len(self.classes)} classes")
        self.datasets: list[str] = list(datasets) if datasets is not None else [dataset] * len(self.classes)
        self._index = {c: i for i, c in enumerate(self.classes)}

    def _class_index(self, cls: str) -> int:
        if cls not in self._index:
            if self.fixed:
                raise ValueError(f"class {cls!r} is not one of the test classes {self.classes}")
            self._index[cls] = len(self.classes)
            self.classes.append(cls)
            self.datasets.append(self.dataset)
        return self._index[cls]

    def update(self, classes: Sequence[str], scores: Any, labels: Any, sample_ids: Sequence[Any]) -> None:
        """classes (B,) names, scores (B,) raw, labels (B,) {0, 1}, sample_ids (B,) unique per test image."""
        s = torch.as_tensor(scores).detach().reshape(-1).to(self.device, torch.float64)
        y = torch.as_tensor(labels).detach().reshape(-1).to(self.device, torch.float64)
        if not len(classes) == len(s) == len(y) == len(sample_ids):
            raise ValueError(f"classes ({len(classes)}), scores ({len(s)}), labels ({len(y)}) and sample_ids "
                             f"({len(sample_ids)}) differ in length")
        f64 = {"device": self.device, "dtype": torch.float64}
        self.sample_key.append(torch.tensor([sample_key(i) for i in sample_ids], **f64))
        self.class_index.append(torch.tensor([self._class_index(str(c)) for c in classes], **f64))
        self.label.append((y > 0.5).to(torch.float64))
        self.score.append(s)

    def _gathered(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (synced) state as numpy, one entry per (class, sample): the first copy of a repeat."""
        def flat(state: Any) -> np.ndarray:
            if isinstance(state, list):
                state = torch.cat(state) if state else torch.zeros(0)
            return state.detach().to("cpu", torch.float64).numpy()

        key, cls, y, s = (flat(getattr(self, n)) for n in ("sample_key", "class_index", "label", "score"))
        _, first = np.unique(np.stack([cls, key], axis=1), axis=0, return_index=True)
        keep = np.sort(first)
        return cls[keep].astype(np.int64), y[keep].astype(np.int64), s[keep]

    def compute(self) -> dict[str, dict]:
        if self._to_sync and not self.fixed and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise RuntimeError("ImageMetrics under DDP needs the full class list: ImageMetrics(classes=...)")
        cls, y, s = self._gathered()
        per_class = {}
        for i, name in enumerate(self.classes):
            sel = cls == i
            if sel.any():
                per_class[name] = binary_metrics(s[sel], y[sel], prefix="image_")
        dataset = dict(zip(self.classes, self.datasets))
        return summarise(per_class, dataset.__getitem__)


def log_keys(result: dict, dataset_of: Callable[[str], str]) -> dict[str, float]:
    """A metrics dict (per_class, optional per_dataset, mean) -> flat logger keys:
    ``test/<dataset>/<class>/<metric>``, ``test/<dataset>/mean/<metric>`` and ``test/mean/<metric>``. A class
    name that already starts with ``<dataset>/`` (unified runs) is not prefixed twice."""
    out: dict[str, float] = {}
    for cls, metrics in result["per_class"].items():
        ds = dataset_of(cls)
        name = cls[len(ds) + 1:] if cls.startswith(f"{ds}/") else cls
        out.update({f"test/{ds}/{name}/{k}": float(v) for k, v in metrics.items()})
    per_dataset = result.get("per_dataset") or summarise(result["per_class"], dataset_of)["per_dataset"]
    for ds, metrics in per_dataset.items():
        out.update({f"test/{ds}/mean/{k}": float(v) for k, v in metrics.items()})
    out.update({f"test/mean/{k}": float(v) for k, v in result["mean"].items()})
    return out
