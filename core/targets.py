"""Training targets from roof polygons: the footprint, boundary and contact bands of a mask.

A mask on disk is uint8 with one band per target (mask_args.targets, footprint first):

- footprint: 0 background, 255 roof, 128 unknown (a polygon mask_args.ignore selects: its
  pixels count nowhere — not in the loss, the threshold search or any score);
- boundary: 255 on roof pixels within ``boundary_width`` pixels of the roof's edge (where two
  roofs touch, both sides of the line between them), 0 elsewhere;
- contact: 255 on background pixels lying in a gap narrower than ``contact_width`` pixels
  between two roofs (the streets and alleys that merge neighbours into one blob), 0 elsewhere;
- class (with a class map, mask_args.classes; always last): each roof's class id (1, 2 ... in
  the order the map names them; the names in the mask's ``ROOF_CLASSES`` tag), 0 background,
  128 unknown.

These are the targets the SpaceNet 4, 6 and 7 winners trained on (../shared/notes); a
watershed seeded with footprint x (1 - boundary) x (1 - contact) keeps touching roofs apart
(core/instances.py). A roof cut by the chip's edge has no boundary along that edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from rasterio.features import rasterize
from scipy import ndimage
from shapely.geometry.base import BaseGeometry

from core.errors import SettingsError
from core.raster import CLASS_BAND, UNKNOWN

#: Roof pixels on disk (DESIGN contract 2); unknown ones are core.raster.UNKNOWN.
ROOF = 255
#: Ground widths of the default bands: 3 and 10 px at 0.3 m, as solaris' defaults; 2 and 6 px at 0.5 m.
BOUNDARY_M, CONTACT_M = 0.9, 3.0
#: The widest band, as a share of the chip side: wider ones cover whole roofs and chips.
MAX_SHARE = 0.25
#: Metres per degree of latitude (and of longitude at the equator).
_M_PER_DEG = 111_320.0


def pixel_size_m(transform: Any, crs: Any, centre_y: float) -> float:
    """Ground size of a pixel in metres (the mean of its sides); degrees are converted at ``centre_y``."""
    side = (abs(transform.a) + abs(transform.e)) / 2
    if crs is not None and crs.is_geographic:
        return (abs(transform.a) * math.cos(math.radians(centre_y)) + abs(transform.e)) / 2 * _M_PER_DEG
    if crs is not None and crs.is_projected:
        factor = crs.linear_units_factor[1] if crs.linear_units_factor else 1.0
        return side * factor
    return side


def band_widths(boundary: int | None, contact: int | None, pixel_m: float, chip: int) -> tuple[int, int]:
    """Boundary and contact widths in pixels: the settings, else the ground widths at this pixel size.

    A width set wider than a quarter of the chip is an error naming the setting; derived ones are capped there.
    """
    limit = max(1, int(chip * MAX_SHARE))
    for name, given in (("boundary_width", boundary), ("contact_width", contact)):
        if given is not None and given > limit:
            raise SettingsError(
                f"mask_args.{name} {given} px does not fit chips of {chip} px: a band that wide covers whole roofs; "
                f"use at most {limit} px (a quarter of the chip), or larger chips (chip_args.size)"
            )
    # Derived widths are capped to the chip (tiny chips of coarse imagery).
    return (
        boundary if boundary is not None else min(limit, max(1, round(BOUNDARY_M / pixel_m))),
        contact if contact is not None else min(limit, max(2, round(CONTACT_M / pixel_m))),
    )


def roof_labels(roofs: Sequence[BaseGeometry], shape: tuple[int, int], transform: Any, all_touched: bool) -> np.ndarray:
    """Each roof's number (1..n, in the order given; a later roof wins where two overlap), 0 elsewhere."""
    if not len(roofs):
        return np.zeros(shape, np.int32)
    return rasterize(
        [(g, i) for i, g in enumerate(roofs, start=1)],
        out_shape=shape,
        transform=transform,
        fill=0,
        all_touched=all_touched,
        dtype="int32",
    )


def boundary_band(labels: np.ndarray, width: int) -> np.ndarray:
    """Roof pixels with a pixel of another label (a neighbour or background) within ``width`` pixels
    (chessboard distance); the chip's edge is not an edge of the roof."""
    size = 2 * width + 1
    high = ndimage.maximum_filter(labels, size=size, mode="nearest")
    low = ndimage.minimum_filter(labels, size=size, mode="nearest")
    return (labels > 0) & ((high != labels) | (low != labels))


def contact_band(labels: np.ndarray, width: int) -> np.ndarray:
    """Background pixels with two different roofs within half of ``width`` pixels: the gaps narrower
    than ``width`` between roofs."""
    size = 2 * ((width + 1) // 2) + 1
    big = np.iinfo(np.int32).max
    high = ndimage.maximum_filter(labels, size=size, mode="nearest")
    low = ndimage.minimum_filter(np.where(labels > 0, labels, big), size=size, mode="nearest")
    return (labels == 0) & (low < big) & (high != low)


def make_targets(
    roofs: Sequence[BaseGeometry],
    unknown: Sequence[BaseGeometry],
    shape: tuple[int, int],
    transform: Any,
    *,
    targets: Sequence[str] = ("footprint",),
    widths: tuple[int, int] = (1, 2),
    all_touched: bool = False,
    valid: np.ndarray | None = None,
    classes: Sequence[int] | None = None,
) -> np.ndarray:
    """The mask bands (len(targets), rows, cols) uint8 of one chip, and a class band last when ``classes``
    gives each roof's class id; 0 everywhere outside ``valid``."""
    labels = roof_labels(roofs, shape, transform, all_touched)
    roof = labels > 0
    footprint = np.where(roof, ROOF, 0).astype(np.uint8)
    if len(unknown):
        ignored = rasterize([(g, 1) for g in unknown], out_shape=shape, transform=transform, fill=0,
                            all_touched=all_touched, dtype="uint8").astype(bool) & ~roof  # fmt: skip
        footprint[ignored] = UNKNOWN
    bands = {"footprint": footprint}
    if "boundary" in targets:
        bands["boundary"] = np.where(boundary_band(labels, widths[0]), ROOF, 0).astype(np.uint8)
    if "contact" in targets:
        contact = contact_band(labels, widths[1]) & (footprint != UNKNOWN)
        bands["contact"] = np.where(contact, ROOF, 0).astype(np.uint8)
    if classes is not None:
        ids = np.zeros(len(roofs) + 1, np.uint8)
        ids[1:] = classes
        band = ids[labels]
        band[footprint == UNKNOWN] = UNKNOWN
        bands[CLASS_BAND] = band
        targets = (*targets, CLASS_BAND)
    out = np.stack([bands[t] for t in targets])
    if valid is not None:
        out[:, ~valid] = 0
    return out
