"""``amoe bench --quick``: the benchmark runs end to end on a toy model and prints its JSON last."""

import json
import math

import pytest
import torch

from amoe.bench import StageTimer, build_model, main, make_routes, parse_args, quick_config, timed_interleaved


def _leaves(d, path=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, (*path, k))
    else:
        yield path, d


def test_quick_bench_prints_the_json_with_finite_values(capsys):
    assert main(["--quick", "--batch", "2", "--iters", "1", "--peak-size", "128", "--runtimes", "none", "--dtypes", "fp32,bf16"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    out = json.loads(last)
    for key in ("encoder_ms_per_img", "dense_ms_per_img", "sparse_ms_per_img"):
        assert set(out[key]) == {"fp32", "bf16"}
        assert all(set(v) == {"worst", "mixed"} for v in out[key].values())
    for key in (
        "speedup_dense_over_sparse", "max_abs_score_diff", "flops_utilization", "flops_utilization_mixed", "train_step_ms",
    ):
        assert isinstance(out[key], float) and math.isfinite(out[key]), key
    assert out["max_abs_score_diff"] <= 1e-5
    assert set(out["train_step_breakdown_ms"]) >= {"encoder", "patch", "component", "global", "router_esb", "eir_club"}
    for key in ("train_ms_per_step", "train_flops_utilization"):
        assert set(out[key]) == {"fp32", "bf16"}, key
        assert all(v > 0 for v in out[key].values()), key
    for table in out["train_stage_table"].values():  # per-stage FLOPs add up to at most the step's total
        assert set(table) >= {"encoder", "patch", "component", "global", "eir_club", "optimizer", "other"}
    numbers = [(p, v) for p, v in _leaves(out) if isinstance(v, float)]
    bad = [p for p, v in numbers if not math.isfinite(v)]
    assert not bad, bad
    assert out["gflop_per_img"]["dense"]["total"] > out["gflop_per_img"]["sparse_worst"]["total"] > 0


@pytest.mark.parametrize("fast", [True, False])
def test_auto_dtypes_run_bf16_only_where_the_cpu_has_a_fast_path(monkeypatch, fast):
    import amoe.bench

    monkeypatch.setattr(amoe.bench, "cpu_bf16_is_fast", lambda: fast)
    args = amoe.bench.parse_args(["--quick"])
    assert args.dtypes == ("fp32,bf16" if fast else "fp32")
    assert ("bf16" in args.dtypes_skipped) is not fast
    assert amoe.bench.parse_args(["--quick", "--dtypes", "fp32,bf16"]).dtypes == "fp32,bf16"  # asked for: run as given


def test_a_skipped_dtype_is_named_in_the_json(monkeypatch, capsys):
    import amoe.bench

    monkeypatch.setattr(amoe.bench, "cpu_bf16_is_fast", lambda: False)
    assert main(["--quick", "--batch", "2", "--iters", "1", "--dense-iters", "1", "--peak-size", "128", "--runtimes", "none", "--no-train"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["sparse_ms_per_img"]) == {"fp32"} and out["flops_utilization_dtype"] == "fp32"
    assert "scalar GEMM" in out["dtypes_skipped"]["bf16"]


@pytest.mark.slow  # 30-37 s of inductor compiles on 2 cores; compile_for_inference itself is tested in make test (tests/test_compile.py)
def test_compile_ab_reports_compiled_headline_and_eager_keys(capsys):
    """--compile: eager passes, then the same passes compiled; the headline is the compiled run's. Only the
    patch experts are compiled here (compiling the encoder too doubled this test's time); the default parts
    are checked on the parsed arguments."""
    assert parse_args(["--compile"]).compile_parts == ("encoder", "patch")
    args = ["--quick", "--batch", "2", "--peak-size", "128", "--runtimes", "none", "--no-train", "--dtypes", "fp32", "--compile"]
    assert main([*args, "--compile-parts", "patch", "--iters", "1", "--dense-iters", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["inference_mode"] == "compiled" and out["compile_parts"] == ["patch"]
    assert set(out["eager"]) >= {"flops_utilization", "speedup_dense_over_sparse", "max_abs_score_diff"}
    assert set(out["compile_gain"]["fp32"]) == {"worst", "mixed", "dense"}
    assert all(v > 0 for v in out["compile_gain"]["fp32"].values())
    assert set(out["compile_s"]) == {"fp32/worst", "fp32/mixed", "fp32/dense"}
    assert out["compiled_vs_eager_max_abs_score_diff"]["fp32"] <= 1e-5 and out["max_abs_score_diff"] <= 1e-5
    with pytest.raises(SystemExit):  # an unknown part is refused before any pass runs
        main([*args, "--compile-parts", "encoder,decoder"])


def test_timed_passes_go_round_robin_and_keep_each_runs_fastest(monkeypatch):
    """worst, mixed, dense, worst, mixed, dense: a burst slows one pass of each run, not one run."""
    calls = []
    durations = {"worst": [5.0, 3.0], "mixed": [2.0, 4.0], "dense": [9.0]}
    now = [0.0]

    def fake_clock():
        return now[0]

    class CountingPeak:
        def sample(self):
            calls.append("peak")

    def make(name):
        def run():
            calls.append(name)
            now[0] += durations[name][calls.count(name) - 1]
            return name
        return run

    monkeypatch.setattr("amoe.bench.time.perf_counter", fake_clock)
    timer = StageTimer(build_model(quick_config()))
    got = timed_interleaved({n: make(n) for n in durations}, {"worst": 2, "mixed": 2, "dense": 1}, timer, CountingPeak())
    timer.remove()
    assert calls == ["peak", "worst", "peak", "mixed", "peak", "dense", "peak", "worst", "peak", "mixed"]
    assert {n: got[n][0] for n in got} == {"worst": 3.0, "mixed": 2.0, "dense": 9.0}
    assert [got[n][3] for n in got] == ["worst", "mixed", "dense"]


def test_forced_routes_have_the_intended_groups():
    cfg = quick_config()  # 3/3/3 experts, K=3
    for spread in (False, True):
        routes = make_routes(cfg, 4, spread=spread)
        assert routes["worst"].shape == routes["mixed"].shape == (4, 3)
        assert (routes["worst"] < 3).all()  # patch experts only
        assert (routes["mixed"] // 3 == torch.arange(3)).all()  # one of each group
        assert all(len(set(r.tolist())) == 3 for r in routes["worst"])
    assert len({tuple(r.tolist()) for r in make_routes(cfg, 4, spread=True)["worst"]}) > 1



def test_op_profile_prints_one_table_per_stage_and_dtype(capsys):
    assert main(["--quick", "--op-profile", "--dtypes", "fp32,bf16", "--batch", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for title in ("Encoder (fp32", "One patch expert (fp32", "Encoder (bf16", "One patch expert (bf16"):
        assert title in out, title
    shares = [float(line.split("|")[2].strip().rstrip("%")) for line in out.splitlines() if line.startswith("| `")]
    assert shares and all(1.0 <= s <= 100.0 for s in shares)
    assert "aten::addmm" in out or "aten::mm" in out  # the GEMMs are there


def test_train_only_prints_the_training_keys(capsys):
    assert main(["--quick", "--train", "--dtypes", "fp32", "--train-batch", "2", "--peak-size", "128", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["train_ms_per_step"]) == set(out["train_flops_utilization"]) == {"fp32"}
    assert 0 < out["train_flops_utilization"]["fp32"] < 1.5
    assert "sparse_ms_per_img" not in out and out["train_loss_finite"] is True


def test_training_step_flops_are_linear_in_the_batch_and_add_up():
    """bench_train counts a small step and scales it by the batch: that must be exact (2 and 4 images; a
    batch of one has no non-matched CLUB pair, so its EIR bound runs no MLP: docs/FIDELITY.md row 34)."""
    from amoe.bench import build_model, train_step_flops

    model = build_model(quick_config()).train()
    x = torch.randn(4, 3, 56, 56)

    def step(n):
        out = model(x[:n], ["bench"] * n)
        model.loss(out).total.backward()
        model.eir.estimator_loss(out.reps).backward()

    one, three = (train_step_flops(model, lambda n=n: step(n), "fp32") for n in (2, 4))
    for k, v in one.items():
        assert three[k] == pytest.approx(2 * v, rel=1e-6, abs=1.0), k
    parts = one["encoder"] + one["patch"] + one["component"] + one["global"] + one["eir_club"]
    assert parts == pytest.approx(one["total"]) and one["patch"] > 0 and one["global"] > 0


def test_runtime_figures_join_the_one_json_line(monkeypatch):
    """`amoe bench` runs `amoe bench --runtime` as a child and merges its keys into its own JSON line."""
    import json
    import subprocess
    from types import SimpleNamespace

    from amoe import bench

    child = {"batch": 8, "threads": 1, "export_s": 2.0, "ms_per_img_torch": 4.0, "ms_per_img_onnxruntime": 2.0,
             "speedup_onnxruntime_over_torch": 2.0, "routing_identical_onnxruntime": True,
             "max_score_diff_onnxruntime": 1e-7, "model": "toy"}
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "log line\n" + json.dumps(child) + "\n", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    args = SimpleNamespace(train=False, runtimes="onnxruntime", batch=8, img_size=56, quick=True)
    got = bench.bench_runtimes(args)
    assert "--runtime" in calls[0] and "onnxruntime" in calls[0] and "--quick" in calls[0]
    assert got == {"ms_per_img_onnxruntime": 2.0, "speedup_onnxruntime_over_torch": 2.0,
                   "routing_identical_onnxruntime": True, "max_score_diff_onnxruntime": 1e-7,
                   "runtime_ms_per_img_torch": 4.0, "runtime_batch": 8, "runtime_threads": 1, "runtime_export_s": 2.0}
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 2, "", "boom"))
    assert "exited 2" in bench.bench_runtimes(args)["runtime_error"]
    assert bench.bench_runtimes(SimpleNamespace(train=False, runtimes="none")) == {}


def test_a_training_step_is_sized_with_a_quarter_over_its_saved_tensors(monkeypatch):
    """The measured case: 5.5 GB saved per image, 15.8 GB available: each image counts 1.25 x 5.5 = 6.875 GB,
    (15.8 - 1) / 6.875 = 2.15 -> batch 2; with 60 GB available, (60 - 1) / 6.875 = 8.6 -> 4 (or 8 of 9)."""
    import amoe.bench as bench

    monkeypatch.setattr(bench, "release_freed_memory", lambda: None)
    monkeypatch.setattr(bench, "_meminfo_mb", lambda field: 15.8 * 1024)
    batch, why = bench._fitting_train_batch(4, 5.5 * 1024)
    assert batch == 2 and why == "batch 4 does not fit: 5.5 GB kept for the backward per image (1.25x counted), 15.8 GB available"
    monkeypatch.setattr(bench, "_meminfo_mb", lambda field: 60 * 1024)
    assert bench._fitting_train_batch(4, 5.5 * 1024)[0] == 4
    assert bench._fitting_train_batch(9, 5.5 * 1024)[0] == 8
    monkeypatch.setattr(bench, "_meminfo_mb", lambda field: None)
    assert bench._fitting_train_batch(4, 5.5 * 1024) == (4, "requested (no memory information)")


def test_warm_up_and_timed_steps_run_at_the_fitted_batch(monkeypatch):
    """The warm-up steps once ran at the requested batch instead of the fitted one (a batch-4 step on a
    machine that fits 2 was OOM-killed)."""
    import amoe.bench as bench

    monkeypatch.setattr(bench, "_fitting_train_batch", lambda requested, per_img_mb: (2, "test"))

    def counting_step_only(model, one_step, dtype):  # the 1-image step runs; its per-expert FLOP re-runs do not
        one_step()
        return dict.fromkeys(("total", "encoder", *bench.GROUPS, "router_esb", "eir_club"), 1.0)

    monkeypatch.setattr(bench, "train_step_flops", counting_step_only)
    model = build_model(quick_config())
    sizes = []
    model.router.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    r = bench.bench_train_step(model, batch=3, warmup=1)
    assert r["batch"] == 2 and sizes.count(1) == 1 and sizes.count(2) == 2 and 3 not in sizes, sizes  # counting, warm-up, timed


def test_peak_rss_is_this_processes_in_gb():
    import resource

    import amoe.bench as bench

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert bench._max_rss_gb() == round(kb / 2**20, 1) and 0.05 < bench._max_rss_gb() < 1024
