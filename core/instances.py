"""One object per roof: a seeded watershed on the roof probabilities, block by block.

Touching roofs merge into one blob when the probability map is thresholded; the low
probabilities along their shared edge still tell them apart. Seeds are the cores where the
probability is high (``seed_threshold``, by default halfway between the decision threshold
and 1: 0.75 for 0.5, as SpaceNet 6's winners seeded); a watershed grows each seed over the
roof pixels (probability >= the threshold) down to the valleys between roofs. A U-Net trained
on the boundary and contact bands (core/targets.py) gives better seeds and valleys:
footprint x (1 - boundary) x (1 - contact), as SpaceNet 6's winner seeded, with seeds three
quarters of the way from the threshold to 1 by default. Roof pixels no
seed reaches (a small, faint roof) are objects of their own, so the roof pixels are exactly
the mask's. A model trained on classes may also split objects where the class changes
(:func:`split_by_class`): a metal roof touching a concrete one is two roofs.

A raster of any size is processed in blocks with a margin around each: an object belongs to
the block holding the top-left corner of its bounding box and is polygonized from that
block's view, which sees it whole unless it is wider than the margin. Memory follows the
block, not the raster.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
import shapely
from rasterio.features import rasterize, shapes
from rasterio.windows import Window
from scipy import ndimage
from shapely import STRtree
from shapely.geometry.base import BaseGeometry

from core.raster import create_raster, gtiff_profile, iter_windows, open_raster
from core.vector import pixel_m2

#: Block side and margin of the block-by-block watershed, pixels.
BLOCK = 2048
MARGIN = 256
#: Seeds smaller than this many pixels are noise, not roof cores.
MIN_SEED_PIXELS = 4
#: A part of a roof of another class splits off as a roof of its own from this ground area (m2) up; smaller
#: parts take their roof's class. Measured on the Banepa validation chips (U-Net at 60 epochs, metal pixel IoU):
#: 0.400 one class per watershed object, 0.455 split at every change, 0.461 from 4 or 8 m2, 0.456 from 17 m2,
#: 0.432 from 35 m2.
MIN_PART_M2 = 8.0
#: 4-connectivity, as rasterio.features.shapes and evaluate's objects.
_CROSS = ndimage.generate_binary_structure(2, 1)


def default_seed_threshold(
    threshold: float, setting: float | None = None, channels: bool = False, fraction: float | None = None
) -> float:
    """The seed threshold: the setting, else ``fraction`` of the way from the decision threshold to 1 (a
    bundle's, tuned on validation by :func:`core.objects.tune_instances`), else halfway (0.75 for 0.5, as
    SpaceNet 6's winners seeded) for seeds from the roof probability, three quarters of the way
    (0.875 for 0.5) for seeds from footprint x (1 - boundary) x (1 - contact) (``channels``).

    Measured on the demo's validation split, polygon F1: U-Net channel seeds, rows of touching roofs
    0.848 halfway, 0.923 at three quarters (the bands' valleys are deep, so cores can be strict);
    the regression's footprint seeds, detached roofs 1.000 halfway, 0.786 at three quarters (its
    probabilities pass so high a threshold only in specks, each a seed of its own). Where the boundary band
    is wide against the roofs (SpaceNet Rio: houses of 15-20 px at 0.5 m), footprint x (1 - boundary) never
    reaches three quarters: no roof has a seed and every group of touching roofs is one object; hence the
    tuned fraction.
    """
    if setting is not None:
        return setting
    if fraction is None:
        fraction = default_seed_fraction(channels)
    return threshold + fraction * (1.0 - threshold)


def seed_words(targets: tuple[str, ...] | list[str]) -> str:
    """What :func:`seed_score` computes from these bands, in words: "footprint x (1 - boundary) x (1 - contact)"."""
    return " x ".join(["footprint", *(f"(1 - {t})" for t in targets if t in ("boundary", "contact"))])


def default_seed_fraction(channels: bool) -> float:
    """Where the seeds start without a tuned fraction, as a share of the way from the decision threshold to 1:
    three quarters for seeds from the boundary and contact bands (``channels``), half from the footprint."""
    return 0.75 if channels else 0.5


def label_objects(mask: np.ndarray, min_area: int = 0) -> tuple[np.ndarray, int]:
    """Number the 4-connected objects of a boolean mask 1..n in raster order, dropping those under ``min_area`` pixels.

    Returns the label image (0 = background or dropped) and n.
    """
    labels, n = ndimage.label(np.asarray(mask, bool), structure=_CROSS)
    if n and min_area > 0:
        labels, n = keep_labels(labels, np.bincount(labels.ravel(), minlength=n + 1) >= min_area)
    return labels, n


def keep_labels(labels: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, int]:
    """The objects ``keep`` (a boolean per label 0..n) of a label image, renumbered 1..m in order; m."""
    keep = keep.copy()
    keep[0] = False
    new = np.zeros(len(keep), labels.dtype)
    new[keep] = np.arange(1, int(keep.sum()) + 1)
    return new[labels], int(keep.sum())


def seed_score(bands: np.ndarray, targets: tuple[str, ...]) -> np.ndarray:
    """footprint x (1 - boundary) x (1 - contact) of a (targets, rows, cols) array (the bands it has)."""
    score = bands[0].astype(np.float32, copy=True)
    for k, name in enumerate(targets):
        if name in ("boundary", "contact"):
            score *= 1.0 - bands[k]
    return score


def class_kinds(class_bands: np.ndarray) -> np.ndarray:
    """Each pixel's most probable class (0-based) from a (classes, rows, cols) array of class probabilities."""
    return np.argmax(class_bands, axis=0).astype(np.int16)


def object_classes(labels: np.ndarray, ids: np.ndarray, class_bands: np.ndarray, rule: str = "vote") -> np.ndarray:
    """Each object's class (0-based) from the class probabilities (classes, rows, cols) over its pixels, as
    predict gives a roof its class (predict_args.roof_class): ``vote`` sums them, ``majority`` counts each
    pixel's most probable class."""
    ids = np.asarray(ids, np.int64)
    if rule == "majority":
        best = class_kinds(class_bands)
        counts = [ndimage.sum(best == k, labels, ids) for k in range(len(class_bands))]
    else:
        counts = [ndimage.sum(band, labels, ids) for band in class_bands]
    return np.argmax(np.column_stack([np.atleast_1d(c) for c in counts]), axis=1) if ids.size else ids


def split_by_class(labels: np.ndarray, kinds: np.ndarray, min_part: int = 0) -> tuple[np.ndarray, int]:
    """A label image's objects split where the class changes: each 4-connected group of one object's pixels
    of one class (``kinds``, each pixel's class) is an object of its own, numbered 1..n in raster order.
    A group under ``min_part`` pixels does not split off (a speck of another class is noise, not a roof of its
    own): it takes the class of the nearest large group of its own object, or, where its object has none,
    the class most of the object's pixels have; a group still apart and small after that (in a concave
    roof, the nearest large group need not touch it) takes the class of the neighbours it borders most."""
    from skimage.measure import label

    if not labels.any():
        return np.zeros(labels.shape, np.int32), 0
    width = int(kinds.max()) + 1

    def parts(kinds: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
        pieces = np.where(labels > 0, labels.astype(np.int64) * width + kinds, 0)
        split, n = label(pieces, background=0, return_num=True, connectivity=1)
        small = np.bincount(split.ravel(), minlength=n + 1) < min_part
        small[0] = False
        return split.astype(np.int32), int(n), small

    split, n, small = parts(kinds)
    if not small.any():
        return split, n
    kinds = kinds.copy()
    counts = np.bincount((labels.astype(np.int64) * width + kinds).ravel(), minlength=(int(labels.max()) + 1) * width)
    majority = np.argmax(counts.reshape(-1, width), axis=1).astype(kinds.dtype)
    boxes = ndimage.find_objects(labels)
    for obj in np.unique(labels[small[split]]):
        box = boxes[obj - 1]
        own = labels[box] == obj
        specks = own & small[split[box]]
        large = own & ~specks
        if large.any():  # the nearest large group of this object, not of a touching one
            rows, cols = ndimage.distance_transform_edt(~large, return_distances=False, return_indices=True)
            kinds[box][specks] = kinds[box][rows, cols][specks]
        else:
            kinds[box][specks] = majority[obj]
    split, n, small = parts(kinds)
    boxes = ndimage.find_objects(split) if small.any() else []
    for k in np.flatnonzero(small):  # still apart: the class of the object's pixels that border it most
        box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in boxes[k - 1])
        piece = split[box] == k
        rim = ndimage.binary_dilation(piece, structure=_CROSS) & ~piece & (labels[box] == labels[box][piece][0])
        if rim.any():
            kinds[box][piece] = np.bincount(kinds[box][rim]).argmax()
    split, n, _ = parts(kinds)
    return split, n


def part_pixels(pixel_m2: float) -> int:
    """The pixels of :data:`MIN_PART_M2` at this pixel area (m2): the smallest part that splits off a roof."""
    return max(1, int(np.ceil(MIN_PART_M2 / max(pixel_m2, 1e-12))))


def label_instances(
    prob: np.ndarray,
    threshold: float,
    seed_threshold: float,
    score: np.ndarray | None = None,
    kinds: np.ndarray | None = None,
    min_part: int = 0,
    boundary: np.ndarray | None = None,
    merge: float = 0.0,
    max_side: int | None = None,
) -> tuple[np.ndarray, int]:
    """Label image of roofs (1..n, 0 = background) from a probability array: seeded watershed.

    ``score`` (default: the probability) picks the seeds (score >= seed_threshold) and is the
    surface the seeds grow over, down to its valleys: :func:`seed_score` of a U-Net's boundary
    and contact bands makes the lines between touching roofs deep valleys. With ``kinds`` (each
    pixel's class) the objects are then split where the class changes, in parts of at least
    ``min_part`` pixels (:func:`split_by_class`). Before that, with ``boundary`` (a U-Net's boundary band) and
    ``merge`` > 0, touching objects whose shared border's mean boundary probability is under ``merge`` are one
    (:func:`merge_fragments`; none that would make an object wider or higher than ``max_side``).
    """
    from skimage.segmentation import watershed

    roof = prob >= threshold
    score = prob if score is None else score
    seeds, n = label_objects(roof & (score >= seed_threshold), MIN_SEED_PIXELS)
    labels = (
        watershed(-score, seeds, mask=roof, connectivity=1).astype(np.int32) if n else np.zeros(prob.shape, np.int32)
    )
    rest, m = ndimage.label(roof & (labels == 0), structure=_CROSS)
    if m:
        labels[rest > 0] = rest[rest > 0] + n
    n += m
    if boundary is not None and merge > 0 and n > 1:
        labels, n = merge_fragments(labels, boundary, merge, max_side=max_side)
    if kinds is not None:
        return split_by_class(labels, kinds, min_part)
    return labels, n


def border_means(labels: np.ndarray, boundary: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of 4-adjacent objects of a label image (a < b) and the mean of ``boundary`` along their
    shared border (the two pixels of each neighbouring pair averaged): arrays a, b, mean."""
    lows, highs, values = [], [], []
    for a, b, va, vb in (
        (labels[:, :-1], labels[:, 1:], boundary[:, :-1], boundary[:, 1:]),
        (labels[:-1], labels[1:], boundary[:-1], boundary[1:]),
    ):
        touch = (a > 0) & (b > 0) & (a != b)
        lows.append(np.minimum(a[touch], b[touch]))
        highs.append(np.maximum(a[touch], b[touch]))
        values.append((va[touch].astype(np.float64) + vb[touch]) / 2)
    low, high = np.concatenate(lows).astype(np.int64), np.concatenate(highs).astype(np.int64)
    if not len(low):
        return low, high, np.zeros(0)
    width = int(labels.max()) + 1
    codes, inverse = np.unique(low * width + high, return_inverse=True)
    means = np.bincount(inverse, weights=np.concatenate(values)) / np.bincount(inverse)
    return codes // width, codes % width, means


def merge_fragments(
    labels: np.ndarray,
    boundary: np.ndarray,
    limit: float,
    borders: tuple | None = None,
    max_side: int | None = None,
) -> tuple[np.ndarray, int]:
    """Touching objects whose shared border has a mean boundary probability under ``limit`` joined into one,
    numbered 1..n. A large roof's ridges and seams can seed the watershed twice; its pieces meet where the
    boundary band is faint, two roofs where it is strong. Each merged object takes the place of its lowest old
    number. A merge whose object would be more than ``max_side`` pixels wide or high is not made (its pieces
    stay apart): block by block, a block sees an object whole only up to its margin. ``borders``
    (:func:`border_means` of these labels) spares computing them again."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    low, high, means = borders if borders is not None else border_means(labels, boundary)
    width = int(labels.max()) + 1
    join = means < limit
    graph = coo_matrix((np.ones(int(join.sum())), (low[join], high[join])), shape=(width, width))
    _, group = connected_components(graph, directed=False)
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if max_side is not None and join.any():  # the groups' boxes: find_objects of the image labelled by group
        boxes = ndimage.find_objects(np.where(labels > 0, group[labels] + 1, 0))
        too_big = np.array([b is not None and max(b[0].stop - b[0].start, b[1].stop - b[1].start) > max_side
                            for b in boxes] + [False] * (len(group) - len(boxes)))  # fmt: skip
        if too_big[group[ids]].any():  # those pieces keep a group of their own each
            alone = ids[too_big[group[ids]]]
            group = group.copy()
            group[alone] = group.max() + 1 + np.arange(len(alone))
    # Each merged object keeps the place of its lowest old number: numbered 1..n in the watershed's order.
    lowest = np.full(int(group.max()) + 1, width)
    np.minimum.at(lowest, group[ids], ids)
    used = np.unique(group[ids])
    rank = np.zeros(len(lowest), np.int32)
    rank[used[np.argsort(lowest[used])]] = np.arange(1, len(used) + 1, dtype=np.int32)
    lut = np.zeros(width, np.int32)
    lut[ids] = rank[group[ids]]
    return lut[labels], len(used)


def raster_instances(
    prob_path: Path,
    threshold: float,
    seed_threshold: float,
    targets: tuple[str, ...] = ("footprint",),
    *,
    keep: Callable[[np.ndarray, np.ndarray, np.ndarray, Window, np.ndarray | None], np.ndarray] | None = None,
    dropped: list[BaseGeometry] | None = None,
    split_classes: int = 0,
    merge: float = 0.0,
    block: int = BLOCK,
    margin: int = MARGIN,
) -> list[tuple[BaseGeometry, float]]:
    """One (polygon, mean probability) per roof of a probability raster (band 1; further bands
    ``targets[1:]`` seed the watershed), block by block. ``keep(labels, ids, bands, window, class_bands)`` (the
    object filter; ``class_bands`` the block's class probabilities when split by class, else None) says which
    objects of a block are roofs; the others are left out, their polygons added to ``dropped``.
    ``split_classes`` (the number of class bands after the targets' bands, 0 = none) splits the objects
    where the most probable class changes (parts of at least :data:`MIN_PART_M2`). ``merge`` > 0 joins touching
    objects whose border's mean boundary probability is under it, where ``targets`` has a boundary band
    (:func:`merge_fragments`)."""
    found: list[tuple[BaseGeometry, float]] = []
    with open_raster(prob_path) as src:
        min_part = part_pixels(pixel_m2(src.profile, (src.height, src.width))) if split_classes else 0
        for core in iter_windows(src.width, src.height, block):
            r0, c0 = max(0, int(core.row_off) - margin), max(0, int(core.col_off) - margin)
            r1 = min(src.height, int(core.row_off + core.height) + margin)
            c1 = min(src.width, int(core.col_off + core.width) + margin)
            ext = Window(c0, r0, c1 - c0, r1 - r0)
            bands = src.read(list(range(1, len(targets) + split_classes + 1)), window=ext)
            class_bands = bands[len(targets) :] if split_classes else None
            kinds = class_kinds(class_bands) if class_bands is not None else None
            bands = bands[: len(targets)]
            prob = bands[0]
            score = seed_score(bands, targets) if len(targets) > 1 else None
            boundary = bands[targets.index("boundary")] if "boundary" in targets else None
            labels, n = label_instances(
                prob, threshold, seed_threshold, score, kinds, min_part, boundary, merge, max_side=margin
            )
            if n == 0:
                continue
            owned = [
                k
                for k, box in enumerate(ndimage.find_objects(labels), start=1)
                if box is not None
                and core.row_off <= r0 + box[0].start < core.row_off + core.height
                and core.col_off <= c0 + box[1].start < core.col_off + core.width
            ]
            if not owned:
                continue
            mine = np.zeros(n + 1, bool)
            mine[owned] = True
            roof = dict.fromkeys(owned, True)
            if keep is not None:
                roof = dict(zip(owned, keep(labels, np.asarray(owned), bands, ext, class_bands), strict=True))
            means = dict(zip(owned, np.atleast_1d(ndimage.mean(prob, labels, owned)), strict=True))
            parts: dict[int, list[BaseGeometry]] = {}
            for geom, value in shapes(labels, mask=mine[labels], transform=src.window_transform(ext), connectivity=4):
                parts.setdefault(int(value), []).append(shapely.geometry.shape(geom))
            for value, polys in parts.items():
                geom = polys[0] if len(polys) == 1 else shapely.union_all(polys)
                if roof[value]:
                    found.append((geom, float(means[value])))
                elif dropped is not None:
                    dropped.append(geom)
    return found


def write_instances(path: Path, like: Path, polygons: list[BaseGeometry], ids: list[int], compression: str) -> Path:
    """Each roof's id in its pixels (uint32, 0 = no roof), on the grid of the raster ``like``, block by block."""
    tree = STRtree(polygons) if polygons else None
    with open_raster(like) as src:
        profile = gtiff_profile(width=src.width, height=src.height, count=1, dtype="uint32", crs=src.crs,
                                transform=src.transform, nodata=None, compression=compression)  # fmt: skip
        with create_raster(path, profile) as dst:
            for win in iter_windows(src.width, src.height, BLOCK):
                transform = src.window_transform(win)
                out = np.zeros((int(win.height), int(win.width)), np.uint32)
                if tree is not None:
                    bounds = shapely.box(*src.window_bounds(win))
                    hits = tree.query(bounds, predicate="intersects")
                    if len(hits):
                        out = rasterize(
                            [(polygons[i], ids[i]) for i in hits], out_shape=out.shape, transform=transform,
                            fill=0, dtype="uint32",
                        )  # fmt: skip
                dst.write(out[None], window=win)
    return path


def roof_classes(
    prob_path: Path,
    polygons: list[BaseGeometry],
    first: int,
    classes: int,
    rule: str = "vote",
    *,
    block: int = BLOCK,
) -> list[tuple[int, float]]:
    """Each roof's class id (1..classes) and the mean probability of that class over its pixels, from the
    class bands ``first + 1 .. first + classes`` (1-based) of a probability raster (each class's probability
    of a roof of that class, or given a roof). One roof, one class: ``vote`` sums each pixel's class probabilities (a vote weighted by
    probability); ``majority`` counts each pixel's most probable class. Block by block: a roof is read with
    the block holding its first vertex, the block grown to the roofs it holds.
    """
    out: list[tuple[int, float]] = [(0, 0.0)] * len(polygons)
    if not polygons:
        return out
    with open_raster(prob_path) as src:
        inverse = ~src.transform
        starts = [inverse @ tuple(shapely.get_coordinates(p)[0]) for p in polygons]
        owner: dict[tuple[int, int], list[int]] = {}
        for k, (col, row) in enumerate(starts):
            owner.setdefault((int(row) // block, int(col) // block), []).append(k)
        bands = list(range(first + 1, first + classes + 1))
        for mine in owner.values():
            left, bottom, right, top = shapely.total_bounds([polygons[k] for k in mine])
            (ca, ra), (cb, rb) = inverse @ (left, top), inverse @ (right, bottom)
            r0, c0 = max(0, int(np.floor(min(ra, rb)))), max(0, int(np.floor(min(ca, cb))))
            r1, c1 = min(src.height, int(np.ceil(max(ra, rb)))), min(src.width, int(np.ceil(max(ca, cb))))
            win = Window(c0, r0, max(c1 - c0, 1), max(r1 - r0, 1))
            probs = src.read(bands, window=win)
            labels = rasterize([(polygons[k], i) for i, k in enumerate(mine, start=1)], out_shape=probs.shape[1:],
                               transform=src.window_transform(win), fill=0, dtype="int32")  # fmt: skip
            ids = np.arange(1, len(mine) + 1)
            sums = np.stack([np.atleast_1d(ndimage.sum(p, labels, ids)) for p in probs], axis=1)  # (roofs, classes)
            pixels = np.atleast_1d(ndimage.sum(np.ones_like(labels), labels, ids))
            if rule == "majority":
                best = np.argmax(probs, axis=0)
                counts = np.stack([np.atleast_1d(ndimage.sum(best == c, labels, ids)) for c in range(classes)], axis=1)
                chosen = np.argmax(counts, axis=1)
            else:
                chosen = np.argmax(sums, axis=1)
            for i, k in enumerate(mine):
                if pixels[i] > 0:  # (a roof covering no pixel centre has no class: 0)
                    out[k] = (int(chosen[i]) + 1, float(sums[i, chosen[i]] / pixels[i]))
    return out


def burn_polygons(path: Path, polygons: list[BaseGeometry], values: list[int], *, block: int = BLOCK) -> int:
    """Give every pixel of each polygon its value in band 1 of a raster (0 included: the object filter erases
    the objects it drops), pixels outside the polygons keeping theirs; block by block, in place. Returns
    how many pixels that held a value other than 0 now hold 0."""
    erased = 0
    if not polygons:
        return erased
    tree = STRtree(polygons)
    with rasterio.open(path, "r+") as dst:
        for win in iter_windows(dst.width, dst.height, block):
            hits = tree.query(shapely.box(*dst.window_bounds(win)), predicate="intersects")
            if not len(hits):
                continue
            data = dst.read(1, window=win)
            burned = rasterize([(polygons[i], values[i]) for i in hits], out_shape=data.shape,
                               transform=dst.window_transform(win), fill=-1, dtype="int32")  # fmt: skip
            inside = burned >= 0  # (-1: no polygon's pixel; a value of 0 erases)
            erased += int((inside & (burned == 0) & (data != 0)).sum())
            dst.write(np.where(inside, burned, data).astype(data.dtype)[None], window=win)
    return erased
