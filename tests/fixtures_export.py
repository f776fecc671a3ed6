"""Shared by tests/test_export.py and tests/test_inference.py: the trained smoke checkpoint exported once
per session (ONNX through `amoe export`, TorchScript, OpenVINO converted from the ONNX graphs) and a
folder of mixed images (PNG, JPEG, grayscale JPEG/PNG, RGBA, 16-bit gray and colour, palette, TIFF, non-ASCII name)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from amoe.fixture_trees import noise, save

__all__ = ["exported", "mixed_images", "MIXED"]


def smooth(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Low-frequency image (JPEG keeps it close to the original; a real photo more than white noise)."""
    small = np.squeeze(noise(max(2, h // 6), max(2, w // 6), channels, seed))
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


MIXED = {
    "a.png": lambda p: save(p, smooth(40, 50, seed=1)),
    "a.jpg": lambda p: Image.fromarray(smooth(64, 64, seed=2)).save(p, quality=90),
    "big.jpg": lambda p: Image.fromarray(smooth(150, 120, seed=3)).save(p, quality=95),
    "sub/gray.jpg": lambda p: Image.fromarray(smooth(70, 60, channels=1, seed=4)).save(p, quality=85),
    "sub/gray.png": lambda p: save(p, smooth(30, 30, channels=1, seed=5)),
    "sub/deep16.png": lambda p: save(p, smooth(33, 20, channels=1, seed=6).astype(np.uint16) * 257),
    "sub/rgba.png": lambda p: save(p, np.dstack([smooth(25, 25, seed=7), np.full((25, 25), 128, np.uint8)])),
    "sub/pal.png": lambda p: save(p, smooth(20, 36, seed=8), "P"),
    "sub/t.tiff": lambda p: tifffile.imwrite(p, smooth(20, 28, seed=9)),
    "sub/rgb16.tiff": lambda p: tifffile.imwrite(p, smooth(22, 26, seed=11).astype(np.uint16) * 250),
    "sub/rgb16.png": lambda p: cv2.imwrite(str(p), smooth(26, 22, seed=12).astype(np.uint16) * 257),
    "sub/Prüfstück.png": lambda p: save(p, smooth(30, 30, seed=10)),
}


@pytest.fixture(scope="session")
def mixed_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed") / "line images"
    for name, write in MIXED.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write(root / name)
    return root


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory) -> dict[str, Path]:
    """{"ckpt", "onnx", "torchscript", "openvino"}: folders of the trained smoke checkpoint."""
    from amoe.cli import main
    from amoe.export import openvino_from_onnx

    base = tmp_path_factory.mktemp("exports")
    out = {"ckpt": trained_run["ckpt"]}
    for fmt in ("onnx", "torchscript"):
        out[fmt] = base / fmt
        assert main(["export", "--config", "experiments/smoke.yaml", "--ckpt_path", str(trained_run["ckpt"]),
                     "--format", fmt, "--out", str(out[fmt])]) == 0
    out["openvino"] = Path(openvino_from_onnx(str(out["onnx"]), str(base / "openvino")))
    return out
