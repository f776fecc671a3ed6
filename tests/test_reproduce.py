"""amoe reproduce (Table 1) and amoe ablations (Tables 2 and 3): configs, missing datasets, tables; the slow
tests run both end to end at smoke size (tiny trees in the real layouts, tiny encoder, CPU)."""

import re
from pathlib import Path

import pytest
import yaml

from amoe import ablations, reproduce
from amoe.cli import main
from amoe.model import AnomalyMoE, AnomalyMoEConfig
from data_modules import DATAMODULES

REPO = Path(__file__).resolve().parents[1]


def resolved(configs: list[str], capsys, *extra: str) -> dict:
    with pytest.raises(SystemExit) as e:
        main(["fit", *[a for c in configs for a in ("--config", c)], *extra, "--print_config"])
    assert e.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


BASES = {
    "synthetic": ["experiments/synthetic.yaml"],
    "smoke": ["experiments/smoke.yaml"],
    "paper+visa": ["experiments/paper.yaml", "experiments/visa.yaml"],
}
EXPECT = {  # (patch, component, global) expert counts as a fraction of the base, ESB, EIR
    "patch": ((1, 0, 0), True, True),
    "patch_component": ((1, 1, 0), True, True),
    "patch_global": ((1, 0, 1), True, True),
    "all": ((1, 1, 1), True, True),
    "no_esb": ((1, 1, 1), False, True),
    "no_eir": ((1, 1, 1), True, False),
}


def test_the_six_ablations_are_the_papers():
    assert [v[0] for v in ablations.VARIANTS] == list(EXPECT)
    assert sorted(p.stem for p in (REPO / "experiments" / "ablations").glob("*.yaml")) == sorted(EXPECT)


@pytest.mark.parametrize("base", list(BASES))
def test_every_ablation_yaml_instantiates_with_the_base_config(base, capsys):
    ref = AnomalyMoEConfig(**resolved(BASES[base], capsys)["model"]["config"])
    for name, (groups, esb, eir) in EXPECT.items():
        files = [*BASES[base], f"experiments/ablations/{name}.yaml"]
        cfg = AnomalyMoEConfig(**resolved(files, capsys)["model"]["config"])
        cap = ablations.capped_top_k(files)  # what the runner passes when a subset has fewer experts than top_k
        assert cap == (cfg.num_experts if cfg.top_k > cfg.num_experts else None), name
        if cap:
            cfg.top_k = cap
        cfg.validate()
        counts = (cfg.num_patch_experts, cfg.num_component_experts, cfg.num_global_experts)
        full = (ref.num_patch_experts, ref.num_component_experts, ref.num_global_experts)
        assert counts == tuple(g * n for g, n in zip(groups, full)), name
        assert (cfg.use_esb, cfg.use_eir) == (esb, eir), name
        assert cfg.top_k == min(ref.top_k, cfg.num_experts) and cfg.encoder == ref.encoder, name  # nothing else changes
        if base == "smoke":
            AnomalyMoE(cfg)  # and the model builds


@pytest.mark.parametrize("name", reproduce.DATASETS)
def test_smoke_overlay_layers_over_every_dataset_config(name, tmp_path, capsys):
    """paper.yaml + <dataset>.yaml + the smoke overlay: the dataset's module with the smoke sizes, one CPU."""
    overlay = reproduce.smoke_overlay(str(tmp_path / "overlay.yaml"))
    cfg = resolved(["experiments/paper.yaml", f"experiments/{name}.yaml", overlay], capsys)
    assert cfg["trainer"]["devices"] == 1 and cfg["trainer"]["strategy"] == "auto" and cfg["trainer"]["max_steps"] == 4
    assert cfg["model"]["config"]["pretrained"] is False and cfg["model"]["config"]["img_size"] == 56
    assert cfg["data"]["class_path"] == reproduce.data_config(name)[0]
    init = cfg["data"]["init_args"]
    assert init["crop_size"] == 56 and init["num_workers"] == 0 and init.get("classes") is None


