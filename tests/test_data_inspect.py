"""inspect-data: counts per split/class/type, masks, every problem; exit 0 only when clean."""

from __future__ import annotations

import json

import numpy as np
from fixtures_data import save, touch

from data_modules.inspect import main


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_clean_dataset_json(mvtec_loco_root, capsys):
    assert main(["--dataset", "mvtec_loco", "--root", str(mvtec_loco_root), "--json"]) == 0
    assert last_json(capsys) == {
        "train": {"juice_bottle": 3}, "validation": {"juice_bottle": 2},
        "test": {"juice_bottle": {"good": 1, "logical_anomalies": 2, "structural_anomalies": 1}},
        "masks": 4, "problems": []}


def test_pass_through_subset_and_modality(bmad_root, mvtec_3d_root, capsys):
    assert main(["--dataset", "bmad", "--subset", "LiverCT", "--root", str(bmad_root), "--json"]) == 0
    assert last_json(capsys)["test"] == {"LiverCT": {"good": 1, "ungood": 2}}
    assert main(["--dataset", "mvtec_3d", "--modality", "depth", "--root", str(mvtec_3d_root), "--json"]) == 0
    assert last_json(capsys)["masks"] == 3


def test_every_problem_is_listed(mvtec_ad_root, capsys):
    b = mvtec_ad_root / "bottle"
    (b / "ground_truth/broken_large/001_mask.png").unlink()  # anomalous image without mask
    save(b / "ground_truth/contamination/005_mask.png", np.zeros((4, 4), np.uint8))  # mask without image
    touch(b / "test/good/001.png", b"")  # unreadable
    (mvtec_ad_root / "cable").mkdir()  # empty class folder
    assert main(["--dataset", "mvtec_ad", "--root", str(mvtec_ad_root), "--json"]) == 1
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    problems = "\n".join(report["problems"])
    assert len(report["problems"]) == 5, problems  # cable: no train/good and no test folders
    for words in ("broken_large/001.png: anomalous test image without mask", "005_mask.png: mask without image",
                  "test/good/001.png: zero-byte file", "cable/train/good: empty class folder", "cable/test: no test"):
        assert words in problems and words in out
    assert report["test"]["bottle"] == {"broken_large": 1, "contamination": 1, "good": 2}


def test_missing_root(tmp_path, capsys):
    assert main(["--dataset", "ped2", "--root", str(tmp_path / "none"), "--json"]) == 1
    (problem,) = last_json(capsys)["problems"]
    assert "ped2" in problem and "svcl.ucsd.edu" in problem
