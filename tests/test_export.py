"""``amoe export`` (TorchScript, ONNX, OpenVINO) and the exported model's parity with the checkpoint:
image scores within 1e-4, maps within 1e-3, identical routing, on mixed PNG/JPEG/grayscale images;
``amoe predict --model DIR`` writes the same scores.csv and masks as ``amoe predict --ckpt_path``."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_export import MIXED
from PIL import Image

from amoe.cli import main
from amoe.export import load_model
from amoe.inference import Inferencer
from data_modules.base import Transform, read_rgb

RUNTIMES = [("torchscript", "torchscript"), ("onnx", "onnxruntime"), ("onnx", "openvino"), ("openvino", "openvino")]


def test_export_writes_graphs_and_metadata(exported):
    ckpt = exported["ckpt"]
    sd = torch.load(ckpt, weights_only=True)
    model, _ = load_model(str(ckpt))
    for fmt, ext in (("onnx", ".onnx"), ("torchscript", ".pt"), ("openvino", ".xml")):
        meta = json.loads((exported[fmt] / "metadata.json").read_text())
        assert meta["format"] == fmt and meta["dtype"] == "float32"
        g = meta["graphs"]
        assert len(g["experts"]) == meta["num_experts"] == model.config.num_experts  # one graph per expert
        assert [e["group"] for e in g["experts"]] == ["patch"] * 2 + ["component"] * 2 + ["global"] * 2
        for spec in [g["front"], *g["experts"], g["score"]]:
            assert spec["file"].endswith(ext) and (exported[fmt] / spec["file"]).is_file()
        assert meta["checkpoint_sha256"] == hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()
        assert meta["thresholds"]["image"] == pytest.approx(float(sd["state_dict"]["model.scorer.image_threshold"]))
        assert meta["thresholds"]["pixel"] == pytest.approx(float(sd["state_dict"]["model.scorer.pixel_threshold"]))
        assert "quantile" in meta["thresholds"]["image_source"]
        assert meta["map_normalisation"]["lo"] == pytest.approx(model.scorer.lo.tolist())
        assert meta["map_normalisation"]["hi"] == pytest.approx(model.scorer.hi.tolist())
        assert meta["component_classes"] == model.component_bank.classes == ["breakfast", "pushpins"]
        assert (meta["image_size"], meta["crop_size"]) == (56, 56) and meta["preprocessing"]["channel_order"] == "RGB"
        assert meta["preprocessing"]["mean"] == [0.485, 0.456, 0.406]


def _checkpoint_outputs(ckpt: Path, paths: list[str], cls: str):
    model, meta = load_model(str(ckpt))
    t = Transform(**meta["data"])
    x = torch.stack([t.image(read_rgb(p)) for p in paths])
    with torch.no_grad():
        out = model(x, [cls] * len(paths), sparse=True)
        maps, scores = model.score(out)
    return x.numpy(), maps.numpy(), scores.numpy(), out.router.topk.numpy()


def test_checkpoint_torchscript_onnxruntime_openvino_parity(exported, mixed_images):
    paths = [str(mixed_images / n) for n in MIXED]
    x, maps, scores, topk = _checkpoint_outputs(exported["ckpt"], paths, mixed_images.name)
    worst = {}
    for fmt, rt in RUNTIMES:
        inf = Inferencer(exported[fmt], rt)
        xi = np.stack([inf.preprocess(p) for p in paths])
        assert np.abs(xi - x).max() < 1e-5  # the inferencer's cv2/numpy preprocessing = the data module's
        got = inf.forward(xi, mixed_images.name)
        np.testing.assert_array_equal(got["topk"], topk)  # identical routing
        worst[f"{fmt}/{rt}"] = (float(np.abs(got["scores"] - scores).max()), float(np.abs(got["maps"] - maps).max()))
        assert worst[f"{fmt}/{rt}"][0] < 1e-4 and worst[f"{fmt}/{rt}"][1] < 1e-3
        one = inf.forward(xi[2:3], mixed_images.name)  # dynamic batch: another batch size, same result
        assert abs(float(one["scores"][0]) - float(scores[2])) < 1e-4
    print("largest |score diff|, |map diff| vs checkpoint:", worst)


def _rows(run: Path) -> dict[str, dict]:
    with open(run / "scores.csv", newline="", encoding="utf-8") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def test_predict_with_the_exported_model_equals_the_checkpoint(exported, mixed_images, tmp_path):
    results = tmp_path / "results"
    assert main(["predict", "--config", "experiments/smoke.yaml", "--ckpt_path", str(exported["ckpt"]),
                 "--data.path", str(mixed_images), "--model.results_root", str(results), "--model.run_name", "ckpt"]) == 0
    ref = _rows(results / "predict" / "ckpt")
    assert len(ref) == len(MIXED)
    for fmt in ("onnx", "openvino"):
        assert main(["predict", "--model", str(exported[fmt]), "--data.path", str(mixed_images),
                     "--model.results_root", str(results), "--model.run_name", fmt]) == 0
        run = results / "predict" / fmt
        rows = _rows(run)
        assert set(rows) == set(ref)
        for path, r in rows.items():
            assert abs(float(r["score"]) - float(ref[path]["score"])) < 1e-4
            assert r["anomalous"] == ref[path]["anomalous"] and r["overlay"] == ref[path]["overlay"]
            with Image.open(run / r["mask"]) as a, Image.open(results / "predict" / "ckpt" / ref[path]["mask"]) as b:
                assert (np.asarray(a) != np.asarray(b)).mean() < 1e-3
        summary = json.loads((run / "summary.json").read_text())
        assert summary["images"] == len(MIXED) and summary["model"] == str(exported[fmt].resolve())
        assert "quantile" in summary["image_threshold_source"]


def test_bf16_export_is_refused(exported, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["export", "--ckpt_path", str(exported["ckpt"]), "--format", "onnx", "--dtype", "bf16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "float32" in err and "bf16" in err and not out.exists()


def test_export_never_overwrites_and_names_a_bad_checkpoint(exported, tmp_path, capsys):
    assert main(["export", "--ckpt_path", str(exported["ckpt"]), "--format", "torchscript", "--out", str(exported["onnx"])]) == 2
    assert "not empty" in capsys.readouterr().err and (exported["onnx"] / "front.onnx").is_file()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", "--ckpt_path", str(bad), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert str(bad) in capsys.readouterr().err


@pytest.mark.slow
def test_bench_runtime_reports_both_runtimes_next_to_torch(capsys):
    assert main(["bench", "--runtime", "onnxruntime,openvino", "--quick", "--batch", "2", "--iters", "1"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for rt in ("onnxruntime", "openvino"):
        assert res[f"ms_per_img_{rt}"] > 0 and res[f"speedup_{rt}_over_torch"] > 0
        assert res[f"routing_identical_{rt}"] and res[f"max_score_diff_{rt}"] < 1e-4
    assert res["ms_per_img_torch"] > 0
