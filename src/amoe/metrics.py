"""Exact, memory-bounded anomaly-detection metrics (SPEC §4; definitions in docs/METRICS.md).

Every curve is exact: raw scores are sorted (no sigmoid, no binning) and tied scores form a single
threshold, as in sklearn and the official MVTec tools.

- :func:`binary_metrics`: AUROC, AP (sklearn's step sum) and F1-max of scores (N,) against labels (N,).
- :func:`pixel_metrics`: the same over the pixels of maps (N, H, W), plus AUPRO to FPR 0.3. AUPRO uses the
  MVTec AD official definition: 8-connected GT regions, one global threshold sweep, linear
  interpolation at the limit, and the area divided by the limit.
- :func:`auspro`: MVTec LOCO AU-sPRO with saturation areas taken from ``defects_config.json``.
- :func:`evaluate`: the dict of all of the above for in-memory arrays.
- :class:`DatasetEvaluator`: a streaming per-class evaluator (one class in memory) with exact DDP
  merging through spilled shards.
- :func:`main_evaluate_maps`: the ``amoe evaluate-maps`` command line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

# torch is imported only where tensors come in (DatasetEvaluator's resizing): `evaluate` on numpy arrays
# runs without it, and its import alone is ~0.5 GB resident (docs/PERFORMANCE.md, metrics memory).

_CHUNK = 64  # images per step when packing pixels: bounds the temporaries


# --------------------------------------------------------------------------------------------------
# exact curves
#
# Between two thresholds at which positives enter, only negatives enter: the ROC and PRO curves run
# horizontally (the official per-threshold points there are collinear), AP's step sum gains nothing and
# F1 only falls. So every metric here is computed exactly from
#   - the positive samples sorted by score, grouped by tied score (G groups, highest first), and
#   - for each group score u: how many negatives score below u and how many tie with u,
# which needs one sort of the negatives and one of the positives (no sort of the merged set).
# --------------------------------------------------------------------------------------------------


class _Groups(NamedTuple):
    """Positive groups of tied scores, highest score first (G groups; P positives, N negatives)."""

    ends: np.ndarray  # (G,) int64: index of the group's last positive in descending order
    tp: np.ndarray  # (G,) int64: positives scoring >= the group's score (= ends + 1)
    fp_at: np.ndarray  # (G,) int64: negatives scoring >= the group's score
    fp_before: np.ndarray  # (G,) int64: negatives scoring > the group's score
    n_neg: int


def _is_tensor(x: Any) -> bool:
    """``isinstance(x, torch.Tensor)`` without importing torch (a tensor exists only once torch is loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _np(x: Any) -> np.ndarray:
    """Tensor / array / memmap -> ndarray (no copy when possible)."""
    if _is_tensor(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _sortable_u32(x: np.ndarray) -> np.ndarray:
    """float32 (...) -> uint32 (...) keys ordered like the floats; -0.0 and +0.0 get the same key."""
    u = (np.asarray(x, dtype=np.float32) + np.float32(0)).view(np.uint32)  # fresh array, -0.0 -> +0.0
    m = u >> np.uint32(31)  # 1 for negative floats
    m *= np.uint32(0x7FFFFFFF)
    m |= np.uint32(0x80000000)
    u ^= m  # negative: flip all bits; positive: set the sign bit
    return u


def _groups(neg_sorted: np.ndarray, pos_desc: np.ndarray) -> _Groups:
    """neg_sorted (N,) ascending, pos_desc (P,) descending (same comparable dtype) -> _Groups."""
    p = pos_desc.shape[0]
    ends = np.append(np.flatnonzero(pos_desc[1:] != pos_desc[:-1]), p - 1)
    u = pos_desc[ends]
    n = neg_sorted.shape[0]
    fp_at = n - np.searchsorted(neg_sorted, u, side="left").astype(np.int64)
    fp_before = n - np.searchsorted(neg_sorted, u, side="right").astype(np.int64)
    return _Groups(ends, ends + 1, fp_at, fp_before, n)


def _degenerate(name: str, why: str) -> float:
    warnings.warn(f"{name} is undefined ({why}); returning NaN", RuntimeWarning, stacklevel=3)
    return math.nan


def _roc_pr(g: _Groups | None, p: int, n: int, prefix: str) -> dict[str, float]:
    """AUROC (exact integer Mann-Whitney sum = trapezoid ROC), AP (sklearn's step sum) and F1-max."""
    keys = [f"{prefix}auroc", f"{prefix}ap", f"{prefix}f1max"]
    if g is None or p == 0 or n == 0:
        why = "no positive samples" if p == 0 else "no negative samples"
        return {k: _degenerate(k, why) for k in keys}
    # in place where it keeps the values: every array here has one entry per group (up to one per pixel)
    cnt = np.diff(g.tp, prepend=0)  # positives in each group
    below2 = np.subtract(2 * n, g.fp_at)
    below2 -= g.fp_before  # 2 x (negatives below) + negatives tied (exact integers)
    auroc = float(np.dot(cnt, below2)) / (2.0 * p * n)
    del below2
    denom = g.tp + g.fp_at
    precision = g.tp / denom
    ap = float(np.dot(cnt / p, precision))  # sum_k (R_k - R_{k-1}) P_k
    del precision, cnt
    denom += p
    f1 = 2.0 * g.tp
    f1 /= denom
    f1max = float(np.max(f1))  # 2TP / (TP + FP + P)
    return dict(zip(keys, (auroc, ap, f1max)))


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the polyline (x, y) up to x_max, interpolated at x_max (MVTec `generic_util.trapezoid`).

    x (n,) ascending (repeats allowed), y (n,).
    """
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.all():
        x, y = x[finite], y[finite]
    del finite
    correction = 0.0
    if not np.any(x == x_max):
        ins = int(np.searchsorted(x, x_max, side="right"))
        assert 0 < ins < len(x), "x_max must lie inside the curve"
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1])
    keep = int(np.searchsorted(x, x_max, side="right"))  # x ascending: x <= x_max is a prefix
    x, y = x[:keep], y[:keep]
    terms = y[1:] + y[:-1]
    terms *= 0.5
    terms *= x[1:] - x[:-1]
    return float(np.sum(terms) + correction)


def _overlap_area(
    fp_before: np.ndarray, fp_at: np.ndarray, y: np.ndarray, n_neg: int, y_end: float, limits: Sequence[float]
) -> dict[float, float]:
    """Normalised area under a PRO-type curve, for each FPR limit.

    Per group (highest score first) the curve runs horizontally to (fp_before/N, y_prev), then to
    (fp_at/N, y); it starts at (0, 0) and ends at (1, y_end). fp_before, fp_at, y: (G,).
    Only the points up to the first FPR above max(limits) are used.
    """
    g = min(int(np.searchsorted(fp_at, max(limits) * n_neg, side="right")), len(fp_at) - 1)
    x = np.empty(2 * g + 4)
    yy = np.empty_like(x)
    x[0] = yy[0] = 0.0
    x[1 : 2 * g + 3 : 2], x[2 : 2 * g + 3 : 2] = fp_before[: g + 1] / n_neg, fp_at[: g + 1] / n_neg
    yy[2 : 2 * g + 3 : 2] = np.minimum(y[: g + 1], 1.0)
    yy[1 : 2 * g + 3 : 2] = np.concatenate(([0.0], yy[2 : 2 * g + 1 : 2]))
    x[-1], yy[-1] = 1.0, min(y_end, 1.0)
    np.minimum(x, 1.0, out=x)
    return {lim: _trapezoid(x, yy, lim) / lim for lim in limits}


def _metrics_from_split(
    neg_sorted: np.ndarray,
    pos_desc: np.ndarray,
    region_desc: np.ndarray | None,
    sizes: np.ndarray | None,
    limit: float,
    prefix: str,
) -> dict[str, float]:
    """AUROC/AP/F1-max (+ AUPRO when sizes is given) from sorted negatives and positives.

    neg_sorted (N,) ascending; pos_desc (P,) descending; region_desc (P,) region id (1..R) of each positive.
    """
    p, n = pos_desc.shape[0], neg_sorted.shape[0]
    return _metrics_from_groups(_groups(neg_sorted, pos_desc) if p and n else None, p, n, region_desc, sizes, limit, prefix)


def _metrics_from_groups(
    g: _Groups | None, p: int, n: int, region_desc: np.ndarray | None, sizes: np.ndarray | None, limit: float, prefix: str
) -> dict[str, float]:
    """AUROC/AP/F1-max (+ AUPRO when sizes is given) from the positive groups (None: p or n is 0)."""
    out = _roc_pr(g, p, n, prefix)
    if sizes is not None:
        if g is None or len(sizes) == 0:
            out[f"{prefix}aupro"] = _degenerate(f"{prefix}aupro", "no GT regions or no normal pixels")
        else:
            weight = np.concatenate(([0.0], 1.0 / sizes))  # PRO gain of a pixel of region r: 1 / |r|
            gain = weight[region_desc]
            np.cumsum(gain, out=gain)
            pro = gain[g.ends]
            del gain
            pro /= len(sizes)
            out[f"{prefix}aupro"] = _overlap_area(g.fp_before, g.fp_at, pro, n, 1.0, [limit])[limit]
    return out


def binary_metrics(scores: Any, labels: Any, prefix: str = "") -> dict[str, float]:
    """Exact AUROC, AP and F1-max of raw scores (N,) against labels (N,) {0, 1}.

    Scores are used as given (any range, float64 precision); ties form one threshold. Keys:
    ``{prefix}auroc, {prefix}ap, {prefix}f1max``; NaN with a warning when one label class is missing.
    """
    s = _np(scores).astype(np.float64).ravel()
    y = _np(labels).astype(np.float64).ravel() > 0.5
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    s = s + 0.0  # -0.0 -> +0.0
    return _metrics_from_split(np.sort(s[~y]), np.sort(s[y])[::-1], None, None, 0.3, prefix)


# --------------------------------------------------------------------------------------------------
# pixel metrics and AUPRO
# --------------------------------------------------------------------------------------------------


def _plane8() -> np.ndarray:
    """(3, 3, 3) structure: 8-connectivity inside each image, none across images."""
    s = np.zeros((3, 3, 3), dtype=bool)
    s[1] = True
    return s


def _chunks(maps: Sequence[Any], masks: Sequence[Any], chunk: int = _CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (maps (b, H, W), masks (b, H, W)) pieces of at most ``chunk`` images."""
    for m, k in zip(maps, masks):
        m, k = _np(m), _np(k)
        if m.ndim == 2:
            m, k = m[None], k[None]
        if m.shape != k.shape:
            raise ValueError(f"maps {m.shape} and masks {k.shape} differ in shape")
        for i in range(0, m.shape[0], chunk):
            yield m[i : i + chunk], k[i : i + chunk]


def _keyed_chunks(maps: Sequence[Any], masks: Sequence[Any], chunk: int = _CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (sortable keys (b*H*W,) uint32, masks (b, H, W) bool) per piece of at most ``chunk`` images."""
    for m, k in _chunks(maps, masks, chunk):
        m = np.asarray(m, dtype=np.float32)
        if np.isnan(m).any():
            raise ValueError("anomaly maps contain NaN")
        yield _sortable_u32(m).ravel(), np.asarray(k) > 0.5


def _pack_positives(key: np.ndarray, k: np.ndarray, regions: bool, first_region: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Anomalous pixels of one piece as uint64 key << 32 | 8-connected GT region id (global: offset by
    ``first_region``; 1 when regions=False) -> (packed (p,), region sizes (r,), r)."""
    flat = k.ravel()
    sizes, r = np.zeros(0, dtype=np.int64), 0
    if regions:
        lab, r = ndimage.label(k, structure=_plane8())  # (b, H, W) int32, 0 = normal
        sizes = np.bincount(lab.ravel(), minlength=r + 1)[1:]
        payload = lab.ravel()[flat].astype(np.uint64) + np.uint64(first_region)
    else:
        payload = np.uint64(1)
    kp = key[flat].astype(np.uint64)
    kp <<= np.uint64(32)
    kp |= payload
    return kp, sizes, r


def _unpack_desc(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted packed positives (P,) uint64 -> (score keys, region ids), both (P,) uint32, highest first."""
    if sys.byteorder == "little":
        pairs = pos.view(np.uint32).reshape(-1, 2)  # [:, 0] region id, [:, 1] score key; no copy
        return pairs[::-1, 1], pairs[::-1, 0]
    return (pos >> np.uint64(32)).astype(np.uint32)[::-1], (pos & np.uint64(0xFFFFFFFF)).astype(np.uint32)[::-1]  # pragma: no cover


def _split_pixels(
    maps: Sequence[Any], masks: Sequence[Any], regions: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split pixels into normal and anomalous ones, as sortable float32 keys.

    maps, masks: lists of (b, H, W) pieces (arrays, tensors or memmaps; masks binarised at > 0.5).
    Returns normal keys (N,) uint32; anomalous pixels (P,) uint64 = key << 32 | global 8-connected GT
    region id (1 when regions=False); region sizes (R,) int64.
    """
    n_px = sum(_np(m).size for m in maps)
    neg = np.empty(n_px, dtype=np.uint32)  # pages are only touched as they are filled
    pos: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    n_neg = n_regions = 0
    for key, k in _keyed_chunks(maps, masks):
        flat = k.ravel()
        kn = key[~flat]
        neg[n_neg : n_neg + kn.size] = kn
        n_neg += kn.size
        if not flat.any():
            continue
        kp, sz, r = _pack_positives(key, k, regions, n_regions)
        pos.append(kp)
        sizes.append(sz)
        n_regions += r
    neg = neg[:n_neg]
    pos_all = np.concatenate(pos) if pos else np.zeros(0, dtype=np.uint64)
    return neg, pos_all, (np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64))


def _pixel_split_metrics(
    neg: np.ndarray, pos: np.ndarray, sizes: np.ndarray | None, limit: float
) -> dict[str, float]:
    """Sort normal keys (N,) uint32 and packed anomalous pixels (P,) uint64 in place -> pixel metrics."""
    neg.sort()
    pos.sort()
    hi, lo = _unpack_desc(pos)
    return _metrics_from_split(neg, hi, lo, sizes, limit, "pixel_")


_COUNT_CHUNK = 16  # images per step of the counting path: its temporaries are ~30 bytes per pixel of a step


def _pixel_counted_metrics(maps: Sequence[Any], masks: Sequence[Any], aupro: bool, limit: float) -> dict[str, float]:
    """The pixel metrics of :func:`_pixel_split_metrics` without a copy of the normal pixels.

    Pass 1 packs and sorts the anomalous pixels only (8 bytes each). Pass 2 reads the maps again and
    counts, for each distinct anomalous score u (U sorted), the normal pixels strictly between the
    neighbouring values of U and those equal to u (searchsorted + bincount, one piece at a time). These
    integer counts are exactly what the sort of all normal pixels gives (``_groups``), so the metrics
    are identical; memory is O(anomalous pixels + one piece) instead of 4 bytes per normal pixel.
    """
    pos: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    n = n_regions = 0
    for key, k in _keyed_chunks(maps, masks, _COUNT_CHUNK):
        flat = k.ravel()
        n_pos = int(np.count_nonzero(flat))
        n += flat.size - n_pos
        if n_pos:
            kp, sz, r = _pack_positives(key, k, aupro, n_regions)
            pos.append(kp)
            sizes.append(sz)
            n_regions += r
    packed = np.concatenate(pos) if pos else np.zeros(0, dtype=np.uint64)
    del pos
    packed.sort()
    hi, lo = _unpack_desc(packed)
    p = hi.shape[0]
    size_arr = (np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)) if aupro else None
    if not (p and n):
        return _metrics_from_groups(None, p, n, lo, size_arr, limit, "pixel_")
    ends = np.append(np.flatnonzero(hi[1:] != hi[:-1]), p - 1)
    u = np.ascontiguousarray(hi[ends][::-1])  # (G,) distinct anomalous keys, ascending
    # counts[2j]: normal pixels in (u[j-1], u[j]) (j = G: above all); counts[2j + 1]: normal pixels == u[j]
    counts = np.zeros(2 * u.size + 2, dtype=np.int64)
    for key, k in _keyed_chunks(maps, masks, _COUNT_CHUNK):
        kn = key[~k.ravel()]
        kn.sort()  # sorted queries: cache-friendly search, and equal bins form runs
        c = np.searchsorted(u, kn, side="left")
        tie = u[np.minimum(c, u.size - 1)] == kn
        c <<= 1
        c += tie
        starts = np.flatnonzero(np.diff(c, prepend=-1))  # one run per bin present in this piece
        counts[c[starts]] += np.diff(starts, append=c.size)  # bins are distinct: no repeated index
    del kn, c, tie, starts
    below = np.cumsum(counts[:-2].reshape(-1, 2).sum(1)) - counts[1:-1:2]  # normal pixels < u[j]
    fp_at = n - below[::-1]  # normal pixels >= u, highest u first
    fp_before = fp_at - counts[-3::-2]  # normal pixels > u
    del below, counts
    g = _Groups(ends, ends + 1, fp_at, fp_before, n)
    return _metrics_from_groups(g, p, n, lo, size_arr, limit, "pixel_")


def _pixel_float64(maps: np.ndarray, masks: np.ndarray, aupro: bool, limit: float) -> dict[str, float]:
    """Pixel metrics for float64 maps that float32 cannot hold exactly (argsort path, more memory)."""
    if np.isnan(maps).any():
        raise ValueError("anomaly maps contain NaN")
    k = masks.reshape(-1, *masks.shape[-2:]) > 0.5
    flat, s = k.ravel(), maps.ravel() + 0.0
    sizes = region = None
    if aupro:
        lab, r = ndimage.label(k, structure=_plane8())
        sizes, region = np.bincount(lab.ravel(), minlength=r + 1)[1:], lab.ravel()[flat]
    sp = s[flat]
    order = np.argsort(sp, kind="stable")[::-1]
    return _metrics_from_split(
        np.sort(s[~flat]), sp[order], None if region is None else region[order], sizes, limit, "pixel_"
    )


def _float32_exact(maps: Any) -> bool:
    """True when float32 holds every value of maps exactly (checked piece by piece)."""
    m = _np(maps)
    if m.dtype in (np.float32, np.float16, np.bool_, np.uint8, np.int8, np.uint16, np.int16):
        return True
    flat = m.reshape(-1)
    step = 1 << 22
    for i in range(0, flat.size, step):
        c = np.asarray(flat[i : i + step])
        if not np.array_equal(c.astype(np.float32).astype(c.dtype), c, equal_nan=True):
            return False
    return True


def pixel_metrics(maps: Any, masks: Any, aupro: bool = True, fpr_limit: float = 0.3) -> dict[str, float]:
    """Exact pixel AUROC, AP, F1-max and AUPRO (MVTec official, to ``fpr_limit``).

    maps (N, H, W) float (any range), masks (N, H, W) {0, 1}; or lists of such pieces (memmaps are read
    piece by piece). float32 maps (and float64 maps that float32 holds exactly) take the counting path
    (``_pixel_counted_metrics``): 8 bytes per anomalous pixel beyond the inputs and a small piece of
    temporaries, nothing per normal pixel; other float64 maps an argsort.
    """
    maps_l = list(maps) if isinstance(maps, list | tuple) else [maps]
    masks_l = list(masks) if isinstance(masks, list | tuple) else [masks]
    if not all(_float32_exact(m) for m in maps_l):
        full = np.concatenate([_np(m).reshape(-1, *_np(m).shape[-2:]) for m in maps_l])
        full_masks = np.concatenate([_np(k).reshape(-1, *_np(k).shape[-2:]) for k in masks_l])
        return _pixel_float64(full.astype(np.float64), full_masks, aupro, fpr_limit)
    return _pixel_counted_metrics(maps_l, masks_l, aupro, fpr_limit)


# --------------------------------------------------------------------------------------------------
# MVTec LOCO sPRO
# --------------------------------------------------------------------------------------------------


def load_defects_config(path: str | os.PathLike) -> dict[int, tuple[str, float, bool]]:
    """``defects_config.json`` -> {pixel_value: (defect_name, saturation_threshold, relative_saturation)}."""
    with open(path) as f:
        entries = json.load(f)
    try:
        return {
            int(e["pixel_value"]): (
                str(e["defect_name"]),
                float(e["saturation_threshold"]),
                bool(e["relative_saturation"]),
            )
            for e in entries
        }
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a MVTec LOCO defects_config.json list ({err})") from err


def saturation_area(defect_area: int, threshold: float, relative: bool) -> int:
    """Official LOCO rule: ``int(threshold * area)`` if relative else ``min(threshold, area)``; at least 1."""
    sat = int(threshold * defect_area) if relative else int(min(threshold, defect_area))
    return max(sat, 1)  # the official code divides by zero here (only for 1-pixel relative defects)


def _spro_weights(keys: np.ndarray, sat: int) -> tuple[np.ndarray, np.ndarray]:
    """One defect's pixel keys (a,) -> (keys, sPRO gains) of the pixels that raise its sPRO.

    sPRO = min(TP, sat) / sat, so only the sat highest-scoring pixels count, 1 / sat each; pixels tied
    at the sat-th score share what is left.
    """
    a = keys.size
    if sat >= a:
        return keys, np.full(a, 1.0 / sat)
    kth = np.partition(keys, a - sat)[a - sat]  # the sat-th largest key
    above, tied = keys > kth, keys == kth
    w = np.zeros(a)
    w[above] = 1.0 / sat
    w[tied] = (sat - int(above.sum())) / (sat * int(tied.sum()))
    sel = above | tied
    return keys[sel], w[sel]


def _auspro_stream(
    n_images: int,
    get_map: Callable[[int], np.ndarray],
    get_defects: Callable[[int], list[tuple[np.ndarray, int]]],
    limits: Sequence[float],
) -> dict[float, float]:
    """Exact AU-sPRO over images 0..n-1, reading one full-resolution image at a time.

    get_map(i) -> (H, W) float map at GT resolution; get_defects(i) -> [(mask (H, W) bool, saturation)],
    empty for a good image. Pass 1 collects the gains of defect pixels (sorted unique keys U). Pass 2 bins
    the normal pixels to find the score above which FPR <= max(limits) needs exact counts; pass 3 counts
    those normal pixels between and at the U keys (searchsorted). Memory: O(defect pixels + one image).
    """
    nan = {lim: math.nan for lim in limits}
    keys_l, gains_l, union = [], [], {}
    n_defects = 0
    for i in range(n_images):
        defects = get_defects(i)
        if not defects:
            continue
        k = _sortable_u32(get_map(i)).ravel()
        is_defect = np.zeros(k.size, dtype=bool)
        for mask, sat in defects:
            idx = np.flatnonzero(mask)
            kk, ww = _spro_weights(k[idx], sat)
            keys_l.append(kk)
            gains_l.append(ww)
            is_defect[idx] = True
            n_defects += 1
        union[i] = np.flatnonzero(is_defect)
    if n_defects == 0:
        warnings.warn("AU-sPRO is undefined (no defects); returning NaN", RuntimeWarning, stacklevel=2)
        return nan
    uniq, inv = np.unique(np.concatenate(keys_l), return_inverse=True)
    gains = np.bincount(inv.ravel(), weights=np.concatenate(gains_l), minlength=uniq.size)
    del keys_l, gains_l, inv

    def normal_keys(i: int) -> np.ndarray:
        k = _sortable_u32(get_map(i)).ravel()
        if i in union:
            ok = np.ones(k.size, dtype=bool)
            ok[union[i]] = False
            k = k[ok]
        return k

    hist = np.zeros(1 << 16, dtype=np.int64)  # normal pixels by the top 16 bits of their key
    for i in range(n_images):
        hist += np.bincount(normal_keys(i) >> np.uint32(16), minlength=1 << 16)
    n_ok = int(hist.sum())
    if n_ok == 0:
        warnings.warn(
            "AU-sPRO is undefined (no defect-free pixels); returning NaN", RuntimeWarning, stacklevel=2
        )
        return nan
    need = min(math.floor(max(limits) * n_ok) + 1, n_ok)  # normal pixels that must be counted exactly
    top = int(np.searchsorted(np.cumsum(hist[::-1]), need))  # bins from the top holding >= need pixels
    cutoff = np.uint32((hist.size - 1 - top) << 16)
    u = uniq.size
    gap = np.zeros(u + 1, dtype=np.int64)  # gap[s]: normals strictly between uniq[s-1] and uniq[s]
    eq = np.zeros(u, dtype=np.int64)  # eq[s]: normals tied with uniq[s]
    for i in range(n_images):
        k = normal_keys(i)
        k = np.sort(k[k >= cutoff])  # sorted needles make searchsorted fast
        s = np.searchsorted(uniq, k)
        tie = uniq[np.minimum(s, u - 1)] == k
        gap += np.bincount(s[~tie], minlength=u + 1)
        eq += np.bincount(s[tie], minlength=u)
    # highest key first; normals below the cutoff are never counted: they lie beyond max(limits)
    e, below = eq[::-1], gap[:u][::-1]
    fp_at = gap[u] + np.cumsum(e + below) - below
    spro = np.cumsum(gains[::-1]) / n_defects
    return _overlap_area(fp_at - e, fp_at, spro, n_ok, float(spro[-1]), limits)


def auspro(
    maps: Sequence[Any],
    defects: Sequence[Sequence[tuple[Any, int]] | None],
    limits: Sequence[float] = (0.05, 0.3),
) -> dict[float, float]:
    """Exact MVTec LOCO AU-sPRO for in-memory maps.

    maps: N maps (H_i, W_i) at GT resolution. defects: per image None (good) or a list of
    (mask (H_i, W_i) bool, saturation_area int), one entry per GT region file. Returns {limit: AU-sPRO}.
    """

    def get_defects(i: int) -> list[tuple[np.ndarray, int]]:
        return [(_np(m) > 0, int(s)) for m, s in (defects[i] or [])]

    return _auspro_stream(len(maps), lambda i: _np(maps[i]).astype(np.float32), get_defects, limits)


def _read_region(path: str, config: dict[int, tuple[str, float, bool]]) -> tuple[np.ndarray, int]:
    """One LOCO region PNG -> (mask (H, W) bool, saturation area); its single non-zero value is the defect type."""
    from PIL import Image

    try:
        arr = np.array(Image.open(path))
    except OSError as err:
        raise ValueError(f"{path}: cannot read the LOCO region mask ({err})") from err
    if arr.ndim != 2:
        raise ValueError(f"{path}: a LOCO region mask must be single-channel, got shape {arr.shape}")
    values = np.unique(arr)
    values = values[values != 0]
    if len(values) != 1:
        raise ValueError(
            f"{path}: a LOCO region mask needs exactly one non-zero pixel value, got {values.tolist()}"
        )
    if int(values[0]) not in config:
        raise ValueError(f"{path}: pixel value {int(values[0])} is not in defects_config.json")
    _, threshold, relative = config[int(values[0])]
    mask = arr != 0
    return mask, saturation_area(int(mask.sum()), threshold, relative)


# --------------------------------------------------------------------------------------------------
# batch API
# --------------------------------------------------------------------------------------------------


def _level_aurocs(scores: np.ndarray, labels: np.ndarray, levels: Sequence[str | None]) -> dict[str, float]:
    """image_auroc_<level>: that level's anomalous images against all normal images."""
    lv = np.array([str(v) if v is not None else "" for v in levels], dtype=object)
    out = {}
    for level in sorted({v for v, y in zip(lv, labels) if y and v not in ("", "good")}):
        sel = (labels == 0) | ((labels == 1) & (lv == level))
        out[f"image_auroc_{level}"] = binary_metrics(scores[sel], labels[sel])["auroc"]
    return out


def evaluate(
    scores: Any,
    labels: Any,
    maps: Any = None,
    masks: Any = None,
    levels: Sequence[str | None] | None = None,
    aupro: bool = True,
) -> dict[str, float]:
    """All metrics of one set of images (e.g. one class).

    scores (N,), labels (N,) {0, 1}, maps (N, H, W) float, masks (N, H, W) {0, 1}; numpy or torch.
    Keys: image_auroc, image_ap, image_f1max; with maps and masks also pixel_auroc, pixel_ap,
    pixel_f1max and pixel_aupro (FPR 0.3); with levels image_auroc_<level>.
    """
    s = _np(scores).astype(np.float64).ravel()
    y = (_np(labels).astype(np.float64).ravel() > 0.5).astype(np.int64)
    out = binary_metrics(s, y, prefix="image_")
    if levels is not None:
        out.update(_level_aurocs(s, y, levels))
    if maps is not None and masks is not None:
        out.update(pixel_metrics(maps, masks, aupro=aupro))
    return out


# --------------------------------------------------------------------------------------------------
# streaming per-class evaluator
# --------------------------------------------------------------------------------------------------


class _Part:
    """Raw data of one class (or one contiguous run of it): lists of per-batch arrays."""

    def __init__(self) -> None:
        self.scores: list[np.ndarray] = []  # (b,) float64
        self.labels: list[np.ndarray] = []  # (b,) int64
        self.maps: list[np.ndarray] = []  # (b, S, S) float32 (or memmaps when loaded from disk)
        self.masks: list[np.ndarray] = []  # (b, S, S) bool
        self.levels: list[str | None] = []
        self.extras: list[dict] = []

    def __len__(self) -> int:
        return len(self.levels)

    def extend(self, other: _Part) -> None:
        for name in ("scores", "labels", "maps", "masks", "levels", "extras"):
            getattr(self, name).extend(getattr(other, name))


def _jsonable(x: Any) -> Any:
    """Make an `extras` value JSON-safe (tensors, arrays, tuples and paths become lists and strings)."""
    if isinstance(x, np.ndarray) or _is_tensor(x):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, str | int | float | bool) or x is None:
        return x
    return str(x)


def _write_npy(path: str, pieces: list[np.ndarray], dtype: Any) -> None:
    """Write pieces (b_i, ...) as one .npy (sum b_i, ...) without concatenating them in memory."""
    shape = (sum(p.shape[0] for p in pieces), *pieces[0].shape[1:])
    with open(path, "wb") as f:
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": shape,
        }
        np.lib.format.write_array_header_2_0(f, header)
        for p in pieces:
            f.write(np.ascontiguousarray(p, dtype=dtype).tobytes())


