"""``amoe ablations``: the paper's Tables 2 and 3 under Table 1's protocol, with the paper's values and Δ.

Six settings (``experiments/ablations/<name>.yaml``): patch only; patch + component; patch + global; all
three groups (Table 2); without ESB; without EIR (Table 3). Each is one ``amoe fit`` + ``amoe test`` of the
base config plus the override, all in one W&B group, each run tagged with its setting and datasets.

``--dataset all`` (default): the paper's protocol — each setting trains ONE model on every dataset present
(:class:`data_modules.unified.Unified`) and each dataset is evaluated separately. ``--dataset <name>``: one
dataset (``experiments/paper.yaml`` + ``experiments/<name>.yaml``); ``--dataset synthetic``: the embedded
synthetic data (``experiments/synthetic.yaml``, or ``smoke.yaml`` with ``--smoke``).

Writes ``ablations_<dataset>.md`` / ``.json`` / ``.csv`` (ours, paper from ``experiments/paper_table2.yaml``
and ``paper_table3.yaml``, Δ) and ``ablations.html``, a self-contained offline dashboard
(:mod:`amoe.dashboard`). Online, a W&B report for the group is built when ``wandb-workspaces`` is installed
(``pip install 'amoe[report]'``). Arguments after ``--`` go to every ``amoe fit`` / ``amoe test`` call.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import pandas as pd
import yaml

from amoe import runner
from amoe.dashboard import ablations_html
from amoe.model import AnomalyMoEConfig
from amoe.reproduce import PAPER_TABLE, cell, markdown, paper_values, percent, signed
from amoe.runner import DATASETS, label
from amoe.wandb_mode import wandb_wanted

log = logging.getLogger("amoe.ablations")

ABLATIONS = os.path.join(runner.EXPERIMENTS, "ablations")
PAPER_TABLE2 = os.path.join(runner.EXPERIMENTS, "paper_table2.yaml")
PAPER_TABLE3 = os.path.join(runner.EXPERIMENTS, "paper_table3.yaml")
# name, (patch, component, global) groups, ESB, EIR
VARIANTS: tuple[tuple[str, tuple[bool, bool, bool], bool, bool], ...] = (
    ("patch", (True, False, False), True, True),
    ("patch_component", (True, True, False), True, True),
    ("patch_global", (True, False, True), True, True),
    ("all", (True, True, True), True, True),
    ("no_esb", (True, True, True), False, True),
    ("no_eir", (True, True, True), True, False),
)
SETTING_LABELS = {"patch": "patch", "patch_component": "patch + component", "patch_global": "patch + global",
                  "all": "AnomalyMoE (all groups, ESB + EIR)", "no_esb": "w/o ESB", "no_eir": "w/o EIR"}
TABLE_OF = {"patch": 2, "patch_component": 2, "patch_global": 2, "all": 1, "no_esb": 3, "no_eir": 3}
GROUP_KEYS = ("num_patch_experts", "num_component_experts", "num_global_experts")


class AblationError(RuntimeError):
    """An ablation that would not test what it names (the message says why and what to change)."""


def variant_config(name: str) -> str:
    return os.path.join(ABLATIONS, f"{name}.yaml")


def merged_model_config(configs: list[str]) -> dict[str, Any]:
    """``model.config`` of ``configs`` layered in order (later files win), over the dataclass defaults."""
    merged: dict[str, Any] = {}
    for path in configs:
        with open(path) as f:
            merged.update(((yaml.safe_load(f) or {}).get("model") or {}).get("config") or {})
    default = AnomalyMoEConfig()
    return {k: merged.get(k, getattr(default, k)) for k in (*GROUP_KEYS, "top_k", "use_eir", "use_esb")}


def capped_top_k(configs: list[str]) -> int | None:
    """The number of experts when the merged ``model.config`` of ``configs`` selects more (top_k) than
    it has, else None: a group-subset ablation of a base with few experts per group keeps top_k ≤ experts."""
    cfg = merged_model_config(configs)
    n = sum(cfg[k] for k in GROUP_KEYS)
    return n if cfg["top_k"] > n else None


def check_no_eir(configs: list[str]) -> None:
    """``no_eir`` compares against the full model only when some group has two experts or more: EIR is a
    sum over expert pairs within each group, identically 0 with one expert per group."""
    cfg = merged_model_config(configs)
    if max(cfg[k] for k in GROUP_KEYS) <= 1:
        counts = ", ".join(f"{k}={cfg[k]}" for k in GROUP_KEYS)
        raise AblationError(
            f"ablation no_eir: every expert group has at most one expert ({counts}), so EIR (Eq. 4, a sum over "
            "expert pairs within a group) is identically 0 and 'w/o EIR' would train a duplicate of the full "
            "model. Use a base config with two or more experts in a group, or leave no_eir out (--only)."
        )


def base_configs(dataset: str, smoke: bool, work: str) -> list[str]:
    """Config paths of the base setting (the data config is added by the protocol for benchmark data)."""
    if dataset == "synthetic":
        return [runner.SMOKE_CONFIG if smoke else os.path.join(runner.EXPERIMENTS, "synthetic.yaml")]
    configs = [runner.PAPER_CONFIG]
    if smoke:
        configs.append(runner.smoke_overlay(os.path.join(work, "smoke_overlay.yaml")))
    return configs


def run_setting(name: str, dataset: str, roots: dict[str, str], configs: list[str], work: str, out: str,
                run_name: str, extra: list[str]) -> dict[str, Any]:
    """One ablation setting -> run_protocol's result ({"runs", "datasets": {dataset: {metrics, …}}})."""
    if dataset == "synthetic":
        args = [a for c in configs for a in ("--config", c)]
        run = runner.fit_and_test("synthetic", args, None, work, out, run_name, extra, f"synthetic/{name}")
        result = run["result"] or {}
        return {"protocol": "synthetic", "runs": [run],
                "datasets": {"synthetic": {"metrics": result.get("mean"), "results_dir": run["results_dir"],
                                           "checkpoint": run["checkpoint"], "error": run["error"]}}}
    protocol = "single_model" if dataset == "all" else "per_dataset"
    return runner.run_protocol(protocol, roots, configs, work, out, run_name, extra, f"{name}: ")


