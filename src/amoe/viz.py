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


def expert_labels(group_sizes: list[int]) -> list[str]:
    """Expert names in router order: P1.., C1.., G1.. (patch, component, global)."""
    return [f"{g[0].upper()}{i + 1}" for g, n in zip(GROUP_NAMES, group_sizes) for i in range(n)]


def save_router_gates(
    path: str,
    gates: dict[str, np.ndarray],
    expert_gates: dict[str, np.ndarray] | None = None,
    group_sizes: list[int] | None = None,
) -> None:
    """Router gates per class (paper Fig. 4): left, the mean gate mass of each expert group (stacked bars);
    right, the mean gate value of every expert (heat map, classes × experts), when ``expert_gates`` is given."""
    if not gates:
        return
    classes = list(gates)
    values = np.stack([gates[c] for c in classes])  # (C, G)
    per_expert = expert_gates is not None and group_sizes is not None and sum(group_sizes) > 0
    width = max(4, 0.5 * len(classes) + 2)
    n_exp = sum(group_sizes) if per_expert else 0
    fig, axes = plt.subplots(
        1, 2 if per_expert else 1, figsize=(width + (max(3, 0.35 * n_exp + 2) if per_expert else 0), 3.5 + 0.12 * len(classes) * per_expert),
        squeeze=False,
    )
    ax = axes[0, 0]
    bottom = np.zeros(len(classes))
    for g, name in enumerate(GROUP_NAMES):
        ax.bar(classes, values[:, g], bottom=bottom, label=name)
        bottom += values[:, g]
    ax.set_ylabel("mean gate mass")
    ax.set_ylim(0, 1)
    ax.set_title("per expert group", fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    for t in ax.get_xticklabels():
        t.set_ha("right")
    if per_expert:
        ax = axes[0, 1]
        grid = np.stack([expert_gates[c] for c in classes])  # (C, N)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(float(grid.max()), 1e-6))
        ax.set_xticks(range(n_exp), expert_labels(group_sizes), fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        edges = np.cumsum(group_sizes)[:-1]
        for e in edges:
            ax.axvline(e - 0.5, color="white", lw=1.5)
        ax.set_title("mean gate value per expert", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_expert_maps(path: str, items: list[dict]) -> None:
    """Rows of: input (GT contour; class and score above), patch, component, global and final maps (paper Fig. 5).

    Group maps are shown normalised with the training statistics on a fixed [0, 1] scale (their gate mass in
    the title); the final map is min–max scaled per image."""
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
        panels[0] = (f"{it['cls']} (score {it['score']:.3g})" if "score" in it else it["cls"], panels[0][1])
        for c, (title, img) in enumerate(panels):
            axes[r, c].imshow(img)
            axes[r, c].set_title(title, fontsize=7)
            axes[r, c].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
