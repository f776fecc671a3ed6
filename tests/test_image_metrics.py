"""amoe.image_metrics: the torchmetrics image metrics equal binary_metrics (ties included), drop sampler
padding, and under 2-process gloo DDP give exactly the 1-process values (15 images: the sampler pads)."""

import json
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from amoe.image_metrics import ImageMetrics, log_keys, sample_key
from amoe.metrics import DatasetEvaluator, binary_metrics

CLASSES = ["mvtec_ad/bottle", "mvtec_ad/cable", "visa/pcb1"]


def _data(n: int = 15, seed: int = 0):
    """n test images over CLASSES (grouped by class, as the loaders give them), heavily tied raw scores."""
    rng = np.random.default_rng(seed)
    cls = [CLASSES[i * len(CLASSES) // n] for i in range(n)]
    labels = np.array([i % 3 != 0 for i in range(n)], dtype=np.int64)
    scores = np.round(rng.normal(size=n) * 3 + 2 * labels, 0) * 1e3  # ties within and across labels, far outside [0, 1]
    return cls, scores, labels


def _metric() -> ImageMetrics:
    return ImageMetrics(CLASSES, [c.split("/")[0] for c in CLASSES])


def test_equals_binary_metrics_with_ties_and_the_evaluator():
    cls, scores, labels = _data(30)
    m = _metric()
    for start in range(0, 30, 4):  # batches straddling classes
        sl = slice(start, start + 4)
        m.update(cls[sl], torch.from_numpy(scores[sl]).float(), torch.from_numpy(labels[sl]), list(range(30))[sl])
    got = m.compute()
    ev = DatasetEvaluator("unified", pixel=False)
    ev.update(cls, scores.astype(np.float32), labels)
    ref = ev.compute()
    for c in CLASSES:
        sel = np.array([x == c for x in cls])
        direct = binary_metrics(scores[sel].astype(np.float32), labels[sel], prefix="image_")
        assert len(np.unique(scores[sel])) < sel.sum()  # the class has tied scores
        for k, v in direct.items():
            assert got["per_class"][c][k] == v == ref["per_class"][c][k], (c, k)
    assert got["mean"] == {k: v for k, v in ref["mean"].items() if k in got["mean"]}
    assert got["per_dataset"] == {d: {k: v for k, v in r.items() if k.startswith("image_")}
                                  for d, r in ref["per_dataset"].items()}
    keys = log_keys(got, lambda c: c.split("/")[0])
    assert keys["test/visa/pcb1/image_auroc"] == got["per_class"]["visa/pcb1"]["image_auroc"]
    assert keys["test/mvtec_ad/mean/image_ap"] == got["per_dataset"]["mvtec_ad"]["image_ap"]
    assert keys["test/mean/image_f1max"] == got["mean"]["image_f1max"]


def test_repeated_samples_count_once_and_reset_forgets():
    cls, scores, labels = _data(15)
    ref = _metric()
    ref.update(cls, scores, labels, list(range(15)))
    m = _metric()
    m.update(cls, scores, labels, list(range(15)))
    m.update(cls[:3], scores[:3], 1 - labels[:3], [0, 1, 2])  # repeats (even with other labels) are dropped
    assert m.compute() == ref.compute()
    m.reset()
    m.update(cls[:10], scores[:10], labels[:10], list(range(10)))
    assert set(m.compute()["per_class"]) == {"mvtec_ad/bottle", "mvtec_ad/cable"}
    with pytest.raises(ValueError, match="not one of the test classes"):
        m.update(["visa/pcb9"], [0.0], [1], [99])


def test_sample_keys_are_stable_and_distinct():
    assert sample_key(7) == 7.0 and sample_key(np.int64(7)) == 7.0 and sample_key(torch.tensor(7)) == 7.0
    a, b = sample_key("/data/a.png"), sample_key("/data/b.png")
    assert a != b and a == sample_key("/data/a.png") and a >= 2**53 and float(int(a)) == a


def _rank(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from torchmetrics.classification import BinaryAUROC

    cls, scores, labels = _data(15)
    idx = list(DistributedSampler(range(15), num_replicas=world, rank=rank, shuffle=False))
    m, plain = _metric(), BinaryAUROC(thresholds=None)
    for start in range(0, len(idx), 3):
        b = idx[start:start + 3]
        m.update([cls[i] for i in b], scores[b], labels[b], b)
        plain.update(torch.from_numpy(scores[b]), torch.from_numpy(labels[b]))
    result = {"ours": m.compute()}
    plain.sync()  # what plain.compute() sees: every rank's share, the padded duplicate included
    result["plain_n"] = int(torch.cat(plain.preds).numel() if isinstance(plain.preds, list) else plain.preds.numel())
    plain.unsync()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one_process_exactly(tmp_path):
    cls, scores, labels = _data(15)
    single = _metric()
    single.update(cls, scores, labels, list(range(15)))
    ref = single.compute()
    out = tmp_path / "rank0.json"
    ctx = mp.start_processes(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2, join=False,
                             start_method="fork" if sys.platform == "linux" else "spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):  # raises if a rank fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process gloo run did not finish in 120 s")
    got = json.loads(out.read_text())
    assert got["ours"] == json.loads(json.dumps(ref))  # exact (15 images, 16 sampled: one padded duplicate)
    assert got["plain_n"] == 16  # a plain torchmetrics BinaryAUROC counts the padded duplicate