def ablation_rows(results: dict[str, dict[str, Any]], papers: dict[int, dict], names: list[str]) -> list[dict[str, Any]]:
    """One row per (setting, dataset): ours, the paper's and Δ for Image and Pixel AUROC (%), AUPRO."""
    rows = []
    for setting, res in results.items():
        paper = papers[TABLE_OF[setting]]
        paper = paper.get(setting, {}) if TABLE_OF[setting] != 1 else paper
        for ds in names:
            run = res["datasets"].get(ds) or {}
            m = run.get("metrics") or {}
            p = paper.get(ds) or {}
            row = {"setting": setting, "table": TABLE_OF[setting] if setting != "all" else "2, 3", "dataset": ds,
                   "status": "ok" if m else "failed", "error": None if m else run.get("error"),
                   "image_auroc": percent(m.get("image_auroc")), "pixel_auroc": percent(m.get("pixel_auroc")),
                   "pixel_aupro": percent(m.get("pixel_aupro")),
                   "paper_image_auroc": p.get("image_auroc"), "paper_pixel_auroc": p.get("pixel_auroc"),
                   "results_dir": run.get("results_dir"), "checkpoint": run.get("checkpoint")}
            for k in ("image_auroc", "pixel_auroc"):
                ours, theirs = row[k], row[f"paper_{k}"]
                row[f"delta_{k}"] = round(ours - float(theirs), 2) if ours is not None and theirs is not None else None
            rows.append(row)
    return rows


