"""Roof polygons scored as SpaceNet scores buildings, and SpaceNet's CSV layout.

A predicted polygon matches at most one true polygon, and the other way round, at IoU >=
``iou_threshold`` (0.5), greedily by IoU, highest first; polygons under a ground area are
ignored on both sides. Precision, recall and F1 follow from the counts. SpaceNet's CSV files
(``ImageId,BuildingId,PolygonWKT_Pix,Confidence``: one row per building in the pixel
coordinates of its image, ``POLYGON EMPTY`` for an image without buildings) are read and
written so that results compare with published ones.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from affine import Affine
from shapely import STRtree
from shapely.geometry.base import BaseGeometry

from core.errors import DataError
from core.metrics import MatchCounts

#: SpaceNet's columns.
SPACENET_COLUMNS = ("ImageId", "BuildingId", "PolygonWKT_Pix", "Confidence")


def overlaps(truth: list[BaseGeometry], predicted: list[BaseGeometry]) -> tuple[np.ndarray, ...]:
    """Every intersecting pair of a true and a predicted polygon (an STRtree query): arrays of the true index,
    the predicted index and the area of their intersection (0 where they only touch)."""
    if not truth or not predicted:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    p_idx, t_idx = STRtree(truth).query(predicted, predicate="intersects")
    if not len(p_idx):
        return t_idx, p_idx, np.zeros(0)
    inter = shapely.area(shapely.intersection(np.asarray(truth, object)[t_idx], np.asarray(predicted, object)[p_idx]))
    return t_idx, p_idx, inter


def group_counts(
    truth: Sequence[BaseGeometry], groups: Sequence[Any], predicted: Sequence[BaseGeometry], iou_threshold: float = 0.5
) -> dict[Any, MatchCounts]:
    """SpaceNet counts of each group of true polygons (``groups``: one value per true polygon).

    A predicted polygon belongs to the group of the true polygon it overlaps most (by area);
    one that overlaps none belongs to no group. Each group is then matched on its own.
    """
    truth, predicted = list(truth), list(predicted)
    owner = np.full(len(predicted), -1)
    t_idx, p_idx, inter = overlaps(truth, predicted)
    for k in np.argsort(inter, kind="stable"):  # the largest overlap is written last
        if inter[k] > 0:
            owner[p_idx[k]] = t_idx[k]
    values = np.asarray(list(groups), object)
    out: dict[Any, MatchCounts] = {}
    for value in sorted(set(values.tolist()), key=str):
        ts = [g for g, v in zip(truth, values, strict=True) if v == value]
        ps = [g for g, o in zip(predicted, owner, strict=True) if o >= 0 and values[o] == value]
        out[value] = match_polygons(ts, ps, iou_threshold)[0]
    return out


def match_polygons(
    truth: Sequence[BaseGeometry], predicted: Sequence[BaseGeometry], iou_threshold: float = 0.5
) -> tuple[MatchCounts, list[tuple[int, int, float]]]:
    """SpaceNet one-to-one matching: pairs (truth index, predicted index, IoU) taken greedily by IoU.

    Returns the counts and the matched pairs.
    """
    truth, predicted = list(truth), list(predicted)
    pairs: list[tuple[float, int, int]] = []
    t_idx, p_idx, inter = overlaps(truth, predicted)
    if len(inter):
        union = (
            shapely.area(np.asarray(truth, object)[t_idx]) + shapely.area(np.asarray(predicted, object)[p_idx]) - inter
        )
        iou = np.where(union > 0, inter / np.maximum(union, 1e-300), 0.0)
        pairs = [(float(v), int(t), int(p)) for v, t, p in zip(iou, t_idx, p_idx, strict=True) if v > 0]
    used_t: set[int] = set()
    used_p: set[int] = set()
    matched = []
    for iou, t, p in sorted(pairs, key=lambda x: (-x[0], x[1], x[2])):
        if iou < iou_threshold:
            break
        if t in used_t or p in used_p:
            continue
        used_t.add(t)
        used_p.add(p)
        matched.append((t, p, iou))
    counts = MatchCounts(tp=len(matched), fp=len(predicted) - len(matched), fn=len(truth) - len(matched))
    return counts, matched


@dataclass
class PolygonErrors:
    """Why the unmatched polygons of a polygon score are unmatched (:func:`polygon_errors`).

    "Holds" means holds at least half of a true roof's area. False objects (predicted, unmatched):
    ``merges`` hold two true roofs or more, ``misfits`` hold one but do not match it (too large, offset,
    or a duplicate that lost the match), ``pieces`` lie at least half on true roofs but hold none (part
    of a roof, or astride two), ``off_roofs`` lie mostly off the true roofs. Missed roofs (true,
    unmatched): ``merged`` lie in an object that holds another true roof too, ``misfit`` in one object
    holding no other (its IoU under the threshold), ``split`` are covered at least half by several
    objects together but by none alone, ``not_found`` covered less than half.
    """

    merges: int = 0
    misfits: int = 0
    pieces: int = 0
    off_roofs: int = 0
    merged: int = 0
    misfit: int = 0
    split: int = 0
    not_found: int = 0

    def merge(self, other: PolygonErrors) -> PolygonErrors:
        """Add another's counts (a chip's to a split's); returns self."""
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)
        return self

    def scores(self) -> dict[str, dict[str, int]]:
        """The counts as metrics.json keeps them: {"false": {...}, "missed": {...}}."""
        d = asdict(self)
        return {"false": {k: d[k] for k in ("merges", "misfits", "pieces", "off_roofs")},
                "missed": {k: d[k] for k in ("merged", "misfit", "split", "not_found")}}  # fmt: skip

    def line(self) -> str:
        """One line for a log or a benchmark table."""
        return (f"false objects: {self.merges} merges, {self.misfits} misfits, {self.pieces} pieces, "
                f"{self.off_roofs} off roofs; missed roofs: {self.merged} merged, {self.misfit} misfit, "
                f"{self.split} split, {self.not_found} not found")  # fmt: skip


