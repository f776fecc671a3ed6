"""Result files of a test run: metrics.json / metrics.csv, table.md, scores.csv, figures, ``latest`` link."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import numpy as np
import pandas as pd

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


def _pct(v: Any) -> str:
    """A metric (fraction) as a % cell with one decimal; '–' when absent or not finite."""
    return "–" if v is None or not np.isfinite(v) else f"{100 * v:.1f}"


def markdown(frame: pd.DataFrame) -> str:
    """A DataFrame of preformatted cells as a GitHub markdown table (pandas + tabulate), '(none)' when empty."""
    return frame.to_markdown(index=False, disable_numparse=True) if len(frame) else "(none)"


def metrics_frame(result: dict) -> pd.DataFrame:
    """Per-class metrics and their mean as a typed DataFrame: ``dataset``, ``class``, then one float column
    per metric (sorted; NaN where a class lacks it or it is undefined). The rows of ``metrics.csv``."""
    names = sorted({k for m in result["per_class"].values() for k in m} | set(result["mean"]))
    rows = [*result["per_class"].items(), ("mean", result["mean"])]
    frame = pd.DataFrame([[m.get(k) for k in names] for _, m in rows], columns=names, dtype=float)
    frame.insert(0, "class", [c for c, _ in rows])
    frame.insert(0, "dataset", result["dataset"])
    return frame


def metrics_table(result: dict, metrics: tuple[str, ...] | None = None) -> str:
    """Markdown table: one row per class and the mean; values in percent."""
    names = list(metrics or sorted({k for m in result["per_class"].values() for k in m}))
    rows = [*result["per_class"].items(), ("**mean**", result["mean"])]
    return markdown(pd.DataFrame([[c, *(_pct(m.get(k)) for k in names)] for c, m in rows], columns=["class", *names])) + "\n"


def paper_table(result: dict) -> str:
    """The paper's Table 1 cell format: Image-AUROC / Pixel-AUROC per class and mean."""
    rows = [*result["per_class"].items(), ("**mean**", result["mean"])]
    frame = pd.DataFrame([[c, " / ".join(_pct(m.get(k)) for k in PAPER_METRICS)] for c, m in rows],
                         columns=["class", "I-AUROC / P-AUROC"])
    return f"### {result['dataset']}: (Image-AUROC, Pixel-AUROC)\n\n{markdown(frame)}\n"


def write_metrics(run_dir: str, result: dict) -> None:
    """metrics.json, metrics.csv (``pd.read_csv`` gives typed columns) and table.md."""
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(_clean(result), f, indent=2)
    metrics_frame(result).to_csv(os.path.join(run_dir, "metrics.csv"), index=False)
    with open(os.path.join(run_dir, "table.md"), "w") as f:
        f.write(paper_table(result) + "\n### All metrics (%)\n\n" + metrics_table(result))


def write_scores(run_dir: str, rows: list[dict[str, Any]]) -> None:
    """scores.csv: one row per test image (columns in the rows' key order)."""
    if rows:
        pd.DataFrame(rows, columns=list(rows[0])).to_csv(os.path.join(run_dir, "scores.csv"), index=False)


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