def table_frame(rows: list[dict[str, Any]], settings: tuple[str, ...]) -> pd.DataFrame:
    """The printed form of Table 2 or 3: setting × dataset rows, ours / paper / Δ."""
    out = []
    for r in sorted((r for r in rows if r["setting"] in settings), key=lambda r: settings.index(r["setting"])):
        failed = None if r["status"] == "ok" else "failed"
        out.append({
            "Setting": SETTING_LABELS[r["setting"]], "Dataset": label(r["dataset"]),
            "I-AUROC ours": failed or cell(r["image_auroc"]), "I-AUROC paper": cell(r["paper_image_auroc"]),
            "I-AUROC Δ": signed(r["delta_image_auroc"]),
            "P-AUROC ours": failed or cell(r["pixel_auroc"]), "P-AUROC paper": cell(r["paper_pixel_auroc"]),
            "P-AUROC Δ": signed(r["delta_pixel_auroc"]), "AUPRO ours": failed or cell(r["pixel_aupro"]),
        })
    return pd.DataFrame(out)


def ablation_markdown(rows: list[dict[str, Any]], head: str, sources: list[str]) -> str:
    parts = [head, "", "## Table 2: expert groups", "",
             markdown(table_frame(rows, ("patch", "patch_component", "patch_global", "all"))), "",
             "## Table 3: auxiliary losses (all three expert groups)", "",
             markdown(table_frame(rows, ("no_esb", "no_eir", "all"))), ""]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        parts += ["Failed:", ""] + [f"- {r['setting']} / {r['dataset']}: {r['error']}" for r in failed] + [""]
    parts += ["Paper values: " + "; ".join(sources) + ". '–' where the paper has no value (Table 2 has no "
              "LiverCT column). The full model's row is Table 1's."]
    return "\n".join(parts) + "\n"


