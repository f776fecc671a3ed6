"""``amoe ablations``: the paper's Table 2 (expert groups) and Table 3 (ESB, EIR) on one dataset.

Six runs, each the base config plus one override in ``experiments/ablations/`` — patch; patch+component;
patch+global; all (= the full model of Table 3); without ESB; without EIR — trained and tested as separate
``amoe fit`` / ``amoe test`` processes that share one W&B group, then ``results/ablations_<dataset>.md``.

Base config: ``experiments/synthetic.yaml`` for ``--dataset synthetic``, otherwise ``experiments/paper.yaml``
+ ``experiments/<dataset>.yaml``. ``--smoke``: ``experiments/smoke.yaml`` for synthetic; for a benchmark
dataset its tiny tree (:mod:`amoe.fixture_trees`) with the smoke model, as in ``amoe reproduce --smoke``.
Extra arguments after ``--`` go to every ``amoe fit`` / ``amoe test`` call.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from amoe.model import AnomalyMoEConfig
from amoe.reproduce import (
    DATASETS,
    EXPERIMENTS,
    LABELS,
    PAPER_CONFIG,
    SMOKE_CONFIG,
    build_parser,
    fit_and_test,
    log_table_to_wandb,
    pct,
    smoke_overlay,
    split_extra,
    summary_wandb_mode,
    wandb_args,
)

log = logging.getLogger("amoe.ablations")

ABLATIONS = os.path.join(EXPERIMENTS, "ablations")
# name, (patch, component, global) groups, ESB, EIR, table
VARIANTS: tuple[tuple[str, tuple[bool, bool, bool], bool, bool], ...] = (
    ("patch", (True, False, False), True, True),
    ("patch_component", (True, True, False), True, True),
    ("patch_global", (True, False, True), True, True),
    ("all", (True, True, True), True, True),
    ("no_esb", (True, True, True), False, True),
    ("no_eir", (True, True, True), True, False),
)
METRICS = (("image_auroc", "I-AUROC"), ("pixel_auroc", "P-AUROC"), ("pixel_aupro", "AUPRO"))


def variant_config(name: str) -> str:
    return os.path.join(ABLATIONS, f"{name}.yaml")


def capped_top_k(configs: list[str]) -> int | None:
    """The number of experts when the merged ``model.config`` of ``configs`` selects more (top_k) than
    it has, else None: a group-subset ablation of a base with few experts per group keeps top_k ≤ experts."""
    merged: dict[str, Any] = {}
    for path in configs:
        with open(path) as f:
            merged.update(((yaml.safe_load(f) or {}).get("model") or {}).get("config") or {})
    default = AnomalyMoEConfig()
    n = sum(merged.get(k, getattr(default, k)) for k in ("num_patch_experts", "num_component_experts", "num_global_experts"))
    return n if merged.get("top_k", default.top_k) > n else None


def base_configs(dataset: str, smoke: bool, work: str) -> tuple[list[str], str | None]:
    """(config paths of the base setting, data root or None for the configured one)."""
    if dataset == "synthetic":
        return [SMOKE_CONFIG if smoke else os.path.join(EXPERIMENTS, "synthetic.yaml")], None
    configs = [PAPER_CONFIG, os.path.join(EXPERIMENTS, f"{dataset}.yaml")]
    if not smoke:
        return configs, None
    from amoe.fixture_trees import build_benchmark_trees

    root = build_benchmark_trees(Path(work) / "data", [dataset])[dataset]
    return [*configs, smoke_overlay(os.path.join(work, "smoke_overlay.yaml"))], str(root)


def ablation_tables(dataset: str, runs: dict[str, dict[str, Any]], header: str) -> str:
    extra = []
    if any(r["result"] and "image_auroc_logical" in r["result"]["mean"] for r in runs.values()):
        extra = [("image_auroc_logical", "I-AUROC logical"), ("image_auroc_structural", "I-AUROC structural")]
    metrics = [*METRICS, *extra]

    def cells(name: str) -> str:
        r = runs.get(name)
        if r is None or r["result"] is None:
            return " | ".join(["failed" if r else "–"] * len(metrics))
        return " | ".join(pct(r["result"]["mean"].get(k)) for k, _ in metrics)

    cols = " | ".join(lbl for _, lbl in metrics)
    lines = [header, "", "## Table 2: expert groups", "", f"| Patch | Component | Global | {cols} |",
             "|---|---|---|" + "---|" * len(metrics)]
    for name, groups, _esb, _eir in VARIANTS[:4]:
        marks = " | ".join("✓" if g else "" for g in groups)
        lines.append(f"| {marks} | {cells(name)} |")
    lines += ["", "## Table 3: ESB and EIR (all three expert groups)", "", f"| Setting | {cols} |", "|---|" + "---|" * len(metrics)]
    for name, label in (("no_esb", "w/o ESB"), ("no_eir", "w/o EIR"), ("all", "AnomalyMoE (ESB + EIR)")):
        lines.append(f"| {label} | {cells(name)} |")
    lines += ["", "Runs (override, results, log):", ""]
    for name, *_ in VARIANTS:
        r = runs.get(name)
        if r is not None:
            where = f"`{r['results_dir']}`" if r["result"] is not None else f"failed: {r['error']}"
            lines.append(f"- `{variant_config(name)}`: {where}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_extra(list(sys.argv[1:] if argv is None else argv))
    p = build_parser("amoe ablations", "Tables 2 and 3: six ablation runs on one dataset, one W&B group.")
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", *DATASETS])
    p.add_argument("--data-root", default=None, help="the dataset root (default: as in experiments/<dataset>.yaml)")
    p.add_argument("--only", default=None, help="comma-separated subset of: " + ", ".join(v[0] for v in VARIANTS))
    args = p.parse_args(argv)
    names = [v[0] for v in VARIANTS]
    chosen = [n.strip() for n in args.only.split(",")] if args.only else names
    if set(chosen) - set(names):
        p.error(f"unknown ablation(s) {sorted(set(chosen) - set(names))}; choose from {', '.join(names)}")
    out = args.out or (os.path.join("results", "smoke") if args.smoke else "results")
    work = args.work or os.path.join("runs", "ablations_smoke" if args.smoke else "ablations", args.dataset)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    group = f"ablations-{args.dataset}-{stamp}"
    configs, root = base_configs(args.dataset, args.smoke, work)
    root = args.data_root or root
    if root is None and args.dataset != "synthetic":
        from amoe.reproduce import check_roots, default_root

        present, missing = check_roots([args.dataset], {args.dataset: default_root(args.dataset)})
        if missing:
            print(f"amoe ablations: {LABELS[args.dataset]}: {missing[args.dataset]}", file=sys.stderr)
            return 2
    results_root = out  # each run's files: <out>/<dataset>/ablation-<name>-<stamp>/
    runs = {}
    for name in chosen:
        cfg = [a for c in [*configs, variant_config(name)] for a in ("--config", c)]
        cap = capped_top_k([*configs, variant_config(name)])
        if cap is not None:
            log.info("ablation %s: top_k capped to its %d expert(s)", name, cap)
        runs[name] = fit_and_test(
            args.dataset, cfg, root, os.path.join(work, name), results_root, f"ablation-{name}-{stamp}",
            [*wandb_args(args.wandb, args.wandb_project, group), *(["--model.config.top_k", str(cap)] if cap else []), *extra],
            f"{args.dataset}/{name}",
        )
    setting = " + ".join(configs) + (" (smoke)" if args.smoke else "")
    header = (f"# Ablations on {LABELS.get(args.dataset, args.dataset)} (AnomalyMoE Tables 2 and 3)\n\n"
              f"Base: {setting}; overrides: `{ABLATIONS}/<name>.yaml` (top_k capped to the number of experts "
              f"where a group subset has fewer); W&B group `{group}`; "
              f"{time.strftime('%Y-%m-%d %H:%M')}. Values: mean over classes, %.")
    text = ablation_tables(args.dataset, runs, header)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"ablations_{args.dataset}.md")
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {path}")
    log_table_to_wandb(summary_wandb_mode(args.wandb), args.wandb_project, group, f"ablations_{args.dataset}", text, path)
    return 1 if any(r["result"] is None for r in runs.values()) else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
