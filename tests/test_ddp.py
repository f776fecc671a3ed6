"""DDP on CPU (gloo, 2 processes): fit, then test on 2 processes and on 1 process with the same checkpoint.
The test metrics (metrics.json and the CSV logger's, whose image metrics come from torchmetrics), per-image
scores and figures must be identical: no sample is lost or counted twice (15
test images on 2 ranks: DistributedSampler pads one duplicate), and the state is gathered once on rank 0.

Evaluation batches of 1 make every forward pass the same computation on both sides, so the comparison is
exact; with larger batches CPU kernels round differently by batch composition (measured: ≤ 5e-6 on pixel
metrics, image AUROC unchanged)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def amoe(*args: str, env: dict) -> None:
    proc = subprocess.run([sys.executable, "-m", "amoe.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_exactly(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("AMOE_RUN_DIR", "LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env["WANDB_MODE"] = "disabled"
    runs, results = tmp_path / "runs", tmp_path / "results"
    common = ["--config", "experiments/smoke.yaml", "--trainer.default_root_dir", str(runs), "--model.results_root",
              str(results), "--data.classes", "[breakfast, pcb, pushpins]", "--data.num_test_good", "2",
              "--data.num_test_per_level", "1", "--data.eval_batch_size", "1"]
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp_find_unused_parameters_true"]
    amoe("fit", *common, *ddp, env=env)
    assert sorted(os.listdir(runs)) == [os.readlink(runs / "latest"), "latest"]  # rank 1 reused rank 0's run dir
    assert (runs / "latest" / "checkpoints" / "last.ckpt").is_file()
    amoe("test", *common, *ddp, "--ckpt_path", "last", "--model.run_name", "ddp", env=env)
    amoe("test", *common, "--ckpt_path", "last", "--model.run_name", "single", env=env)

    two, one = results / "synthetic" / "ddp", results / "synthetic" / "single"
    m2, m1 = json.loads((two / "metrics.json").read_text()), json.loads((one / "metrics.json").read_text())
    assert set(m1["per_class"]) == {"breakfast", "pcb", "pushpins"}
    assert m2 == m1
    rows = list(csv.DictReader(open(two / "scores.csv")))
    assert len(rows) == 15 and len({r["path"] for r in rows}) == 15  # the padded duplicate is gone
    assert (two / "scores.csv").read_text() == (one / "scores.csv").read_text()
    assert sorted(os.listdir(two / "overlays")) == sorted(os.listdir(one / "overlays"))
    assert not [d for d in os.listdir(runs / "latest") if d.startswith("eval_shards_")]  # shards cleaned up
    # the CSV logs: torchmetrics' image metrics (synced over both ranks, the duplicate dropped) equal 1 process
    logs = sorted((f for f in (runs / "latest" / "csv").glob("version_*/metrics.csv") if "test/mean/image_auroc" in f.read_text()),
                  key=lambda f: int(f.parent.name.split("_")[1]))
    assert len(logs) == 2  # the DDP test run, then the single-process one
    log2, log1 = (pd.read_csv(f).iloc[-1] for f in logs)
    for cls, metrics in m1["per_class"].items():
        for k in ("image_auroc", "image_ap", "image_f1max"):
            assert log2[f"test/synthetic/{cls}/{k}"] == log1[f"test/synthetic/{cls}/{k}"] == pytest.approx(metrics[k], rel=0, abs=1e-12)
    keys = [k for k in log1.index if k.startswith("test/")]
    assert keys and log2[keys].equals(log1[keys])
