"""Embedded synthetic dataset: generated on the fly, deterministic, no download.

Each class is an "assembly": a textured board with parts (shapes of given type and colour) at fixed
slots, placed with small random jitter. Test anomalies come at three semantic levels, each with a
pixel mask:

  structural  scratch, hole or stain on the board or a part              (local texture)
  component   one part replaced by a part of the wrong type, same colour   (wrong component)
  logical     a part missing, an extra part, or two parts swapped          (wrong arrangement)

Swaps keep the image's colour histogram exactly, and wrong-type parts keep their colour, so the
anomalies cannot be told from global colour statistics alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np

from data_modules.base import AnomalyDataModule, AnomalyDataset, Record

LEVELS = ("structural", "component", "logical")


@dataclass(frozen=True)
class Part:
    shape: str  # circle | square | triangle | ring | cross
    colour: tuple[int, int, int]


@dataclass(frozen=True)
class Assembly:
    """A class: background colour, slot grid (rows × cols, None = empty slot) and part size."""

    background: tuple[int, int, int]
    slots: tuple[tuple[Part | None, ...], ...]
    radius: float = 0.075  # part radius as a fraction of the image side


def default_assemblies() -> dict[str, Assembly]:
    red, blue, yellow, white, orange = (200, 40, 40), (40, 70, 200), (220, 200, 40), (230, 230, 230), (230, 130, 30)
    return {
        "breakfast": Assembly(
            (60, 45, 35),
            ((Part("circle", orange), None, Part("square", white)), (Part("triangle", yellow), Part("circle", red), None)),
        ),
        "pcb": Assembly(
            (30, 110, 50),
            (
                (Part("square", (20, 20, 20)), Part("circle", yellow), Part("square", (20, 20, 20))),
                (Part("ring", (200, 200, 200)), None, Part("ring", (200, 200, 200))),
                (Part("cross", blue), Part("square", (20, 20, 20)), Part("circle", yellow)),
            ),
            radius=0.06,
        ),
        "pushpins": Assembly(
            (150, 150, 160),
            ((Part("circle", red), Part("circle", blue)), (Part("circle", blue), Part("circle", red))),
            radius=0.09,
        ),
    }


def _rng(*key) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _draw_part(img: np.ndarray, mask: np.ndarray | None, part: Part, cx: float, cy: float, r: float, angle: float) -> None:
    """Draw one part on img (H, W, 3) uint8; also on mask (H, W) uint8 when given."""
    targets = [(img, part.colour)] + ([(mask, 255)] if mask is not None else [])
    c = (int(round(cx)), int(round(cy)))
    for canvas, colour in targets:
        if part.shape == "circle":
            cv2.circle(canvas, c, int(r), colour, -1, cv2.LINE_AA if canvas is img else cv2.LINE_8)
        elif part.shape == "ring":
            cv2.circle(canvas, c, int(r), colour, max(2, int(r / 2.5)))
        else:
            if part.shape == "square":
                pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
                scale = r * 0.85
            elif part.shape == "triangle":
                pts = [(0, -1.15), (1.0, 0.75), (-1.0, 0.75)]
                scale = r
            else:  # cross
                a, b = 0.35, 1.0
                pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
                scale = r
            ca, sa = np.cos(angle), np.sin(angle)
            poly = np.array([[cx + scale * (x * ca - y * sa), cy + scale * (x * sa + y * ca)] for x, y in pts])
            cv2.fillPoly(canvas, [np.round(poly).astype(np.int32)], colour, cv2.LINE_AA if canvas is img else cv2.LINE_8)


def render(assembly: Assembly, size: int, rng: np.random.Generator, anomaly: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Render one image. anomaly: None or one of LEVELS. Returns (rgb (S,S,3) uint8, mask (S,S) bool, defect name)."""
    rows = len(assembly.slots)
    cols = max(len(r) for r in assembly.slots)
    noise = rng.normal(0, 6, (size, size, 1)) + rng.normal(0, 3, (size, size, 3))
    background = np.array(assembly.background, dtype=np.float64) + rng.normal(0, 12, 3)  # lighting / board tint
    img = np.clip(background + noise, 0, 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    r = assembly.radius * size * rng.uniform(0.85, 1.15)

    slots = [(i, j, p) for i, row in enumerate(assembly.slots) for j, p in enumerate(row)]
    centres = {}
    for i, j, _ in slots:
        cx = (j + 0.5) / cols * size + rng.uniform(-0.025, 0.025) * size
        cy = (i + 0.5) / rows * size + rng.uniform(-0.025, 0.025) * size
        centres[(i, j)] = (cx, cy)
    placed = {(i, j): p for i, j, p in slots if p is not None}
    empty = [(i, j) for i, j, p in slots if p is None]
    defect = "good"

    if anomaly == "component":
        key = list(placed)[rng.integers(len(placed))]
        old = placed[key]
        shapes = [s for s in ("circle", "square", "triangle", "ring", "cross") if s != old.shape]
        placed[key] = Part(shapes[rng.integers(len(shapes))], old.colour)
        _draw_part(mask, None, Part(placed[key].shape, (255, 255, 255)), *centres[key], r, 0.0)
        _draw_part(mask, None, Part(old.shape, (255, 255, 255)), *centres[key], r, 0.0)
        defect = f"wrong_{placed[key].shape}"
    elif anomaly == "logical":
        kinds = ["missing", "swapped"] + (["extra"] if empty else [])
        kind = kinds[rng.integers(len(kinds))]
        distinct = [(a, b) for a in placed for b in placed if a < b and placed[a] != placed[b]]
        if kind == "swapped" and not distinct:
            kind = "missing"
        if kind == "missing":
            key = list(placed)[rng.integers(len(placed))]
            _draw_part(mask, None, Part(placed.pop(key).shape, (255, 255, 255)), *centres[key], r, 0.0)
        elif kind == "extra":
            key = empty[rng.integers(len(empty))]
            placed[key] = list(placed.values())[rng.integers(len(placed))]
            _draw_part(mask, None, Part(placed[key].shape, (255, 255, 255)), *centres[key], r, 0.0)
        else:
            a, b = distinct[rng.integers(len(distinct))]
            placed[a], placed[b] = placed[b], placed[a]
            for key in (a, b):
                _draw_part(mask, None, Part(placed[key].shape, (255, 255, 255)), *centres[key], r, 0.0)
        defect = f"{kind}_part"

    for key, part in placed.items():
        _draw_part(img, None, part, *centres[key], r, rng.uniform(-0.15, 0.15))

    img = np.clip(img.astype(np.float64) * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)  # exposure
    if anomaly == "structural":
        kind = ("scratch", "hole", "stain")[rng.integers(3)]
        cx, cy = rng.uniform(0.2, 0.8, 2) * size
        if kind == "scratch":
            ang = rng.uniform(0, np.pi)
            length = rng.uniform(0.15, 0.3) * size
            p1 = (int(cx - length / 2 * np.cos(ang)), int(cy - length / 2 * np.sin(ang)))
            p2 = (int(cx + length / 2 * np.cos(ang)), int(cy + length / 2 * np.sin(ang)))
            thick = max(2, size // 48)
            for canvas, colour in ((img, (235, 235, 225)), (mask, 255)):
                cv2.line(canvas, p1, p2, colour, thick)
        elif kind == "hole":
            rad = int(rng.uniform(0.03, 0.05) * size)
            for canvas, colour in ((img, (10, 10, 10)), (mask, 255)):
                cv2.circle(canvas, (int(cx), int(cy)), rad, colour, -1)
        else:
            rad = rng.uniform(0.04, 0.07) * size
            yy, xx = np.mgrid[:size, :size]
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rad**2))
            tint = np.array([120.0, 90.0, 20.0]) * rng.choice([-1, 1])
            img[:] = np.clip(img + blob[..., None] * tint, 0, 255).astype(np.uint8)
            mask[blob > 0.35] = 255
        defect = kind
    return img, mask > 0, defect


