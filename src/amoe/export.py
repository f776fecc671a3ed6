"""``amoe export``: a trained checkpoint -> a self-contained model folder (TorchScript, ONNX or OpenVINO)
that keeps routing sparse outside PyTorch.

The network is split into graphs (``docs/DEPLOY.md``)::

    front.*        image (B,3,S,S), class_index (B,) -> fused tokens, encoder groups, router gates and top-K,
                   component assignment and pooled part vectors (encoder + router + component bank)
    expert_<i>.*   one graph per expert: its inputs (a sub-batch of the front outputs or the image) -> its map
    score.*        per-expert maps (B,N,h*w) and gates (B,N) -> anomaly map (B,E,E) and image score (B,)
    metadata.json  preprocessing contract, thresholds and their source, normalisation statistics, component
                   bank classes, graph files and their inputs, amoe version, checkpoint sha256

:class:`amoe.inference.Inferencer` runs ``front``, then each expert on the rows whose top-K holds it,
then ``score`` (numpy + the runtime only). Every graph has a dynamic batch axis. The graphs wrap the
model's own modules (:class:`~amoe.model.AnomalyMoE`); the per-expert maps are the formulas of
``AnomalyMoE.forward`` in inference mode, the parity tests (tests/test_export.py) hold them equal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from einops import rearrange
from torch import nn

from amoe.component_bank import masked_average_pool
from amoe.evaluation import finite_or_none
from amoe.losses import cosine_distance
from amoe.model import AnomalyMoE, AnomalyMoEConfig

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx", "openvino")
EXTENSION = {"torchscript": ".pt", "onnx": ".onnx", "openvino": ".xml"}
METADATA_VERSION = 1
OPSET = 18


class ExportError(RuntimeError):
    """An export the user must change (the message says which setting or file, and what to do)."""


# --- graphs --------------------------------------------------------------------------------------------
class FrontGraph(nn.Module):
    """Encoder + router + component assignment. ``class_index``: the sample's component-bank row, or -1
    (a class the bank does not know: the best-fitting bank, :meth:`ComponentBank.best_fitting_rows`)."""

    def __init__(self, model: AnomalyMoE):
        super().__init__()
        self.model = model
        self.names = ["fused", "enc_groups", "weights", "topk"] + (["assign", "parts"] if len(model.component_experts) else [])

    def forward(self, image: torch.Tensor, class_index: torch.Tensor | None = None):
        m, cfg = self.model, self.model.config
        enc = m.encoder(image)
        fused, enc_groups, router_in = m.fuse(enc)  # the same fusion as AnomalyMoE.forward
        target = fused[:, enc.num_prefix :]
        router = m.router(router_in)
        out = [fused, torch.stack(enc_groups, 1), router.weights, router.topk]
        if len(m.component_experts):
            bank = m.component_bank  # the same assignment as AnomalyMoE.forward; -1 -> the best-fitting bank
            rows = torch.where(class_index >= 0, class_index, bank.best_fitting_rows(target))
            assign = bank.assign_rows(target, rows)  # (B, h*w)
            parts, _ = masked_average_pool(target, assign, cfg.num_components)
            out += [assign, parts]
        return tuple(out)


class PatchGraph(nn.Module):
    inputs = ("fused", "enc_groups")

    def __init__(self, expert: nn.Module, num_prefix: int):
        super().__init__()
        self.expert, self.p = expert, num_prefix

    def forward(self, fused: torch.Tensor, enc_groups: torch.Tensor) -> torch.Tensor:
        dec = self.expert(fused)
        return torch.stack([cosine_distance(enc_groups[:, g], d[:, self.p :]) for g, d in enumerate(dec)]).mean(0)


class ComponentGraph(nn.Module):
    inputs = ("parts", "assign")

    def __init__(self, expert: nn.Module):
        super().__init__()
        self.expert = expert

    def forward(self, parts: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
        return cosine_distance(self.expert(parts), parts).gather(1, assign)


class GlobalGraph(nn.Module):
    def __init__(self, expert: nn.Module, num_prefix: int, grid: tuple[int, int]):
        super().__init__()
        self.expert, self.p, self.grid = expert, num_prefix, grid
        self.inputs = ("image",) if expert.student is not None else ("image", "fused")

    def forward(self, image: torch.Tensor, fused: torch.Tensor | None = None) -> torch.Tensor:
        out = self.expert(image)
        if out.student is not None:
            ref = out.student
        else:
            ref = rearrange(fused[:, self.p :], "b (h w) d -> b d h w", h=self.grid[0], w=self.grid[1])
        return rearrange((out.ae - ref).pow(2).mean(1), "b h w -> b (h w)")


class ScoreGraph(nn.Module):
    """Per-expert maps (B, N, h*w) and gates (B, N) -> final map (B, E, E) and image score (B,)."""

    inputs = ("maps", "weights")

    def __init__(self, model: AnomalyMoE):
        super().__init__()
        self.model = model

    def forward(self, maps: torch.Tensor, weights: torch.Tensor):
        h, w = self.model.encoder.grid
        group_maps, mass = self.model.fuse_expert_maps(maps, weights)
        return tuple(self.model.scorer(rearrange(group_maps, "b g (h w) -> b g h w", h=h, w=w), mass))


def expert_graphs(model: AnomalyMoE) -> list[tuple[str, nn.Module]]:
    """(group, graph) for every expert, in the router's order (patch, component, global)."""
    p, grid = model.encoder.num_prefix, model.encoder.grid
    return (
        [("patch", PatchGraph(e, p)) for e in model.patch_experts]
        + [("component", ComponentGraph(e)) for e in model.component_experts]
        + [("global", GlobalGraph(e, p, grid)) for e in model.global_experts]
    )


