"""Figures: anomaly-map overlays, router gate histogram (paper Fig. 4), per-group expert maps (Fig. 5)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import cv2  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

GROUP_NAMES = ("patch", "component", "global")


def heat_overlay(rgb: np.ndarray, amap: np.ndarray, vmin: float | None = None, vmax: float | None = None, alpha: float = 0.5) -> np.ndarray:
    """rgb (H, W, 3) uint8, amap (h, w) float -> (H, W, 3) uint8 JET overlay (map min–max scaled unless given)."""
    lo = float(np.min(amap)) if vmin is None else vmin
    hi = float(np.max(amap)) if vmax is None else vmax
    norm = np.clip((amap - lo) / (hi - lo + 1e-12), 0, 1)
    norm = cv2.resize(norm.astype(np.float32), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat = cv2.cvtColor(cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return (alpha * heat + (1 - alpha) * rgb).astype(np.uint8)


def mask_contour(rgb: np.ndarray, mask: np.ndarray, colour=(0, 255, 0)) -> np.ndarray:
    m = cv2.resize(mask.astype(np.uint8), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = rgb.copy()
    cv2.drawContours(out, contours, -1, colour, 1)
    return out


def _rgb(thumb: torch.Tensor) -> np.ndarray:
    return thumb.permute(1, 2, 0).numpy()


def save_overlays(folder: str, items: list[dict]) -> None:
    """Per item: image | overlay with GT contour, saved as <cls>_<highest|lowest>_<i>.png."""
    os.makedirs(folder, exist_ok=True)
    counts: dict[tuple[str, str], int] = {}
    for it in items:
        rgb = _rgb(it["thumb"])
        over = mask_contour(heat_overlay(rgb, it["map"].numpy()), it["mask"].numpy())
        key = (it["cls"].replace("/", "_"), it["which"])
        counts[key] = counts.get(key, 0) + 1
        name = f"{key[0]}_{key[1]}_{counts[key]}_score{it['score']:.3f}.png"
        cv2.imwrite(os.path.join(folder, name), cv2.cvtColor(np.concatenate([rgb, over], 1), cv2.COLOR_RGB2BGR))


def save_router_gates(path: str, gates: dict[str, np.ndarray]) -> None:
    """Stacked bars: mean gate mass per expert group for every class (paper Fig. 4)."""
    if not gates:
        return
    classes = list(gates)
    values = np.stack([gates[c] for c in classes])  # (C, G)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(classes) + 2), 3.5))
    bottom = np.zeros(len(classes))
    for g, name in enumerate(GROUP_NAMES):
        ax.bar(classes, values[:, g], bottom=bottom, label=name)
        bottom += values[:, g]
    ax.set_ylabel("mean gate mass")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", fontsize=8)
    plt.xticks(rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_expert_maps(path: str, items: list[dict]) -> None:
    """Rows of: input (GT contour), patch, component, global and final maps (paper Fig. 5)."""
    if not items:
        return
    cols = 2 + len(GROUP_NAMES)
    fig, axes = plt.subplots(len(items), cols, figsize=(2 * cols, 2 * len(items)), squeeze=False)
    for r, it in enumerate(items):
        rgb = _rgb(it["thumb"])
        panels = [("input", mask_contour(rgb, it["mask"].numpy()))]
        panels += [
            (f"{n} ({m:.2f})", heat_overlay(rgb, it["groups"][g].numpy(), 0.0, 1.0)) for g, (n, m) in enumerate(zip(GROUP_NAMES, it["mass"]))
        ]
        panels.append(("final", heat_overlay(rgb, it["final"].numpy())))
        for c, (title, img) in enumerate(panels):
            axes[r, c].imshow(img)
            axes[r, c].set_title(title if r == 0 or c > 0 else title, fontsize=7)
            axes[r, c].axis("off")
        axes[r, 0].set_ylabel(it["cls"], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
