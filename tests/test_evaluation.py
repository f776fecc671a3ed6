"""Test-time collection (amoe.evaluation): result files, dataset-specific metrics on the real layouts, and the
DDP merge of several ranks' shards, checked against one process on the same model outputs."""

import csv
import json
import os
import re

import pandas as pd
import pytest
import torch
from fixtures_model import tiny_model
from PIL import Image

from amoe.evaluation import TestCollector
from amoe.model import ModelOutput
from amoe.router import RouterOutput
from data_modules import MVTecLOCO, Ped2, SyntheticDataModule
from data_modules.base import collate


def _outputs(model, dataset):
    """Every sample of ``dataset`` and the model's output on all of them at once (so any batching of the
    outputs gives the same numbers, whatever the batch composition)."""
    samples = [dataset[i] for i in range(len(dataset))]
    batch = collate(samples)
    model.eval()
    with torch.no_grad():
        out = model(batch["image"], batch["cls"], sparse=True)
    return samples, out


def _slice(out: ModelOutput, idx: list[int]) -> ModelOutput:
    r = out.router
    router = RouterOutput(r.logits[idx], r.probs[idx], r.weights[idx], r.topk[idx])
    return ModelOutput(router, out.expert_losses[idx], out.group_maps[idx], out.group_mass[idx], None)


def _feed(collector: TestCollector, samples, out, order: list[int], batch_size: int) -> None:
    size = collector.model.config.eval_size
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([samples[i] for i in idx])
        masks = torch.nn.functional.interpolate(batch["mask"], size=(size, size), mode="nearest")[:, 0] > 0.5
        collector.add(batch, _slice(out, idx), masks)


def _synthetic(classes=("breakfast", "pcb", "pushpins")):
    dm = SyntheticDataModule(classes=list(classes), num_train=2, num_test_good=2, num_test_per_level=1, size=64,
                             image_size=56, crop_size=56)
    dm.setup("test")
    return dm.split("test")


