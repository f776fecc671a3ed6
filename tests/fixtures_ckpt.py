"""Shared by the predict, bad-input and resume tests: a trained smoke-sized checkpoint (trained once per
session) and a content hash of an input tree.

The run is the uninterrupted reference of tests/test_resume.py: 2 synthetic classes × 5 training images
(1 held out per class for calibration) -> 8 images, batch 4 -> 2 steps per epoch, 3 epochs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

__all__ = ["trained_run"]

STEPS_PER_EPOCH = 2
RUN_ARGS = ["--config", "experiments/smoke.yaml", "--data.num_train", "5", "--trainer.max_steps", str(3 * STEPS_PER_EPOCH)]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> dict[str, Path]:
    """{"runs": default_root_dir, "ckpt": the final checkpoint (read it, never modify it), "results": results_root}."""
    from amoe.cli import main

    base = tmp_path_factory.mktemp("trained")
    runs, results = base / "runs", base / "results"
    assert main(["fit", *RUN_ARGS, "--trainer.default_root_dir", str(runs), "--model.results_root", str(results)]) == 0
    return {"runs": runs, "ckpt": (runs / "latest" / "checkpoints" / "last.ckpt").resolve(), "results": results}


def tree_hash(root: Path) -> dict[str, str]:
    """sha256 of every file under root (to check that nothing the user gave is modified or deleted)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}
