"""What this machine's CPU runs fast: whether bf16 matmuls have a vectorised path.

On an x86 CPU with AVX-512 (BW/VL/DQ; AVX512_BF16 or AMX make it native) oneDNN runs bf16 matmuls and
convolutions at or above the fp32 rate. Without it (AVX2-only CPUs, e.g. AMD EPYC Zen 3) torch falls back
to a scalar bf16 GEMM: measured on a 2-vCPU AMD EPYC (Zen 3, AVX2), one thread, 1024² matmul:
fp32 66 GFLOP/s, bf16 0.84 GFLOP/s — bf16-mixed runs about 80× slower than fp32 there.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

def cpu_bf16_is_fast() -> bool:
    """True where oneDNN has a vectorised bf16 path on this CPU (what ``torch.matmul`` in bf16 uses).
    Unknown (an API this torch lacks) counts as fast: nothing is refused on a guess."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def bf16_cpu_hint() -> str:
    """The one-line reason given where bf16 is skipped or warned about."""
    return (
        "this CPU has no vectorised bf16 matmul path (oneDNN needs AVX-512 BW/VL/DQ, AVX512_BF16 or AMX; "
        f"cpu capability: {torch.backends.cpu.get_cpu_capability()}): "
        "bf16 matmuls fall back to a scalar GEMM, about 80x slower than fp32 (docs/PERFORMANCE.md)"
    )


def warn_if_bf16_is_slow(precision: str | int | None, accelerator: str | None) -> bool:
    """``amoe fit/test/predict``: warn (and return True) where ``--trainer.precision bf16*`` would run on a
    CPU without a vectorised bf16 path. A warning, not an error: the results are right, only slow."""
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    if not (str(precision).startswith("bf16") and on_cpu) or cpu_bf16_is_fast():
        return False
    log.warning("--trainer.precision %s on the CPU: %s. --trainer.precision 32 is the fast choice here.", precision, bf16_cpu_hint())
    return True
