"""``amoe predict --ckpt_path X --data.path DIR``: any folder of images, whatever data module the config
names; scores.csv, overlays and masks at each image's original size, thresholds from the checkpoint."""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from fixtures_ckpt import tree_hash
from fixtures_data import noise, save, touch
from lightning.pytorch import Trainer
from PIL import Image

from amoe.cli import main
from amoe.predict import output_names, to_original

# name -> (array, PIL mode or None); sizes, channels and bit depths deliberately mixed
IMAGES = {
    "a.png": (noise(40, 50, seed=1), None),
    "a.jpg": (noise(64, 64, seed=2), None),  # same stem as a.png: outputs must not collide
    "sub/gray.bmp": (noise(30, 30, channels=1, seed=3), None),
    "sub/deep16.png": (noise(33, 20, channels=1, seed=4).astype(np.uint16) * 257, None),
    "sub/rgba.png": (np.dstack([noise(25, 25, seed=5), np.full((25, 25), 128, np.uint8)]), None),
    "sub/Prüfstück_日本.png": (noise(30, 30, seed=6), None),
    "sub/deeper/pal.png": (noise(20, 36, seed=7), "P"),
}


@pytest.fixture
def mixed_dir(tmp_path: Path) -> Path:
    root = tmp_path / "incoming images"
    for name, (arr, mode) in IMAGES.items():
        save(root / name, arr, mode)
    tifffile.imwrite(root / "sub/t.tiff", noise(20, 28, seed=8))
    touch(root / "notes.txt", b"not an image")  # ignored: not an image extension
    save(root / ".hidden/x.png", noise(seed=9))  # ignored: hidden
    return root


def _predict(ckpt, data_dir, results, *extra, config="experiments/synthetic.yaml"):
    return main(["predict", "--config", config, "--ckpt_path", str(ckpt), "--data.path", str(data_dir),
                 "--model.results_root", str(results), *extra])