def test_single_process_writes_every_result_file(tmp_path):
    model = tiny_model(num_component_experts=0, eval_size=32)
    ds = _synthetic()
    samples, out = _outputs(model, ds)
    col = TestCollector("synthetic", model, map_norm="none", results_root=str(tmp_path), run_name="r")
    _feed(col, samples, out, list(range(len(ds))), batch_size=4)
    result = col.finish()
    run = tmp_path / "synthetic" / "r"
    assert col.run_dir == str(run)
    assert set(result["per_class"]) == {"breakfast", "pcb", "pushpins"}
    rows = list(csv.DictReader(open(run / "scores.csv")))
    assert len(rows) == len(ds) == 15  # one row per test image, in dataset order
    assert [r["path"] for r in rows] == [s["path"] for s in samples]
    assert set(rows[0]) == {"path", "dataset", "cls", "defect_type", "label", "score", "anomalous", "gate_patch",
                            "gate_component", "gate_global", "experts"}
    metrics = list(csv.DictReader(open(run / "metrics.csv")))
    assert [m["class"] for m in metrics] == ["breakfast", "pcb", "pushpins", "mean"]
    typed = pd.read_csv(run / "metrics.csv")  # a DataFrame with typed columns, NaN where undefined
    assert typed["image_auroc"].dtype == float and typed["class"].tolist()[-1] == "mean"
    assert typed["image_auroc"].iloc[-1] == result["mean"]["image_auroc"]
    assert pd.read_csv(run / "scores.csv")["score"].dtype == float
    assert json.loads((run / "metrics.json").read_text())["mean"]["image_auroc"] == pytest.approx(result["mean"]["image_auroc"])
    table = re.sub(r" +", " ", (run / "table.md").read_text())  # pandas pads the markdown cells
    assert "(Image-AUROC, Pixel-AUROC)" in table and "| **mean** |" in table
    mean = result["mean"]
    assert f"| **mean** | {100 * mean['image_auroc']:.1f} / {100 * mean['pixel_auroc']:.1f} |" in table
    # figures: k highest + k lowest per class, and an input/patch/component/global/final row per anomaly
    overlays = sorted(os.listdir(run / "overlays"))
    assert len(overlays) == 3 * 4 and all(n.endswith(".png") for n in overlays)
    for name in ("router_gates.png", "expert_maps.png"):
        with Image.open(run / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    with Image.open(run / "expert_maps.png") as im:  # 3 classes × 2 anomalies = 6 rows of 5 panels
        assert im.size[1] > 5 * im.size[0] / 5 * 0.9


def test_ddp_ranks_merge_to_the_single_process_result(tmp_path):
    """Two ranks with DistributedSampler's padding (15 samples -> 16: sample 0 twice) and interleaved
    shards give exactly the single-process metrics, rows and gates; rank 1 returns None."""
    model = tiny_model(eval_size=32)
    model.component_bank.build({c: model.patch_embeddings(torch.randn(2, 3, 56, 56)).flatten(0, 1)
                                for c in ("breakfast", "pcb", "pushpins")})
    ds = _synthetic()
    samples, out = _outputs(model, ds)
    n = len(ds)
    single = TestCollector("synthetic", model, map_norm="none", results_root=str(tmp_path / "one"), run_name="r")
    _feed(single, samples, out, list(range(n)), batch_size=4)
    ref = single.finish()

    padded = list(range(n)) + list(range(16 - n))  # DistributedSampler(shuffle=False) with 2 replicas
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    ranks = [TestCollector("synthetic", model, map_norm="none", results_root=str(tmp_path / "ddp"), run_name="r",
                           is_global_zero=r == 0, rank=r, world_size=2, shard_dir=str(shard_dir)) for r in (0, 1)]
    for r, col in enumerate(ranks):
        _feed(col, samples, out, padded[r::2], batch_size=3)
    assert ranks[1].finish() is None
    got = ranks[0].finish()
    assert got == ref
    assert not shard_dir.exists()  # rank 0 removes the shards once the results are written
    one, ddp = tmp_path / "one/synthetic/r", tmp_path / "ddp/synthetic/r"
    assert (ddp / "scores.csv").read_text() == (one / "scores.csv").read_text()
    assert sorted(os.listdir(ddp / "overlays")) == sorted(os.listdir(one / "overlays"))
    assert (ddp / "metrics.csv").read_text() == (one / "metrics.csv").read_text()


def test_loco_reports_logical_structural_and_auspro(mvtec_loco_root, tmp_path):
    dm = MVTecLOCO(root=str(mvtec_loco_root), image_size=56, crop_size=56, num_workers=0)
    dm.setup("test")
    assert dm.name == "mvtec_loco"  # the name that switches the collector's sPRO on
    model = tiny_model(num_component_experts=0, eval_size=32)
    samples, out = _outputs(model, dm.split("test"))
    col = TestCollector(dm.name, model, map_norm="none", results_root=str(tmp_path))
    assert col.evaluator.spro
    _feed(col, samples, out, list(range(len(samples))), batch_size=2)
    mean = col.finish()["mean"]
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "image_auroc_logical", "image_auroc_structural",
                "pixel_auspro_0.05", "pixel_auspro_0.05_logical", "pixel_auspro_0.05_structural"):
        assert key in mean, key
    assert "pixel_auspro_0.05" in (tmp_path / "mvtec_loco" / "latest" / "metrics.csv").read_text()


def test_ped2_reports_frame_auroc(ped2_root, tmp_path):
    dm = Ped2(root=str(ped2_root), image_size=56, crop_size=56, num_workers=0)
    dm.setup("test")
    model = tiny_model(num_component_experts=0, eval_size=32)
    samples, out = _outputs(model, dm.split("test"))
    col = TestCollector(dm.name, model, map_norm="none", results_root=str(tmp_path))
    _feed(col, samples, out, list(range(len(samples))), batch_size=4)
    result = col.finish()
    assert list(result["per_class"]) == ["pedestrian"]
    assert result["mean"]["frame_auroc"] == result["mean"]["image_auroc"]  # micro over all 7 frames
    rows = list(csv.DictReader(open(tmp_path / "ped2" / "latest" / "scores.csv")))
    assert len(rows) == 7
