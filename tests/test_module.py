"""AnomalyMoEModule pieces that need no Trainer run."""

from types import SimpleNamespace

import pytest
import torch
from fixtures_model import tiny_config
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from amoe.module import AnomalyMoEModule


@pytest.mark.parametrize("plugin, autocast", [(MixedPrecision("bf16-mixed", "cpu"), True), (Precision(), False)])
def test_calibration_runs_under_the_test_precision(plugin, autocast, monkeypatch):
    """The map-normalisation statistics come from maps computed in the precision the test maps get."""
    module = AnomalyMoEModule(tiny_config(num_component_experts=0))
    batches = [{"image": torch.randn(2, 3, 56, 56), "cls": ["a", "a"]}]
    dm = SimpleNamespace(calib_dataloader=lambda: batches, calib_fraction=0.1)
    module._trainer = SimpleNamespace(precision_plugin=plugin, datamodule=dm)
    monkeypatch.setattr(module, "log_dict", lambda *a, **k: None)
    seen = []
    forward = module.model.forward
    monkeypatch.setattr(module.model, "forward", lambda *a, **k: seen.append(torch.is_autocast_enabled("cpu")) or forward(*a, **k))
    module.calibrate()
    assert seen == [autocast] and bool(module.model.scorer.calibrated)
