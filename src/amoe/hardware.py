"""What this machine's CPU runs fast: whether bf16 matmuls have a vectorised path, which memory layout
its convolutions want, and a glibc malloc that keeps freed memory for reuse.

On an x86 CPU with AVX-512 (BW/VL/DQ; AVX512_BF16 or AMX make it native) oneDNN runs bf16 matmuls and
convolutions at or above the fp32 rate. Without it (AVX2-only CPUs, e.g. AMD EPYC Zen 3) torch falls back
to a scalar bf16 GEMM: measured on a 2-vCPU AMD EPYC (Zen 3, AVX2), one thread, 1024² matmul:
fp32 66 GFLOP/s, bf16 0.84 GFLOP/s — bf16-mixed runs about 80× slower than fp32 there.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

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


def cpu_lacks_avx512() -> bool:
    """True where torch's CPU kernels run without AVX-512 (AVX2-only x86, and any non-x86 CPU)."""
    return "AVX512" not in torch.backends.cpu.get_cpu_capability()


def conv_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout for the global experts' convolutions on ``x``'s device in the current grad mode.

    Channels-last (NHWC) is oneDNN's and cuDNN's fast layout: measured faster for fp32 inference on an AVX2
    CPU and for bf16 on an AVX-512 CPU, where training in it ran at 0.65–0.72 of the peak in both dtypes
    (NCHW was not measured there). The exception is training on a CPU without
    AVX-512: oneDNN's AVX2 weight gradient of the student's 256->512 conv at 196² runs at 0.20 of the fp32
    peak channels-last against 0.56 in NCHW (docs/PERFORMANCE.md), so backward there stays NCHW.
    """
    if x.device.type == "cpu" and cpu_lacks_avx512() and torch.is_grad_enabled():
        return torch.contiguous_format
    return torch.channels_last


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS (``amoe`` calls
    this at start; ``AMOE_MALLOC=system`` keeps glibc's defaults). Returns whether it was set.

    By default every allocation over 128 kB gets fresh pages from the kernel and gives them back on free,
    so each training step faults in all its activations again: one global expert's step at batch 2, 392²
    took 710 000 minor page faults and 2.7 s of kernel time in 8.3–9.4 s; with both thresholds at their
    maximum (2 GiB) it takes none and 5.2 s (docs/PERFORMANCE.md). The cost: up to 2 GiB of freed memory
    stays in the process (peak RSS of that test 1.6 -> 2.0 GB); ``release_freed_memory`` hands it back.
    """
    if os.environ.get("AMOE_MALLOC", "retain") == "system":
        return False
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold, most = -1, -3, ctypes.c_int(2**31 - 1)  # <malloc.h>
    set_ok = libc.mallopt(m_mmap_threshold, most) == 1 and libc.mallopt(m_trim_threshold, most) == 1
    log.debug("glibc malloc: freed memory kept for reuse (%s)", "set" if set_ok else "refused")
    return set_ok


def release_freed_memory() -> None:
    """Hand the memory ``retain_freed_memory`` keeps back to the OS (before reading ``MemAvailable``)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
