"""Bad input, end to end (docs/BAD_INPUT.md): every case stops with a message that names the file or setting
and says what to do, or (``skip_bad_files: true``) goes on with a logged list and count. Nothing the user
gave is modified or deleted (sha256 of the input tree before/after).

Already covered at the data-module level, not repeated here: unreadable files per kind (zero-byte,
truncated, not an image) raised or skipped with a count, missing/stray masks, empty class/type folders
(tests/test_data_base.py: test_unreadable_file_is_named_or_skipped_with_count,
test_pairing_problems_raise_or_skip); missing root of every dataset (test_missing_root_names_dataset_layout_and_page);
gray/16-bit/RGBA/palette decoding (test_read_rgb_gray_16bit_rgba_palette); predict-path errors
(tests/test_data_folder.py); encoder weights of another model, pickled weights (tests/test_encoder.py).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fixtures_ckpt import tree_hash
from fixtures_data import box, noise, save, small, touch
from fixtures_model import tiny_config

from amoe.checkpoint import CheckpointError
from amoe.cli import main
from amoe.encoder import FrozenEncoder
from amoe.module import AnomalyMoEModule
from data_modules.folder import Folder


def folder_config(tmp_path: Path, root: Path, **init) -> str:
    """A config that swaps smoke.yaml's synthetic data for a Folder tree (smoke geometry: 56 px)."""
    path = tmp_path / "folder.yaml"
    init = {"root": str(root), "classes": None, "image_size": 56, "crop_size": 56, "batch_size": 2, "eval_batch_size": 4,
            "num_workers": 0, **init}
    path.write_text(yaml.safe_dump({"data": {"class_path": "data_modules.folder.Folder", "init_args": init}}))
    return str(path)


def own_tree(root: Path, masks: bool = True) -> Path:
    """A small own-data tree: train/good 3, test/good 1, test/scratch 2 (+ ground_truth when ``masks``)."""
    for i in range(3):
        save(root / "train/good" / f"{i}.png", noise(seed=i))
    save(root / "test/good/g.png", noise(seed=10))
    for i in range(2):
        save(root / "test/scratch" / f"s{i}.png", noise(seed=20 + i))
        if masks:
            save(root / "ground_truth/scratch" / f"s{i}_mask.png", box())
    return root


def _fit(tmp_path, *args):
    return main(["fit", "--config", "experiments/smoke.yaml", "--trainer.default_root_dir", str(tmp_path / "runs"), *args])


def _ckpts(tmp_path) -> list[Path]:
    return sorted((tmp_path / "runs").rglob("*.ckpt"))


