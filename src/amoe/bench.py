"""``amoe bench``: how fast AnomalyMoE runs on this machine, and how close to the machine's matmul peak.

Everything is measured in ONE run, so that the ratios (speed-up, utilisation) hold even on a shared,
noisy machine:

* **peak**: a large square matmul (4096², fp32 and bf16), sampled right before every timed pass; the
  best sample of the run is the peak (a high peak only makes the utilisation lower).
* **model**: the paper-sized AnomalyMoE (``AnomalyMoEConfig()`` defaults: ViT-B/14-reg4 at 392², 6/6/6
  experts, K=3) with random weights (``pretrained=False``; speed does not depend on the values) and a
  component bank built from random embeddings. Batch 8, fp32 and bf16 (``torch.autocast``; by default bf16
  only where the CPU has a vectorised bf16 path, ``amoe.hardware``; ``dtypes_skipped`` says why not).
* **routing** forced with ``route=``: ``worst`` (all K experts are patch experts, the most expensive
  group; spread over the patch experts) and ``mixed`` (one expert of each group, spread).
* **dense** (``sparse=False``): all 18 experts on one encoder pass — the released code's inference
  (which also runs the encoder twice). Dense does the same work for every routing, so it is timed once
  per dtype and reported under both patterns.
* **sparse** (``sparse=True``): each expert once, on the samples that selected it.
* **compiled** (``--compile``, what ``make bench`` runs): after each dtype's eager passes, the same passes
  with ``amoe.compile.compile_for_inference`` (encoder and patch experts as frozen inductor graphs; the
  first full-batch pass of each routing compiles and is timed as ``compile_s``). The top-level keys are
  then the compiled run's; eager's main keys are under ``eager``, eager ÷ compiled time in ``compile_gain``.
* **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` on the same forward (the first warm-up pass;
  dense: on one image, times the batch — dense FLOPs are exactly linear in the batch). The CPU flash
  attention kernel has no formula in torch; the standard SDPA formula (4·T²·d per head) is registered
  for it, so the encoder's attention counts.
* **stages**: forward hooks time the encoder, router and each expert group inside every timed pass.
* **timed passes** go round-robin over the routings and dense (worst, mixed, dense, worst, …; best of
  ``--iters`` / ``--dense-iters`` each), so that a neighbour's burst hits one pass of each, not every pass of one.
* **train step** (first, before the inference passes): batch 4 (or the largest that fits in memory), fp32 and
  bf16-mixed, dense, as ``AnomalyMoEModule.training_step`` (the AE view's second encoder pass, both
  optimisers), timed after ``--train-warmup`` untimed steps at the same batch (a training loop's steady
  state: no page faults), profiled with ``torch.profiler``; backward ops are attributed to the
  stage whose forward op created them. FLOPs (forward + backward) from FlopCounterMode on a 1-image step,
  times the batch; ``train_flops_utilization`` = FLOPs / step time / same-run matmul peak. ``--train``:
  only this.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from amoe.compile import PARTS as COMPILE_PARTS
from amoe.compile import compile_for_inference, uncompile
from amoe.hardware import bf16_cpu_hint, cpu_bf16_is_fast, release_freed_memory
from amoe.linear import inference_gemm
from amoe.model import GROUPS, AnomalyMoE, AnomalyMoEConfig
from amoe.patch_experts import fuse_layers

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STAGES = ("encoder", "router", *GROUPS)


# --- configuration ---------------------------------------------------------------------------------
def quick_config(img_size: int = 56) -> AnomalyMoEConfig:
    """A toy AnomalyMoE (dim 32, 4 blocks, 3/3/3 experts, K=3) for smoke tests of the benchmark."""
    return AnomalyMoEConfig(
        encoder="vit_small_patch14_reg4_dinov2", pretrained=False, encoder_arch={"embed_dim": 32, "depth": 4, "num_heads": 2},
        img_size=img_size, layers=[0, 1, 2, 3], fuse_groups=[[0, 1], [2, 3]], num_patch_experts=3,
        num_component_experts=3, num_global_experts=3, top_k=3, router_hidden=16, decoder_depth=4, decoder_heads=2,
        num_components=3, component_hidden=16, component_bottleneck=8, global_width=16, global_code=16,
        student_channels=[8, 16], eval_size=32,
    )


def build_model(cfg: AnomalyMoEConfig, seed: int = 0) -> AnomalyMoE:
    """Random-weight model with a one-class component bank built from random embeddings (no data)."""
    torch.manual_seed(seed)
    model = AnomalyMoE(cfg)
    emb = torch.randn(max(64, 16 * cfg.num_components), model.encoder.dim)
    model.component_bank.build({"bench": emb}, seed=seed, niter=5)
    return model.eval()


def make_routes(cfg: AnomalyMoEConfig, batch: int, spread: bool = False) -> dict[str, torch.Tensor]:
    """(B, K) forced expert choices. ``worst``: patch experts only (the most expensive group; filled up
    from the next groups if K > N_p). ``mixed``: one expert of each group in turn. Concentrated (default):
    every sample picks the same experts, so each selected expert runs once on the whole batch. ``spread``:
    sample b shifts the choice by b inside each group, so experts run on sub-batches (B·K/N_group)."""
    sizes = [cfg.num_patch_experts, cfg.num_component_experts, cfg.num_global_experts]
    starts = [0, sizes[0], sizes[0] + sizes[1]]

    def pick(order: list[int], b: int) -> list[int]:
        chosen, used = [], {g: 0 for g in range(3)}
        for g in order:
            if len(chosen) == cfg.top_k:
                break
            if used[g] < sizes[g]:
                chosen.append(starts[g] + ((b if spread else 0) + used[g]) % sizes[g])
                used[g] += 1
        return chosen

    worst = [g for g in range(3) for _ in range(sizes[g])]  # patch first, then the rest
    mixed = [g for _ in range(max(sizes)) for g in range(3)]
    return {
        "worst": torch.tensor([pick(worst, b) for b in range(batch)]),
        "mixed": torch.tensor([pick(mixed, b) for b in range(batch)]),
    }


# --- measuring tools -------------------------------------------------------------------------------
def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU flash-attention kernel (torch has no formula for it)."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_attention_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_attention_backward_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def stage_flops(counter: FlopCounterMode) -> dict[str, float]:
    """Total FLOPs per stage (encoder, router, patch/component/global experts) from the module tree."""
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = "AnomalyMoE"
    out = {"encoder": counts.get(f"{root}.encoder", 0), "router": counts.get(f"{root}.router", 0)}
    for group in GROUPS:
        prefix = f"{root}.{group}_experts."
        out[group] = sum(v for k, v in counts.items() if k.startswith(prefix) and k.count(".") == 2)
    out["total"] = counter.get_total_flops()
    return {k: float(v) for k, v in out.items()}


class StageTimer:
    """Wall time inside the forward of the encoder, the router and each expert group (forward hooks)."""

    def __init__(self, model: AnomalyMoE):
        self.totals: dict[str, float] = defaultdict(float)  # wall seconds
        self.cpu: dict[str, float] = defaultdict(float)  # process CPU seconds (all threads)
        self._t0: dict[int, tuple[float, float]] = {}
        self._handles = []
        stages = {"encoder": [model.encoder], "router": [model.router]}
        stages.update({g: list(getattr(model, f"{g}_experts")) for g in GROUPS})
        for name, modules in stages.items():
            for m in modules:
                self._handles.append(m.register_forward_pre_hook(self._pre))
                self._handles.append(m.register_forward_hook(lambda mod, a, o, name=name: self._post(name, mod)))

    def _pre(self, module, args) -> None:
        self._t0[id(module)] = (time.perf_counter(), time.process_time())

    def _post(self, name: str, module) -> None:
        t0, c0 = self._t0.pop(id(module))
        self.totals[name] += time.perf_counter() - t0
        self.cpu[name] += time.process_time() - c0

    def reset(self) -> None:
        self.totals.clear()
        self.cpu.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class Peak:
    """Best matmul throughput of an n×n @ n×n product in one dtype, sampled during the run: per wall
    second (``best``) and per CPU-second of this process, all threads (``best_cpu``)."""

    def __init__(self, dtype: torch.dtype, n: int):
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=gen).to(dtype)
        self.b = torch.randn(n, n, generator=gen).to(dtype)
        self.flops = 2.0 * n**3
        self.best = self.best_cpu = 0.0
        self.samples: list[float] = []

    def sample(self, reps: int = 2) -> float:
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            torch.mm(self.a, self.b)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            self.samples.append(self.flops / wall)
            self.best = max(self.best, self.flops / wall)
            self.best_cpu = max(self.best_cpu, self.flops / max(cpu, 1e-9))
        return self.best


def autocast(dtype: str):
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def timed_interleaved(
    runs: dict[str, Callable[[], Any]], iters: dict[str, int], timer: StageTimer, peak: Peak
) -> dict[str, tuple[float, float, dict[str, float], Any]]:
    """Per run: best wall time of ``iters[name]`` passes, that pass's process CPU time (all threads), its
    stage times and the output. The passes go round-robin (A, B, C, A, B, C, …) with a peak sample right
    before each, so a neighbour's burst on a shared machine falls on one pass of every run instead of on
    all passes of one run: the speed-up is a ratio of two of these times."""
    best: dict[str, tuple[float, float, dict[str, float], Any]] = {name: (math.inf, math.nan, {}, None) for name in runs}
    for i in range(max(iters.values(), default=0)):
        for name, fn in runs.items():
            if i >= iters[name]:
                continue
            peak.sample()
            timer.reset()
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            elapsed, used = time.perf_counter() - t0, time.process_time() - c0
            if elapsed < best[name][0]:
                best[name] = (elapsed, used, {**timer.totals, **{f"{k}_cpu": v for k, v in timer.cpu.items()}}, out)
            log.info("  pass %d %-6s %8.1f s", i + 1, name, elapsed)
    return best


# --- inference -------------------------------------------------------------------------------------
def bench_inference(model: AnomalyMoE, args, dtypes: list[str]) -> dict[str, Any]:
    """Per dtype: eager passes, then (``--compile``) the same passes with ``compile_for_inference`` — an A/B
    against the same peak samples. Returns shared ``peak``/``flops``/``routes`` and per-variant results."""
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, cfg.img_size, cfg.img_size, generator=gen)
    classes = ["bench"] * args.batch
    routes = make_routes(cfg, args.batch, spread=args.routing == "spread")
    variants = ["eager", "compiled"] if args.compile else ["eager"]
    timer = StageTimer(model)
    res: dict[str, Any] = {"peak": {}, "peak_cpu": {}, "flops": {}, "routes": routes, "compile_s": {}}
    for v in variants:
        res[v] = {"time": {}, "cpu": {}, "stages": {}, "outputs": {}}
    try:
        for dt in dtypes:
            peak = Peak(DTYPES[dt], args.peak_size)
            peak.sample(3)  # warms the GEMM path

            def infer(n=args.batch, sparse=True, route=routes["worst"], dt=dt):
                # a fresh autocast region per pass, as Lightning's test/predict step (no casts cached across passes)
                with torch.no_grad(), autocast(dt):
                    return model(x[:n], classes[:n], sparse=sparse, route=route[:n])

            for variant in variants:
                got = res[variant]
                if variant == "compiled":
                    compile_for_inference(model, args.compile_parts)

                def compiling(run, name, dt=dt):  # the first full-batch pass compiles what it runs
                    t0 = time.perf_counter()
                    run()
                    res["compile_s"][(dt, name)] = time.perf_counter() - t0
                if variant == "eager" and not args.skip_dense:  # dense FLOPs are linear in the batch: count one image (a warm-up too)
                    with flop_counter() as fc:
                        infer(n=1, sparse=False)
                    res["flops"].setdefault("dense", {k: v * args.batch for k, v in stage_flops(fc).items()})
                runs = {pattern: (lambda r=route: infer(route=r)) for pattern, route in routes.items()}
                if not args.skip_dense:
                    runs["dense"] = lambda: infer(sparse=False)
                for name, run in runs.items():
                    if variant == "eager" and name != "dense":
                        # FLOPs (and a warm-up of every op): with concentrated routing sparse FLOPs are linear in
                        # the batch, so one image is counted; spread routing is counted on the whole batch.
                        n = args.batch if args.routing == "spread" else 1
                        with flop_counter() as fc:
                            infer(n=n, route=routes[name])
                        res["flops"].setdefault(f"sparse_{name}", {k: v * args.batch / n for k, v in stage_flops(fc).items()})
                    elif variant == "compiled":
                        compiling(run, name)
                    for _ in range(args.dense_warmup if name == "dense" else args.warmup):
                        run()
                iters = {name: args.dense_iters if name == "dense" else args.iters for name in runs}
                for name, (t, cpu, st, out) in timed_interleaved(runs, iters, timer, peak).items():
                    key = (dt, "dense") if name == "dense" else (dt, "sparse", name)
                    got["time"][key], got["cpu"][key], got["stages"][key], got["outputs"][key] = t, cpu, st, out
                    log.info("%s %s %-12s %8.1f ms/img", dt, variant, name if name == "dense" else f"sparse {name}", 1e3 * t / args.batch)
                if variant == "compiled":
                    uncompile(model)
            peak.sample(3)
            res["peak"][dt], res["peak_cpu"][dt] = peak.best, peak.best_cpu
            log.info("%s matmul peak  %8.1f GFLOP/s (%d samples)", dt, peak.best / 1e9, len(peak.samples))
    finally:
        timer.remove()
        uncompile(model)
    return res


def score_diffs(model: AnomalyMoE, res: dict[str, Any], dtype: str) -> tuple[float, float]:
    """Max |score| and |map| difference, sparse vs dense, over both patterns (dense maps re-fused with
    each pattern's gates: the same fusion the forward uses)."""
    dense = res["outputs"][(dtype, "dense")]
    score_diff = map_diff = 0.0
    with torch.no_grad():
        for pattern in res["routes"]:
            sparse = res["outputs"][(dtype, "sparse", pattern)]
            group_maps, mass = model.fuse_expert_maps(dense.expert_maps.float(), sparse.router.weights)
            a, b = model.scorer(group_maps, mass), model.score(sparse)
            score_diff = max(score_diff, (a.scores - b.scores).abs().max().item())
            map_diff = max(map_diff, (a.maps - b.maps).abs().max().item())
    return score_diff, map_diff


# --- training --------------------------------------------------------------------------------------
TRAIN_STAGES = ("encoder", *GROUPS, "router_esb", "eir_club", "optimizer", "other")


def bench_train(model: AnomalyMoE, args, dtypes: list[str]) -> dict[str, Any]:
    """One training step per dtype as ``AnomalyMoEModule.training_step`` (without Lightning): dense experts,
    the AE view's jittered second encoder pass, StableAdamW with grad clipping, the CLUB step; bf16 runs
    the forward and the losses under autocast, as Lightning's ``bf16-mixed``.

    Per dtype: a 1-image step under FlopCounterMode (the FLOPs, forward and backward, scaled by the batch;
    it also warms up every forward and backward op), ``--train-warmup`` untimed steps, then one profiled,
    timed step at ``--train-batch`` (or the largest batch that fits in memory) with matmul peak samples
    around it."""
    out: dict[str, Any] = {"ms": {}, "util": {}, "stages": {}, "peak": {}, "breakdown": {}, "finite": {}, "batch": {}, "batch_reason": {}, "ms_img": {}}
    for dt in dtypes:
        peak = Peak(DTYPES[dt], args.peak_size)
        peak.sample(3)
        r = bench_train_step(model, args.train_batch, args.train_warmup, dt, peak)
        peak.sample(3)
        total_flops = r["flops"]["total"]
        out["ms"][dt] = round(1e3 * r["seconds"], 1)
        out["ms_img"][dt] = round(1e3 * r["seconds"] / r["batch"], 1)
        out["util"][dt] = round(total_flops / r["seconds"] / peak.best, 3)
        out["peak"][dt] = round(peak.best / 1e9, 1)
        out["breakdown"][dt] = {k: round(1e3 * v, 1) for k, v in r["stage_seconds"].items()}
        out["finite"][dt] = r["finite"]
        out["batch"][dt], out["batch_reason"][dt] = r["batch"], r["batch_reason"]
        out["stages"][dt] = {
            s: {
                "ms": round(1e3 * r["stage_seconds"][s], 1),
                "gflop": round(r["flops"].get(s, 0.0) / 1e9, 2),
                "utilization": round(r["flops"][s] / r["stage_seconds"][s] / peak.best, 3)
                if r["flops"].get(s) and r["stage_seconds"][s] > 0 else None,
            }
            for s in TRAIN_STAGES
        }
        log.info("%s train step  %8.1f ms (batch %d: %s), utilisation %.3f", dt, 1e3 * r["seconds"], r["batch"], r["batch_reason"], out["util"][dt])
    first = dtypes[0]
    return {
        "train_ms_per_step": out["ms"],
        "train_ms_per_img": out["ms_img"],
        "train_flops_utilization": out["util"],
        "train_stage_table": out["stages"],
        "train_peak_gflops": out["peak"],
        "train_batch": out["batch"],
        "train_batch_reason": out["batch_reason"],
        # the keys of the earlier batch-2 fp32 measurement, now from the first dtype's step
        "train_step_ms": out["ms"][first],
        "train_step_breakdown_ms": out["breakdown"][first],
        "train_loss_finite": all(out["finite"].values()),
    }


def train_step_flops(model: AnomalyMoE, one_step: Callable[[], Any], dtype: str) -> dict[str, float]:
    """FLOPs of one training step (forward + backward), per stage. FlopCounterMode's total is exact, but
    its module attribution of backward ops is not (on a toy model the stages summed to twice the total).
    So: total and encoder (forward only, frozen) from the step itself; each expert group = its number of
    experts × the forward + backward of its first expert, re-run alone on the input it got in the step
    (its backward is the same graph: the inputs need no gradient); the rest (router, losses, ESB, EIR and
    the CLUB step) = total − those."""
    inputs: dict[str, tuple] = {}
    firsts = {g: getattr(model, f"{g}_experts")[0] for g in GROUPS if len(getattr(model, f"{g}_experts"))}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, g=g: inputs.setdefault(g, tuple(a.detach() for a in args)))
        for g, m in firsts.items()
    ]
    try:
        with flop_counter() as fc:
            one_step()
    finally:
        for h in hooks:
            h.remove()
    counted = stage_flops(fc)
    out = {"total": counted["total"], "encoder": counted["encoder"]}
    model.train()
    for g in GROUPS:
        out[g] = 0.0
        if g not in firsts:
            continue
        with flop_counter() as fc_g, autocast(dtype):
            res = firsts[g](*inputs[g])
            leaves = [t for t in (res if isinstance(res, list | tuple) else [res]) if isinstance(t, torch.Tensor)]
            loss = sum(t.float().sum() for t in leaves)
        with flop_counter() as fc_b:
            loss.backward()
        firsts[g].zero_grad(set_to_none=True)
        out[g] = float(fc_g.get_total_flops() + fc_b.get_total_flops()) * len(getattr(model, f"{g}_experts"))
    out["router_esb"] = 0.0  # a (B, D) x (D, 256) MLP: counted in eir_club below
    out["eir_club"] = max(0.0, out["total"] - out["encoder"] - sum(out[g] for g in GROUPS))
    return out


