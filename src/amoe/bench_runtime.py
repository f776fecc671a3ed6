"""``amoe bench --runtime onnxruntime[,openvino]``: the exported model's speed next to the PyTorch path,
in the same run, on the same batch, with the same (learnt) routing.

The model (the paper configuration with random weights, the toy one with ``--quick``, or a trained
``--ckpt_path``) is exported to ONNX in a temporary folder (and converted to OpenVINO when asked); then
PyTorch's sparse inference (``model(x, sparse=True)`` + scoring) and :class:`amoe.inference.Inferencer`
(front graph, the selected experts' graphs, score graph) are timed on the same float32 batch with the
same thread count. Prints one JSON line: ``ms_per_img_torch``, ``ms_per_img_<runtime>``,
``speedup_<runtime>_over_torch``, and per runtime the largest score difference and whether the routing
was identical.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable

import torch

from amoe.bench import build_model, choose_threads, quick_config
from amoe.export import export, load_model, openvino_from_onnx
from amoe.model import AnomalyMoEConfig

log = logging.getLogger(__name__)


def best_ms(fn: Callable[[], object], iters: int) -> float:
    """Best wall time of ``iters`` calls after one untimed warm-up call, in ms."""
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="amoe bench --runtime", description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime", required=True, help="comma list of onnxruntime, openvino")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=2, help="timed passes per path after one warm-up (the best counts)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default 392, --quick 56)")
    p.add_argument("--threads", type=int, default=None, help="threads of every path (default: all cores; 1 on a loaded machine)")
    p.add_argument("--quick", action="store_true", help="tiny model: a smoke test of the benchmark")
    p.add_argument("--ckpt_path", default=None, help="a trained checkpoint instead of random weights")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runtimes = [r.strip() for r in args.runtime.split(",") if r.strip()]
    bad = [r for r in runtimes if r not in ("onnxruntime", "openvino")]
    if bad:
        print(f"amoe bench: error: --runtime {','.join(bad)}: choose onnxruntime and/or openvino.")
        return 2
    from amoe.inference import Inferencer, ModelFolderError

    threads, why = choose_threads(args.threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if args.ckpt_path:
            model = load_model(args.ckpt_path)[0]
        else:
            size = args.img_size or (56 if args.quick else 392)
            model = build_model(quick_config(size) if args.quick else AnomalyMoEConfig(pretrained=False, img_size=size), args.seed)
        model.eval()
        s = model.config.img_size
        x = torch.randn(args.batch, 3, s, s, generator=torch.Generator().manual_seed(args.seed))
        classes = [model.component_bank.classes[0]] * args.batch if model.component_bank.classes else ["bench"] * args.batch

        def torch_pass():
            with torch.no_grad():
                out = model(x, classes, sparse=True)
                return out, model.score(out)

        out, (_, scores) = torch_pass()
        res = {
            "batch": args.batch, "img_size": s, "threads": threads, "threads_reason": why,
            "model": args.ckpt_path or ("quick toy model" if args.quick else f"{model.config.encoder} (random weights)"),
            "experts_selected": sorted(set(out.router.topk.flatten().tolist())),
            "ms_per_img_torch": best_ms(torch_pass, args.iters) / args.batch,
        }
        xs = x.numpy()
        with tempfile.TemporaryDirectory(prefix="amoe_bench_") as tmp:
            t0 = time.perf_counter()
            onnx_dir = export(model, os.path.join(tmp, "onnx"), "onnx")
            res["export_s"] = round(time.perf_counter() - t0, 1)
            for rt in runtimes:
                folder = onnx_dir if rt == "onnxruntime" else openvino_from_onnx(onnx_dir, os.path.join(tmp, "openvino"))
                try:
                    inf = Inferencer(folder, rt, class_name=classes[0], threads=threads)
                except ModelFolderError as e:
                    print(f"amoe bench: error: {e}")
                    return 2
                got = inf.forward(xs)
                res[f"ms_per_img_{rt}"] = best_ms(lambda inf=inf: inf.forward(xs), args.iters) / args.batch
                res[f"speedup_{rt}_over_torch"] = res["ms_per_img_torch"] / res[f"ms_per_img_{rt}"]
                res[f"routing_identical_{rt}"] = bool((got["topk"] == out.router.topk.numpy()).all())
                res[f"max_score_diff_{rt}"] = float(abs(got["scores"] - scores.numpy()).max())
    finally:
        torch.set_num_threads(before)
    res["load_average"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    for rt in runtimes:
        log.info("%s: %.2f ms/img, torch %.2f ms/img (same batch %d, same routing: %s)", rt, res[f"ms_per_img_{rt}"],
                 res["ms_per_img_torch"], args.batch, res[f"routing_identical_{rt}"])
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover  (amoe bench runs it as a child process)
    raise SystemExit(main())