def polygon_errors(
    truth: Sequence[BaseGeometry], predicted: Sequence[BaseGeometry], matched: Sequence[tuple[int, int, float]]
) -> PolygonErrors:
    """What went wrong with the polygons :func:`match_polygons` left unmatched (``matched``: its pairs).

    Each unmatched polygon gets exactly one kind (see :class:`PolygonErrors`). Tells roofs found together
    as one object (a seeding or boundary problem) from roofs found in pieces or not at all (a footprint
    problem).
    """
    truth, predicted = list(truth), list(predicted)
    out = PolygonErrors()
    t_area = shapely.area(np.asarray(truth, object)) if truth else np.zeros(0)
    p_area = shapely.area(np.asarray(predicted, object)) if predicted else np.zeros(0)
    inter = np.zeros((len(truth), len(predicted)))
    t_idx, p_idx, pair_inter = overlaps(truth, predicted)
    inter[t_idx, p_idx] = pair_inter
    # How much of each lies on the other side's polygons, each area once (true roofs may overlap).
    on_truth = (
        shapely.area(shapely.intersection(np.asarray(predicted, object), shapely.union_all(truth)))
        if truth and predicted
        else np.zeros(len(predicted))
    )
    on_pred = (
        shapely.area(shapely.intersection(np.asarray(truth, object), shapely.union_all(predicted)))
        if truth and predicted
        else np.zeros(len(truth))
    )
    covers = inter >= 0.5 * t_area[:, None]
    covers &= inter > 0
    n_covered = covers.sum(axis=0)
    used_t = {t for t, _, _ in matched}
    used_p = {p for _, p, _ in matched}
    for p in range(len(predicted)):
        if p in used_p:
            continue
        if n_covered[p] >= 2:
            out.merges += 1
        elif n_covered[p] == 1:
            out.misfits += 1
        elif 2 * on_truth[p] >= p_area[p] > 0:
            out.pieces += 1
        else:
            out.off_roofs += 1
    for t in range(len(truth)):
        if t in used_t:
            continue
        holders = np.flatnonzero(covers[t])
        if len(holders):
            if n_covered[holders].max() >= 2:
                out.merged += 1
            else:
                out.misfit += 1
        elif 2 * on_pred[t] >= t_area[t] > 0:
            out.split += 1
        else:
            out.not_found += 1
    return out


def keep_at_least(geoms: Iterable[BaseGeometry], min_area: float) -> list:
    """The polygons whose area is at least ``min_area`` (pixel polygons of a SpaceNet CSV); empty ones dropped."""
    return [g for g in geoms if not g.is_empty and g.area >= min_area]