# --- unreadable files ----------------------------------------------------------------------------
@pytest.fixture
def bad_dir(tmp_path) -> Path:
    root = tmp_path / "incoming"
    save(root / "0_good.png", noise(seed=1))
    good = save(root / "5_good.jpg", noise(seed=2))
    data = (root / "0_good.png").read_bytes()
    touch(root / "1_truncated.png", data[: len(data) // 3])
    touch(root / "2_empty.png")
    touch(root / "3_text.jpg", b"<html>not an image</html>")
    assert good.is_file()
    return root


def test_predict_names_an_unreadable_image_or_skips_with_a_list(trained_run, bad_dir, tmp_path, capsys, caplog):
    before = tree_hash(bad_dir)
    args = ["predict", "--config", "experiments/smoke.yaml", "--ckpt_path", str(trained_run["ckpt"]),
            "--data.path", str(bad_dir), "--model.results_root", str(tmp_path / "results")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(bad_dir / "1_truncated.png") in err and "skip_bad_files" in err
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--data.skip_bad_files", "true"]) == 0
    assert "skipped 3 file(s)" in caplog.text
    run = (tmp_path / "results" / "predict" / "latest").resolve()
    with open(run / "scores.csv", newline="") as f:
        assert sorted(Path(r["path"]).name for r in csv.DictReader(f)) == ["0_good.png", "5_good.jpg"]
    skipped = (run / "skipped.csv").read_text()
    for name, why in (("1_truncated.png", "truncated or not an image"), ("2_empty.png", "zero-byte"),
                      ("3_text.jpg", "cannot be read")):
        assert name in skipped and why in skipped
    assert tree_hash(bad_dir) == before


def test_unreadable_training_image_stops_fit_naming_it(tmp_path, capsys):
    root = own_tree(tmp_path / "parts")
    bad = root / "train/good/1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    before = tree_hash(root)
    assert _fit(tmp_path, "--config", folder_config(tmp_path, root)) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "skip_bad_files" in err
    assert _ckpts(tmp_path) == [] and tree_hash(root) == before


# --- layout ----------------------------------------------------------------------------------------
def test_missing_mask_of_an_anomalous_image_is_named(trained_run, tmp_path, capsys):
    root = own_tree(tmp_path / "parts")
    (root / "ground_truth/scratch/s1_mask.png").unlink()
    before = tree_hash(root)
    code = main(["test", "--config", "experiments/smoke.yaml", "--config", folder_config(tmp_path, root),
                 "--ckpt_path", str(trained_run["ckpt"]), "--model.results_root", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2 and "test/scratch/s1.png: anomalous test image without mask" in err and "Restore the mask" in err
    assert tree_hash(root) == before


def test_mask_of_another_size_is_resized_with_a_warning(tmp_path, caplog):
    root = own_tree(tmp_path / "parts")
    save(root / "ground_truth/scratch/s0_mask.png", box(12, 12, rows=slice(4, 8), cols=slice(4, 8)))  # image is 24×24
    ds = small(Folder, root=str(root)).split("test")
    with caplog.at_level(logging.WARNING):
        sample = next(ds[i] for i, r in enumerate(ds.records) if r.path.endswith("s0.png"))
    assert "s0_mask.png" in caplog.text and "differs from image size" in caplog.text and "resized" in caplog.text
    assert sample["mask"].shape == (1, 32, 32) and 0 < sample["mask"].sum() < 32 * 32


def test_empty_class_folder_is_named(tmp_path, capsys):
    root = tmp_path / "own"
    own_tree(root / "widget")
    (root / "gadget/train/good").mkdir(parents=True)
    assert _fit(tmp_path, "--config", folder_config(tmp_path, root)) == 2
    err = capsys.readouterr().err
    assert "gadget/train/good: empty class folder" in err and _ckpts(tmp_path) == []


def test_missing_root_is_named_with_the_layout(tmp_path, capsys):
    missing = tmp_path / "data" / "my_images"
    # demo.yaml wants pretrained weights (offline: an error); the data is checked first
    code = main(["fit", "--config", "experiments/demo.yaml", "--data.root", str(missing),
                 "--trainer.default_root_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and "does not exist" in err and "train/good" in err and "--data.root" in err


def test_root_without_the_layout_is_explained(tmp_path, capsys):
    root = tmp_path / "loose"
    save(root / "a.png", noise())
    assert _fit(tmp_path, "--config", folder_config(tmp_path, root)) == 2
    err = capsys.readouterr().err
    assert "no class folders found" in err and str(root) in err and "train/good" in err


def test_gray_16bit_rgba_images_under_a_non_ascii_root_train(tmp_path):
    root = tmp_path / "Prüfstück_日本"
    save(root / "train/good/gray.png", noise(channels=1, seed=1))
    save(root / "train/good/deep.png", noise(channels=1, seed=2).astype(np.uint16) * 257)
    save(root / "train/good/rgba.png", np.dstack([noise(seed=3), np.zeros((24, 24), np.uint8)]))
    save(root / "train/good/ß.tif", noise(seed=4))
    dm = small(Folder, root=str(root), calib_fraction=0)
    batches = list(dm.train_dataloader())
    images = torch.cat([b["image"] for b in batches])
    assert images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()


# --- numerical problems ---------------------------------------------------------------------------
def test_nan_features_stop_training_at_that_step_without_a_nan_checkpoint(tmp_path, monkeypatch, capsys):
    poison = {"on": False}
    forward = FrozenEncoder.forward

    def nan_forward(self, x):
        out = forward(self, x)
        return out._replace(layers=[t.clone().fill_(math.nan) for t in out.layers]) if poison["on"] else out

    step = AnomalyMoEModule.training_step

    def training_step(self, batch, batch_idx):
        poison["on"] = self.global_step == 5
        try:
            return step(self, batch, batch_idx)
        finally:
            poison["on"] = False

    monkeypatch.setattr(FrozenEncoder, "forward", nan_forward)
    monkeypatch.setattr(AnomalyMoEModule, "training_step", training_step)
    assert _fit(tmp_path, "--trainer.max_steps", "8") == 1  # smoke: 4 steps per epoch
    err = capsys.readouterr().err
    assert "step 5" in err and "nan" in err.lower() and "no checkpoint of this step was written" in err
    ckpts = _ckpts(tmp_path)
    assert ckpts, "the epoch-0 checkpoint (before the NaN) is kept"
    for p in ckpts:
        ck = torch.load(p, weights_only=True)
        assert ck["global_step"] < 5
        assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if torch.is_tensor(v) and v.is_floating_point())


def test_a_checkpoint_of_nan_weights_is_refused():
    module = AnomalyMoEModule(tiny_config())
    with torch.no_grad():
        next(module.model.router.parameters()).fill_(math.inf)
    with pytest.raises(FloatingPointError, match="refusing to write this checkpoint"):
        module.on_save_checkpoint({})


# --- weights and checkpoints ----------------------------------------------------------------------
def test_encoder_weights_of_another_model_are_refused_by_the_cli(tmp_path, capsys):
    other = FrozenEncoder("vit_small_patch14_reg4_dinov2", (0, 1), 56, False, None, {"embed_dim": 48, "depth": 2, "num_heads": 2})
    path = tmp_path / "other.pth"
    torch.save(other.vit.state_dict(), path)
    assert _fit(tmp_path, "--model.config.pretrained", "true", "--model.config.weights", str(path)) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "does not fit encoder" in err and "--model.config.encoder" in err


def test_checkpoint_of_another_model_config_is_refused(trained_run, tmp_path, capsys):
    ckpt = str(trained_run["ckpt"])
    code = main(["test", "--config", "experiments/smoke.yaml", "--ckpt_path", ckpt,
                 "--model.config.num_components", "5", "--trainer.default_root_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "--model.config.num_components 5: the checkpoint has 3" in err
    with pytest.raises(CheckpointError) as e:
        AnomalyMoEModule.load_from_checkpoint(ckpt, config=tiny_config(num_components=5, num_patch_experts=3))
    assert "num_components: checkpoint 3, current 5" in str(e.value) and "num_patch_experts: checkpoint 2, current 3" in str(e.value)
    module = AnomalyMoEModule.load_from_checkpoint(ckpt)  # weights_only=True by default
    assert bool(module.model.scorer.calibrated) and module.model.component_bank.is_built


@pytest.mark.parametrize("kind", ["pickled", "truncated", "empty", "not_lightning", "not_amoe"])
def test_unusable_checkpoint_files_are_explained(trained_run, tmp_path, capsys, kind):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "pickled":
        torch.save({"state_dict": {}, "hyper_parameters": {"config": {}}, "evil": argparse.Namespace(x=1)}, path)
    elif kind == "truncated":
        data = trained_run["ckpt"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_lightning":  # e.g. an encoder weights file given as --ckpt_path
        torch.save(FrozenEncoder("vit_small_patch14_reg4_dinov2", (0,), 56, False, None, {"embed_dim": 32, "depth": 1,
                                                                                          "num_heads": 2}).vit.state_dict(), path)
    else:
        torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, path)
    code = main(["predict", "--config", "experiments/smoke.yaml", "--ckpt_path", str(path), "--data.path", str(tmp_path),
                 "--trainer.default_root_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    words = {"pickled": "pickled Python objects", "truncated": "truncated or not a checkpoint", "empty": "empty file",
             "not_lightning": "not a Lightning checkpoint", "not_amoe": "not written by amoe"}[kind]
    assert code == 2 and str(path) in err and words in err


def test_checkpoint_written_before_a_setting_existed_loads_with_its_default(trained_run, tmp_path):
    """A checkpoint without a later-added model setting (router_input) behaves as it was trained: the default."""
    ck = torch.load(trained_run["ckpt"], map_location="cpu", weights_only=True)
    del ck["hyper_parameters"]["config"]["router_input"]
    old = tmp_path / "old.ckpt"
    torch.save(ck, old)
    from amoe.checkpoint import saved_config

    assert saved_config(torch.load(old, weights_only=True))["router_input"] == "cls"
    module = AnomalyMoEModule.load_from_checkpoint(str(old))
    assert module.config.router_input == "cls"
