"""TEMPORARY stand-in for fedseg.difficulty.polypgen_difficulty until the real estimator lands (same signature;
small = H*W / area of the smallest connected component >= tau). Used only when the real function is missing."""

import math

import numpy as np
from scipy import ndimage

from fedseg import difficulty as dif


def polypgen_difficulty(mask, base=100.0, tau=150.0):
    m = np.asarray(mask) != 0
    h, w = m.shape
    n = int(m.sum())
    if n == 0:
        return dif.MaskDifficulty(h, w, 0, math.inf, False, 0.0)
    lab, _ = ndimage.label(m)
    small = h * w / np.bincount(lab.ravel())[1:].min() >= tau
    a_inv = h * w / n
    delta = float(dif.delta_from_inverse_area(a_inv, base)) if small else 0.0
    return dif.MaskDifficulty(h, w, n, a_inv, bool(small), delta)


def install(monkeypatch):
    if not hasattr(dif, "polypgen_difficulty"):
        monkeypatch.setattr(dif, "polypgen_difficulty", polypgen_difficulty, raising=False)
