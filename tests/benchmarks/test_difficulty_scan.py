"""Difficulty scan throughput (on demand: ``python -m pytest tests/benchmarks/test_difficulty_scan.py -m benchmark -s``).

A manifest builder runs the difficulty once per image (thousands of PolypGen frames), so this measures masks per
second on ONE core: the measurement runs in a child process pinned to one CPU (``os.sched_setaffinity``) with
the BLAS/OpenMP thread counts at 1. It times

* PolypGen mode (:func:`fedseg.difficulty.polypgen_difficulty`) on seeded 512 x 512 PolypGen-like masks: one
  lobulated polyp covering 1-30 % of the frame (most frames), a large polyp plus a separate small one, a small
  polyp attached to a large one, one or two small polyps alone, empty frames (small polyps cover 1/900-1/320 of
  the frame, the large ones 1-30 %, so tau = 150 lies well between them);
* LiTS mode (:func:`fedseg.difficulty.lits_difficulty`) on the same masks, for comparison;
* PolypGen mode on the same geometry at PolypGen's native 1080 x 1920.

It prints masks/s and per-kind median milliseconds, and checks that every small flag matches the kind the mask
was drawn as (the only assertion; nothing here asserts a timing). Run the child directly with
``python tests/benchmarks/test_difficulty_scan.py [N]``.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.benchmark

KINDS = ("large", "large+small", "attached", "small", "empty")
KIND_P = (0.70, 0.10, 0.08, 0.07, 0.05)
SMALL_KINDS = {"large+small", "attached", "small"}


def _polyp(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, area: float, rng: np.random.Generator,
           lobed: bool) -> np.ndarray:
    """Star-shaped polyp of about ``area`` pixels: an ellipse with a wavy (lobulated) boundary."""
    e = rng.uniform(0.65, 1.0)
    a = math.sqrt(area / (math.pi * e))
    angle = rng.uniform(0, math.pi)
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * (xx - cx) + s * (yy - cy), -s * (xx - cx) + c * (yy - cy)
    t = np.arctan2(v, u)
    wave = 1.0
    if lobed:
        for k in (2, 3, 5, 8):
            wave = wave + rng.uniform(0, 0.08 / math.sqrt(k)) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
    return np.hypot(u / a, v / (e * a)) <= wave


def make_masks(n: int, shape: tuple[int, int] = (512, 512), seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """``n`` seeded PolypGen-like masks ``(kind, bool mask)``; the same seed draws the same geometry at any shape."""
    h, w = shape
    hw = h * w
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        kind = KINDS[int(rng.choice(len(KINDS), p=KIND_P))]
        m = np.zeros(shape, dtype=bool)
        large_area = hw * math.exp(rng.uniform(math.log(0.01), math.log(0.30)))
        small_area = hw * math.exp(rng.uniform(math.log(1 / 900), math.log(1 / 320)))
        if kind in ("large", "large+small", "attached"):
            cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
            m |= _polyp(yy, xx, cy, cx, large_area, rng, lobed=True)
            if kind == "attached":  # small polyp centred 0.75 r outside the large one: neck ~1.3 r wide
                r = math.sqrt(small_area / math.pi)
                theta = rng.uniform(0, 2 * math.pi)
                ys, xs = np.nonzero(m)
                reach = np.max((xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta))
                d = reach + 0.75 * r
                m |= np.hypot(yy - (cy + d * math.sin(theta)), xx - (cx + d * math.cos(theta))) <= r
            elif kind == "large+small":  # a separate small polyp in a corner region away from the large one
                qy, qx = rng.choice([0.12, 0.88]), rng.choice([0.12, 0.88])
                m |= _polyp(yy, xx, qy * h, qx * w, small_area, rng, lobed=False)
        elif kind == "small":
            for _ in range(1 + int(rng.random() < 0.3)):
                cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
                m |= _polyp(yy, xx, cy, cx, small_area, rng, lobed=False)
        out.append((kind, m))
    return out


def _time(fn, masks: list[tuple[str, np.ndarray]]) -> tuple[float, dict[str, list[float]], list]:
    fn(masks[0][1])  # warm-up (imports)
    per_kind: dict[str, list[float]] = {k: [] for k in KINDS}
    results = []
    t_all = time.perf_counter()
    for kind, m in masks:
        t0 = time.perf_counter()
        results.append(fn(m))
        per_kind[kind].append(time.perf_counter() - t0)
    return time.perf_counter() - t_all, per_kind, results


def run_child(n: int) -> int:
    """The measurement (one core). Returns the number of masks whose small flag contradicts their kind."""
    from fedseg.difficulty import lits_difficulty, polypgen_difficulty

    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    print(f"difficulty scan on CPU {cpu} only (threads: OMP/MKL/OPENBLAS = {os.environ.get('OMP_NUM_THREADS')})")
    wrong = 0
    for label, shape, count, fns in (("512 x 512", (512, 512), n, ("polypgen", "lits")),
                                     ("1080 x 1920", (1080, 1920), max(20, n // 5), ("polypgen",))):
        masks = make_masks(count, shape)
        mix = {k: sum(1 for kk, _ in masks if kk == k) for k in KINDS}
        print(f"\n{label}: {count} PolypGen-like masks {mix}")
        for mode in fns:
            fn = polypgen_difficulty if mode == "polypgen" else lits_difficulty
            total, per_kind, results = _time(fn, masks)
            med = "  ".join(f"{k} {1000 * statistics.median(v):.2f}" for k, v in per_kind.items() if v)
            print(f"  {mode:8s} {count / total:8.1f} masks/s  ({1000 * total / count:.2f} ms/mask; "
                  f"median ms by kind: {med})")
            if mode == "polypgen":
                bad = [(kind, r.small) for (kind, _), r in zip(masks, results) if r.small != (kind in SMALL_KINDS)]
                wrong += len(bad)
                print(f"  polypgen small flags matching the drawn kind: {count - len(bad)}/{count} {bad[:5]}")
    return wrong


def test_difficulty_scan_throughput():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "300"], env=env, capture_output=True,
                         text=True, timeout=1800, check=False)
    print(res.stdout, res.stderr[-2000:])
    assert res.returncode == 0, "some small flags contradict the kind their mask was drawn as (see output)"


if __name__ == "__main__":
    sys.exit(1 if run_child(int(sys.argv[1]) if len(sys.argv) > 1 else 300) else 0)
