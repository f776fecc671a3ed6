"""Checkpoints: safe loading, compatibility checks, RNG state for exact resume.

Everything amoe writes into a checkpoint is a tensor, a number, a string, or a list/dict of those, so
every checkpoint loads with ``torch.load(..., weights_only=True)`` (no pickled objects, no code runs
on load). A checkpoint trained with other architecture settings than the current model is refused
with a message naming the settings that differ, instead of a wall of missing/mis-shaped keys.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
from typing import Any

import numpy as np
import torch

from amoe.model import AnomalyMoEConfig

# Model settings that fix the shapes or the meaning of the trained weights. Scoring settings
# (eval_size, blur, top_ratio, map_norm) may differ between training and evaluation.
ARCH_KEYS = (
    "encoder", "encoder_arch", "img_size", "layers", "fuse_groups",
    "num_patch_experts", "num_component_experts", "num_global_experts", "top_k", "router_hidden", "router_input",
    "decoder_depth", "decoder_heads", "num_components", "component_hidden", "component_bottleneck",
    "global_expert", "global_width", "global_code", "student_channels",
)

# Checkpoint entry (top level) written by AnomalyMoEModule.on_save_checkpoint.
AMOE_KEY = "amoe"


class SettingsError(RuntimeError):
    """A combination of settings (or of settings and a checkpoint) the user must change; the message says how."""


class CheckpointError(SettingsError):
    """A checkpoint that cannot be used: unreadable, unsafe, or trained with other model settings."""


def _plain(v: Any) -> Any:
    """Tuples -> lists (recursively) so that a YAML/argparse value compares equal to a stored one."""
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def config_mismatches(saved: dict[str, Any], current: dict[str, Any], keys=ARCH_KEYS) -> list[tuple[str, Any, Any]]:
    """[(key, checkpoint value, current value)] for every architecture setting that differs."""
    return [(k, saved.get(k), current.get(k)) for k in keys if _plain(saved.get(k)) != _plain(current.get(k))]


def mismatch_message(source: str, diffs: list[tuple[str, Any, Any]]) -> str:
    lines = "\n".join(f"  model.config.{k}: checkpoint {a!r}, current {b!r}" for k, a, b in diffs)
    return (
        f"{source} was trained with other model settings than the current model:\n{lines}\n"
        "Use the config the checkpoint was trained with (or drop these overrides), or train a new model."
    )


def safe_load(path: str) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that say what is wrong with the file."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist.")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint '{path}' is an empty file (a copy or save that did not finish).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint '{path}' holds pickled Python objects, which amoe refuses to load (weights_only=True: "
            f"loading them could run arbitrary code). It was not written by amoe. ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # truncated zip, not a torch file at all
        raise CheckpointError(
            f"checkpoint '{path}' cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "it is truncated or not a checkpoint. Use another checkpoint (e.g. an earlier one of the run)."
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"'{path}' is not a Lightning checkpoint (no 'state_dict'); pass an amoe .ckpt file.")
    return ckpt


def saved_config(ckpt: dict[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """The model config stored in a checkpoint's hyper-parameters (refuses non-amoe checkpoints)."""
    cfg = (ckpt.get("hyper_parameters") or {}).get("config")
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):  # merged in by load_from_checkpoint(config=...)
        cfg = dataclasses.asdict(cfg)
    if not isinstance(cfg, dict):
        raise CheckpointError(
            f"{source} has no amoe model config in its hyper-parameters: it was not written by amoe's "
            "AnomalyMoEModule. Pass a checkpoint of `amoe fit`."
        )
    # settings added after the checkpoint was written take their defaults (the behaviour it was trained with)
    defaults = dataclasses.asdict(AnomalyMoEConfig())
    return {**{k: v for k, v in defaults.items() if k not in cfg}, **cfg}


# --- RNG state ---------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Global torch (CPU and CUDA), numpy and python RNG states as tensors / plain values."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_version), "state": [int(x) for x in py_state], "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu().to(torch.uint8) for s in state["cuda"]])


# --- loop state --------------------------------------------------------------------------------
def close_epoch(checkpoint: dict[str, Any]) -> None:
    """Store an epoch-end checkpoint as the state at the start of the next epoch.

    Lightning writes epoch-end checkpoints from ``on_train_epoch_end``, when the epoch is "processed" but
    not yet "completed". Resuming such a state, Lightning 2.6 re-enters the end of the finished epoch and,
    without a validation loop, runs one extra batch of a new epoch before starting the next one, so the
    resumed run departs from the uninterrupted one. Marking the epoch completed (and resetting the
    per-epoch counters, as Lightning does when an epoch starts) makes the resume start cleanly at the next
    epoch, exactly where the uninterrupted run goes on.
    """
    fit = (checkpoint.get("loops") or {}).get("fit_loop")
    if not fit or "epoch_progress" not in fit:
        return
    ep = fit["epoch_progress"]
    t = ep["total"]
    if not (t["ready"] == t["started"] == t["processed"] == t["completed"] + 1):
        return  # not at an epoch end (e.g. a mid-epoch checkpoint): leave Lightning's state as is

    def zero(d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                zero(v)
            elif isinstance(v, int) and not isinstance(v, bool):
                d[k] = 0

    def zero_current(d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                zero(v) if k == "current" else zero_current(v)

    for part in ("total", "current"):
        ep[part]["completed"] = ep[part]["processed"]
    for key, value in fit.items():
        if key.startswith("epoch_loop.") and key.endswith("progress") and isinstance(value, dict):
            zero_current(value)
            if "is_last_batch" in value:
                value["is_last_batch"] = False
    val = fit.get("epoch_loop.val_loop.batch_progress")
    if isinstance(val, dict) and isinstance(val.get("total"), dict):
        zero(val["total"])
