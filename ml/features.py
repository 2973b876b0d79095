"""Per-pixel features of the classical models: one function, used by training and prediction.

Features start from :meth:`core.bundle.Normalization.apply` (raw pixels -> normalized
(rows, cols, bands)), so they are the same at training and at prediction time by
construction. For each pixel, in this order:

1. the normalized bands;
2. with ``indices``: the normalized difference (a - b) / (|a| + |b|) of every pair of bands
   (NDVI-like; with percentile normalization a and b are in [0, 1]);
3. for each texture window w: the mean and the standard deviation of each band in the w x w
   window around the pixel (corrugated metal has a texture). Windows reach ``context`` =
   max(w) // 2 pixels beyond a pixel: at the edge of an array the values are mirrored, so a
   caller that has the neighbouring pixels (predict's sliding window) passes them as a halo.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
from scipy.ndimage import uniform_filter

from core.bundle import Normalization
from core.errors import DataError

#: Added to the denominator of normalized differences: 0 / 0 gives 0, not NaN.
_EPS = np.float32(1e-6)


@dataclass(frozen=True)
class FeatureSpec:
    """Which features, for how many bands; stored in bundle.json as ``features``."""

    bands: int
    indices: bool = True
    texture_windows: tuple[int, ...] = (5, 11)

    @property
    def context(self) -> int:
        """Pixels of neighbourhood a feature reads beyond its pixel (max window // 2)."""
        return max(self.texture_windows, default=1) // 2

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(combinations(range(self.bands), 2)) if self.indices else []

    def names(self) -> list[str]:
        """A readable name per feature column, in order (band numbers 1-based)."""
        names = [f"band {b + 1}" for b in range(self.bands)]
        names += [f"nd(b{i + 1}, b{j + 1})" for i, j in self.pairs]
        for w in self.texture_windows:
            names += [f"mean{w}x{w} b{b + 1}" for b in range(self.bands)]
            names += [f"std{w}x{w} b{b + 1}" for b in range(self.bands)]
        return names

    @property
    def count(self) -> int:
        return self.bands + len(self.pairs) + 2 * self.bands * len(self.texture_windows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bands": self.bands,
            "indices": self.indices,
            "texture_windows": list(self.texture_windows),
            "context": self.context,
            "names": self.names(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        return cls(
            bands=int(data["bands"]), indices=bool(data["indices"]), texture_windows=tuple(data["texture_windows"])
        )


def pixel_features(x: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Normalized (rows, cols, bands) -> float32 (rows, cols, spec.count) features."""
    if x.ndim != 3 or x.shape[2] != spec.bands:
        raise DataError(f"features expect (rows, cols, {spec.bands}) normalized pixels, got shape {x.shape}")
    x = x.astype(np.float32, copy=False)
    out = np.empty((*x.shape[:2], spec.count), np.float32)
    out[..., : spec.bands] = x
    k = spec.bands
    for i, j in spec.pairs:
        a, b = x[..., i], x[..., j]
        out[..., k] = (a - b) / (np.abs(a) + np.abs(b) + _EPS)
        k += 1
    for w in spec.texture_windows:
        # Filter along rows and cols only, each band on its own; reflect at the array's edge.
        mean = uniform_filter(x, size=(w, w, 1), mode="reflect")
        square = uniform_filter(x * x, size=(w, w, 1), mode="reflect")
        out[..., k : k + spec.bands] = mean
        out[..., k + spec.bands : k + 2 * spec.bands] = np.sqrt(np.maximum(square - mean * mean, 0.0))
        k += 2 * spec.bands
    return out


def chip_features(chw: np.ndarray, normalization: Normalization, spec: FeatureSpec) -> np.ndarray:
    """Raw (bands, rows, cols) pixels -> (rows, cols, features): normalize, then :func:`pixel_features`."""
    return pixel_features(normalization.apply(chw), spec)