class SyntheticDataset(AnomalyDataset):
    """Records carry generation keys instead of files; images and masks are rendered on access."""

    def __init__(self, records, dataset, transform, assemblies: dict[str, Assembly], size: int, seed: int):
        super().__init__(records, dataset, transform)
        self.assemblies, self.size, self.seed = assemblies, size, seed

    def _render(self, rec: Record):
        key = rec.extra["key"]
        rng = _rng(self.seed, *key)
        return render(self.assemblies[rec.cls], self.size, rng, rec.extra.get("level"))

    def load_rgb(self, rec: Record) -> np.ndarray:
        return self._render(rec)[0]

    def load_mask(self, rec: Record, shape) -> np.ndarray:
        return self._render(rec)[1]

    def drop_bad_files(self) -> list[str]:
        return []


class SyntheticDataModule(AnomalyDataModule):
    """Deterministic synthetic assemblies (the embedded default; no download).

    Args:
        classes: which assemblies (default: all of ``default_assemblies()``).
        num_train: normal training images per class.
        num_test_good: normal test images per class.
        num_test_per_level: anomalous test images per class and level (structural, component, logical).
        size: rendered image side before the transform.
    """

    name = "synthetic"
    download_page = "(none: generated on the fly)"
    expected_layout = "(none: generated on the fly)"

    def __init__(
        self,
        classes: list[str] | None = None,
        num_train: int = 60,
        num_test_good: int = 15,
        num_test_per_level: int = 10,
        size: int = 128,
        image_size: int = 112,
        crop_size: int = 112,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        calib_fraction: float = 0.1,
        seed: int = 0,
    ):
        super().__init__(None, image_size, crop_size, batch_size, eval_batch_size, num_workers, calib_fraction, False, seed)
        assemblies = default_assemblies()
        unknown = sorted(set(classes or []) - set(assemblies))
        if unknown:
            raise ValueError(f"synthetic: unknown classes {unknown}; choose from {sorted(assemblies)}.")
        self.assemblies = {c: assemblies[c] for c in (classes or sorted(assemblies))}
        self.num_train, self.num_test_good, self.num_test_per_level, self.size = num_train, num_test_good, num_test_per_level, size

    def check_root(self) -> None:
        pass

    def _dataset(self, records, split):
        return SyntheticDataset(records, self.name, self.transform, self.assemblies, self.size, self.seed)

    def train_records(self) -> list[Record]:
        return [
            Record(f"synthetic://{c}/train/good/{i:03d}", 0, c, "good", extra={"key": (c, "train", i)})
            for c in self.assemblies
            for i in range(self.num_train)
        ]

    def test_records(self) -> list[Record]:
        recs = []
        for c in self.assemblies:
            recs += [
                Record(f"synthetic://{c}/test/good/{i:03d}", 0, c, "good", extra={"key": (c, "test", "good", i)})
                for i in range(self.num_test_good)
            ]
            for level in LEVELS:
                for i in range(self.num_test_per_level):
                    key = (c, "test", level, i)
                    recs.append(Record(f"synthetic://{c}/test/{level}/{i:03d}", 1, c, level, extra={"key": key, "level": level}))
        return recs
