"""Resume (SPEC §3): a run killed with SIGKILL and resumed with ``--ckpt_path last`` ends exactly where the
uninterrupted run ends: weights, both optimisers (main StableAdamW and CLUB Adam), scheduler, component
bank, normalisation statistics and thresholds, RNG (dropout, jitter) and data order."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from fixtures_ckpt import RUN_ARGS, STEPS_PER_EPOCH

from amoe.cli import main
from data_modules.base import EpochRandomSampler

REPO = Path(__file__).resolve().parents[1]

# Runs `amoe fit` and SIGKILLs itself mid-way through the second epoch (the epoch-0 checkpoint is on disk).
KILLER = """
import os, signal, sys
from amoe.module import AnomalyMoEModule

def kill_mid_epoch(self, outputs, batch, batch_idx):
    if self.global_step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)

AnomalyMoEModule.on_train_batch_end = kill_mid_epoch
from amoe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _losses(run: Path) -> dict[int, float]:
    """step -> train/loss from every CSV log of a run directory."""
    out = {}
    for f in sorted(run.glob("csv/version_*/metrics.csv")):
        with open(f) as fh:
            for row in csv.DictReader(fh):
                if row.get("train/loss"):
                    out[int(row["step"])] = float(row["train/loss"])
    return out


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=where)
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_sampler_order_is_a_function_of_seed_and_epoch():
    s = EpochRandomSampler(range(10), seed=3)
    orders = []
    for epoch in (0, 1, 2, 1):
        s.set_epoch(epoch)
        orders.append(list(s))
    assert orders[1] == orders[3] and orders[0] != orders[1] != orders[2]
    torch.manual_seed(123)  # the global RNG does not matter
    s.set_epoch(0)
    assert list(s) == orders[0] and sorted(orders[0]) == list(range(10))


def test_killed_run_resumes_to_the_same_result(tmp_path, trained_run):
    full, killed = trained_run["runs"], tmp_path / "killed"  # full: the uninterrupted run (same RUN_ARGS)

    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", KILLER.format(kill_at=STEPS_PER_EPOCH + 1), "fit", *RUN_ARGS,
         "--trainer.default_root_dir", str(killed)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = killed / "latest" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == STEPS_PER_EPOCH  # the epoch-0 checkpoint

    assert main(["fit", *RUN_ARGS, "--trainer.default_root_dir", str(killed), "--ckpt_path", "last"]) == 0

    a = torch.load(trained_run["ckpt"], weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["global_step"] == b["global_step"] == 3 * STEPS_PER_EPOCH
    _assert_same(a["state_dict"], b["state_dict"], "state_dict")  # weights, bank, normalisation stats, thresholds
    assert len(a["optimizer_states"]) == 2  # StableAdamW and the CLUB Adam
    _assert_same(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    _assert_same(a["lr_schedulers"], b["lr_schedulers"], "lr_schedulers")
    _assert_same(a["amoe"]["rng"], b["amoe"]["rng"], "rng")
    assert bool(b["state_dict"]["model.scorer.calibrated"])
    # the losses logged after the resume are those of the uninterrupted run
    la, lb = _losses(full / "latest"), _losses(killed / "latest")
    resumed = {s: v for s, v in lb.items() if s >= STEPS_PER_EPOCH}
    assert resumed and all(abs(la[s] - v) <= 1e-6 for s, v in resumed.items()), (la, lb)
