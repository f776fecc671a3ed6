"""Memory/time benchmark of DatasetEvaluator on a VisA-sized test set (SPEC §4 memory budget).

2 162 maps of 256x256 in 12 classes (~180 images each, ~half anomalous with random blob masks), fed in
batches of 32 and evaluated with pixel AUROC/AP/F1-max and AUPRO. Maps are generated class by class.

    .venv/bin/python benchmarks/bench_metrics.py [--n-maps 2162] [--classes 12] [--size 256]
    .venv/bin/python benchmarks/bench_metrics.py --in-memory   # amoe.metrics.evaluate on one in-memory set
    .venv/bin/python benchmarks/bench_metrics.py --in-memory --with-torch   # the same with torch loaded

Prints peak RSS (VmHWM), the RSS baseline after imports, and wall times; the last line is one JSON object.
Targets: peak RSS <= 1.5 GB and <= 30 s on 2 CPU cores. ``--in-memory``: the whole set is generated into
numpy arrays first and ``evaluate`` is called once on them (peak RSS <= 1.5 GB, inputs included).
``amoe.metrics`` does not import torch; ``--with-torch`` imports it first, as a process that has just
run a model would have it (~0.5 GB more resident).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import cv2
import numpy as np

from amoe.metrics import DatasetEvaluator, evaluate


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB (falls back to ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: ``5`` to /proc/self/clear_refs); no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def make_class(
    rng: np.random.Generator, n: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One class: maps (n, S, S) float32 smooth noise + blob signal, masks (n, S, S) uint8, labels, scores."""
    masks = np.zeros((n, size, size), np.uint8)
    labels = (rng.random(n) < 0.5).astype(np.int64)
    for i in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            center = (int(rng.integers(0, size)), int(rng.integers(0, size)))
            axes = (int(rng.integers(3, size // 8)), int(rng.integers(3, size // 8)))
            cv2.ellipse(masks[i], center, axes, float(rng.integers(0, 180)), 0, 360, 1, -1)
    low = rng.random((n, size // 16, size // 16)).astype(np.float32)
    maps = np.stack([cv2.resize(m, (size, size), interpolation=cv2.INTER_CUBIC) for m in low])
    maps += masks * np.float32(rng.uniform(0.2, 0.8))
    maps += rng.standard_normal(maps.shape, dtype=np.float32) * np.float32(0.05)
    scores = maps.reshape(n, -1).max(1)
    return maps, masks, labels, scores


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-maps", type=int, default=2162)
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-memory", action="store_true", help="one evaluate() call on in-memory arrays")
    parser.add_argument("--with-torch", action="store_true", help="--in-memory: import torch first")
    args = parser.parse_args(argv)
    if args.with_torch or not args.in_memory:
        import torch  # the streaming evaluator takes tensors
    if args.in_memory:
        return in_memory(args)

    baseline = _status_mb("VmRSS")
    rng = np.random.default_rng(args.seed)
    per_class = [args.n_maps // args.classes + (c < args.n_maps % args.classes) for c in range(args.classes)]
    ev = DatasetEvaluator("visa", pixel=True, aupro=True, eval_size=args.size)
    t_gen = t_eval = cpu_eval = 0.0
    for c, n in enumerate(per_class):
        t0 = time.perf_counter()
        maps, masks, labels, scores = make_class(rng, n, args.size)
        t1, c1 = time.perf_counter(), time.process_time()
        for i in range(0, n, args.batch):
            sl = slice(i, i + args.batch)
            b = len(scores[sl])
            ev.update(
                [f"class{c:02d}"] * b,
                torch.from_numpy(scores[sl]),
                torch.from_numpy(labels[sl]),
                torch.from_numpy(maps[sl]),
                torch.from_numpy(masks[sl]),
            )
        del maps, masks
        t_gen, t_eval = t_gen + t1 - t0, t_eval + time.perf_counter() - t1
        cpu_eval += time.process_time() - c1
    t0, c0 = time.perf_counter(), time.process_time()
    out = ev.compute()
    t_eval, cpu_eval = t_eval + time.perf_counter() - t0, cpu_eval + time.process_time() - c0
    peak = _status_mb("VmHWM")
    print("mean:", json.dumps({k: round(v, 4) for k, v in out["mean"].items()}))
    print(
        f"classes {len(per_class)}  maps {sum(per_class)}  generation {t_gen:.1f} s  "
        f"evaluation {t_eval:.1f} s wall, {cpu_eval:.1f} s CPU"
    )
    print(f"RSS after imports {baseline:.0f} MB, peak {peak:.0f} MB")
    result = {
        "n_maps": sum(per_class),
        "peak_rss_mb": round(peak, 1),
        "baseline_rss_mb": round(baseline, 1),
        "seconds": round(t_eval, 2),
        "cpu_seconds": round(cpu_eval, 2),
        "generation_seconds": round(t_gen, 2),
    }
    print(json.dumps(result))
    return result


def in_memory(args: argparse.Namespace) -> dict:
    """``evaluate`` once on the whole set held in memory: maps float32, masks uint8 (as a caller has them)."""
    baseline = _status_mb("VmRSS")
    rng = np.random.default_rng(args.seed)
    maps = np.empty((args.n_maps, args.size, args.size), np.float32)
    masks = np.empty((args.n_maps, args.size, args.size), np.uint8)
    labels = np.empty(args.n_maps, np.int64)
    scores = np.empty(args.n_maps, np.float32)
    t0 = time.perf_counter()
    for i in range(0, args.n_maps, 180):  # generated in class-sized pieces
        n = min(180, args.n_maps - i)
        maps[i : i + n], masks[i : i + n], labels[i : i + n], scores[i : i + n] = make_class(rng, n, args.size)
    t_gen = time.perf_counter() - t0
    inputs = _status_mb("VmRSS")
    gen_peak = _status_mb("VmHWM")
    _reset_peak()  # the peak below is evaluate's, not the generation's temporaries
    t0, c0 = time.perf_counter(), time.process_time()
    out = evaluate(scores, labels, maps, masks)
    t_eval, cpu_eval = time.perf_counter() - t0, time.process_time() - c0
    peak = _status_mb("VmHWM")
    print("metrics:", json.dumps({k: round(v, 6) for k, v in out.items()}))
    print(f"RSS after imports {baseline:.0f} MB, with the inputs {inputs:.0f} MB, peak {peak:.0f} MB "
          f"(+{peak - inputs:.0f} MB over the inputs); evaluate {t_eval:.1f} s wall, {cpu_eval:.1f} s CPU")
    result = {
        "n_maps": args.n_maps, "torch_imported": "torch" in sys.modules, "peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(baseline, 1),
        "inputs_rss_mb": round(inputs, 1), "generation_peak_rss_mb": round(gen_peak, 1), "over_inputs_mb": round(peak - inputs, 1), "seconds": round(t_eval, 2),
        "cpu_seconds": round(cpu_eval, 2), "generation_seconds": round(t_gen, 2),
        "metrics": {k: round(v, 6) for k, v in out.items()},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
