"""``ablations.html``: a self-contained offline dashboard of an ablation sweep (inline SVG, no scripts, no
network): per dataset, bar charts of Image and Pixel AUROC for every setting, ours next to the paper's;
the router's gate mass per expert group and dataset (the paper's Fig. 4); the full table."""

from __future__ import annotations

import html
from typing import Any

import pandas as pd

from amoe.runner import label

OURS, PAPER = "#1f77b4", "#c7c7c7"
GROUP_COLOURS = {"patch": "#1f77b4", "component": "#ff7f0e", "global": "#2ca02c"}
SETTING_ORDER = ("patch", "patch_component", "patch_global", "all", "no_esb", "no_eir")
SHORT = {"patch": "P", "patch_component": "P+C", "patch_global": "P+G", "all": "full", "no_esb": "w/o ESB",
         "no_eir": "w/o EIR"}


def _bars(title: str, groups: list[tuple[str, float | None, float | None]], width: int = 420, height: int = 190) -> str:
    """Grouped bars (ours, paper) per setting on a 0–100 % axis; missing values drawn as 'n/a'."""
    left, bottom, top = 34, 34, 22
    plot_h = height - bottom - top
    step = (width - left - 8) / max(len(groups), 1)
    bar = min(18.0, step / 2.6)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{html.escape(title)}">', f'<text x="{width / 2}" y="14" text-anchor="middle" '
           f'font-size="12" font-weight="bold">{html.escape(title)}</text>']
    for tick in (0, 25, 50, 75, 100):
        y = top + plot_h * (1 - tick / 100)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 6}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end" font-size="9">{tick}</text>')
    for i, (name, ours, paper) in enumerate(groups):
        x0 = left + i * step + (step - 2 * bar) / 2
        for j, (value, colour) in enumerate(((ours, OURS), (paper, PAPER))):
            x = x0 + j * bar
            if value is None:
                out.append(f'<text x="{x + bar / 2:.1f}" y="{top + plot_h - 3}" text-anchor="middle" '
                           f'font-size="7" fill="#999">n/a</text>')
                continue
            h = plot_h * max(0.0, min(100.0, float(value))) / 100
            out.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" '
                       f'fill="{colour}"><title>{html.escape(name)}: {float(value):.1f}</title></rect>')
        out.append(f'<text x="{x0 + bar:.1f}" y="{height - bottom + 13}" text-anchor="middle" '
                   f'font-size="9">{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _gate_bars(gates: dict[str, dict[str, float]], width: int = 420) -> str:
    """Stacked horizontal bars: mean gate mass of each expert group per dataset (sums to 1)."""
    row, left = 20, 90
    height = 30 + row * len(gates)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           'aria-label="router gate mass per expert group">']
    for i, (ds, mass) in enumerate(gates.items()):
        y, x = 8 + i * row, float(left)
        out.append(f'<text x="{left - 4}" y="{y + 12}" text-anchor="end" font-size="10">'
                   f'{html.escape(label(ds))}</text>')
        for g, colour in GROUP_COLOURS.items():
            w = (width - left - 10) * float(mass.get(g, 0.0))
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 4}" fill="{colour}">'
                       f'<title>{g}: {float(mass.get(g, 0.0)):.3f}</title></rect>')
            x += w
    legend_y = height - 8
    for k, (g, colour) in enumerate(GROUP_COLOURS.items()):
        out.append(f'<rect x="{left + 90 * k}" y="{legend_y - 8}" width="9" height="9" fill="{colour}"/>'
                   f'<text x="{left + 90 * k + 12}" y="{legend_y}" font-size="10">{g}</text>')
    out.append("</svg>")
    return "".join(out)


def ablations_html(rows: list[dict[str, Any]], gates: dict[str, dict[str, float]], title: str,
                   notes: list[str] | None = None) -> str:
    """The dashboard page. ``rows``: :func:`amoe.ablations.ablation_rows` (one per setting and dataset, in %);
    ``gates``: {dataset: {group: mean gate mass}} of the full model."""
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_dataset.setdefault(r["dataset"], []).append(r)
    cards = []
    for ds, rs in by_dataset.items():
        rs = sorted(rs, key=lambda r: SETTING_ORDER.index(r["setting"]))
        name = label(ds)
        img = _bars(f"{name}: Image AUROC (%)", [(SHORT[r["setting"]], r["image_auroc"], r["paper_image_auroc"]) for r in rs])
        pix = _bars(f"{name}: Pixel AUROC (%)", [(SHORT[r["setting"]], r["pixel_auroc"], r["paper_pixel_auroc"]) for r in rs])
        cards.append(f'<section class="card"><h2>{html.escape(name)}</h2>{img}{pix}</section>')
    gate = (f'<section class="card"><h2>Router gate mass per expert group (full model; paper Fig. 4)</h2>'
            f'{_gate_bars(gates)}</section>') if gates else ""
    cols = ["setting", "dataset", "image_auroc", "paper_image_auroc", "delta_image_auroc", "pixel_auroc",
            "paper_pixel_auroc", "delta_pixel_auroc", "pixel_aupro", "status"]
    table = pd.DataFrame(rows, columns=cols).to_html(index=False, na_rep="–", float_format=lambda v: f"{v:.1f}",
                                                     border=0, classes="results")
    legend = (f'<p class="legend"><span style="background:{OURS}"></span> ours '
              f'<span style="background:{PAPER}"></span> paper (n/a: no value in the paper or the run failed). '
              "P: patch only; P+C, P+G: patch with component / global; full: all groups with ESB and EIR.</p>")
    note = "".join(f"<p>{html.escape(n.replace('**', ''))}</p>" for n in notes or [])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 16px; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; }}
.card h2 {{ font-size: 15px; margin: 4px 0; }}
.legend span {{ display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 10px; }}
table.results {{ border-collapse: collapse; font-size: 12px; margin-top: 16px; }}
table.results td, table.results th {{ border-bottom: 1px solid #eee; padding: 2px 8px; text-align: right; }}
</style></head><body>
<h1>{html.escape(title)}</h1>{note}{legend}
<div class="grid">{''.join(cards)}{gate}</div>
{table}
</body></html>
"""