def wandb_report(project: str, group: str, title: str, text: str, entity: str | None = None, save: bool = True):
    """A W&B report for the ablation group (``wandb-workspaces``): the tables as markdown and a bar chart
    of each run's mean test metrics. -> the report, or None when ``wandb-workspaces`` is not installed."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        log.info("W&B report skipped: pip install 'amoe[report]' (wandb-workspaces) to build one for group %s", group)
        return None
    runset = wr.Runset(entity=entity or "", project=project, name=group, filters=f"Group = '{group}'")
    panels = [wr.BarPlot(title="mean image AUROC per run", metrics=["test/mean/image_auroc"]),
              wr.BarPlot(title="mean pixel AUROC per run", metrics=["test/mean/pixel_auroc"])]
    report = wr.Report(project=project, entity=entity or "", title=title,
                       description=f"amoe ablations, W&B group {group}",
                       blocks=[wr.MarkdownBlock(text=text), wr.PanelGrid(runsets=[runset], panels=panels)])
    if save:
        report.save()
        log.info("W&B report: %s", report.url)
    return report


def main(argv: list[str] | None = None) -> int:
    argv, extra = runner.split_extra(list(sys.argv[1:] if argv is None else argv))
    p = runner.build_parser("amoe ablations", "Tables 2 and 3: six ablation settings under Table 1's protocol.")
    p.add_argument("--dataset", default="all", choices=["all", "synthetic", *DATASETS],
                   help="all (default; the paper's protocol: one model per setting on every dataset present), "
                        "one benchmark dataset, or the synthetic data")
    p.add_argument("--data-root", default=None, help="the root of a single --dataset (default: its config's)")
    p.add_argument("--only", default=None, help="comma-separated subset of: " + ", ".join(v[0] for v in VARIANTS))
    args = p.parse_args(argv)
    names = [v[0] for v in VARIANTS]
    chosen = [n.strip() for n in args.only.split(",")] if args.only else names
    if set(chosen) - set(names):
        p.error(f"unknown ablation(s) {sorted(set(chosen) - set(names))}; choose from {', '.join(names)}")
    out = (args.out or os.path.join("results", "smoke" if args.smoke else "")).rstrip(os.sep) or "results"
    work = args.work or os.path.join("runs", "ablations_smoke" if args.smoke else "ablations", args.dataset)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    group = f"ablations-{args.dataset}-{stamp}"
    configs = base_configs(args.dataset, args.smoke, work)
    if "no_eir" in chosen:
        try:
            check_no_eir([*configs, variant_config("no_eir")])
        except AblationError as e:
            print(f"amoe ablations: {e}", file=sys.stderr)
            return 2

    roots: dict[str, str] = {}
    missing: dict[str, str] = {}
    if args.dataset != "synthetic":
        wanted = list(DATASETS) if args.dataset == "all" else [args.dataset]
        roots = runner.dataset_roots(wanted, args.smoke, work, args.data_dir)
        if args.data_root and args.dataset != "all":
            roots[args.dataset] = args.data_root
        roots, missing = runner.check_roots(wanted, roots)
        for n, msg in missing.items():
            print(f"{label(n)}: {msg}")
        if not roots:
            print("amoe ablations: none of the datasets is present; nothing to run.", file=sys.stderr)
            return 2
    evaluated = list(roots) if roots else ["synthetic"]

    results = {}
    for name in chosen:
        files = [*configs, variant_config(name)]
        cap = capped_top_k(files)
        tags = [f"setting:{name}", f"ablations:{args.dataset}", *(f"dataset:{d}" for d in evaluated)]
        run_extra = [*runner.wandb_args(args.wandb, args.wandb_project, group, tags),
                     *(["--model.config.top_k", str(cap)] if cap else []), *extra]
        results[name] = run_setting(name, args.dataset, roots, files, os.path.join(work, name), out,
                                    f"ablation-{name}-{stamp}", run_extra)

    papers = {1: paper_values(PAPER_TABLE)[0], 2: paper_values(PAPER_TABLE2, "settings")[0],
              3: paper_values(PAPER_TABLE3, "settings")[0]}
    sources = [f"`{PAPER_TABLE}`", f"`{PAPER_TABLE2}`", f"`{PAPER_TABLE3}`"]
    rows = ablation_rows(results, papers, evaluated)
    gates = {}
    for r in (results.get("all") or {}).get("runs", []):
        gates.update(runner.gate_mass(r.get("results_dir")))
    protocol = {"all": "single_model", "synthetic": "synthetic"}.get(args.dataset, "per_dataset")
    head_lines = [f"# Ablations (AnomalyMoE Tables 2 and 3), `--dataset {args.dataset}`, protocol `{protocol}`", ""]
    if protocol == "single_model":
        head_lines.append(f"Each setting trains ONE model on {len(roots)} of {len(DATASETS)} datasets "
                          f"({', '.join(label(n) for n in roots)}); each dataset is evaluated separately.")
        if missing:
            head_lines.append(f"**Not the paper's protocol:** {', '.join(label(n) for n in missing)} missing.")
    if args.smoke:
        head_lines.append("**Smoke run:** tiny data and a tiny random encoder; the numbers mean nothing.")
    head_lines.append(f"Base: {' + '.join(configs)}; overrides `{ABLATIONS}/<name>.yaml` (top_k capped to the "
                      f"number of experts where a group subset has fewer); W&B group `{group}`; "
                      f"{time.strftime('%Y-%m-%d %H:%M')}. Values: mean over classes, %.")
    text = ablation_markdown(rows, "\n".join(head_lines), sources)

    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"ablations_{args.dataset}")
    with open(f"{stem}.md", "w") as f:
        f.write(text)
    pd.DataFrame(rows).to_csv(f"{stem}.csv", index=False)
    with open(f"{stem}.json", "w") as f:
        json.dump({"dataset": args.dataset, "protocol": protocol, "group": group, "missing": missing,
                   "rows": rows, "gate_mass": gates}, f, indent=2)
    html = os.path.join(out, "ablations.html")
    with open(html, "w") as f:
        f.write(ablations_html(rows, gates, title=f"amoe ablations — {args.dataset} ({protocol})",
                               notes=[line for line in head_lines[2:] if line]))
    print(text)
    print(f"wrote {stem}.md/.csv/.json and {html}")
    mode = wandb_wanted(args.wandb)
    runner.log_table_to_wandb(mode, args.wandb_project, group, f"ablations_{args.dataset}",
                              pd.DataFrame(rows), f"{stem}.md")
    if mode == "online":
        try:
            wandb_report(args.wandb_project, group, f"AnomalyMoE ablations ({args.dataset})", text)
        except Exception as e:  # pragma: no cover - needs the W&B service
            log.warning("W&B report for %s failed (%s: %s)", group, type(e).__name__, e)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
