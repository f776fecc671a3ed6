"""``amoe reproduce``: the paper's Table 1 under its own protocol, on every dataset present.

Default ``--protocol single_model`` (Table 1's caption: "under the unified, single-model setting"): ONE
``amoe fit`` of ``experiments/paper.yaml`` on :class:`data_modules.unified.Unified` over every dataset
present (each configured as in ``experiments/<dataset>.yaml``), then one ``amoe test`` that evaluates each
dataset separately: its own unweighted class mean, MVTec LOCO with AU-sPRO and the logical/structural split,
Ped2 with frame AUROC, MVTec 3D with the configured modality. ``--protocol per_dataset`` trains one model per
dataset instead (a documented variant, not the paper's protocol).

Missing datasets are listed with their download pages and the model is trained on the ones present; the
table's header then says that a model trained on fewer datasets is not the paper's protocol.

Outputs (``results/``, or ``results/smoke/`` with ``--smoke``): ``table1.md`` (ours, paper, Δ per dataset
for Image and Pixel AUROC, then every other metric and the router's gate mass per group, Fig. 4) and
``table1.json`` (values in %, as in the paper). ``--smoke`` runs the same path on tiny trees in the real
layouts (:mod:`amoe.fixture_trees`) with the tiny encoder of ``experiments/smoke.yaml`` on one CPU.

Arguments after ``--`` go to every ``amoe fit`` / ``amoe test`` call (e.g. ``-- --trainer.devices 1``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

import pandas as pd
import yaml

from amoe import runner
from amoe.results import markdown
from amoe.runner import DATASETS, label
from amoe.wandb_mode import wandb_wanted

log = logging.getLogger("amoe.reproduce")

PAPER_TABLE = os.path.join(runner.EXPERIMENTS, "paper_table1.yaml")
OTHER_METRICS = (  # (metrics.json key, column) of the second table
    ("pixel_aupro", "AUPRO"), ("image_ap", "I-AP"), ("pixel_ap", "P-AP"), ("image_f1max", "I-F1max"),
    ("pixel_f1max", "P-F1max"), ("image_auroc_logical", "I-AUROC logical"),
    ("image_auroc_structural", "I-AUROC structural"), ("pixel_auspro_0.05", "AU-sPRO@0.05"),
    ("frame_auroc", "frame AUROC"),
)


def paper_values(path: str = PAPER_TABLE, key: str = "datasets") -> tuple[dict[str, dict[str, float]], str]:
    """The paper's values ({dataset: {"image_auroc": %, "pixel_auroc": %}}) of a ``paper_table*.yaml`` and
    their source note."""
    with open(path) as f:
        data = yaml.safe_load(f)
    return data.get(key) or {}, str(data.get("source", "")).strip()


def percent(v: Any) -> float | None:
    """A metric (fraction) in % rounded to 0.01, or None when absent / not finite."""
    if v is None or not math.isfinite(float(v)):
        return None
    return round(100.0 * float(v), 2)


def dataset_entry(name: str, run: dict[str, Any] | None, missing: str | None, paper: dict[str, float]) -> dict[str, Any]:
    """One dataset of ``table1.json``: ours and the paper's Image/Pixel AUROC (%), their difference, every
    other metric (%), the classes, where the results are, and ``status`` ok | failed | missing."""
    p_img, p_pix = paper.get("image_auroc"), paper.get("pixel_auroc")
    entry: dict[str, Any] = {"label": label(name), "status": "missing", "image_auroc": None, "pixel_auroc": None,
                             "paper_image_auroc": p_img, "paper_pixel_auroc": p_pix,
                             "delta_image_auroc": None, "delta_pixel_auroc": None}
    if missing is not None:
        return {**entry, "error": missing}
    metrics = run.get("metrics") if run else None
    if not metrics:
        return {**entry, "status": "failed", "error": (run or {}).get("error") or "no result"}
    entry.update(status="ok", image_auroc=percent(metrics.get("image_auroc")), pixel_auroc=percent(metrics.get("pixel_auroc")))
    for ours, paper_key in (("image_auroc", "paper_image_auroc"), ("pixel_auroc", "paper_pixel_auroc")):
        if entry[ours] is not None and entry[paper_key] is not None:
            entry[f"delta_{ours}"] = round(entry[ours] - float(entry[paper_key]), 2)
    entry.update({k: percent(v) for k, v in metrics.items() if k not in ("image_auroc", "pixel_auroc")})
    entry.update(classes=run.get("classes", []), results_dir=run.get("results_dir"), checkpoint=run.get("checkpoint"))
    return entry


def cell(v: Any) -> str:
    return "–" if v is None else f"{float(v):.1f}"


def signed(v: Any) -> str:
    return "–" if v is None else f"{float(v):+.1f}"


def main_frame(entries: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Table 1 as printed: one row per dataset; ours, the paper's and Δ for Image and Pixel AUROC (%)."""
    rows = []
    for e in entries.values():
        status = None if e["status"] == "ok" else e["status"]
        rows.append({
            "Dataset": e["label"],
            "I-AUROC ours": status or cell(e["image_auroc"]), "I-AUROC paper": cell(e["paper_image_auroc"]),
            "I-AUROC Δ": signed(e["delta_image_auroc"]),
            "P-AUROC ours": status or cell(e["pixel_auroc"]), "P-AUROC paper": cell(e["paper_pixel_auroc"]),
            "P-AUROC Δ": signed(e["delta_pixel_auroc"]),
        })
    return pd.DataFrame(rows)