# --- loading -------------------------------------------------------------------------------------------
def load_model(ckpt_path: str) -> tuple[AnomalyMoE, dict[str, Any]]:
    """The checkpoint's model (float32, eval) without Lightning, and the checkpoint's amoe entry."""
    from amoe.checkpoint import AMOE_KEY, safe_load, saved_config

    ckpt = safe_load(ckpt_path)
    model = AnomalyMoE(AnomalyMoEConfig(**saved_config(ckpt, f"checkpoint '{ckpt_path}'")))
    sd = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(sd)
    model.encoder.weights_loaded = True  # the checkpoint holds the encoder
    return model.float().eval(), dict(ckpt.get(AMOE_KEY) or {})


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def amoe_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("amoe")
    except PackageNotFoundError:
        return "unknown"


def metadata(model: AnomalyMoE, geometry: dict[str, int], fmt: str, ckpt_path: str | None, files: dict) -> dict[str, Any]:
    cfg, sc = model.config, model.scorer
    calibrated = bool(sc.calibrated)
    image_thr, pixel_thr = finite_or_none(float(sc.image_threshold)), finite_or_none(float(sc.pixel_threshold))
    src = "checkpoint: {} quantile of the held-out normal images' {}"
    return {
        "format": fmt,
        "metadata_version": METADATA_VERSION,
        "amoe_version": amoe_version(),
        "checkpoint": os.path.abspath(ckpt_path) if ckpt_path else None,
        "checkpoint_sha256": sha256(ckpt_path) if ckpt_path else None,
        "dtype": "float32",
        "preprocessing": {
            "read": "any image file -> 8-bit RGB (amoe.inference.read_image = data_modules.base.read_rgb): gray "
            "replicated, alpha dropped, palette expanded, 16-bit scaled by its range (65535 if its max > 255 else 255) "
            "except 16-bit colour PNG (its high byte), float by its min-max",
            "channel_order": "RGB",
            "layout": "NCHW",
            "scale": 1 / 255,
            "resize": {"size": [geometry["image_size"]] * 2, "mode": "bilinear", "antialias": True, "align_corners": False,
                       "semantics": "torch.nn.functional.interpolate(antialias=True), reproduced by amoe.inference.resize"},
            "center_crop": [geometry["crop_size"]] * 2,
            "clamp": [0.0, 1.0],
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
        "image_size": geometry["image_size"],
        "crop_size": geometry["crop_size"],
        "grid": list(model.encoder.grid),
        "eval_size": sc.eval_size,
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "groups": {"patch": cfg.num_patch_experts, "component": cfg.num_component_experts, "global": cfg.num_global_experts},
        "component_classes": list(model.component_bank.classes),
        "thresholds": {
            "image": image_thr,
            "image_source": src.format(sc.image_q, "image scores") if image_thr is not None else "none (never calibrated)",
            "pixel": pixel_thr,
            "pixel_source": src.format(sc.pixel_q, "map values") if pixel_thr is not None else "none (never calibrated)",
        },
        "map_normalisation": {
            "calibrated": calibrated,
            "method": "(S_g - lo_g) / (hi_g - lo_g) per group, quantiles of held-out normal training images",
            "quantiles": list(sc.norm_quantiles),
            "lo": sc.lo.tolist(),
            "hi": sc.hi.tolist(),
            "in_graph": "score",
        },
        "scoring": {"blur_sigma": sc.blur_sigma, "blur_kernel": sc.blur_kernel, "top_ratio": sc.top_ratio,
                    "fusion": "sum over groups of gate mass x normalised group map"},
        "graphs": files,
    }


# --- writing -------------------------------------------------------------------------------------------
def _example_inputs(model: AnomalyMoE, crop: int, batch: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 3, crop, crop, generator=gen)
    idx = torch.full((batch,), -1, dtype=torch.long)
    with torch.no_grad():
        front = dict(zip(FrontGraph(model).names, FrontGraph(model)(image, idx)))
    return {"image": image, "class_index": idx, **front,
            "maps": torch.rand(batch, model.config.num_experts, front["fused"].shape[1] - model.encoder.num_prefix)}


def _write_graph(module: nn.Module, names_in: list[str], names_out: list[str], ex: dict, path: str, fmt: str) -> None:
    args = tuple(ex[n] for n in names_in)
    module.eval()
    if fmt == "torchscript":
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit deprecation and tracer notes (shapes are fixed but the batch)
            traced = torch.jit.trace(module, args, check_trace=False)
        traced.save(path)
        return
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise ExportError(f"--format {fmt} needs the 'onnx' package: pip install 'amoe[onnx]'.") from e
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    shapes = {n: {0: batch} for n in names_in}
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):  # per-pass INFO lines of the exporter
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, path, input_names=names_in, output_names=names_out, opset_version=OPSET,
            dynamo=True, dynamic_shapes=shapes, external_data=False, verbose=False, optimize=True,
        )


