"""Linear layers that run their GEMM on oneDNN where MKL's measured slower: fp32 inference on AVX2 CPUs.

A linear over tokens, y = x Wᵀ + b with x (..., K), is a 1×1 convolution over the channels-last image
(1, K, M, 1) that is x's memory as it lies (M = all leading dims), so torch hands it to oneDNN without a
copy. On a 2-vCPU AMD EPYC Zen 3 (AVX2, no AVX-512), fp32, batch 8 at 392², alternating passes: a patch
expert took 5.71–6.56 s against 6.40–7.71 s on MKL's sgemm (best/median of 10), the encoder 8.50–9.52 s
against 9.90–10.54 s (best/median of 8); values equal to 1.5e-6 (docs/PERFORMANCE.md).

Where it applies (``onednn_is_faster``): CPU, fp32, no gradient (the frozen encoder always; the patch
experts at test and predict time), eager or compiled but not while exporting or tracing (exports keep a
plain MatMul), on a CPU without AVX-512 (where it was measured). Compiled graphs call it as one opaque op,
``torch.ops.amoe.conv_linear``: inductor's own lowering of the same 1×1 convolution measured 13–21 % slower
than its MKL GEMM, the opaque op 7–11 % faster (best of 6–10 passes; docs/PERFORMANCE.md). ``AMOE_LINEAR=mkl`` keeps ``F.linear`` everywhere;
``AMOE_LINEAR=onednn`` takes the oneDNN path on any CPU (for an A/B). Training's backward never takes it.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from amoe.hardware import cpu_lacks_avx512

MODES = ("auto", "mkl", "onednn")


def _exporting() -> bool:
    """Exporting or tracing: exports keep a plain MatMul."""
    return (
        torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_exporting()
    )


def linear_mode() -> str:
    mode = os.environ.get("AMOE_LINEAR", "auto")
    if mode not in MODES:
        raise ValueError(f"AMOE_LINEAR={mode!r} is not one of {list(MODES)} (auto: oneDNN for fp32 inference on AVX2-only CPUs).")
    return mode


@torch.compiler.assume_constant_result  # a compiled graph takes the choice made when it was traced
def inference_gemm() -> str:
    """Which library ``Linear`` uses for fp32 inference (eager and compiled) on this CPU: ``onednn`` or ``mkl``."""
    mode = linear_mode()
    return "onednn" if mode == "onednn" or (mode == "auto" and cpu_lacks_avx512()) else "mkl"


def onednn_is_faster(x: torch.Tensor) -> bool:
    """Whether ``Linear`` runs ``x`` as a oneDNN 1×1 convolution (see the module docstring)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() < 2 or torch.is_grad_enabled():
        return False
    if torch.is_autocast_enabled("cpu") or _exporting():  # autocast bf16 linears are oneDNN's already
        return False
    return inference_gemm() == "onednn"


def conv_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as a 1×1 convolution: x (..., K), weight (N, K) -> (..., N)."""
    *lead, k = x.shape
    image = x.reshape(1, -1, 1, k).permute(0, 3, 1, 2)  # (1, K, M, 1), channels-last: x's own memory
    y = F.conv2d(image, weight[:, :, None, None], bias)  # (1, N, M, 1), channels-last
    return y.permute(0, 2, 3, 1).reshape(*lead, -1)  # (..., N)


@torch.library.custom_op("amoe::conv_linear", mutates_args=())
def conv_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv_linear`` as one op that compiled graphs call as it is (inductor does not lower it)."""
    return conv_linear(x, weight, bias)


@conv_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose fp32 inference may run on oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if onednn_is_faster(x):
            gemm = conv_linear_op if torch.compiler.is_compiling() else conv_linear
            return gemm(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_onednn_linears(module: nn.Module) -> nn.Module:
    """In place: every plain ``nn.Linear`` in ``module`` (e.g. timm's ViT blocks) becomes a ``Linear``.
    Parameters, state dict keys and values are unchanged. Returns ``module``."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
    return module
