"""amoe.dashboard: the offline ablations page (self-contained HTML with inline SVG)."""

from amoe.dashboard import ablations_html


def row(setting, ds, img, pix, p_img, p_pix):
    return {"setting": setting, "dataset": ds, "image_auroc": img, "pixel_auroc": pix, "paper_image_auroc": p_img,
            "paper_pixel_auroc": p_pix, "delta_image_auroc": None, "delta_pixel_auroc": None, "pixel_aupro": None,
            "status": "ok"}


def test_one_chart_pair_per_dataset_bars_scaled_to_percent_and_gate_mass():
    rows = [row("patch", "visa", 50.0, 100.0, 97.0, None), row("all", "visa", 25.0, 75.0, 98.1, 99.0),
            row("all", "liverct", None, 80.0, 71.1, 97.2)]
    page = ablations_html(rows, {"visa": {"patch": 0.5, "component": 0.25, "global": 0.25}}, "T <x>", ["a & b"])
    assert page.count("<svg") == 2 * 2 + 1 and "T &lt;x&gt;" in page and "a &amp; b" in page
    # plot height 190 - 34 - 22 = 134 px: 50 % -> 67 px, 100 % -> 134 px
    assert 'height="67.0" fill="#1f77b4"><title>P: 50.0' in page
    assert 'height="134.0" fill="#1f77b4"><title>P: 100.0' in page
    assert page.count(">n/a<") == 2  # the paper's missing patch pixel value, our missing LiverCT image value
    assert "<title>component: 0.250</title>" in page and "<script" not in page
    assert "VisA" in page and "LiverCT" in page
