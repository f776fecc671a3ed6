"""amoe ablations (Tables 2 and 3): the six settings, the no_eir guard, tables with the paper's values
and Δ, the offline dashboard and the W&B report."""

import json
import re
from pathlib import Path

import pytest
import yaml

from amoe import ablations
from amoe.cli import main
from amoe.model import AnomalyMoE, AnomalyMoEConfig

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
        assert cfg.top_k == min(ref.top_k, cfg.num_experts) and cfg.encoder == ref.encoder, name
        if base == "smoke":
            AnomalyMoE(cfg)


def test_no_eir_with_one_expert_per_group_stops_before_training(tmp_path, capsys):
    base = tmp_path / "one_each.yaml"
    base.write_text(yaml.safe_dump({"model": {"config": {"num_patch_experts": 1, "num_component_experts": 1,
                                                         "num_global_experts": 1, "top_k": 1}}}))
    with pytest.raises(ablations.AblationError, match="identically 0"):
        ablations.check_no_eir(["experiments/smoke.yaml", str(base), ablations.variant_config("no_eir")])
    ablations.check_no_eir(["experiments/smoke.yaml", ablations.variant_config("no_eir")])  # 2 per group: fine


def test_ablation_rows_carry_the_papers_values_and_delta():
    res = {"patch": {"datasets": {"visa": {"metrics": {"image_auroc": 0.95, "pixel_auroc": 0.99}},
                                  "liverct": {"metrics": {"image_auroc": 0.5, "pixel_auroc": 0.6}}}},
           "all": {"datasets": {"visa": {"metrics": None, "error": "amoe fit exited with 1"}}}}
    papers = {1: {"visa": {"image_auroc": 98.1, "pixel_auroc": 99.0}},
              2: {"patch": {"visa": {"image_auroc": 97.0, "pixel_auroc": 98.8}}}, 3: {}}
    rows = ablations.ablation_rows(res, papers, ["visa", "liverct"])
    visa = rows[0]
    assert (visa["paper_image_auroc"], visa["delta_image_auroc"], visa["delta_pixel_auroc"]) == (97.0, -2.0, 0.2)
    assert rows[1]["paper_image_auroc"] is None and rows[1]["delta_image_auroc"] is None  # no LiverCT in Table 2
    assert rows[2]["status"] == "failed" and rows[2]["paper_image_auroc"] == 98.1  # the full model is Table 1
    text = ablations.ablation_markdown(rows, "# T", ["src"])
    assert "| patch " in text and "-2.0" in text and "failed" in text


def test_wandb_report_holds_the_tables_and_the_groups_runs():
    pytest.importorskip("wandb_workspaces", reason="optional extra amoe[report]")
    report = ablations.wandb_report("proj", "ablations-x", "T", "| a |\n|---|\n| 1 |", entity="me", save=False)
    assert report.title == "T" and "ablations-x" in report.description
    grid = report.blocks[1]
    assert grid.runsets[0].project == "proj" and "ablations-x" in str(grid.runsets[0].filters)
    assert report.blocks[0].text.startswith("| a |")


def test_ablations_smoke_on_synthetic_writes_tables_json_and_dashboard(tmp_path):
    # one row (each trains a model: 30 s on a Zen 3); several rows and their order: the @slow test below
    code = main(["ablations", "--smoke", "--dataset", "synthetic", "--only", "no_eir",
                 "--out", str(tmp_path / "res"), "--work", str(tmp_path / "runs")])
    assert code == 0
    data = json.loads((tmp_path / "res" / "ablations_synthetic.json").read_text())
    assert [r["setting"] for r in data["rows"]] == ["no_eir"] and data["protocol"] == "synthetic"
    assert all(r["status"] == "ok" and 0 <= r["image_auroc"] <= 100 for r in data["rows"])
    page = (tmp_path / "res" / "ablations.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "http" not in page.replace("http://www.w3.org", "")
    import pandas as pd

    assert list(pd.read_csv(tmp_path / "res" / "ablations_synthetic.csv")["setting"]) == ["no_eir"]


@pytest.mark.slow
def test_ablations_smoke_all_fill_tables_2_and_3_with_the_paper(tmp_path):
    code = main(["ablations", "--smoke", "--out", str(tmp_path / "res"), "--work", str(tmp_path / "runs")])
    text = (tmp_path / "res" / "ablations_all.md").read_text()
    assert code == 0, text
    data = json.loads((tmp_path / "res" / "ablations_all.json").read_text())
    assert data["protocol"] == "single_model" and len(data["rows"]) == 6 * 8
    patch_visa = next(r for r in data["rows"] if r["setting"] == "patch" and r["dataset"] == "visa")
    assert patch_visa["paper_image_auroc"] == 97.0 and patch_visa["delta_image_auroc"] is not None
    assert re.search(r"\| w/o EIR +\| MVTec LOCO +\| \d+\.\d +\| 85\.6 ", text)
    page = (tmp_path / "res" / "ablations.html").read_text()
    assert page.count("<svg") == 8 * 2 + 1  # two charts per dataset and the gate-mass chart
