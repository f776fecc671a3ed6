"""amoe.runner: dataset configs, roots, the single-model data config and the smoke overlay."""

import warnings
from pathlib import Path

import pytest
import yaml

from amoe import runner
from amoe.cli import main
from data_modules import DATAMODULES

REPO = Path(__file__).resolve().parents[1]


def resolved(configs: list[str], capsys, *extra: str) -> dict:
    with pytest.raises(SystemExit) as e:
        main(["fit", *[a for c in configs for a in ("--config", c)], *extra, "--print_config"])
    assert e.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", runner.DATASETS)
def test_smoke_overlay_layers_over_every_dataset_config(name, tmp_path, capsys):
    """paper.yaml + <dataset>.yaml + the smoke overlay: the dataset's module with the smoke sizes, one CPU."""
    overlay = runner.smoke_overlay(str(tmp_path / "overlay.yaml"))
    cfg = resolved(["experiments/paper.yaml", f"experiments/{name}.yaml", overlay], capsys)
    assert cfg["trainer"]["devices"] == 1 and cfg["trainer"]["strategy"] == "auto" and cfg["trainer"]["max_steps"] == 4
    assert cfg["model"]["config"]["pretrained"] is False and cfg["model"]["config"]["img_size"] == 56
    assert cfg["data"]["class_path"] == runner.data_config(name)[0]
    init = cfg["data"]["init_args"]
    assert init["crop_size"] == 56 and init["num_workers"] == 0 and init.get("classes") is None


def test_unified_config_is_one_model_over_the_present_datasets(tmp_path, capsys):
    roots = {"visa": str(tmp_path / "v"), "mvtec_3d": str(tmp_path / "m3"), "liverct": str(tmp_path / "l")}
    path = runner.unified_config(str(tmp_path / "unified.yaml"), roots)
    cfg = resolved(["experiments/paper.yaml", path], capsys)
    assert cfg["data"]["class_path"] == "data_modules.unified.Unified"
    children = cfg["data"]["init_args"]["datasets"]
    assert [c["name"] for c in children] == ["visa", "mvtec_3d", "liverct"]
    assert [c["root"] for c in children] == list(roots.values())
    assert children[1]["modality"] == "rgb"  # the child keeps the settings of experiments/mvtec_3d.yaml
    assert "subset" not in children[2]  # the BMAD subset follows from the name
    assert cfg["data"]["init_args"]["crop_size"] == 392  # the paper's geometry applies to every child


def test_missing_datasets_are_listed_with_their_download_pages(tmp_path):
    roots = {n: runner.default_root(n, str(tmp_path)) for n in runner.DATASETS}
    assert roots["visa"] == str(tmp_path / "VisA") and roots["brainmri"] == str(tmp_path / "BMAD" / "BrainMRI")
    assert roots["liverct"] == str(tmp_path / "BMAD" / "LiverCT")
    present, missing = runner.check_roots(runner.DATASETS, roots)
    assert not present and list(missing) == list(runner.DATASETS)
    for name, msg in missing.items():
        assert DATAMODULES[name].download_page in msg and roots[name] in msg


def test_the_old_livercT_spelling_still_works_with_a_warning():
    import argparse

    with pytest.warns(FutureWarning, match="livercT.*liverct"):
        assert runner.parse_datasets("visa,livercT", argparse.ArgumentParser()) == ["visa", "liverct"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runner.parse_datasets("liverct", argparse.ArgumentParser()) == ["liverct"]


def test_gate_mass_is_the_mean_per_dataset_in_the_papers_order(tmp_path):
    (tmp_path / "scores.csv").write_text(
        "path,dataset,cls,label,score,gate_patch,gate_component,gate_global\n"
        "a,visa,visa/x,0,0.1,0.5,0.25,0.25\nb,visa,visa/x,1,0.9,0.7,0.25,0.05\n"
        "c,mvtec_ad,mvtec_ad/y,0,0.2,0.2,0.4,0.4\n"
    )
    gates = runner.gate_mass(str(tmp_path))
    assert list(gates) == ["mvtec_ad", "visa"]
    assert gates["visa"] == pytest.approx({"patch": 0.6, "component": 0.25, "global": 0.15})
    assert runner.gate_mass(None) == {} and runner.gate_mass(str(tmp_path / "nothing")) == {}


def test_runner_reproduce_and_ablations_do_not_import_the_cli():
    import subprocess
    import sys

    code = ("import sys, amoe.reproduce, amoe.ablations, amoe.runner; "
            "assert 'amoe.cli' not in sys.modules, 'amoe.cli imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
