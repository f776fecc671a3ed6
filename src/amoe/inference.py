"""Run a model folder written by ``amoe export`` without PyTorch or Lightning.

    from amoe.inference import Inferencer
    inf = Inferencer("runs/smoke/export/last_onnx")          # onnxruntime; runtime="openvino" for OpenVINO
    score, anomaly_map, is_anomalous, mask = inf.predict("part.png")

Imports numpy, OpenCV and the runtime that runs the graphs (``onnxruntime`` or ``openvino``; ``torch``
only for a TorchScript folder). Preprocessing reproduces the data modules' transform exactly (read as
8-bit RGB, antialiased bilinear resize with PyTorch's weights, centre crop, ImageNet normalisation);
the sparse dispatch runs here: the ``front`` graph gives each image's top-K experts, each expert graph
runs once on the rows that selected it, the ``score`` graph fuses and post-processes (docs/DEPLOY.md).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

RUNTIMES = ("onnxruntime", "openvino", "torchscript")
INSTALL = {"onnxruntime": "pip install 'amoe[onnx]'  (or: pip install onnxruntime)",
           "openvino": "pip install 'amoe[openvino]'  (or: pip install openvino)",
           "torchscript": "pip install torch"}
REQUIRED_KEYS = ("format", "crop_size", "image_size", "num_experts", "top_k", "graphs", "thresholds", "preprocessing")


class ModelFolderError(ValueError):
    """A model folder that cannot be run (the message names the file and says what to do)."""


class ImageReadError(ValueError):
    """An image file that cannot be read (the message names the file)."""


class Prediction(NamedTuple):
    score: float  # image anomaly score
    anomaly_map: np.ndarray  # (E, E) float32 at the evaluation size, over the centre crop
    is_anomalous: bool | None  # score > image threshold (None: the export has no threshold)
    mask: np.ndarray | None  # (E, E) bool, anomaly_map > pixel threshold (None: no pixel threshold)


# --- images ------------------------------------------------------------------------------------------
def to_rgb8(arr: np.ndarray, path: str, bgr: bool = False, colour16: str = "range") -> np.ndarray:
    """Any decoded array (H,W), (H,W,1|2|3|4), uint8/uint16/float -> (H,W,3) uint8 RGB. The one set of
    rules of both readers (``data_modules.base.read_rgb`` and :func:`read_image`): alpha dropped, gray
    replicated, 16-bit scaled by its range (65535 if its maximum exceeds 255, else 255) or, for colour
    with ``colour16="high_byte"``, by its high byte (PIL's 16-bit RGB PNG), float by its min-max.
    ``bgr``: the array is in OpenCV's channel order."""
    if arr.ndim == 3 and arr.shape[2] in (1, 2):  # gray (+ alpha)
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] in (3, 4) and bgr:
        arr = arr[..., 2::-1]
    elif arr.ndim == 3 and arr.shape[2] == 4:  # RGBA: drop alpha
        arr = arr[..., :3]
    if arr.dtype in (np.uint16, np.int32, np.uint32) and colour16 == "high_byte" and arr.ndim == 3:
        arr = (arr >> 8).astype(np.uint8)
    elif arr.dtype in (np.uint16, np.int32, np.uint32):
        hi = float(arr.max()) if arr.size else 0.0
        scale = 65535.0 if hi > 255 else 255.0
        arr = np.clip(arr.astype(np.float64) / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif arr.dtype in (np.float32, np.float64):
        if not np.isfinite(arr).all():
            raise ImageReadError(f"{path}: image holds NaN/Inf values; replace or remove the file.")
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)).astype(np.uint8)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageReadError(f"{path}: unsupported image shape {arr.shape}; expected a 2-D gray or RGB(A) image.")
    return np.ascontiguousarray(arr)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Any image file (non-ASCII names included) -> (H, W, 3) uint8 RGB; a clear error naming the file."""
    path = str(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"{path}: file not found.")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise ImageReadError(f"{path}: zero-byte file; re-copy it or remove it.")
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageReadError(f"{path}: cannot be read as an image (truncated or not an image); replace or remove it.")
    tiff = path.lower().endswith((".tif", ".tiff"))  # read_rgb reads TIFF with tifffile (range), PNG with PIL (high byte)
    return to_rgb8(arr, path, bgr=True, colour16="range" if tiff else "high_byte")


def resize_weights(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """(n_out, n_in) float64 interpolation matrix of ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)``; with ``antialias`` its triangle filter widened by the downscale factor."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in))
    if antialias:
        support = scale if scale >= 1 else 1.0
        inv = 1 / scale if scale >= 1 else 1.0
        for i in range(n_out):
            centre = scale * (i + 0.5)
            lo = max(int(centre - support + 0.5), 0)
            hi = min(int(centre + support + 0.5), n_in)
            j = np.arange(lo, hi)
            f = np.clip(1 - np.abs((j - centre + 0.5) * inv), 0, None)
            w[i, lo:hi] = f / f.sum() if f.sum() else 0
        return w
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    np.add.at(w, (np.arange(n_out), i0), 1 - lam)
    np.add.at(w, (np.arange(n_out), i1), lam)
    return w


