"""W&B: `--wandb offline` on the smoke config logs hyper-parameters, losses, gates, the per-class test metrics,
the figures and the metrics table into offline run directories (read back from the .wandb transaction log),
with no network and no prompt; the mode selection never asks for a login."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from amoe.wandb_mode import wandb_wanted

REPO = Path(__file__).resolve().parents[1]


def wandb_records(path: str) -> list:
    """The records of a .wandb file (LevelDB-style log: 7-byte header, 32 KiB blocks, chunked records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def summarise(records) -> dict:
    history, config, run = {}, {}, None
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            for it in r.history.item:
                history.setdefault(it.key or "/".join(it.nested_key), []).append(json.loads(it.value_json))
        elif kind == "config":
            for it in r.config.update:
                config[it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
        elif kind == "run":
            run = r.run
    return {"history": history, "config": config, "run": run}


@pytest.fixture(scope="module")
def offline_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "AMOE_RUN_DIR")}
    env.update(WANDB_SILENT="true", WANDB_DIR=str(tmp), WANDB_CONFIG_DIR=str(tmp / "cfg"), NETRC=str(tmp / "netrc"))
    common = ["--config", "experiments/smoke.yaml", "--trainer.default_root_dir", str(tmp / "runs"),
              "--model.results_root", str(tmp / "results"), "--wandb", "offline", "--wandb_group", "g-test"]
    for sub in (["fit"], ["test", "--ckpt_path", "last"]):
        proc = subprocess.run([sys.executable, "-m", "amoe.cli", *sub, *common], cwd=REPO, env=env,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted(glob.glob(str(tmp / "runs" / "latest" / "wandb" / "offline-run-*")))
    assert len(runs) == 2, runs  # the fit run and the test run, both in the training run's directory
    results = json.loads((tmp / "results" / "synthetic" / "latest" / "metrics.json").read_text())
    return [Path(r) for r in runs], results


@pytest.mark.slow  # the offline fit + test subprocesses take 41-46 s on 2 cores (make test-all)
def test_fit_run_holds_hparams_losses_and_gates(offline_runs):
    runs, _ = offline_runs
    s = summarise(wandb_records(glob.glob(str(runs[0] / "run-*.wandb"))[0]))
    assert s["run"].run_group == "g-test" and s["run"].job_type == "fit"
    assert s["config"]["lr"] == 5e-4 and s["config"]["config"]["num_patch_experts"] == 2
    for key in ("train/loss", "train/loss_patch", "train/esb_total", "train/eir", "gates/patch", "gates/global_2"):
        assert key in s["history"], key
    assert len(s["history"]["train/loss"]) == 4  # max_steps 4, log_every_n_steps 1


@pytest.mark.slow  # the offline fit + test subprocesses take 41-46 s on 2 cores (make test-all)
def test_test_run_holds_metrics_figures_and_table(offline_runs):
    runs, results = offline_runs
    run = runs[1]
    s = summarise(wandb_records(glob.glob(str(run / "run-*.wandb"))[0]))
    assert s["run"].run_group == "g-test" and s["run"].job_type == "test"
    for cls, metrics in [*((f"synthetic/{c}", m) for c, m in results["per_class"].items()), ("mean", results["mean"])]:
        for k, v in metrics.items():
            assert s["history"][f"test/{cls}/{k}"] == [pytest.approx(v, abs=1e-6)], (cls, k)
    media = run / "files" / "media"
    for name in ("router_gates", "expert_maps", "overlays"):
        assert glob.glob(str(media / "images" / "test" / f"{name}_*.png")), name
    (table,) = glob.glob(str(media / "table" / "test" / "metrics_per_class_*.table.json"))
    t = json.loads(Path(table).read_text())
    col = t["columns"].index("image_auroc")
    assert [r[0] for r in t["data"]] == [*results["per_class"], "mean"]
    assert t["data"][-1][col] == pytest.approx(results["mean"]["image_auroc"])


def test_mode_selection_never_prompts(monkeypatch, tmp_path):
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_wanted("auto") == "offline"
    assert wandb_wanted("online") == "offline"  # no credentials: offline instead of a login prompt
    assert wandb_wanted("disabled") is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_wanted("auto") is None and wandb_wanted("offline") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_wanted("auto") == "online" and wandb_wanted("online") == "online"