def _meminfo_mb(field: str, path: str = "/proc/meminfo") -> float | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _max_rss_gb() -> float | None:
    """This process's peak resident memory so far (GB; Linux's VmHWM, None elsewhere)."""
    peak_mb = _meminfo_mb("VmHWM", "/proc/self/status")
    return None if peak_mb is None else round(peak_mb / 1024, 1)


def _fitting_train_batch(requested: int, per_img_mb: float) -> tuple[int, str]:
    """The largest batch <= ``requested`` whose training step fits in the available memory: 1.25× the
    tensors the 1-image step kept for its backward (``per_img_mb``) per image, and 1 GB spare.

    The saved tensors undercount a step's growth a little (paper model, fp32, 24 GB machine: 5.5 GB counted
    per image; a warm batch-1 step grew the RSS by 6.1 GB over the 8.3 GB after the 1-image step), and a
    step at batch 4 there was killed by the OOM killer at 24.3 GB."""
    release_freed_memory()  # the 1-image step's freed activations, kept by malloc, count as available
    free = _meminfo_mb("MemAvailable")
    if free is None:
        return requested, "requested (no memory information)"
    fits = max(1, min(requested, int((free - 1024) / (1.25 * max(per_img_mb, 1.0)))))
    why = f"{per_img_mb / 1024:.1f} GB kept for the backward per image (1.25x counted), {free / 1024:.1f} GB available"
    return fits, ("requested; " if fits == requested else f"batch {requested} does not fit: ") + why


