import json
import math
import os

import pandas as pd
import pytest

from amoe.cli import main


def _run(tmp_path, *args):
    return main([*args, "--config", "experiments/smoke.yaml", "--trainer.default_root_dir", str(tmp_path / "runs"),
                 "--model.results_root", str(tmp_path / "results")])


def test_fit_then_test_writes_finite_metrics(tmp_path):
    assert _run(tmp_path, "fit") == 0
    ckpt = tmp_path / "runs" / "latest" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert _run(tmp_path, "test", "--ckpt_path", "last") == 0
    run = tmp_path / "results" / "synthetic" / "latest"
    result = json.loads((run / "metrics.json").read_text())
    assert result["dataset"] == "synthetic" and set(result["per_class"]) == {"breakfast", "pushpins"}
    for key in ("image_auroc", "pixel_auroc", "image_auroc_structural", "image_auroc_component", "image_auroc_logical"):
        assert key in result["mean"] and math.isfinite(result["mean"][key]), key
    for name in ("metrics.csv", "table.md", "scores.csv", "router_gates.png", "expert_maps.png"):
        assert (run / name).is_file(), name
    assert len(os.listdir(run / "overlays")) > 0
    # the CSV logger got the torchmetrics image metrics (test/<dataset>/<class>/...) and the evaluator's others
    (log,) = [f for f in (tmp_path / "runs" / "latest" / "csv").glob("version_*/metrics.csv")
              if "test/mean/image_auroc" in f.read_text()]
    logged = pd.read_csv(log).iloc[-1]
    for cls, metrics in [*((f"synthetic/{c}", m) for c, m in result["per_class"].items()),
                         ("synthetic/mean", result["mean"]), ("mean", result["mean"])]:
        for k, v in metrics.items():
            assert logged[f"test/{cls}/{k}"] == pytest.approx(v, rel=0, abs=1e-12), (cls, k)  # float64, not float32
    assert logged.dtype == float
    # a second test run never overwrites the first
    assert _run(tmp_path, "test", "--ckpt_path", "last") == 0
    assert len([d for d in os.listdir(tmp_path / "results" / "synthetic") if d != "latest"]) == 2


def test_explicit_scoring_settings_survive_the_checkpoint_settings(tmp_path):
    """test --ckpt_path: the architecture comes from the checkpoint, but a scoring setting given on the
    command line is used (it was silently replaced by its default before)."""
    import yaml

    assert _run(tmp_path, "fit") == 0
    assert _run(tmp_path, "test", "--ckpt_path", "last", "--model.config.top_ratio", "0.25") == 0
    configs = sorted((tmp_path / "runs" / "latest" / "csv").glob("version_*/config.yaml"), key=os.path.getmtime)
    cfg = yaml.safe_load(configs[-1].read_text())["model"]["config"]
    assert cfg["top_ratio"] == 0.25
    assert cfg["router_input"] == "cls" and cfg["encoder_arch"]["embed_dim"] == 32  # from the checkpoint


def test_missing_dataset_fails_fast_with_the_download_page(tmp_path, capsys):
    code = main(["fit", "--config", "experiments/paper.yaml", "--config", "experiments/visa.yaml",
                 "--data.root", str(tmp_path / "nope"), "--trainer.default_root_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "VisA" in err and ("amazon-visual-anomaly" in err or "spot-diff" in err)


def test_ckpt_path_last_without_a_run_is_explained(tmp_path, capsys):
    assert _run(tmp_path, "test", "--ckpt_path", "last") == 2
    assert "Train first" in capsys.readouterr().err


@pytest.mark.parametrize("sub", ["fit", "test"])
def test_help_works(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
