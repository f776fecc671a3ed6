"""Opt-in ``torch.compile`` of the inference path: inductor with freezing, for the encoder and the patch experts.

Freezing folds a module's weights into its compiled graph as constants. In bf16 they are cast and
pre-packed for oneDNN once, bias and GELU run as the GEMM's post-ops, and LayerNorm, the autocast casts
and the residual adds fuse into a few loops; in fp32 the GEMMs are not pre-packed (inductor's packed fp32
linear measured slower) and only the element-wise work fuses: on AVX2-only CPUs each linear is one opaque
oneDNN call (``amoe.linear``), elsewhere MKL's. Measured A/Bs are in docs/PERFORMANCE.md.

The weights are taken when a graph is compiled: at a module's first call per dtype and input shape. So
compile once the weights are final (test, predict, bench). After a weight change (an optimiser step,
``load_state_dict``) graphs already compiled are stale — a bf16 graph keeps its own packed copy, an fp32
one may still read the tensor — so call ``uncompile`` and compile again. Gradient-enabled calls
(training) are not frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from amoe.model import AnomalyMoE

PARTS = ("encoder", "patch", "component", "global")


def compiled_modules(model: AnomalyMoE, parts: tuple[str, ...]) -> list[nn.Module]:
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"compile parts {unknown} unknown; choose among {list(PARTS)}.")
    groups = {
        "encoder": [model.encoder], "patch": list(model.patch_experts),
        "component": list(model.component_experts), "global": list(model.global_experts),
    }
    return [m for p in parts for m in groups[p]]


def compile_for_inference(model: AnomalyMoE, parts: tuple[str, ...] = ("encoder", "patch")) -> AnomalyMoE:
    """In place: each module of ``parts`` runs a frozen inductor graph (compiled at its first call).

    Defaults to the encoder and the patch experts, where compiling measured −13 % and −20 % (bf16); the
    component experts (tiny MLPs, < 1 ms/img) and the convolutional global experts (±0 in an isolated bf16
    A/B) gain nothing measurable. The state dict and the module tree are unchanged. Returns ``model``.
    """
    import torch._dynamo
    import torch._inductor.config

    modules = compiled_modules(model, tuple(parts))
    # one graph per module instance, dtype and batch shape: lift dynamo's default of 8 per code object
    # (6 patch experts × 2 dtypes would silently fall back to eager)
    need = 8 * max(1, len(modules))
    if torch._dynamo.config.recompile_limit < need:
        torch._dynamo.config.recompile_limit = need
    for m in modules:
        if "forward" in vars(m):
            continue  # compiled already
        graph = torch.compile(m.forward)

        def forward(*args, _graph=graph, **kwargs):
            bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            with torch._inductor.config.patch(freezing=True, **{"cpp.weight_prepack": bf16}):
                return _graph(*args, **kwargs)

        m.forward = forward
    return model


def uncompile(model: AnomalyMoE) -> AnomalyMoE:
    """Back to eager for every module (the compiled graphs are dropped); a no-op on an eager model."""
    if is_compiled(model):
        for m in compiled_modules(model, PARTS):
            vars(m).pop("forward", None)
        torch._dynamo.reset()
    return model


def is_compiled(model: AnomalyMoE) -> bool:
    return any("forward" in vars(m) for m in compiled_modules(model, PARTS))