def _save_part(prefix: str, cls: str, part: _Part) -> None:
    """Spill a part: prefix.{scores,labels,maps,masks}.npy and prefix.json (class, levels, extras)."""
    _write_npy(prefix + ".scores.npy", part.scores, np.float64)
    _write_npy(prefix + ".labels.npy", part.labels, np.int64)
    if part.maps:
        _write_npy(prefix + ".maps.npy", part.maps, np.float32)
        _write_npy(prefix + ".masks.npy", part.masks, np.bool_)
    meta = {"class": cls, "levels": part.levels, "extras": _jsonable(part.extras)}
    with open(prefix + ".json", "w") as f:
        json.dump(meta, f)


def _load_part(prefix: str) -> _Part:
    """Inverse of _save_part; maps and masks are memory-mapped."""
    with open(prefix + ".json") as f:
        meta = json.load(f)
    part = _Part()
    part.scores = [np.load(prefix + ".scores.npy")]
    part.labels = [np.load(prefix + ".labels.npy")]
    if os.path.exists(prefix + ".maps.npy"):
        part.maps = [np.load(prefix + ".maps.npy", mmap_mode="r")]
        part.masks = [np.load(prefix + ".masks.npy", mmap_mode="r")]
    part.levels, part.extras = meta["levels"], meta["extras"]
    return part