def test_missing_datasets_are_listed_with_their_download_pages(tmp_path):
    roots = {n: reproduce.default_root(n, str(tmp_path)) for n in reproduce.DATASETS}
    assert roots["visa"] == str(tmp_path / "VisA") and roots["brainmri"] == str(tmp_path / "BMAD" / "BrainMRI")
    present, missing = reproduce.check_roots(reproduce.DATASETS, roots)
    assert not present and list(missing) == list(reproduce.DATASETS)
    for name, msg in missing.items():
        assert DATAMODULES[name].download_page in msg and roots[name] in msg


def test_reproduce_without_data_writes_a_table_of_missing_rows(tmp_path, capsys):
    code = main(["reproduce", "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "res"),
                 "--work", str(tmp_path / "runs")])
    assert code == 1  # nothing to run
    text = (tmp_path / "res" / "table1.md").read_text()
    rows = [r for r in text.splitlines() if r.startswith("| ") and not r.startswith("| Dataset")]
    assert len(rows) == 8 and all("| missing |" in r for r in rows)
    assert "mvtec.com/company/research/datasets/mvtec-ad" in text and "svcl.ucsd.edu" in text


def test_table1_puts_the_paper_next_to_ours_with_the_delta():
    runs = {"visa": {"result": {"mean": {"image_auroc": 0.9512, "pixel_auroc": 0.981}}, "results_dir": "r", "error": None}}
    paper = {"visa": {"image_auroc": 96.0, "pixel_auroc": None}}
    text = reproduce.table1(runs, {"ped2": "root 'x' not found; download: y"}, paper, "src", "# T")
    assert "| VisA | 95.1 | 96.0 | -0.9 | 98.1 | – | – | `r` |" in text
    assert "| Ped2 | missing |" in text and "- Ped2: root 'x' not found; download: y" in text


def test_the_paper_table_file_holds_no_invented_numbers():
    data = yaml.safe_load((REPO / "experiments" / "paper_table1.yaml").read_text())
    assert set(data["datasets"]) == set(reproduce.DATASETS)
    for name, vals in data["datasets"].items():
        for v in vals.values():
            assert v is None or (isinstance(v, int | float) and 0 <= v <= 100), name
    assert data["source"]


def _rows(text: str) -> list[list[str]]:
    head = text.split("\n\nOther metrics")[0]
    return [[c.strip() for c in r.strip("|").split("|")] for r in head.splitlines()
            if r.startswith("| ") and not r.startswith("| Dataset")]


@pytest.mark.slow
def test_reproduce_smoke_fills_every_row(tmp_path):
    code = main(["reproduce", "--smoke", "--out", str(tmp_path / "res"), "--work", str(tmp_path / "runs")])
    text = (tmp_path / "res" / "table1.md").read_text()
    assert code == 0, text
    rows = _rows(text)
    assert [r[0] for r in rows] == [reproduce.LABELS[n] for n in reproduce.DATASETS]
    for r in rows:
        assert re.fullmatch(r"\d+\.\d", r[1]) and re.fullmatch(r"\d+\.\d", r[4]), r
    for name in reproduce.DATASETS:
        assert (tmp_path / "res" / name / "latest" / "metrics.json").is_file()


@pytest.mark.slow
def test_ablations_smoke_fill_tables_2_and_3(tmp_path):
    code = main(["ablations", "--smoke", "--dataset", "synthetic", "--out", str(tmp_path / "res"),
                 "--work", str(tmp_path / "runs")])
    text = (tmp_path / "res" / "ablations_synthetic.md").read_text()
    assert code == 0, text
    rows = [r for r in text.splitlines() if r.startswith("| ") and ("✓" in r or r.startswith("| w/o") or "ESB + EIR" in r)]
    assert len(rows) == 7  # 4 rows of Table 2, 3 of Table 3
    assert all("failed" not in r and re.search(r"\| \d+\.\d \|", r) for r in rows), rows