def bench_train_step(model: AnomalyMoE, batch: int, warmup: int, dtype: str = "fp32", peak: Peak | None = None) -> dict[str, Any]:
    """One dense training step as AnomalyMoEModule.training_step (without Lightning), profiled: its wall
    time, per-stage time (forward + backward) and per-stage FLOPs (counted on a 1-image step, times ``batch``)."""
    from optimi import StableAdamW

    cfg = model.config
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=gen)
    classes = ["bench"] * batch
    model.train()
    opt = StableAdamW(model.trainable_parameters(), lr=5e-4, betas=(0.9, 0.999), weight_decay=1e-4, triton=False)
    club_opt = torch.optim.Adam(model.eir.parameters(), lr=1e-4, weight_decay=1e-4)
    scopes = {"encoder": [model.encoder], "router": [model.router], "eir": [model.eir]}
    scopes.update({g: list(getattr(model, f"{g}_experts")) for g in GROUPS})
    handles, open_scopes = [], {}
    for name, modules in scopes.items():
        for m in modules:
            def pre(mod, args, name=name):
                open_scopes[id(mod)] = torch.autograd.profiler.record_function(f"stage:{name}").__enter__()

            def post(mod, args, out):
                open_scopes.pop(id(mod)).__exit__(None, None, None)

            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def scope(name):
        return torch.autograd.profiler.record_function(f"stage:{name}")

    saved: dict[int, int] = {}  # storages kept for the backward by the last step: data_ptr -> bytes

    def keep(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def step(n: int):
        saved.clear()
        with autocast(dtype), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            # Lightning's bf16-mixed: forward and losses under autocast, backward outside
            out = model(x[:n], classes[:n])  # dense; the AE view is jittered -> a second encoder pass
            with scope("loss"):
                losses = model.loss(out)
        with scope("zero_grad"):
            opt.zero_grad(set_to_none=True)
        losses.total.backward()
        with scope("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 0.1)
            opt.step()
        if cfg.use_eir and out.reps:
            with scope("club"):
                club_opt.zero_grad(set_to_none=True)
                club = model.eir.estimator_loss(out.reps)
                club.backward()
                torch.nn.utils.clip_grad_norm_(model.eir.parameters(), 0.1)
                club_opt.step()
        return losses

    try:
        # one image: its CLUB bound has no non-matched pair and runs no MLP (about 0.3 GFLOP of the ~3 950 per image: < 1e-4)
        flops1 = train_step_flops(model, lambda: step(1), dtype)
        batch, why = _fitting_train_batch(batch, sum(saved.values()) / 2**20)
        log.info("%s train step: batch %d (%s), %d warm-up step(s) first", dtype, batch, why, warmup)
        flops = {k: v * batch for k, v in flops1.items()}
        for _ in range(warmup):
            step(batch)  # the fitted batch
        if peak is not None:
            peak.sample()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            losses = step(batch)
            total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)  # frees ~1.7 GB of gradients before the next dtype's step
        model.eval()
    breakdown = attribute(prof.events())
    merged = {
        "encoder": breakdown.get("encoder", 0.0),
        **{g: breakdown.get(g, 0.0) for g in GROUPS},
        "router_esb": breakdown.get("router", 0.0) + breakdown.get("loss", 0.0),
        "eir_club": breakdown.get("eir", 0.0) + breakdown.get("club", 0.0),
        "optimizer": breakdown.get("optimizer", 0.0) + breakdown.get("zero_grad", 0.0),
    }
    merged["other"] = max(0.0, total - sum(merged.values()))
    return {
        "batch": batch,
        "batch_reason": why,
        "seconds": total,
        "stage_seconds": merged,
        "flops": flops,
        "finite": bool(torch.isfinite(losses.total)),
    }


def attribute(events) -> dict[str, float]:
    """Seconds per stage: forward = time inside ``stage:*`` scopes (self, nested scopes excluded);
    backward = autograd nodes whose creating forward op ran inside that stage (matched by sequence nr)."""
    by_id = {}
    stage_of_seq: dict[int, tuple[float, str]] = {}
    forward: dict[str, float] = defaultdict(float)

    def stage(evt) -> str | None:
        p = evt.cpu_parent
        while p is not None:
            if p.name.startswith("stage:"):
                return p.name[6:]
            p = p.cpu_parent
        return None

    for evt in events:
        by_id[id(evt)] = evt
        if evt.name.startswith("stage:"):
            nested = sum(c.cpu_time_total for c in _descendant_scopes(evt))
            forward[evt.name[6:]] += (evt.cpu_time_total - nested) / 1e6
        elif evt.sequence_nr >= 0 and not evt.name.startswith("autograd::"):
            s = stage(evt)
            start = evt.time_range.start
            if s is not None and (evt.sequence_nr not in stage_of_seq or start >= stage_of_seq[evt.sequence_nr][0]):
                stage_of_seq[evt.sequence_nr] = (start, s)
    backward: dict[str, float] = defaultdict(float)
    for evt in events:
        if evt.name.startswith("autograd::engine::evaluate_function") and stage(evt) is None:
            s = stage_of_seq.get(evt.sequence_nr, (0, "other"))[1]
            backward[s] += evt.cpu_time_total / 1e6
    return {k: forward.get(k, 0.0) + backward.get(k, 0.0) for k in set(forward) | set(backward)}


def _descendant_scopes(evt):
    """The outermost ``stage:*`` scopes nested inside ``evt``."""
    out, todo = [], list(evt.cpu_children)
    while todo:
        c = todo.pop()
        if c.name.startswith("stage:"):
            out.append(c)
        else:
            todo.extend(c.cpu_children)
    return out


# --- report ----------------------------------------------------------------------------------------
def report(model: AnomalyMoE, args, res: dict[str, Any] | None, train: dict[str, Any] | None, wall: float) -> dict[str, Any]:
    out = compare_variants(model, args, res) if res is not None else {}
    if train:
        out.update(train)
    out["setup"] = {
        "batch": args.batch, "img_size": model.config.img_size, "quick": args.quick, "routing": args.routing, "warmup": args.warmup,
        "iters": args.iters, "dense_warmup": args.dense_warmup, "dense_iters": args.dense_iters, "peak_size": args.peak_size,
        "train_batch": args.train_batch, "train_warmup": args.train_warmup,
        "threads": torch.get_num_threads(), "threads_reason": args.threads_reason, "load_average_at_start": args.load,
        "torch": torch.__version__, "cpu": _cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fp32_inference_linear_gemm": inference_gemm(), "wall_s": round(wall, 1), "max_rss_gb": _max_rss_gb(),
    }
    if args.dtypes_skipped:
        out["dtypes_skipped"] = args.dtypes_skipped
    return out


EAGER_KEYS = (
    "flops_utilization", "flops_utilization_mixed", "speedup_dense_over_sparse", "max_abs_score_diff",
    "sparse_ms_per_img", "dense_ms_per_img", "flops_utilization_all", "speedup_dense_over_sparse_all", "stage_ms_per_img",
)


def compare_variants(model: AnomalyMoE, args, res: dict[str, Any]) -> dict[str, Any]:
    """The report of the last variant (``compiled`` with ``--compile``, else ``eager``) at the top level, the
    eager one's main keys under ``eager``, and what compiling bought: eager time / compiled time per dtype
    and pass (``compile_gain``), per stage, the compile seconds and the compiled-vs-eager score difference."""
    shared = {k: res[k] for k in ("peak", "peak_cpu", "flops", "routes")}
    variants = [v for v in ("eager", "compiled") if v in res]
    reports = {v: inference_report(model, args, {**shared, **res[v]}) for v in variants}
    out = {"inference_mode": variants[-1], **reports[variants[-1]]}
    if "compiled" not in res:
        return out
    eager, comp = res["eager"], res["compiled"]
    out["eager"] = {k: reports["eager"][k] for k in EAGER_KEYS if k in reports["eager"]}
    gain: dict[str, dict[str, float]] = defaultdict(dict)
    stage_gain: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for key, t in comp["time"].items():
        name = key[2] if key[1] == "sparse" else "dense"
        gain[key[0]][name] = round(eager["time"][key] / t, 3)
        st_e, st_c = eager["stages"][key], comp["stages"][key]
        stage_gain[key[0]][name] = {s: round(st_e[s] / st_c[s], 3) for s in STAGES if st_c.get(s) and st_e.get(s)}
    out["compile_gain"], out["compile_gain_by_stage"] = dict(gain), dict(stage_gain)
    out["compile_s"] = {f"{dt}/{name}": round(s, 1) for (dt, name), s in res["compile_s"].items()}
    out["compile_parts"] = list(args.compile_parts)
    diff: dict[str, float] = defaultdict(float)
    with torch.no_grad():  # the compiled graphs' scores against eager's, same dtype and routing
        for key, o in comp["outputs"].items():
            d = (model.score(o).scores - model.score(eager["outputs"][key]).scores).abs().max().item()
            diff[key[0]] = max(diff[key[0]], d)
    out["compiled_vs_eager_max_abs_score_diff"] = dict(diff)
    return out


def inference_report(model: AnomalyMoE, args, res: dict[str, Any]) -> dict[str, Any]:
    b = args.batch
    dtypes = list(res["peak"])
    patterns = list(res["routes"])
    ms = lambda s: round(1e3 * s / b, 2)  # noqa: E731  seconds per batch -> ms per image
    flops = res["flops"]
    enc_ms, dense_ms, sparse_ms, util, speedup, stage_util, util_cpu, share = {}, {}, {}, {}, {}, {}, {}, {}
    stage_util_cpu: dict[str, Any] = {}
    threads = torch.get_num_threads()
    for dt in dtypes:
        peak = res["peak"][dt]
        t_dense = res["time"].get((dt, "dense"), math.nan)
        enc_ms[dt], dense_ms[dt], sparse_ms[dt], util[dt], speedup[dt], stage_util[dt] = {}, {}, {}, {}, {}, {}
        util_cpu[dt], share[dt], stage_util_cpu[dt] = {}, {}, {}
        for key, t in res["time"].items():
            if key[0] == dt:
                name = key[2] if key[1] == "sparse" else "dense"
                share[dt][name] = round(res["cpu"][key] / (t * threads), 2)
                f = flops[f"sparse_{name}" if key[1] == "sparse" else "dense"]["total"]
                util_cpu[dt][name] = round(f / res["cpu"][key] / res["peak_cpu"][dt], 3)
        for p in patterns:
            t = res["time"][(dt, "sparse", p)]
            st = res["stages"][(dt, "sparse", p)]
            enc_ms[dt][p] = ms(st.get("encoder", 0.0))
            dense_ms[dt][p] = ms(t_dense)
            sparse_ms[dt][p] = ms(t)
            util[dt][p] = round(flops[f"sparse_{p}"]["total"] / t / peak, 3)
            speedup[dt][p] = round(t_dense / t, 2)
            fs = flops[f"sparse_{p}"]
            stage_util[dt][p] = {s: round(fs[s] / st[s] / peak, 3) for s in STAGES if st.get(s) and fs[s] > 0}
            stage_util_cpu[dt][p] = {
                s: round(fs[s] / st[f"{s}_cpu"] / res["peak_cpu"][dt], 3) for s in STAGES if st.get(f"{s}_cpu") and fs[s] > 0
            }
        if (dt, "dense") in res["stages"]:
            st, fd = res["stages"][(dt, "dense")], flops["dense"]
            stage_util[dt]["dense"] = {s: round(fd[s] / st[s] / peak, 3) for s in STAGES if st.get(s) and fd[s] > 0}
            util[dt]["dense"] = round(fd["total"] / t_dense / peak, 3)
    diff_dtype = sp_dt = "fp32" if "fp32" in dtypes else dtypes[0]
    score_diff, map_diff = score_diffs(model, res, diff_dtype) if (diff_dtype, "dense") in res["outputs"] else (math.nan, math.nan)
    ref = "bf16" if "bf16" in dtypes else dtypes[0]
    out = {
        "encoder_ms_per_img": enc_ms,
        "dense_ms_per_img": dense_ms,
        "sparse_ms_per_img": sparse_ms,
        "speedup_dense_over_sparse": speedup[sp_dt]["worst"],
        "speedup_dense_over_sparse_all": speedup,
        # derived: the release's inference also encodes a second (jittered) view -> dense + one encoder pass
        "speedup_release_inference_over_sparse": round(
            (res["time"].get((sp_dt, "dense"), math.nan) + res["stages"].get((sp_dt, "dense"), {}).get("encoder", math.nan))
            / res["time"][(sp_dt, "sparse", "worst")], 2,
        ),
        "max_abs_score_diff": score_diff,
        "max_abs_map_diff": map_diff,
        "flops_utilization_dtype": ref,
        "flops_utilization": util[ref]["worst"],
        "flops_utilization_mixed": util[ref]["mixed"],
        "flops_utilization_all": util,
        "flops_utilization_cpu_time": util_cpu,
        "cpu_share": share,
        "stage_utilization": stage_util,
        "stage_utilization_cpu_time": stage_util_cpu,
        "stage_ms_per_img": {
            dt: {k[-1] if k[1] == "sparse" else "dense": {s: ms(v) for s, v in res["stages"][k].items() if not s.endswith("_cpu")}
                 for k in res["stages"] if k[0] == dt}
            for dt in dtypes
        },
        "peak_gflops": {dt: round(v / 1e9, 1) for dt, v in res["peak"].items()},
        "peak_gflops_per_cpu_second": {dt: round(v / 1e9, 1) for dt, v in res["peak_cpu"].items()},
        "gflop_per_img": {k: {s: round(v / b / 1e9, 2) for s, v in f.items()} for k, f in flops.items()},
        "routes": {p: r.tolist() for p, r in res["routes"].items()},
    }
    if len(dtypes) > 1:
        lo, hi = res["outputs"][("bf16", "sparse", "worst")], res["outputs"][("fp32", "sparse", "worst")]
        with torch.no_grad():
            out["bf16_vs_fp32_max_abs_score_diff"] = (model.score(lo).scores - model.score(hi).scores).abs().max().item()
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def choose_threads(requested: int | None) -> tuple[int, str]:
    """All cores on an idle machine. On a shared one (load average above 0.5 before we start), one
    thread: every parallel region of a multi-threaded pass waits for the slowest thread, and a thread
    that shares its core with another process stalls all of them (measured here on 2 cores under load:
    2 threads were slower than 1). The peak is measured with the same threads, so ratios stay fair."""
    if requested:
        return requested, "requested"
    cores = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores > 1 and load > 0.5:
        return 1, f"load average {load:.1f} on {cores} cores: shared machine, per-core measurement"
    return cores, f"load average {load:.1f}: all {cores} cores"


def bench_config(args: argparse.Namespace) -> AnomalyMoEConfig:
    """The benchmarked model: the paper configuration with random weights, or the toy one (``--quick``)."""
    return quick_config(args.img_size) if args.quick else AnomalyMoEConfig(pretrained=False, img_size=args.img_size)


def op_table(fn, title: str, dtype: str) -> str:
    """Markdown table of the ops taking ≥1 % of ``fn()``'s self CPU time (one profiled pass after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    lines = [f"{title}: {total / 1e6:.2f} s self CPU", "", "| op | share | calls |", "|---|---|---|"]
    rest = 0.0
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total):
        share = e.self_cpu_time_total / total
        if share >= 0.01:
            lines.append(f"| `{e.key}` | {share:.1%} | {e.count} |")
        else:
            rest += share
    return "\n".join([*lines, f"| (ops under 1 % each) | {rest:.1%} | |"])


def op_profile(args: argparse.Namespace) -> int:
    """``--op-profile``: where the encoder's and one patch expert's time goes, op by op (docs/PERFORMANCE.md)."""
    cfg = bench_config(args)
    cfg = replace(cfg, num_patch_experts=1, num_component_experts=0, num_global_experts=0, top_k=1)
    torch.manual_seed(0)
    model = AnomalyMoE(cfg).eval()
    x = torch.randn(args.batch, 3, cfg.img_size, cfg.img_size)
    setting = f"{torch.get_num_threads()} thread(s), batch {args.batch}, {cfg.img_size} px"
    for dtype in args.dtypes.split(","):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
            fused = fuse_layers(model.encoder(x).layers)
        print(op_table(lambda: model.encoder(x), f"Encoder ({dtype}, {setting})", dtype) + "\n", flush=True)
        print(op_table(lambda f=fused: model.patch_experts[0](f), f"One patch expert ({dtype}, {setting})", dtype) + "\n", flush=True)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="amoe bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=None, help="input side (default: 392, --quick: 56)")
    p.add_argument(
        "--warmup", type=int, default=0,
        help="untimed full-batch sparse passes after the 1-image counting pass (first-call overhead measured <1 %%)",
    )
    p.add_argument(
        "--iters", type=int, default=2,
        help="timed sparse passes, the best counts (a pass is 10-25 s on 2 cores: one neighbour burst moved a single pass by 10 %%)",
    )
    p.add_argument("--dense-warmup", type=int, default=0, help="untimed full-batch dense passes (a 1-image dense pass always runs first)")
    p.add_argument("--dense-iters", type=int, default=2, help="timed dense passes, the best counts (as --iters)")
    p.add_argument("--skip-dense", action="store_true", help="no dense passes (faster; no speed-up / score check)")
    p.add_argument(
        "--dtypes", default="auto",
        help="comma list of fp32, bf16; auto = fp32, and bf16 where the CPU has a vectorised bf16 path (amoe.hardware)",
    )
    p.add_argument(
        "--routing", choices=("concentrated", "spread"), default="concentrated",
        help="forced routes: every sample the same K experts (default), or spread over each group's experts",
    )
    p.add_argument("--peak-size", type=int, default=None, help="matmul side for the peak (default 4096, --quick: 256)")
    p.add_argument("--train-batch", type=int, default=4, help="training-step batch (the paper's 4)")
    p.add_argument(
        "--train-warmup", type=int, default=1,
        help="untimed full-batch training steps before the profiled one, so that it reuses memory as a training loop "
        "does (a first step at a new batch size faults all its activations in: 57-61 s against 48 s, paper model, "
        "batch 1, AVX2); a 1-image counting step always runs first",
    )
    p.add_argument("--no-train", action="store_true", help="skip the training step")
    p.add_argument("--train", action="store_true", help="only the training step (no inference passes)")
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch threads (default: all cores on an idle machine; 1 when the load average shows other work)",
    )
    p.add_argument(
        "--runtimes", default="auto",
        help="exported-model runtimes timed next to PyTorch (amoe bench --runtime, in a child process): "
        "comma list of onnxruntime, openvino; auto = those installed; none = skip",
    )
    p.add_argument(
        "--compile", action="store_true",
        help="after the eager passes, the same passes with amoe.compile.compile_for_inference (inductor, freezing): "
        "the headline keys are then the compiled ones, eager's go under 'eager', the gain under 'compile_gain'",
    )
    p.add_argument("--compile-parts", default="encoder,patch", help="what --compile compiles: encoder,patch,component,global")
    p.add_argument("--quick", action="store_true", help="tiny model, for a smoke test of the benchmark itself")
    p.add_argument("--op-profile", action="store_true", help="only print op tables of the encoder and one patch expert")
    args = p.parse_args(argv)
    args.img_size = args.img_size or (56 if args.quick else 392)
    args.peak_size = args.peak_size or (256 if args.quick else 4096)
    args.dtypes_skipped = {}
    if args.dtypes == "auto":  # an explicit list is run as given, even where bf16 is slow
        fast = cpu_bf16_is_fast()
        args.dtypes = "fp32,bf16" if fast else "fp32"
        if not fast:
            args.dtypes_skipped = {"bf16": bf16_cpu_hint()}
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad:
        p.error(f"unknown dtype(s) {bad}; use fp32 and/or bf16")
    if args.train and args.no_train:
        p.error("--train and --no-train exclude each other")
    args.compile_parts = tuple(x.strip() for x in args.compile_parts.split(",") if x.strip())
    unknown = [x for x in args.compile_parts if x not in COMPILE_PARTS]
    if unknown:  # checked here, not after minutes of eager passes
        p.error(f"--compile-parts {unknown} unknown; choose among {list(COMPILE_PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("amoe.component_bank", "faiss", "faiss.loader"):
        logging.getLogger(name).setLevel(logging.WARNING)
    args.load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    threads, why = choose_threads(args.threads)
    args.threads_reason = why
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    log.info("threads: %d (%s)", threads, why)
    for dt, reason in args.dtypes_skipped.items():
        log.warning("%s skipped: %s; --dtypes fp32,%s runs it anyway", dt, reason, dt)
    try:
        return op_profile(args) if args.op_profile else _run(args)
    finally:
        torch.set_num_threads(before)


def installed_runtimes(spec: str) -> list[str]:
    """``--runtimes``: auto -> the installed ones among onnxruntime and openvino; none -> []."""
    if spec == "none":
        return []
    if spec != "auto":
        return [r.strip() for r in spec.split(",") if r.strip()]
    import importlib.util

    return [r for r in ("onnxruntime", "openvino") if importlib.util.find_spec(r) is not None]


def bench_runtimes(args: argparse.Namespace) -> dict:
    """The exported model under each runtime next to PyTorch (same batch, threads, routing), run as
    ``amoe bench --runtime`` in a child process; its keys join this run's JSON line (``runtime_*`` for its
    own PyTorch figure and settings). Inference-only runs (--train) skip it."""
    runtimes = [] if args.train else installed_runtimes(args.runtimes)
    if not runtimes:
        return {}
    cmd = [sys.executable, "-m", "amoe.bench_runtime", "--runtime", ",".join(runtimes), "--batch", str(args.batch),
           "--img-size", str(args.img_size), "--threads", str(torch.get_num_threads())] + (["--quick"] if args.quick else [])
    log.info("runtimes %s: %s", ",".join(runtimes), " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-2000:]
        log.warning("runtime benchmark failed (exit %d):\n%s", proc.returncode, tail)
        return {"runtime_error": f"amoe bench --runtime exited {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"}
    got = json.loads(lines[-1])
    keep = {k: v for k, v in got.items() if k.startswith(("ms_per_img_", "speedup_", "routing_identical_", "max_score_diff_"))}
    keep["runtime_ms_per_img_torch"] = keep.pop("ms_per_img_torch")
    keep.update({f"runtime_{k}": got[k] for k in ("batch", "threads", "export_s") if k in got})
    return keep


def _run(args: argparse.Namespace) -> int:
    # the runtime child first, while this process holds no model: both at paper size exceed 24 GB together
    runtimes = bench_runtimes(args)
    cfg = bench_config(args)
    t0 = time.perf_counter()
    model = build_model(cfg)
    log.info(
        "amoe bench: %s, %d px, batch %d, %d/%d/%d experts, K=%d, %d threads (random weights)",
        "quick toy model" if args.quick else cfg.encoder, cfg.img_size, args.batch, cfg.num_patch_experts,
        cfg.num_component_experts, cfg.num_global_experts, cfg.top_k, torch.get_num_threads(),
    )
    dtypes = args.dtypes.split(",")
    # training first: its batch is fitted to the memory available, which is most before anything else ran
    train = None if args.no_train else bench_train(model, args, dtypes)
    release_freed_memory()  # the optimiser state and the step's activations, kept by malloc
    res = None if args.train else bench_inference(model, args, dtypes)
    out = report(model, args, res, train, time.perf_counter() - t0)
    out.update(runtimes)
    for key in ("encoder_ms_per_img", "dense_ms_per_img", "sparse_ms_per_img", "stage_utilization", "train_stage_table"):
        if key in out:
            log.info("%s: %s", key, json.dumps(out[key]))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