def _dedupe(part: _Part) -> _Part:
    """Drop repeated samples (same ``extras["sample_id"]``), e.g. DistributedSampler padding."""
    ids = [e.get("sample_id") if isinstance(e, dict) else None for e in part.extras]
    if all(i is None for i in ids):
        return part
    seen: set = set()
    keep = np.ones(len(ids), dtype=bool)
    for j, i in enumerate(ids):
        key = json.dumps(_jsonable(i))
        if i is not None and key in seen:
            keep[j] = False
        seen.add(key)
    if keep.all():
        return part
    out, off = _Part(), 0
    for j, s in enumerate(part.scores):
        sel = keep[off : off + len(s)]
        out.scores.append(s[sel])
        out.labels.append(part.labels[j][sel])
        if part.maps:
            out.maps.append(np.asarray(part.maps[j][sel]))
            out.masks.append(np.asarray(part.masks[j][sel]))
        off += len(s)
    out.levels = [v for v, k in zip(part.levels, keep) if k]
    out.extras = [v for v, k in zip(part.extras, keep) if k]
    return out


class DatasetEvaluator:
    """Streaming, exact per-class evaluator used at test time (SPEC §4).

    Samples must arrive grouped by class. Only the current class is held in memory (float32 maps and bool
    masks at ``eval_size``); when the class changes, the finished class is spilled to ``spill_dir`` as raw
    .npy files and its metrics are computed. A class that comes back later is recomputed from all of its
    spilled parts, so the result never depends on the order of samples.

    ``compute()`` -> ``{"per_class": {cls: {metric: value}}, "mean": {metric: value}}``; the mean is the
    unweighted mean over the classes that have the metric (NaN propagates).

    DDP: construct with ``distributed=True`` and a ``spill_dir`` every rank can reach, call
    ``dump(rank=rank)`` on every rank after the test loop, barrier, then on rank 0
    ``DatasetEvaluator.compute_from_dumps(spill_dir)``. Samples repeated by sampler padding are dropped
    when ``extras[i]["sample_id"]`` is given.
    """

    def __init__(
        self,
        dataset: str,
        pixel: bool = True,
        aupro: bool = True,
        spro: bool = False,
        eval_size: int | None = 256,
        *,
        fpr_limit: float = 0.3,
        spro_limits: Sequence[float] = (0.05, 0.3),
        spill: bool = True,
        spill_dir: str | None = None,
        rank: int = 0,
        distributed: bool = False,
    ) -> None:
        if distributed and spill_dir is None:
            raise ValueError("distributed=True needs a spill_dir shared by all ranks")
        self.dataset, self.pixel, self.aupro, self.spro = dataset, pixel, aupro, spro
        self.eval_size, self.fpr_limit, self.spro_limits = eval_size, fpr_limit, tuple(spro_limits)
        self.spill, self.rank, self.distributed = spill or distributed, rank, distributed
        self._user_dir = spill_dir
        self._dir: str | None = None
        self._finalizer: weakref.finalize | None = None
        self._configs: dict[str, dict[int, tuple[str, float, bool]]] = {}
        self.reset()

    # ---- configuration ---------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The constructor arguments that define the metrics (written next to the dumps)."""
        return {
            "dataset": self.dataset,
            "pixel": self.pixel,
            "aupro": self.aupro,
            "spro": self.spro,
            "eval_size": self.eval_size,
            "fpr_limit": self.fpr_limit,
            "spro_limits": list(self.spro_limits),
        }

    def reset(self) -> None:
        """Forget all data and results (and delete a private spill directory)."""
        if self._finalizer is not None:
            self._finalizer()
        self._finalizer, self._dir = None, None
        self._current: str | None = None
        self._part = _Part()
        self._order: list[str] = []
        self._results: dict[str, dict[str, float]] = {}
        self._spilled: dict[str, list[str]] = {}
        self._n_parts = 0

    def _spill_dir(self) -> str:
        if self._dir is None:
            if self._user_dir is not None:
                self._dir = self._user_dir
                os.makedirs(self._dir, exist_ok=True)
            else:
                self._dir = tempfile.mkdtemp(prefix="amoe_metrics_")
                self._finalizer = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir

    # ---- streaming ---------------------------------------------------------------------------------

    def update(
        self,
        classes: Sequence[str],
        scores: Any,
        labels: Any,
        maps: Any = None,
        masks: Any = None,
        levels: Sequence[str | None] | None = None,
        extras: Sequence[dict] | None = None,
    ) -> None:
        """Add a batch: classes (B,), scores (B,), labels (B,), maps/masks (B, H, W) or (B, 1, H, W).

        Maps are resized (bilinear) and masks (nearest) to eval_size; masks are binarised at 0.5.
        ``levels[i]``: anomaly level of sample i ("logical", "structural", ...; None for normal images).
        ``extras[i]``: LOCO sPRO needs ``orig_size`` (H, W), and for anomalous images ``region_masks``
        (PNG paths) and ``defects_config`` (json path); ``sample_id`` enables de-duplication.
        """
        b = len(classes)
        s = _np(scores).astype(np.float64).reshape(-1)
        y = (_np(labels).astype(np.float64).reshape(-1) > 0.5).astype(np.int64)
        if s.size != b or y.size != b:
            raise ValueError(f"classes ({b}), scores ({s.size}) and labels ({y.size}) differ in length")
        lv = list(levels) if levels is not None else [None] * b
        ex = [dict(e) if e else {} for e in extras] if extras is not None else [{} for _ in range(b)]
        if len(lv) != b or len(ex) != b:
            raise ValueError(f"classes ({b}), levels ({len(lv)}) and extras ({len(ex)}) differ in length")
        m = k = None
        if self.pixel and maps is not None:
            if masks is None:
                raise ValueError("maps were given without masks")
            m, k = self._prepare(maps, masks)
        start = 0
        for end in [i for i in range(1, b) if classes[i] != classes[i - 1]] + [b]:
            self._open(str(classes[start]))
            p = self._part
            p.scores.append(s[start:end])
            p.labels.append(y[start:end])
            if m is not None:
                p.maps.append(m[start:end])
                p.masks.append(k[start:end])
            p.levels.extend(lv[start:end])
            p.extras.extend(ex[start:end])
            if p.maps and len(p.maps) != len(p.scores):
                raise ValueError(f"class {classes[start]!r}: some batches have maps and some do not")
            start = end

    def _prepare(self, maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
        """maps/masks (B, [1,] H, W) -> float32 (B, S, S), bool (B, S, S) numpy at eval_size."""
        import torch
        import torch.nn.functional as F

        tm = maps if _is_tensor(maps) else torch.from_numpy(np.asarray(maps))
        tk = masks if _is_tensor(masks) else torch.from_numpy(np.asarray(masks))
        tm = tm.detach().to("cpu", torch.float32)
        tk = tk.detach().cpu()
        tm = tm.reshape(tm.shape[0], 1, *tm.shape[-2:])
        tk = tk.reshape(tk.shape[0], 1, *tk.shape[-2:])
        size = self.eval_size
        if size is not None and tuple(tm.shape[-2:]) != (size, size):
            tm = F.interpolate(tm, size=(size, size), mode="bilinear", align_corners=False)
        if size is not None and tuple(tk.shape[-2:]) != (size, size):
            tk = F.interpolate(tk.float(), size=(size, size), mode="nearest")
        if tm.shape != tk.shape:
            raise ValueError(f"maps {tuple(tm.shape)} and masks {tuple(tk.shape)} differ in shape")
        return tm[:, 0].numpy().copy(), (tk[:, 0] > 0.5).numpy()  # own copy: never a view of the caller's

    def _open(self, cls: str) -> None:
        if cls == self._current:
            return
        self._close()
        if cls in self._results or cls in self._spilled:
            if not self.spill:
                raise RuntimeError(
                    f"class {cls!r} came back after other classes; its data was freed. "
                    "Sort the samples by class or construct the evaluator with spill=True."
                )
            if not self.distributed:  # under DDP, sampler padding legitimately wraps around
                warnings.warn(
                    f"class {cls!r} is not contiguous; it will be recomputed from its spilled parts",
                    stacklevel=3,
                )
        else:
            self._order.append(cls)
        self._current = cls

    def _close(self) -> None:
        """Finalize the current class: spill its raw arrays, compute its metrics, free the memory."""
        cls, part = self._current, self._part
        self._current, self._part = None, _Part()
        if cls is None or len(part) == 0:
            return
        first_time = cls not in self._spilled and cls not in self._results
        if self.spill:
            prefix = os.path.join(self._spill_dir(), f"r{self.rank}_p{self._n_parts:05d}")
            self._n_parts += 1
            _save_part(prefix, cls, part)
            self._spilled.setdefault(cls, []).append(prefix)
        if self.distributed:
            return
        if not first_time:  # recompute from every part of the class
            part = _Part()
            for prefix in self._spilled[cls]:
                part.extend(_load_part(prefix))
        self._results[cls] = self._class_metrics(_dedupe(part), cls)

    def compute(self) -> dict[str, dict]:
        """Finalize the open class; -> {"per_class": {cls: {metric: float}}, "mean": {metric: float}}."""
        if self.distributed:
            raise RuntimeError(
                "distributed=True: call dump() on every rank and compute_from_dumps() on rank 0"
            )
        self._close()
        return summarise({c: self._results[c] for c in self._order}, self.class_dataset if self.dataset == "unified" else None)

    # ---- DDP ---------------------------------------------------------------------------------------

    def dump(self, dir: str | None = None, rank: int | None = None) -> str:
        """Spill the open class and write this rank's manifest; -> the manifest path.

        Moves this rank's parts into ``dir`` when it differs from the spill directory. Needs spilling
        (the default); use with ``distributed=True`` so that no rank computes partial metrics.
        """
        if not self.spill:
            raise RuntimeError("dump() needs spill=True")
        rank = self.rank if rank is None else rank
        self._close()
        src = self._spill_dir()
        dst = src if dir is None else dir
        os.makedirs(dst, exist_ok=True)
        parts: dict[str, list[str]] = {}
        for cls in self._order:
            for prefix in self._spilled.get(cls, []):
                name = os.path.basename(prefix)
                if os.path.abspath(dst) != os.path.abspath(src):
                    for f in os.listdir(src):
                        if f.startswith(name + "."):
                            shutil.move(os.path.join(src, f), os.path.join(dst, f))
                parts.setdefault(cls, []).append(name)
        if os.path.abspath(dst) != os.path.abspath(src):
            self._spilled = {c: [os.path.join(dst, n) for n in v] for c, v in parts.items()}
        path = os.path.join(dst, f"manifest_rank{rank}.json")
        with open(path, "w") as f:
            json.dump({"config": self.config(), "order": self._order, "parts": parts}, f)
        return path

    @classmethod
    def compute_from_dumps(cls, dir: str) -> dict[str, dict]:
        """Exact metrics from the dumps of all ranks in ``dir``, one class in memory at a time."""
        manifests = sorted(
            f for f in os.listdir(dir) if f.startswith("manifest_rank") and f.endswith(".json")
        )
        if not manifests:
            raise FileNotFoundError(f"no manifest_rank*.json in {dir}; call dump() on every rank first")
        order: list[str] = []
        parts: dict[str, list[str]] = {}
        config = None
        for name in sorted(manifests, key=lambda n: int(n[len("manifest_rank") : -len(".json")])):
            with open(os.path.join(dir, name)) as f:
                man = json.load(f)
            if config is not None and man["config"] != config:
                raise ValueError(f"{name}: evaluator configuration differs between ranks")
            config = man["config"]
            order += [c for c in man["order"] if c not in order]
            for c, names in man["parts"].items():
                parts.setdefault(c, []).extend(os.path.join(dir, n) for n in names)
        assert config is not None
        ev = cls(**{k: v for k, v in config.items()}, spill=False)
        results = {}
        for c in order:
            part = _Part()
            for prefix in parts.get(c, []):
                part.extend(_load_part(prefix))
            if len(part):
                results[c] = ev._class_metrics(_dedupe(part), c)
        return summarise(results, ev.class_dataset if ev.dataset == "unified" else None)

    # ---- metrics of one class ----------------------------------------------------------------------

    def class_dataset(self, cls: str) -> str:
        """The dataset a class belongs to: the ``<dataset>/`` prefix of a unified (multi-dataset) run."""
        if self.dataset == "unified" and "/" in cls:
            return cls.split("/", 1)[0]
        return self.dataset

    def _class_metrics(self, part: _Part, cls: str) -> dict[str, float]:
        scores, labels = np.concatenate(part.scores), np.concatenate(part.labels)
        dataset = self.class_dataset(cls).lower()
        out = binary_metrics(scores, labels, prefix="image_")
        out.update(_level_aurocs(scores, labels, part.levels))
        if dataset == "ped2":
            out["frame_auroc"] = out["image_auroc"]
        if self.pixel and part.maps:
            neg, pos, sizes = _split_pixels(part.maps, part.masks, regions=self.aupro)
            out.update(_pixel_split_metrics(neg, pos, sizes if self.aupro else None, self.fpr_limit))
            del neg, pos
        if self.spro and (self.dataset != "unified" or dataset == "mvtec_loco"):  # unified: the LOCO classes
            out.update(self._spro_metrics(part, labels))
        return out

    def _spro_metrics(self, part: _Part, labels: np.ndarray) -> dict[str, float]:
        """AU-sPRO at full GT resolution: per level (good images + that level) and their mean."""
        if not part.maps:
            raise ValueError("spro=True needs anomaly maps")
        lows = [m for piece in part.maps for m in piece]  # per-image (S, S) views, no copies
        levels = [str(v) if v not in (None, "", "good") else None for v in part.levels]
        groups = sorted({v for v, y in zip(levels, labels) if y and v is not None})
        sets = {g: [i for i, y in enumerate(labels) if not y or levels[i] == g] for g in groups}
        if not groups or any(y and v is None for v, y in zip(levels, labels)):
            sets = {"": list(range(len(labels)))}

        def size_of(i: int) -> tuple[int, int]:
            size = part.extras[i].get("orig_size")
            if size is None:
                regions = part.extras[i].get("region_masks") or []
                if not regions:
                    raise ValueError(f"sample {i}: sPRO needs extras['orig_size'] (H, W)")
                from PIL import Image

                w, h = Image.open(regions[0]).size
                return h, w
            return int(size[0]), int(size[1])

        def defects_of(i: int) -> list[tuple[np.ndarray, int]]:
            if not labels[i]:
                return []
            e = part.extras[i]
            if not e.get("region_masks") or not e.get("defects_config"):
                raise ValueError(
                    f"sample {i} is anomalous but has no extras['region_masks'] / ['defects_config']"
                )
            path = str(e["defects_config"])
            if path not in self._configs:
                self._configs[path] = load_defects_config(path)
            return [_read_region(str(p), self._configs[path]) for p in e["region_masks"]]

        def full_map(i: int) -> np.ndarray:
            h, w = size_of(i)
            low = np.ascontiguousarray(lows[i], dtype=np.float32)
            return low if low.shape == (h, w) else _resize_bilinear(low, h, w)

        out: dict[str, float] = {}
        per_set = {}
        for name, idx in sets.items():
            res = _auspro_stream(
                len(idx),
                lambda j, idx=idx: full_map(idx[j]),
                lambda j, idx=idx: defects_of(idx[j]),
                self.spro_limits,
            )
            per_set[name] = res
            for lim, v in res.items():
                out[f"pixel_auspro_{lim:g}" + (f"_{name}" if name else "")] = v
        if "" not in per_set:  # official "mean": the mean over anomaly levels
            for lim in self.spro_limits:
                out[f"pixel_auspro_{lim:g}"] = float(np.mean([r[lim] for r in per_set.values()]))
        return out


def _resize_bilinear(low: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize (h', w') -> (h, w), half-pixel centres (= torch bilinear, align_corners=False)."""
    import cv2

    return cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)


def _class_mean(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over the classes that have each metric."""
    keys: list[str] = []
    for r in results.values():
        keys += [k for k in r if k not in keys]
    return {k: float(np.mean([r[k] for r in results.values() if k in r])) for k in keys}


def summarise(results: dict[str, dict[str, float]], dataset_of: Callable[[str], str] | None = None) -> dict[str, dict]:
    """Per-class results -> {"per_class": ..., "mean": unweighted mean over the classes having a key}; with
    ``dataset_of`` (a unified run) also "per_dataset": {dataset: the mean over that dataset's classes} — the
    paper's Table 1 protocol (one model, each dataset its own class mean)."""
    out = {"per_class": results, "mean": _class_mean(results)}
    if dataset_of is not None:
        groups: dict[str, dict[str, dict[str, float]]] = {}
        for cls, r in results.items():
            groups.setdefault(dataset_of(cls), {})[cls] = r
        out["per_dataset"] = {d: _class_mean(g) for d, g in groups.items()}
    return out


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def main_evaluate_maps(argv: list[str] | None = None) -> int:
    """``amoe evaluate-maps --scores S.npy --labels L.npy [--maps M.npy --masks K.npy]``: one JSON line."""
    parser = argparse.ArgumentParser(
        prog="amoe evaluate-maps", description="Exact AUROC/AP/F1-max/AUPRO of saved arrays."
    )
    parser.add_argument("--scores", required=True, help="(N,) image scores .npy")
    parser.add_argument("--labels", required=True, help="(N,) image labels {0,1} .npy")
    parser.add_argument("--maps", help="(N, H, W) anomaly maps .npy (memory-mapped)")
    parser.add_argument("--masks", help="(N, H, W) ground-truth masks {0,1} .npy (memory-mapped)")
    parser.add_argument("--no-aupro", action="store_true", help="skip AUPRO")
    args = parser.parse_args(argv)
    if (args.maps is None) != (args.masks is None):
        parser.error("--maps and --masks go together")
    maps = np.load(args.maps, mmap_mode="r") if args.maps else None
    masks = np.load(args.masks, mmap_mode="r") if args.masks else None
    out = evaluate(np.load(args.scores), np.load(args.labels), maps, masks, aupro=not args.no_aupro)
    print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}))
    return 0