# --- SpaceNet CSV ---------------------------------------------------------------------------------


def to_pixels(geom: BaseGeometry, transform: Affine) -> BaseGeometry:
    """A polygon in map coordinates in the pixel coordinates (column, row) of a raster."""
    inverse = ~transform
    return shapely.transform(geom, lambda xy: np.column_stack(inverse * (xy[:, 0], xy[:, 1])))


def write_spacenet_csv(path: Path, images: dict[str, list[tuple[BaseGeometry, float]]]) -> Path:
    """Write SpaceNet's CSV: one row per polygon (pixel coordinates) with its confidence; an image
    without polygons gets one ``POLYGON EMPTY`` row, as in SpaceNet's truth files."""
    from core.files import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(SPACENET_COLUMNS)
        for image, polygons in images.items():
            if not polygons:
                writer.writerow([image, -1, "POLYGON EMPTY", 1])
            for k, (geom, confidence) in enumerate(polygons):
                writer.writerow([image, k, shapely.to_wkt(geom, rounding_precision=2), f"{confidence:.4f}"])
    return path


def read_spacenet_csv(path: Path) -> dict[str, list[BaseGeometry]]:
    """Polygons by image from a SpaceNet CSV (``PolygonWKT_Pix``; empty images have none)."""
    images: dict[str, list[BaseGeometry]] = {}
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in ("ImageId", "PolygonWKT_Pix") if c not in header]
            if missing:
                raise DataError(
                    f"{path} is not a SpaceNet CSV: it lacks the column(s) {missing} (ImageId,BuildingId,PolygonWKT_Pix)"
                )
            for line, row in enumerate(reader, start=2):
                # (DictReader fills a short row with None and puts a long row's extra fields under the key None)
                fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or ())
                if fields != len(header):
                    quote = ": quote the PolygonWKT_Pix, which holds commas" if fields > len(header) else ""
                    raise DataError(f"{path}, line {line}: {fields} fields, the header names {len(header)}{quote}")
                polygons = images.setdefault(row["ImageId"], [])
                try:
                    geom = shapely.from_wkt(row["PolygonWKT_Pix"])
                except shapely.errors.GEOSException as exc:
                    raise DataError(f"{path}, line {line}: PolygonWKT_Pix is not WKT ({exc})") from exc
                if not geom.is_empty and geom.geom_type not in ("Polygon", "MultiPolygon"):
                    raise DataError(
                        f"{path}, line {line}: PolygonWKT_Pix is a {geom.geom_type}, not a polygon (an image without "
                        "buildings has POLYGON EMPTY)"
                    )
                if not geom.is_empty:
                    polygons.append(shapely.make_valid(geom) if not geom.is_valid else geom)
    except OSError as exc:
        raise DataError(f"SpaceNet CSV {path} cannot be read ({exc.strerror or exc})") from exc
    return images


def unshared_images(truth: dict[str, list[BaseGeometry]], predicted: dict[str, list[BaseGeometry]]) -> str:
    """A warning when two SpaceNet CSVs with polygons share no ImageId (names with and without .tif, say): every
    polygon would be unmatched, an F1 of 0 that says nothing of the polygons. '' when they share one."""
    if not any(truth.values()) or not any(predicted.values()) or set(truth) & set(predicted):
        return ""
    t, p = sorted(truth), sorted(predicted)
    return (
        f"the two CSVs share no ImageId (truth {', '.join(t[:2])} ..., predictions {', '.join(p[:2])} ...): every "
        "polygon is unmatched; name the images alike in both"
    )


def score_spacenet(
    truth: dict[str, list[BaseGeometry]],
    predicted: dict[str, list[BaseGeometry]],
    iou_threshold: float = 0.5,
    min_area: float = 0.0,
) -> MatchCounts:
    """SpaceNet scores of two CSVs' polygons, image by image (areas in pixels); images only in the
    predictions count their polygons as false positives."""
    total = MatchCounts()
    for image in sorted(set(truth) | set(predicted)):
        t = keep_at_least(truth.get(image, []), min_area)
        p = keep_at_least(predicted.get(image, []), min_area)
        total.merge(match_polygons(t, p, iou_threshold)[0])
    return total
