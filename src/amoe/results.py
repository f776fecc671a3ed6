"""Result files of a test run: metrics.json / metrics.csv, table.md, scores.csv, figures, ``latest`` link."""

from __future__ import annotations

import csv
import json
import math
import os
import time
from typing import Any

import numpy as np

PAPER_METRICS = ("image_auroc", "pixel_auroc")


def make_run_dir(base: str, run_name: str | None = None) -> str:
    """Create ``base/<run>`` (a timestamp by default), never reusing an existing directory, and point
    ``base/latest`` at it."""
    os.makedirs(base, exist_ok=True)
    name = run_name or time.strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join(base, name), 1
    while True:
        try:
            os.makedirs(path)
            break
        except FileExistsError:
            n += 1
            path = os.path.join(base, f"{name}-{n}")
    link = os.path.join(base, "latest")
    tmp = f"{link}.tmp{os.getpid()}"
    os.symlink(os.path.basename(path), tmp)
    os.replace(tmp, link)
    return path


def _clean(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, float | np.floating):
        return None if math.isnan(float(v)) else float(v)
    return v


def metrics_table(result: dict, metrics: tuple[str, ...] | None = None) -> str:
    """Markdown table: one row per class and the mean; values in percent."""
    names = list(metrics or sorted({k for m in result["per_class"].values() for k in m}))
    head = "| class | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"

    def fmt(m: dict) -> str:
        return " | ".join("–" if m.get(k) is None or not np.isfinite(m.get(k)) else f"{100 * m[k]:.1f}" for k in names)

    rows = "".join(f"| {c} | {fmt(m)} |\n" for c, m in result["per_class"].items())
    return head + rows + f"| **mean** | {fmt(result['mean'])} |\n"


def paper_table(result: dict) -> str:
    """The paper's Table 1 cell format: Image-AUROC / Pixel-AUROC per class and mean."""
    def cell(m: dict) -> str:
        return " / ".join("–" if m.get(k) is None or not np.isfinite(m[k]) else f"{100 * m[k]:.1f}" for k in PAPER_METRICS)

    lines = [f"### {result['dataset']}: (Image-AUROC, Pixel-AUROC)\n", "| class | I-AUROC / P-AUROC |", "|---|---|"]
    lines += [f"| {c} | {cell(m)} |" for c, m in result["per_class"].items()]
    lines.append(f"| **mean** | {cell(result['mean'])} |")
    return "\n".join(lines) + "\n"


def write_metrics(run_dir: str, result: dict) -> None:
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(_clean(result), f, indent=2)
    names = sorted({k for m in result["per_class"].values() for k in m} | set(result["mean"]))
    with open(os.path.join(run_dir, "metrics.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "class", *names])
        for cls, m in [*result["per_class"].items(), ("mean", result["mean"])]:
            w.writerow([result["dataset"], cls, *(_clean(m.get(k)) if m.get(k) is not None else "" for k in names)])
    with open(os.path.join(run_dir, "table.md"), "w") as f:
        f.write(paper_table(result) + "\n### All metrics (%)\n\n" + metrics_table(result))


def write_scores(run_dir: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with open(os.path.join(run_dir, "scores.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_results(
    run_dir: str,
    result: dict,
    rows: list,
    gates: dict,
    figures: dict,
    expert_gates: dict | None = None,
    group_sizes: list[int] | None = None,
) -> None:
    """Every file of a test run. ``gates``: class -> mean gate mass per group; ``expert_gates``: class ->
    mean gate value per expert (``group_sizes`` experts per group, in patch/component/global order)."""
    from amoe import viz

    write_metrics(run_dir, result)
    write_scores(run_dir, rows)
    viz.save_overlays(os.path.join(run_dir, "overlays"), figures["overlays"])
    viz.save_router_gates(os.path.join(run_dir, "router_gates.png"), gates, expert_gates, group_sizes)
    viz.save_expert_maps(os.path.join(run_dir, "expert_maps.png"), figures["expert_maps"])
