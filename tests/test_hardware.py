"""``amoe.hardware``: whether bf16 has a fast path on this CPU, and the warning where it has not."""

import logging

import pytest
import torch

from amoe import hardware


def _mkldnn_bf16(monkeypatch, value):
    def supported():
        if isinstance(value, Exception):
            raise value
        return value

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", supported, raising=False)


@pytest.mark.parametrize("value", [True, False])
def test_cpu_bf16_is_fast_follows_onednn(monkeypatch, value):
    _mkldnn_bf16(monkeypatch, value)
    assert hardware.cpu_bf16_is_fast() is value


def test_an_unknown_answer_counts_as_fast(monkeypatch):
    _mkldnn_bf16(monkeypatch, AttributeError("no such op in this torch"))
    assert hardware.cpu_bf16_is_fast() is True


def test_the_real_answer_is_a_bool_and_the_hint_names_the_capability():
    assert isinstance(hardware.cpu_bf16_is_fast(), bool)
    assert torch.backends.cpu.get_cpu_capability() in hardware.bf16_cpu_hint()


@pytest.mark.parametrize(
    ("precision", "accelerator", "fast", "warned"),
    [
        ("bf16-mixed", "cpu", False, True),
        ("bf16-true", "cpu", False, True),
        ("bf16-mixed", "cpu", True, False),
        ("32-true", "cpu", False, False),
        (32, "cpu", False, False),
        ("bf16-mixed", "gpu", False, False),
    ],
)
def test_warn_if_bf16_is_slow(monkeypatch, caplog, precision, accelerator, fast, warned):
    monkeypatch.setattr(hardware, "cpu_bf16_is_fast", lambda: fast)
    with caplog.at_level(logging.WARNING, logger="amoe.hardware"):
        assert hardware.warn_if_bf16_is_slow(precision, accelerator) is warned
    assert ("precision 32 is the fast choice" in caplog.text) is warned


def test_auto_accelerator_counts_as_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16_is_fast", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.warn_if_bf16_is_slow("bf16-mixed", "auto") is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hardware.warn_if_bf16_is_slow("bf16-mixed", "auto") is False