def _rows(run: Path) -> list[dict]:
    with open(run / "scores.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_predict_on_a_folder_of_mixed_images(trained_run, mixed_dir, tmp_path, monkeypatch):
    before = tree_hash(mixed_dir)
    results = tmp_path / "results"
    seen = {}
    predict = Trainer.predict

    @functools.wraps(predict)  # the CLI builds its options from this signature
    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return predict(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "predict", spy)
    # synthetic.yaml names SyntheticDataModule and another geometry: --data.path and the checkpoint decide
    assert _predict(trained_run["ckpt"], mixed_dir, results) == 0
    assert seen["weights_only"] is True and seen["return_predictions"] is False  # safe load; nothing kept in memory
    run = (results / "predict" / "latest").resolve()
    rows = _rows(run)
    names = sorted([*IMAGES, "sub/t.tiff"])
    assert sorted(str(Path(r["path"]).relative_to(mixed_dir)) for r in rows) == names
    sd = torch.load(trained_run["ckpt"], weights_only=True)["state_dict"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["images"] == len(names) and summary["skipped"] == 0
    assert summary["image_threshold"] == pytest.approx(float(sd["model.scorer.image_threshold"]))
    assert summary["pixel_threshold"] == pytest.approx(float(sd["model.scorer.pixel_threshold"]))
    thr = summary["image_threshold"]
    for r in rows:
        assert r["anomalous"] == str(float(r["score"]) > thr).lower()
        assert 0.0 <= float(r["anomalous_area"]) <= 1.0
        with Image.open(r["path"]) as im:
            size = im.size
        with Image.open(run / r["overlay"]) as ov, Image.open(run / r["mask"]) as mk:
            assert ov.size == size and ov.mode == "RGB"
            assert mk.size == size and set(np.unique(np.asarray(mk)).tolist()) <= {0, 255}
    assert len({r["overlay"] for r in rows}) == len(rows)  # a.png and a.jpg do not collide
    assert sum(1 for _ in (run / "overlays").rglob("*.png")) == sum(1 for _ in (run / "masks").rglob("*.png")) == len(rows)
    assert tree_hash(mixed_dir) == before


def test_thresholds_can_be_overridden_and_runs_are_never_overwritten(trained_run, mixed_dir, tmp_path):
    results = tmp_path / "results"
    assert _predict(trained_run["ckpt"], mixed_dir, results, "--threshold=-1e9", "--pixel_threshold", "1e9") == 0
    first = (results / "predict" / "latest").resolve()
    first_files = tree_hash(first)
    rows = _rows(first)
    assert {r["anomalous"] for r in rows} == {"true"} and {float(r["anomalous_area"]) for r in rows} == {0.0}
    summary = json.loads((first / "summary.json").read_text())
    assert summary["image_threshold_source"] == "--threshold" and summary["pixel_threshold_source"] == "--pixel_threshold"
    assert _predict(trained_run["ckpt"], mixed_dir, results, "--threshold", "1e9") == 0
    second = (results / "predict" / "latest").resolve()
    assert second != first and tree_hash(first) == first_files
    assert {r["anomalous"] for r in _rows(second)} == {"false"}


def test_compiled_inference_writes_the_eager_scores(trained_run, mixed_dir, tmp_path, monkeypatch):
    """--model.compile_inference true: encoder and patch experts as frozen inductor graphs, same scores (fp32)."""
    from amoe import compile as amoe_compile
    from amoe import module

    compiled_models = []

    def spy(model, *args, **kwargs):
        out = amoe_compile.compile_for_inference(model, *args, **kwargs)
        compiled_models.append(amoe_compile.is_compiled(model))
        return out

    monkeypatch.setattr(module, "compile_for_inference", spy)
    results = tmp_path / "results"
    assert _predict(trained_run["ckpt"], mixed_dir, results) == 0
    eager = _rows((results / "predict" / "latest").resolve())
    assert compiled_models == []
    assert _predict(trained_run["ckpt"], mixed_dir, results, "--model.compile_inference", "true") == 0
    assert compiled_models == [True]
    compiled = _rows((results / "predict" / "latest").resolve())
    assert [r["path"] for r in compiled] == [r["path"] for r in eager] and len(eager) == len(IMAGES) + 1  # + t.tiff
    for a, b in zip(eager, compiled):
        assert float(b["score"]) == pytest.approx(float(a["score"]), rel=1e-5, abs=1e-5), a["path"]


def test_predict_needs_a_checkpoint(mixed_dir, tmp_path, capsys):
    code = main(["predict", "--config", "experiments/smoke.yaml", "--data.path", str(mixed_dir),
                 "--trainer.default_root_dir", str(tmp_path / "runs")])
    assert code == 2 and "--ckpt_path" in capsys.readouterr().err


def test_thresholds_are_for_predict_only(tmp_path, capsys):
    code = main(["fit", "--config", "experiments/smoke.yaml", "--trainer.default_root_dir", str(tmp_path / "runs"),
                 "--threshold", "0.5"])
    assert code == 2 and "amoe predict" in capsys.readouterr().err


def test_output_names_mirror_the_tree_without_collisions():
    paths = ["/d/a.png", "/d/a.JPG", "/d/sub/b.tif", "/d/sub/c.bmp"]
    names = output_names(paths, ["a.png", "a.JPG", "sub/b.tif", "sub/c.bmp"])
    assert names == {"/d/a.png": "a_png.png", "/d/a.JPG": "a_jpg.png", "/d/sub/b.tif": "sub/b.png",
                     "/d/sub/c.bmp": "sub/c.png"}
    assert output_names(["/x/y/p.png", "/x/z/q.jpg"]) == {"/x/y/p.png": "y/p.png", "/x/z/q.jpg": "z/q.png"}


def test_map_goes_back_onto_the_centre_crop_of_the_original_image():
    amap = np.ones((8, 8), np.float32)
    full, covered = to_original(amap, (100, 60), image_size=64, crop_size=48)  # crop = the central 3/4
    assert full.shape == covered.shape == (100, 60)
    assert covered[50, 30] and not covered[5, 30] and not covered[50, 2]
    assert covered.sum() == (88 - 12) * (52 - 8) and np.allclose(full[covered], 1) and (full[~covered] == 0).all()
    full, covered = to_original(amap, (30, 40), image_size=56, crop_size=56)
    assert covered.all() and np.allclose(full, 1)


def test_data_options_of_another_module_are_refused_with_a_folder(trained_run, mixed_dir, tmp_path, capsys):
    code = main(["predict", "--config", "experiments/smoke.yaml", "--ckpt_path", str(trained_run["ckpt"]),
                 "--data.path", str(mixed_dir),
                 "--data.num_train", "5", "--trainer.default_root_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "--data.num_train does not apply" in err and "--data.skip_bad_files" in err


def test_predict_without_a_path_scores_the_configured_test_split(trained_run, tmp_path):
    # the smoke config's synthetic data: images rendered on the fly (no files), overlays still written
    assert main(["predict", "--config", "experiments/smoke.yaml", "--ckpt_path", str(trained_run["ckpt"]),
                 "--model.results_root", str(tmp_path / "results"), "--trainer.default_root_dir", str(tmp_path / "runs")]) == 0
    run = (tmp_path / "results" / "predict" / "latest").resolve()
    rows = _rows(run)
    assert len(rows) == 2 * (4 + 3 * 2) and all(r["path"].startswith("synthetic://") for r in rows)
    assert all((run / r["overlay"]).is_file() and (run / r["mask"]).is_file() for r in rows)


def test_ranks_score_files_merge_once_per_path_sorted(tmp_path):
    """DDP predict: rank files are merged with pandas, a padded repeat kept once, cells unchanged."""
    from types import SimpleNamespace

    from amoe.predict import FIELDS, PredictionWriter

    w = PredictionWriter(results_root=str(tmp_path))
    w.run_dir, w.skipped = str(tmp_path), ["bad, file.png: unreadable"]
    w.thresholds, w.sources = {"image": 0.5, "pixel": float("nan")}, {"image": "x", "pixel": "y"}
    header = ",".join(FIELDS) + "\n"
    (tmp_path / "scores.rank0.csv").write_text(header + '"b,c.png",0.7,true,,overlays/b.png,\na.png,0.1,false,,overlays/a.png,\n')
    (tmp_path / "scores.rank1.csv").write_text(header + "z.png,1e-07,false,,overlays/z.png,\na.png,0.1,false,,overlays/a.png,\n")
    strategy = SimpleNamespace(reduce=lambda t, reduce_op: t, barrier=lambda *a: None)
    w.on_predict_end(SimpleNamespace(strategy=strategy, is_global_zero=True, world_size=2), None)
    assert (tmp_path / "scores.csv").read_text() == header + (
        'a.png,0.1,false,,overlays/a.png,\n"b,c.png",0.7,true,,overlays/b.png,\nz.png,1e-07,false,,overlays/z.png,\n')
    assert not list(tmp_path.glob("scores.rank*.csv"))
    assert list(csv.DictReader(open(tmp_path / "skipped.csv"))) == [{"problem": "bad, file.png: unreadable"}]