def resize(img: np.ndarray, size: tuple[int, int], antialias: bool = False) -> np.ndarray:
    """(H, W[, C]) float -> (h, w[, C]) float32, PyTorch's bilinear interpolation (see resize_weights)."""
    wy = resize_weights(img.shape[0], size[0], antialias)
    wx = resize_weights(img.shape[1], size[1], antialias)
    out = np.einsum("yh,hw...,xw->yx...", wy, img.astype(np.float64), wx)
    return out.astype(np.float32)


def preprocess(rgb: np.ndarray, image_size: int, crop_size: int, mean, std) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, S, S) float32: the data modules' Transform.image, without torch."""
    t = rgb.astype(np.float32) / np.float32(255.0)
    off = (image_size - crop_size) // 2
    wy = resize_weights(rgb.shape[0], image_size, True)[off : off + crop_size]
    wx = resize_weights(rgb.shape[1], image_size, True)[off : off + crop_size]
    t = np.einsum("yh,hwc,xw->cyx", wy, t.astype(np.float64), wx).astype(np.float32)
    t = np.clip(t, 0, 1)
    return (t - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


# --- runtimes ----------------------------------------------------------------------------------------
def _import_runtime(runtime: str):
    try:
        if runtime == "onnxruntime":
            import onnxruntime

            return onnxruntime
        if runtime == "openvino":
            import openvino

            return openvino
        import torch

        return torch
    except ImportError as e:
        raise ModelFolderError(f"runtime '{runtime}' is not installed: {INSTALL[runtime]}") from e


class Graph:
    """One graph file under a runtime: ``names`` (its inputs), ``shapes`` (static dims or None), ``__call__``."""

    def __init__(self, path: str, runtime: str, mod, spec: dict, threads: int | None):
        self.path, self.runtime = path, runtime
        if runtime == "onnxruntime":
            opts = mod.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            opts.log_severity_level = 3
            self.sess = mod.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            ins = self.sess.get_inputs()
            self.names = [i.name for i in ins]
            self.shapes = [[d if isinstance(d, int) else None for d in i.shape] for i in ins]
        elif runtime == "openvino":
            core = mod.Core()
            cfg = {"INFERENCE_PRECISION_HINT": "f32"}  # CPUs with bf16/AMX default to bf16, which breaks parity
            if threads:
                cfg["INFERENCE_NUM_THREADS"] = threads
            self.model = core.compile_model(core.read_model(path), "CPU", cfg)
            self.names = [i.get_any_name() for i in self.model.inputs]
            self.shapes = [[d.get_length() if d.is_static else None for d in i.get_partial_shape()] for i in self.model.inputs]
        else:
            self.torch = mod
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
                self.module = mod.jit.load(path, map_location="cpu").eval()
            self.names, self.shapes = list(spec["inputs"]), None

    def __call__(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.runtime == "onnxruntime":
            return self.sess.run(None, {n: feed[n] for n in self.names})
        if self.runtime == "openvino":
            res = self.model([feed[n] for n in self.names])
            return [np.asarray(res[o]) for o in self.model.outputs]
        with self.torch.no_grad():
            out = self.module(*[self.torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.names])
        return [o.numpy() for o in (out if isinstance(out, tuple | list) else [out])]


def load_metadata(model_dir: str | os.PathLike) -> dict[str, Any]:
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: not a folder. Pass the folder written by `amoe export`.")
    meta_path = folder / "metadata.json"
    if not meta_path.is_file():
        raise ModelFolderError(
            f"{meta_path}: missing; '{folder}' is not an amoe export folder. Create one with "
            "`amoe export --ckpt_path CKPT --format onnx|openvino|torchscript --out DIR`."
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{meta_path}: not valid JSON ({e}); re-export the model.") from e
    missing = [k for k in REQUIRED_KEYS if k not in (meta if isinstance(meta, dict) else {})]
    if missing:
        raise ModelFolderError(f"{meta_path}: not an amoe export metadata file (missing {', '.join(missing)}); re-export the model.")
    return meta


class Inferencer:
    """Sparse AnomalyMoE inference from an ``amoe export`` folder (module docstring).

    Args:
        model_dir: the export folder (``metadata.json`` and the graph files).
        runtime: ``onnxruntime`` (default for ONNX folders), ``openvino`` (default for OpenVINO folders; it
            also runs ONNX folders) or ``torchscript`` (TorchScript folders; needs torch).
        class_name: component-bank class of the images; default (None) or an unknown name: the bank whose
            centres fit each image best (what ``amoe predict --ckpt_path`` does on a folder).
        threads: intra-op threads of the runtime (default: the runtime's).
    """

    def __init__(self, model_dir: str | os.PathLike, runtime: str | None = None, class_name: str | None = None,
                 threads: int | None = None):
        self.dir = Path(model_dir)
        meta = self.meta = load_metadata(self.dir)
        fmt = meta["format"]
        runtime = runtime or {"onnx": "onnxruntime", "openvino": "openvino", "torchscript": "torchscript"}.get(fmt)
        allowed = {"onnx": ("onnxruntime", "openvino"), "openvino": ("openvino",), "torchscript": ("torchscript",)}.get(fmt, ())
        if runtime not in allowed:
            raise ModelFolderError(
                f"{self.dir / 'metadata.json'}: a '{fmt}' export cannot run under runtime '{runtime}' "
                f"(use {' or '.join(allowed) or 'a folder of amoe export'})."
            )
        self.runtime = runtime
        mod = _import_runtime(runtime)
        g = meta["graphs"]
        specs = [g["front"], *g["experts"], g["score"]]
        for spec in specs:
            if not (self.dir / spec["file"]).is_file():
                raise ModelFolderError(f"{self.dir / spec['file']}: graph file listed in metadata.json is missing; re-export the model.")
        graphs = [Graph(str(self.dir / s["file"]), runtime, mod, s, threads) for s in specs]
        self.front, self.experts, self.score_graph = graphs[0], graphs[1:-1], graphs[-1]
        self.n, self.k = int(meta["num_experts"]), int(meta["top_k"])
        self.size, self.image_size = int(meta["crop_size"]), int(meta["image_size"])
        self.classes = list(meta.get("component_classes") or [])
        self.class_name = class_name
        pre = meta["preprocessing"]
        self.mean, self.std = pre["mean"], pre["std"]
        thr = meta["thresholds"]
        self.image_threshold, self.pixel_threshold = thr.get("image"), thr.get("pixel")
        self._check(specs, graphs)

    def _check(self, specs: list[dict], graphs: list[Graph]) -> None:
        """metadata.json and the graph files must agree (a graph from another export, a hand edit)."""
        meta_file = self.dir / "metadata.json"
        if len(self.experts) != self.n:
            raise ModelFolderError(f"{meta_file}: num_experts {self.n} but {len(self.experts)} expert graphs listed; re-export.")
        for spec, graph in zip(specs, graphs):
            if set(graph.names) != set(spec["inputs"]):
                raise ModelFolderError(
                    f"{self.dir / spec['file']}: graph inputs {graph.names} do not match metadata.json {spec['inputs']}; "
                    "the file comes from another export. Re-export the model."
                )
        expect = {"image": [3, self.size, self.size], "maps": [self.n, None]}
        for spec, graph in zip(specs, graphs):
            for name, shape in zip(graph.names, graph.shapes or []):
                want = expect.get(name)
                if want and shape and any(w is not None and s is not None and s != w for s, w in zip(shape[1:], want)):
                    raise ModelFolderError(
                        f"{self.dir / spec['file']}: input '{name}' has shape {shape[1:]} per image, metadata.json says "
                        f"{[w if w is not None else '*' for w in want]}; the graph and metadata come from different exports. Re-export."
                    )

    # --- the model -------------------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray | str | os.PathLike) -> np.ndarray:
        """A path or an (H, W[, 3|4]) RGB array (uint8, 16-bit or float) -> (3, S, S) float32 input."""
        rgb = read_image(image) if isinstance(image, str | os.PathLike) else to_rgb8(np.asarray(image), "array")
        return preprocess(rgb, self.image_size, self.size, self.mean, self.std)

    def class_index(self, batch: int, class_name: str | None = None) -> np.ndarray:
        name = class_name if class_name is not None else self.class_name
        idx = self.classes.index(name) if name in self.classes else -1
        return np.full((batch,), idx, dtype=np.int64)

    def forward(self, images: np.ndarray, class_name: str | None = None) -> dict[str, np.ndarray]:
        """(B, 3, S, S) float32 preprocessed -> maps (B, E, E), scores (B,), topk (B, K), weights (B, N)."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        b = images.shape[0]
        feed: dict[str, np.ndarray] = {"image": images, "class_index": self.class_index(b, class_name)}
        feed.update(zip(self.meta["graphs"]["front"]["outputs"], self.front(feed)))
        topk, weights = feed["topk"], feed["weights"]
        maps = None
        for i, expert in enumerate(self.experts):
            rows = np.nonzero((topk == i).any(1))[0]
            if rows.size == 0:
                continue  # selected by no image: never run
            sub = feed if rows.size == b else {n: feed[n][rows] for n in expert.names}
            out = expert(sub)[0]
            if maps is None:
                maps = np.zeros((b, self.n, out.shape[1]), np.float32)
            maps[rows, i] = out
        amap, score = self.score_graph({"maps": maps, "weights": weights.astype(np.float32)})
        return {"maps": amap, "scores": score, "topk": topk, "weights": weights}

    def predict(self, image, class_name: str | None = None) -> Prediction | list[Prediction]:
        """One image (path or RGB array) -> Prediction; a list of images -> a list (run as one batch)."""
        many = isinstance(image, list | tuple)
        batch = np.stack([self.preprocess(x) for x in (image if many else [image])])
        out = self.forward(batch, class_name)
        preds = [self._prediction(float(s), m) for s, m in zip(out["scores"], out["maps"])]
        return preds if many else preds[0]

    def _prediction(self, score: float, amap: np.ndarray) -> Prediction:
        thr, pix = self.image_threshold, self.pixel_threshold
        return Prediction(score, amap, None if thr is None else score > thr, None if pix is None else amap > pix)