def other_frame(entries: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Every other metric we compute (%), one row per dataset that ran; '–' where a metric does not apply."""
    rows = [{"Dataset": e["label"], **{col: cell(e.get(k)) for k, col in OTHER_METRICS}}
            for e in entries.values() if e["status"] == "ok"]
    return pd.DataFrame(rows)


def gate_frame(gates: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Router gate mass per expert group and dataset (mean over the test images; the paper's Fig. 4)."""
    rows = [{"Dataset": label(d), **{g: f"{v:.3f}" for g, v in m.items()}} for d, m in gates.items()]
    return pd.DataFrame(rows)


def header(protocol: str, present: list[str], missing: dict[str, str], smoke: bool, command: str) -> str:
    lines = [f"# Table 1 reproduction: AnomalyMoE, protocol `{protocol}`", ""]
    if protocol == "single_model":
        lines.append(f"ONE model trained on {len(present)} of {len(DATASETS)} datasets "
                     f"({', '.join(label(n) for n in present) or 'none'}), each dataset evaluated separately "
                     "(the unweighted mean over its own classes).")
        if missing:
            lines += ["", f"**Not the paper's protocol:** the paper trains one model on all eight datasets; "
                          f"{', '.join(label(n) for n in missing)} {'is' if len(missing) == 1 else 'are'} missing "
                          "(download pages below), so this model saw fewer datasets."]
    else:
        lines.append("One model PER DATASET (`--protocol per_dataset`): a variant, not the paper's protocol "
                     "(Table 1 is one model for all eight datasets).")
    if smoke:
        lines += ["", "**Smoke run:** tiny trees in the real layouts and a tiny random encoder on one CPU; the "
                      "numbers test the pipeline and mean nothing about the method."]
    lines += ["", f"Command: `{command}`; {time.strftime('%Y-%m-%d %H:%M')}. Values: mean over classes, %."]
    return "\n".join(lines)


def table1_markdown(entries, gates, missing, checkpoints, source, head) -> str:
    parts = [head, "", markdown(main_frame(entries)), "", "Other metrics (ours, mean over classes, %):", "",
             markdown(other_frame(entries))]
    if gates:
        parts += ["", "Router gate mass per expert group (mean over test images; paper Fig. 4):", "",
                  markdown(gate_frame(gates))]
    if missing:
        parts += ["", "Missing datasets (not trained on, not evaluated):", ""]
        parts += [f"- {label(n)}: {msg}" for n, msg in missing.items()]
    if checkpoints:
        parts += ["", "Checkpoints:", ""] + [f"- `{c}`" for c in checkpoints]
    parts += ["", f"Paper values: `{PAPER_TABLE}` — {source or 'no source given'}."]
    return "\n".join(parts) + "\n"


def write_tables(out: str, result: dict[str, Any], text: str) -> tuple[str, str]:
    os.makedirs(out, exist_ok=True)
    md, js = os.path.join(out, "table1.md"), os.path.join(out, "table1.json")
    with open(md, "w") as f:
        f.write(text)
    with open(js, "w") as f:
        json.dump(result, f, indent=2)
    return md, js


def main(argv: list[str] | None = None) -> int:
    argv, extra = runner.split_extra(list(sys.argv[1:] if argv is None else argv))
    p = runner.build_parser("amoe reproduce", "Table 1 under the paper's protocol (one model on every dataset present).")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of: " + ", ".join(DATASETS))
    args = p.parse_args(argv)
    names = runner.parse_datasets(args.datasets, p)
    out = (args.out or os.path.join("results", "smoke" if args.smoke else "")).rstrip(os.sep) or "results"
    work = args.work or os.path.join("runs", "reproduce_smoke" if args.smoke else "reproduce")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    group = f"reproduce-{args.protocol}-{stamp}"

    roots = runner.dataset_roots(names, args.smoke, work, args.data_dir)
    present, missing = runner.check_roots(names, roots)
    for n, msg in missing.items():
        print(f"{label(n)}: {msg}")
    configs = [runner.PAPER_CONFIG]
    if args.smoke:
        configs.append(runner.smoke_overlay(os.path.join(work, "smoke_overlay.yaml")))
    result: dict[str, Any] = {"protocol": args.protocol, "runs": []}
    if present:
        wandb = runner.wandb_args(args.wandb, args.wandb_project, group, ["reproduce", args.protocol])
        result = runner.run_protocol(args.protocol, present, configs, work, out, f"reproduce-{stamp}",
                                     [*wandb, *extra], "")
    else:
        print("amoe reproduce: none of the datasets is present; nothing to run.", file=sys.stderr)

    paper, source = paper_values()
    runs = result.get("datasets", {})
    entries = {n: dataset_entry(n, runs.get(n), missing.get(n), paper.get(n) or {}) for n in DATASETS if n in names}
    checkpoints = [r["checkpoint"] for r in result["runs"] if r.get("checkpoint") and r.get("error") is None]
    gates: dict[str, dict[str, float]] = {}
    for r in result["runs"]:
        gates.update(runner.gate_mass(r.get("results_dir")))
    command = "amoe reproduce " + " ".join(argv + (["--", *extra] if extra else []))
    head = header(args.protocol, list(present), missing, args.smoke, command.strip())
    text = table1_markdown(entries, gates, missing, checkpoints, source, head)
    table = {"protocol": args.protocol, "checkpoints": checkpoints, "trained_on": list(present),
             "missing": missing, "smoke": args.smoke, "command": command.strip(), "paper_source": source,
             "datasets": entries, "gate_mass": gates}
    md, js = write_tables(out, table, text)
    print(text)
    print(f"wrote {md} and {js}")
    runner.log_table_to_wandb(wandb_wanted(args.wandb), args.wandb_project, group, "table1", main_frame(entries), md)
    failed = [n for n, e in entries.items() if e["status"] == "failed"]
    return 1 if failed or not present else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
