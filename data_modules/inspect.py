"""``amoe inspect-data``: count a dataset's images and masks per split, class and type; list every problem."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from data_modules import DATAMODULES, canonical_name
from data_modules.base import AnomalyDataModule, DataError
from data_modules.bmad import BMAD


def inspect_module(dm: AnomalyDataModule, read: bool = True) -> dict[str, Any]:
    """Counts and problems of a data module; with ``read`` every image and mask is decoded once."""
    dm.collect_problems = True
    report: dict[str, Any] = {"train": {}, "validation": {}, "test": {}, "masks": 0, "problems": []}
    try:
        dm.check_root()
    except DataError as e:
        report["problems"] = [str(e)]
        return report
    masks: set[str] = set()
    for split in ("train", "validation", "test"):
        try:
            records = getattr(dm, f"{split}_records")()
        except DataError as e:
            dm.problems.append(str(e))
            continue
        if read:
            dm.problems += dm._dataset(records, split).drop_bad_files()
        for r in records:
            masks.update([r.mask_path] if r.mask_path else [])
            masks.update(r.extra.get("region_masks", []))
        if split == "test":
            test: dict[str, Counter] = {}
            for r in records:
                test.setdefault(r.cls, Counter())[r.defect_type] += 1
            report["test"] = {c: dict(sorted(n.items())) for c, n in sorted(test.items())}
        else:
            report[split] = dict(sorted(Counter(r.cls for r in records).items()))
    report["masks"] = len(masks)
    report["problems"] = list(dict.fromkeys(dm.problems))
    return report


def print_report(name: str, root: str, report: dict[str, Any]) -> None:
    print(f"{name} at {root}")
    for split in ("train", "validation"):
        for cls, n in report[split].items():
            print(f"  {split:<11} {cls:<32} {'':<24} {n:>7}")
    for cls, types in report["test"].items():
        for t, n in types.items():
            print(f"  {'test':<11} {cls:<32} {t:<24} {n:>7}")
    totals = {s: sum(report[s].values()) for s in ("train", "validation")}
    totals["test"] = sum(sum(t.values()) for t in report["test"].values())
    print(f"  totals: {totals}; masks found: {report['masks']}")
    print(f"  problems: {len(report['problems'])}")
    for msg in report["problems"]:
        print("  - " + msg.replace("\n", "\n    "))


def main(argv: list[str] | None = None) -> int:
    """Print the counts (``--json``: the last line is the JSON report); exit 0 only without problems."""
    p = argparse.ArgumentParser(prog="amoe inspect-data", description=__doc__)
    p.add_argument("--dataset", required=True, type=canonical_name, choices=sorted(set(DATAMODULES) | {"bmad"}))
    p.add_argument("--root", default=None, help="dataset root (default: the module's data/<dataset>)")
    p.add_argument("--subset", default=None, help="bmad: brainmri | liverct | resc")
    p.add_argument("--modality", default=None, help="mvtec_3d: rgb | depth")
    p.add_argument("--no-read", action="store_true", help="do not decode the files (faster; misses unreadable ones)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on the last line")
    a = p.parse_args(argv)
    kwargs = {k: getattr(a, k) for k in ("root", "subset", "modality") if getattr(a, k) is not None}
    try:
        dm = (BMAD if a.dataset == "bmad" else DATAMODULES[a.dataset])(num_workers=0, **kwargs)
    except TypeError as e:
        p.error(f"--dataset {a.dataset} does not take {sorted(kwargs)}: {e}")
    except DataError as e:
        p.error(str(e))
    report = inspect_module(dm, read=not a.no_read)
    print_report(dm.name, dm.root, report)
    if a.json:
        print(json.dumps(report))
    return 0 if not report["problems"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
