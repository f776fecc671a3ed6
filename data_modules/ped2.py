"""UCSD Ped2 as distributed: ``.tif`` frames per clip, gt ``.bmp`` masks, frame labels in ``UCSDped2.m``."""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

from data_modules.base import AnomalyDataModule, DataError, Record, list_images, subdirs


def trailing_number(path: Path) -> int | None:
    """``001.tif`` -> 1, ``frame012.bmp`` -> 12; None without a trailing number."""
    m = re.search(r"(\d+)$", path.stem)
    return int(m.group(1)) if m else None


def parse_gt_frames(text: str) -> list[set[int]]:
    """Anomalous frame numbers (1-based) of each ``TestVideoFile{end+1}.gt_frame = [a:b, c:d];`` in order."""
    text = re.sub(r"%[^\n]*", "", text)  # MATLAB comments
    clips = []
    for body in re.findall(r"gt_frame\s*=\s*\[([^\]]*)\]", text):
        frames: set[int] = set()
        for token in re.split(r"[,;\s]+", body.strip()):
            if not token:
                continue
            parts = [int(x) for x in token.split(":")]
            if len(parts) == 1:
                frames.add(parts[0])
            else:  # a:b or a:step:b, inclusive
                start, step, stop = (parts[0], 1, parts[1]) if len(parts) == 2 else parts
                frames.update(range(start, stop + 1, step))
        clips.append(frames)
    return clips


class Ped2(AnomalyDataModule):
    """UCSD Ped2 (one class, ``pedestrian``): frames of the training clips are normal; a test frame is
    anomalous when ``UCSDped2.m`` lists it, and its mask comes from ``TestNNN_gt`` (matched by number)."""

    name = "ped2"
    default_root = "data/Ped2"
    download_page = "http://www.svcl.ucsd.edu/projects/anomaly/dataset.html"
    expected_layout = """\
  <root>/[UCSD_Anomaly_Dataset.v1p2/][UCSDped2/]Train/Train001/001.tif ...
  <root>/.../UCSDped2/Test/Test001/001.tif ...
  <root>/.../UCSDped2/Test/Test001_gt/001.bmp (or frame001.bmp) ...
  <root>/.../UCSDped2/Test/UCSDped2.m"""

    @cached_property
    def base(self) -> Path:
        """The UCSDped2 folder: root itself, its child or its grandchild."""
        root = Path(self.root)
        for cand in (root, root / "UCSDped2", root / "UCSD_Anomaly_Dataset.v1p2" / "UCSDped2"):
            if (cand / "Train").is_dir() and (cand / "Test").is_dir():
                return cand
        raise DataError(
            f"ped2: no UCSDped2 folder (with Train/ and Test/) under '{root}'.\n"
            f"Expected layout:\n{self.expected_layout}\nDownload page: {self.download_page}"
        )

    def clips(self, split: str) -> list[Path]:
        return [d for d in subdirs(self.base / split) if not d.name.endswith("_gt")]

    def frames(self, clip: Path) -> list[Path]:
        images = list_images(clip)
        if not images:
            self.problem(f"{clip}: empty clip folder (no frames).")
        return images

    def gt_frames(self) -> list[set[int]]:
        test = self.base / "Test"
        found = [test / "UCSDped2.m"] if (test / "UCSDped2.m").is_file() else [
            p for p in sorted(test.glob("*.m")) if not p.name.startswith(".")
        ]
        if not found:
            raise DataError(f"ped2: {self.base / 'Test' / 'UCSDped2.m'} is missing; it holds the frame labels. "
                            "Re-extract the archive.")
        return parse_gt_frames(found[0].read_text(errors="replace"))

    def train_records(self) -> list[Record]:
        return [
            Record(str(p), 0, "pedestrian", "good", extra={"clip": c.name, "frame": trailing_number(p)})
            for c in self.clips("Train")
            for p in self.frames(c)
        ]

    def test_records(self) -> list[Record]:
        labels, out = self.gt_frames(), []
        for clip in self.clips("Test"):
            number = trailing_number(clip)
            if number is None or number > len(labels):
                self.problem(f"{clip}: no gt_frame entry for this clip in UCSDped2.m.")
                continue
            anomalous = labels[number - 1]
            frames = self.frames(clip)
            masks = {trailing_number(m): m for m in list_images(clip.parent / f"{clip.name}_gt")}
            for n in sorted(set(masks) - {trailing_number(p) for p in frames}):
                self.problem(f"{masks[n]}: mask without image (no frame {n} in {clip}).")
            for p in frames:
                n = trailing_number(p)
                mask = masks.get(n) if n in anomalous else None
                if n in anomalous and mask is None:
                    self.problem(f"{p}: anomalous frame (UCSDped2.m) without mask in {clip.name}_gt. Re-extract it.")
                    continue
                label = int(n in anomalous)
                extra = {"clip": clip.name, "frame": n}
                out.append(Record(str(p), label, "pedestrian", "anomaly" if label else "good",
                                  str(mask) if mask else None, extra))
        return out