def export(model: AnomalyMoE, out_dir: str, fmt: str = "onnx", geometry: dict[str, int] | None = None,
           ckpt_path: str | None = None, dtype: str = "float32") -> str:
    """Write the model folder ``out_dir`` (must be absent or empty); returns it."""
    if fmt not in FORMATS:
        raise ExportError(f"--format '{fmt}': choose one of {', '.join(FORMATS)}.")
    if dtype != "float32":
        raise ExportError(
            f"--dtype {dtype}: amoe exports float32 graphs only. A bf16/fp16 graph does not reproduce the checkpoint's "
            "scores within 1e-4 (the router's top-K and the part assignment flip on near ties), and bf16 support "
            "differs between ONNX Runtime and OpenVINO CPUs. Export float32 (the default); see docs/DEPLOY.md."
        )
    if not model.component_bank.is_built and len(model.component_experts):
        raise ExportError("the model's component bank is empty (never trained): export a checkpoint of `amoe fit`.")
    geometry = geometry or {"image_size": model.config.img_size, "crop_size": model.config.img_size}
    if geometry["crop_size"] != model.config.img_size:
        raise ExportError(f"crop size {geometry['crop_size']} differs from the model's input size {model.config.img_size}.")
    if os.path.isdir(out_dir) and any(os.scandir(out_dir)):
        raise ExportError(f"--out '{out_dir}' exists and is not empty: choose a new folder (nothing was overwritten).")
    os.makedirs(out_dir, exist_ok=True)
    model = model.float().eval()
    onnx_fmt = "onnx" if fmt == "openvino" else fmt
    ext = EXTENSION[onnx_fmt]
    ex = _example_inputs(model, geometry["crop_size"])
    front = FrontGraph(model)
    files: dict[str, Any] = {
        "front": {"file": "front" + ext, "inputs": ["image", "class_index"], "outputs": front.names},
        "experts": [],
        "score": {"file": "score" + ext, "inputs": list(ScoreGraph.inputs), "outputs": ["anomaly_map", "score"]},
    }
    if not len(model.component_experts):
        files["front"]["inputs"] = ["image"]
    jobs = [(front, files["front"])]
    for i, (group, graph) in enumerate(expert_graphs(model)):
        files["experts"].append({"file": f"expert_{i:02d}{ext}", "group": group, "inputs": list(graph.inputs), "outputs": ["map"]})
        jobs.append((graph, files["experts"][-1]))
    jobs.append((ScoreGraph(model), files["score"]))
    try:
        for module, spec in jobs:
            _write_graph(module, spec["inputs"], spec["outputs"], ex, os.path.join(out_dir, spec["file"]), onnx_fmt)
        if fmt == "openvino":
            to_openvino(out_dir, [s for _, s in jobs])
    except Exception:
        shutil.rmtree(out_dir, ignore_errors=True)  # never leave a half-written export behind
        raise
    meta = metadata(model, geometry, fmt, ckpt_path, files)
    with open(os.path.join(out_dir, "metadata.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return out_dir


def openvino_from_onnx(onnx_dir: str, out_dir: str) -> str:
    """An OpenVINO folder from an ONNX export folder (the same graphs, converted; metadata copied)."""
    if os.path.isdir(out_dir) and any(os.scandir(out_dir)):
        raise ExportError(f"'{out_dir}' exists and is not empty: choose a new folder (nothing was overwritten).")
    shutil.copytree(onnx_dir, out_dir, dirs_exist_ok=True)
    with open(os.path.join(out_dir, "metadata.json"), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != "onnx":
        raise ExportError(f"{onnx_dir}/metadata.json: format '{meta.get('format')}', expected an onnx export.")
    g = meta["graphs"]
    to_openvino(out_dir, [g["front"], *g["experts"], g["score"]])
    meta["format"] = "openvino"
    with open(os.path.join(out_dir, "metadata.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return out_dir


def to_openvino(out_dir: str, specs: list[dict]) -> None:
    """Convert each ONNX graph to OpenVINO IR (.xml/.bin, float32 weights) and remove the ONNX file."""
    try:
        import openvino as ov
    except ImportError as e:
        raise ExportError("--format openvino needs the 'openvino' package: pip install 'amoe[openvino]'.") from e
    for spec in specs:
        src = os.path.join(out_dir, spec["file"])
        xml = src.removesuffix(".onnx") + ".xml"
        ov.save_model(ov.convert_model(src), xml, compress_to_fp16=False)  # fp16 weights would break parity
        os.remove(src)
        spec["file"] = os.path.basename(xml)


# --- command line --------------------------------------------------------------------------------------
def default_out(ckpt_path: str, fmt: str) -> str:
    ckpt = Path(ckpt_path).resolve()
    base = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else Path("exports")
    out = base / "export" / f"{ckpt.stem}_{fmt}"
    n = 1
    while out.exists() and any(out.iterdir()):
        n += 1
        out = base / "export" / f"{ckpt.stem}_{fmt}_{n}"
    return str(out)


def main(argv: list[str] | None = None) -> int:
    from amoe.checkpoint import CheckpointError

    p = argparse.ArgumentParser(prog="amoe export", description="Export a trained checkpoint for deployment (docs/DEPLOY.md).")
    p.add_argument("--config", action="append", default=[], help="accepted for symmetry with fit/test; the model settings "
                   "and image geometry come from the checkpoint")
    p.add_argument("--ckpt_path", required=True, help="checkpoint of `amoe fit` (or 'last': runs/<...>/latest)")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--out", default=None, help="output folder (default: <run>/export/<ckpt>_<format>)")
    p.add_argument("--dtype", default="float32", help="float32 only (bf16 is refused, see docs/DEPLOY.md)")
    p.add_argument("--trainer.default_root_dir", dest="root", default=None, help="for --ckpt_path last")
    args = p.parse_args(argv)
    from amoe.cli import UsageError, resolve_last

    ckpt = args.ckpt_path
    try:
        if ckpt == "last":
            ckpt = resolve_last(args.root or _config_root(args.config))
        model, meta = load_model(ckpt)
        geometry = (meta.get("data") or {}) or None
        out = export(model, args.out or default_out(ckpt, args.format), args.format, geometry, ckpt, args.dtype)
    except (ExportError, CheckpointError, UsageError) as e:
        print(f"\namoe export: error: {e}", file=sys.stderr)
        return 2
    print(f"amoe export: {args.format} model written to {out}")
    return 0


def _config_root(configs: list[str]) -> str:
    import yaml

    root = os.path.join("runs", "default")
    for c in configs:
        with open(c, encoding="utf-8") as f:
            root = ((yaml.safe_load(f) or {}).get("trainer") or {}).get("default_root_dir") or root
    return root


# --- amoe predict --model DIR ----------------------------------------------------------------------------
def predict_main(argv: list[str]) -> int:
    """``amoe predict --model DIR --data.path FOLDER``: the exported model (no checkpoint, no Lightning
    model) on a folder of images; writes the same run folder as ``amoe predict --ckpt_path``."""
    from amoe.inference import ImageReadError, Inferencer, ModelFolderError, read_image
    from amoe.predict import FIELDS, output_names, write_image_outputs, write_summary
    from amoe.results import make_run_dir
    from data_modules.base import list_images

    p = argparse.ArgumentParser(prog="amoe predict --model", description="Score a folder with an exported model.")
    p.add_argument("--model", required=True, help="folder written by `amoe export`")
    p.add_argument("--data.path", dest="path", required=True, help="folder of images (searched recursively)")
    p.add_argument("--runtime", default=None, help="onnxruntime | openvino | torchscript (default: the folder's format)")
    p.add_argument("--model.results_root", "--results_root", dest="results_root", default="results")
    p.add_argument("--model.run_name", "--run_name", dest="run_name", default=None)
    p.add_argument("--threshold", type=float, default=None, help="image-score threshold (default: the export's)")
    p.add_argument("--pixel_threshold", type=float, default=None, help="mask threshold (default: the export's)")
    p.add_argument("--data.eval_batch_size", "--batch_size", dest="batch_size", type=int, default=8)
    p.add_argument("--data.skip_bad_files", dest="skip_bad_files", type=lambda v: v.lower() in ("1", "true", "yes"), default=False)
    p.add_argument("--config", action="append", default=[], help="accepted and ignored: the export holds every setting")
    args = p.parse_args(argv[1:] if argv and argv[0] == "predict" else argv)
    try:
        inf = Inferencer(args.model, args.runtime)
        base = Path(args.path)
        if not base.is_dir():
            raise ModelFolderError(f"--data.path '{base}' is not a folder. Pass a folder of images.")
        images = list_images(base, recursive=True)
        if not images:
            raise ModelFolderError(f"no images (png/jpg/bmp/tif) under '{base}'.")
        paths = [str(x) for x in images]
        names = output_names(paths, [str(x.relative_to(base)) for x in images])
        thr_meta = inf.meta["thresholds"]
        thresholds, sources = {}, {}
        for kind, flag, value in (("image", "--threshold", args.threshold), ("pixel", "--pixel_threshold", args.pixel_threshold)):
            given = value is not None
            thresholds[kind] = float(value) if given else (thr_meta.get(kind) if thr_meta.get(kind) is not None else float("nan"))
            sources[kind] = flag if given else thr_meta.get(f"{kind}_source", "export metadata.json")
        run_dir = make_run_dir(os.path.join(args.results_root, "predict"), args.run_name)
        counts, skipped = {"images": 0, "anomalous": 0}, []
        geometry = (inf.image_size, inf.size)
        with open(os.path.join(run_dir, "scores.csv"), "w", newline="", encoding="utf-8") as f:
            pd.DataFrame(columns=FIELDS).to_csv(f, index=False)  # the header; rows are appended per batch
            for start in range(0, len(paths), args.batch_size):
                rgbs = []
                for path in paths[start : start + args.batch_size]:
                    try:
                        rgbs.append((path, read_image(path)))
                    except ImageReadError as e:
                        if not args.skip_bad_files:
                            raise
                        skipped.append(str(e))
                if not rgbs:
                    continue
                batch, rows = np.stack([inf.preprocess(rgb) for _, rgb in rgbs]), []
                out = inf.forward(batch, base.resolve().name)  # the class the checkpoint path gives a folder
                for (path, rgb), amap, score in zip(rgbs, out["maps"], out["scores"]):
                    row = write_image_outputs(run_dir, path, names[path], rgb, amap, float(score), thresholds, geometry)
                    counts["images"] += 1
                    counts["anomalous"] += row["anomalous"] == "true"
                    rows.append(row)
                pd.DataFrame(rows, columns=FIELDS).to_csv(f, header=False, index=False)
                f.flush()
        write_summary(run_dir, {"model": os.path.abspath(args.model), "runtime": inf.runtime,
                                "checkpoint_sha256": inf.meta.get("checkpoint_sha256")},
                      counts, skipped, thresholds, sources)
    except (ModelFolderError, ImageReadError) as e:
        print(f"\namoe predict: error: {e}", file=sys.stderr)
        return 2
    return 0
