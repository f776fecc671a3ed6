"""``amoe.compile``: frozen inductor graphs give the eager model's outputs, one graph per module instance."""

import pytest
import torch

from amoe.bench import build_model, make_routes, quick_config
from amoe.compile import compile_for_inference, is_compiled, uncompile


@pytest.fixture(scope="module")
def model():
    m = build_model(quick_config())
    yield m
    uncompile(m)


def _run(model, x, dtype, sparse, route=None):
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
        return model(x, ["bench"] * len(x), sparse=sparse, route=route)


# bf16 is slow: compiling and running it on a CPU without a vectorised bf16 path (AVX2) took most of 64 s
@pytest.mark.parametrize("dt", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_compiled_model_gives_the_eager_maps_and_scores(model, dt):
    uncompile(model)  # eager references, also after the other dtype's case compiled the shared model
    torch.manual_seed(0)
    x = torch.randn(4, 3, 56, 56)
    routes = make_routes(model.config, 4, spread=True)["worst"]  # patch experts on sub-batches of 2 or 4 samples
    keys = set(model.state_dict())
    e_dense, e_sparse = _run(model, x, dt, sparse=False), _run(model, x, dt, sparse=True, route=routes)
    tol = 1e-5
    if dt == "bf16":  # fused kernels round differently; within bf16's own error against fp32
        tol = 2 * (e_dense.expert_maps - _run(model, x, "fp32", sparse=False).expert_maps).abs().max().item()
    compile_for_inference(model)
    assert is_compiled(model) and set(model.state_dict()) == keys  # module tree and checkpoint keys unchanged
    dense, sparse = _run(model, x, dt, sparse=False), _run(model, x, dt, sparse=True, route=routes)
    diff = (dense.expert_maps - e_dense.expert_maps).abs().amax((0, 2, 3))  # per expert
    assert (diff <= tol).all(), (dt, diff)
    assert diff[: model.config.num_patch_experts].max() > 0 or dt == "fp32"  # bf16: the compiled graphs really ran
    s, e = model.score(sparse).scores, model.score(e_sparse).scores
    assert (s - e).abs().max() <= (1e-5 if dt == "fp32" else 0.05), dt
    # per-expert agreement above also shows each expert instance runs its own weights (they are all different)


def test_uncompile_returns_to_eager_and_sees_new_weights(model):
    compile_for_inference(model)
    uncompile(model)
    assert not is_compiled(model)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 56, 56)
    before = _run(model, x, "fp32", sparse=False).expert_maps
    with torch.no_grad():
        w = model.patch_experts[0].blocks[-1].mlp[2]
        saved = (w.weight.clone(), w.bias.clone())
        w.weight.mul_(2)
        after = _run(model, x, "fp32", sparse=False).expert_maps
        w.weight.copy_(saved[0])
    assert (after[:, 0] - before[:, 0]).abs().max() > 1e-4  # eager again: the changed weight counts


def test_unknown_part_is_refused(model):
    with pytest.raises(ValueError, match="compile parts"):
        compile_for_inference(model, ("encoder", "decoder"))
