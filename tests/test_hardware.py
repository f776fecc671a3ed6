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


@pytest.mark.parametrize(
    ("capability", "grad", "channels_last"),
    [("AVX2", True, False), ("AVX2", False, True), ("AVX512", True, True), ("AVX512", False, True), ("DEFAULT", True, False)],
)
def test_conv_memory_format_keeps_nchw_only_for_backward_without_avx512(monkeypatch, capability, grad, channels_last):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    with torch.set_grad_enabled(grad):
        fmt = hardware.conv_memory_format(torch.zeros(1, 3, 4, 4))
    assert fmt == (torch.channels_last if channels_last else torch.contiguous_format)


def test_global_expert_training_layout_follows_the_cpu_and_gives_the_same_values(monkeypatch):
    from amoe.global_experts import GlobalExpert

    torch.manual_seed(0)
    expert = GlobalExpert(dim=16, grid=(4, 4), patch=14, width=8, code=8, student_channels=(8, 16))
    x = torch.randn(2, 3, 56, 56)
    outs, grads = {}, {}
    for capability in ("AVX2", "AVX512"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        expert.zero_grad(set_to_none=True)
        out = expert(x)
        (out.ae.square().mean() + out.student.square().mean()).backward()
        outs[capability] = out
        grads[capability] = expert.student.net[3].weight.grad.clone()
    assert outs["AVX2"].student.is_contiguous()
    assert outs["AVX512"].student.is_contiguous(memory_format=torch.channels_last)
    assert not outs["AVX512"].student.is_contiguous()
    torch.testing.assert_close(outs["AVX2"].student, outs["AVX512"].student, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["AVX2"], grads["AVX512"], rtol=1e-4, atol=1e-6)


_FAULTS = """
import resource
from amoe.hardware import retain_freed_memory
import torch
print(retain_freed_memory())
for _ in range(8):  # settles after a few rounds: small allocations take the first freed blocks
    torch.ones(2**24).sum()  # 64 MB: over glibc's default mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.ones(2**24).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(hardware._glibc() is None, reason="glibc malloc only (Linux)")
@pytest.mark.parametrize("setting", ["retain", "system"])
def test_retained_memory_is_reused_without_page_faults(setting):
    """Four 64 MB allocations after eight: glibc's defaults fault in all 4 × 16 384 pages again; kept
    for reuse they fault in (almost) none. ``AMOE_MALLOC=system`` leaves glibc's defaults."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "AMOE_MALLOC": setting}
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(setting == "retain")
    faults = int(out[1])
    if setting == "retain":
        assert faults < 2_000, faults
    else:
        assert faults > 4 * 16_384 * 0.9, faults


_RELEASE = """
from amoe.hardware import release_freed_memory, retain_freed_memory
import torch
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
retain_freed_memory()
x = torch.ones(2**26)  # 256 MB, touched
del x
kept = rss_mb()
release_freed_memory()
print(kept - rss_mb())
"""


@pytest.mark.skipif(hardware._glibc() is None, reason="glibc malloc only (Linux)")
def test_release_freed_memory_hands_the_kept_memory_back():
    """A freed 256 MB tensor stays resident while retained; ``release_freed_memory`` returns it to the OS."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True, text=True, check=True).stdout
    assert float(out) > 200, out
