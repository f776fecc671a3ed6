"""experiments/<dataset>.yaml: the data part parses and builds the right module with the default root."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from jsonargparse import ArgumentParser

from data_modules.unified import Unified

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
ROOTS = {
    "mvtec_ad": ("MVTecAD", "data/mvtec_ad"), "visa": ("VisA", "data/VisA"),
    "mvtec_loco": ("MVTecLOCO", "data/mvtec_loco"), "brainmri": ("BMAD", "data/BMAD/BrainMRI"),
    "liverct": ("BMAD", "data/BMAD/LiverCT"), "resc": ("BMAD", "data/BMAD/RESC"),
    "mvtec_3d": ("MVTec3D", "data/mvtec_3d"), "ped2": ("Ped2", "data/Ped2"),
}


def parse(name: str, *args: str):
    p = ArgumentParser()
    p.add_subclass_arguments(L.LightningDataModule, "data")
    p.add_argument("--trainer", type=dict)
    p.add_argument("--config", action="config")
    cfg = p.parse_args(["--config", str(EXPERIMENTS / f"{name}.yaml"), *args])
    return cfg, p.instantiate_classes(cfg).data


@pytest.mark.parametrize("name", sorted(ROOTS))
def test_dataset_config(name):
    cfg, dm = parse(name, "--data.init_args.batch_size", "3")
    assert (type(dm).__name__, dm.root, dm.batch_size) == (*ROOTS[name], 3)
    assert cfg.trainer == {"default_root_dir": f"runs/{name}"} and dm.name == name


def test_all_config_is_unified_over_the_eight():
    _, dm = parse("all")
    assert isinstance(dm, Unified)
    assert [(c.name, c.root) for c in dm.members] == [(n, ROOTS[n][1]) for n in ROOTS]
