"""Predict roof masks, probabilities and polygons with a model bundle: python predict/predict.py

Takes a bundle (results/EXPERIMENT/MODEL/bundle/, any model: unet, forest, regression;
--model picks it, default training_args.model; predict_args.bundle or --bundle names
another, whose own kind MODEL is) and a folder of chips or one raster of any size (predict_args.input, default
the validation chips; --input). Writes predictions/EXPERIMENT/MODEL/:

  masks/NAME.tif          uint8, 0 = background, 255 = roof; the input's CRS, transform, size
  probabilities/NAME.tif  float32 roof probability (predict_args.save_probabilities); a U-Net trained
                          on boundary and contact bands adds them as bands 2 and 3 where they seed
                          the watershed (instances, seeds auto or channels)
  instances/NAME.tif      uint32, each roof's id in its pixels (predict_args.instances)
  classes/NAME.tif        a bundle trained on classes (mask_args.classes): uint8 class ids with a
                          colour table (1, 2 ... as the class map names them; 0 background, the
                          nodata value, so that QGIS draws it transparent; NAME.qml beside it, the
                          style QGIS applies by itself: each class by name), each
                          roof one class (predict_args.roof_class; a roof whose pixels change class is
                          split there, predict_args.split_classes); the probabilities add a band per
                          class (a U-Net's: its probability of a roof of that class; the classical
                          models': P(class | roof))
  roofs.gpkg              one polygon per roof: id, source, mean_probability (instances), area_m2 (input CRS);
                          with classes also class, class_id, class_probability

Touching roofs are separated by a seeded watershed on the probabilities (predict_args.instances),
seeded with footprint x (1 - boundary) x (1 - contact) when the U-Net predicts those bands
(predict_args.seeds) where it passes the seed threshold a U-Net's train tuned on validation
(bundle.json seed_fraction; predict_args.seed_threshold); without instances a polygon is a
connected group of roof pixels.
Pieces of one roof whose shared border the boundary band hardly marks are joined, under the
limit train tuned on validation (bundle.json merge; predict_args.merge). The object filter
train fitted drops false objects by their size, probabilities, shape and colours
(predict_args.object_filter); a bundle trained on classes judges each roof by the filter of its
class (is it a roof of that class?). predict_args.tta averages the 8 flips and quarter turns of every
window (8 times the time), at a U-Net's threshold tuned on averaged validation probabilities
(bundle.json threshold_tta).
Every setting: docs/settings.md#predict_args; the stage: docs/stages/predict.md.

Rasters larger than predict_args.window are predicted in overlapping windows whose overlap
is blended with linear weights, so no seams appear; they are read and written strip by
strip, so memory does not grow with the raster. Nodata pixels are 0 in the mask. A band
count or dtype other than the bundle's is an error; a result with no roof pixel says so,
with the probability range seen. To merge the masks of many tiles into one raster, run
python mosaic/mosaic.py --input predictions/EXPERIMENT/MODEL/masks --output FILE.
"""

from __future__ import annotations

import argparse
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from rasterio.features import shapes
from rasterio.windows import Window

from core import cli
from core.bundle import (
    BUNDLE_JSON,
    KINDS,
    BundleInfo,
    Predictor,
    forward_targets,
    load_predictor,
    read_info,
    tta_forward,
    unread_warnings,
)
from core.errors import BlankPredictionError, DataError, InputMissingError, SettingsError
from core.files import atomic_path
from core.index import chip_ids, grid_of
from core.instances import (
    burn_polygons,
    default_seed_fraction,
    default_seed_threshold,
    object_classes,
    raster_instances,
    roof_classes,
    seed_words,
    write_instances,
)
from core.parallel import map_tasks, worker_cached
from core.raster import (
    CLASS_BAND,
    CLASSES_TAG,
    ROOF_BAND,
    class_colormap,
    create_raster,
    gtiff_profile,
    iter_windows,
    open_raster,
    require_georeference,
    valid_pixels,
    window_starts,
    write_class_style,
)
from core.settings import CPU_PREDICT_BATCH, ParallelArgs, PredictArgs, Settings
from core.tree import DataTree, refuse_overwrite
from core.vector import grid_layout, ground_area, roof_grid
from workflow.check import preflight
from workflow.contract import begin, file_identity, file_key, refuse_leaky_bundle
from workflow.stages import (
    outside_bundle,
    outside_kind,
    predict_bundle,
    predict_skipped,
    predict_source,
    split_of_folder,
)

log = logging.getLogger(__name__)

#: Rows of mask polygonized at a time.
_POLY_STRIP = 2048


def ramp(size: int, overlap: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """1-D blending weights: rising over ``overlap`` pixels at an edge shared with a neighbour window."""
    w = np.ones(size, np.float32)
    if overlap > 0:
        rising = (np.arange(size, dtype=np.float32) + 0.5) / overlap
        if ramp_start:
            w = np.minimum(w, rising)
        if ramp_end:
            w = np.minimum(w, rising[::-1])
    return w


def plan_windows(height: int, width: int, args: PredictArgs, context: int = 0) -> tuple:
    """Window rows, columns, window height and width, and overlap for a raster.

    The overlap is at least twice the model's context (the half-width of its feature
    windows), so every pixel gets most of its weight from windows that see around it.
    """
    win = min(args.window, max(height, width))
    overlap = max(args.overlap, 2 * int(context))
    overlap = min(overlap, win // 2 - 1) if win > 2 else 0
    rows, cols = (window_starts(n, win, win - overlap) for n in (height, width))
    return rows, cols, min(win, height), min(win, width), overlap


@dataclass
class RasterResult:
    """What predicting one raster produced."""

    source: Path
    mask: Path
    probability: Path | None
    roof_pixels: int = 0
    valid_pixels: int = 0
    prob_min: float = 1.0
    prob_max: float = 0.0
    polygons: list = field(default_factory=list)
    dropped: int = 0  # objects the object filter dropped


def predict_raster(
    predictor: Predictor,
    source: Path,
    mask_path: Path,
    prob_path: Path | None,
    args: PredictArgs,
    threshold: float,
    bar=None,
) -> RasterResult:
    """Predict one raster in blended windows, strip by strip; write its mask (and probabilities, classes),
    and find its roofs: one polygon each (a seeded watershed with ``predict_args.instances``), with its
    class when the bundle has classes."""
    args = with_batch(args, predictor)  # (predict_all has resolved a null batch size once for every raster)
    targets = seed_targets(predictor.info, args)
    classes = len(predictor.info.classes)
    class_path = mask_path.parent.parent / "classes" / mask_path.name if classes else None
    keep = prob_path is not None
    if not (args.instances or classes):
        result = _write_windows(predictor, source, mask_path, prob_path, class_path, args, targets, threshold, bar)
        result.polygons = [(g, None) for g in polygonize(mask_path)]
        return result
    # The watershed and the roofs' classes read the probabilities: from a temporary file when they are not kept.
    probs = prob_path if keep else mask_path.with_name(f".{mask_path.stem}.probabilities.tmp.tif")
    try:
        result = _write_windows(predictor, source, mask_path, probs, class_path, args, targets, threshold, bar)
        if args.instances:
            seed = seed_threshold(predictor.info, args, targets, threshold)
            dropped: list = []
            roofs_only = object_keeper(predictor.info, args, targets, source)
            split = classes if args.split_classes else 0
            result.polygons = raster_instances(
                probs, threshold, seed, targets, keep=roofs_only, dropped=dropped, split_classes=split,
                merge=merge_limit(predictor.info, args, targets),
            )  # fmt: skip
            if dropped:  # the objects the filter dropped leave the mask (and the class raster) too
                erase = outside_roofs(dropped, [g for g, _ in result.polygons])
                result.roof_pixels -= burn_polygons(mask_path, erase, [0] * len(erase))
                if class_path is not None:
                    burn_polygons(class_path, erase, [0] * len(erase))
            result.dropped = len(dropped)
        else:
            result.polygons = [(g, None) for g in polygonize(mask_path)]
        if classes:
            geoms = [g for g, _ in result.polygons]
            found = roof_classes(probs, geoms, len(targets), classes, args.roof_class)
            result.polygons = [(g, p, *c) for (g, p), c in zip(result.polygons, found, strict=True)]
            burn_polygons(class_path, geoms, [c for c, _ in found])
    finally:
        if not keep:
            probs.unlink(missing_ok=True)
    result.probability = prob_path
    return result


def outside_roofs(dropped: list, kept: list) -> list:
    """The dropped objects less any part of a kept roof: two blocks of the watershed may cut a blob wider
    than their margin differently, and erasing a dropped object must not erase a kept roof's pixels."""
    tree = shapely.STRtree(kept) if kept else None
    out = []
    for geom in dropped:
        near = tree.query(geom, predicate="intersects") if tree is not None else []
        rest = shapely.difference(geom, shapely.union_all([kept[i] for i in near])) if len(near) else geom
        if not rest.is_empty:
            out.append(rest)
    return out


def log_blank(blank: list[Any], threshold: float, shown: int = 3) -> None:
    """One line for each reason rasters came out without a roof (the object filter dropped every object, every
    pixel nodata, no pixel over the threshold), naming the first ``shown``: a folder of chips, most of them
    roof-free, gets three lines, not one per chip."""

    def listed(items: list[str]) -> str:
        more = f" and {len(items) - shown} more" if len(items) > shown else ""
        return ", ".join(items[:shown]) + more

    dropped = [r for r in blank if r.dropped]
    nodata = [r for r in blank if not r.dropped and r.valid_pixels == 0]
    below = [r for r in blank if not r.dropped and r.valid_pixels > 0]
    if dropped:
        log.info("predict: the object filter dropped every object of %s",
                 listed([f"{r.source.name} ({r.dropped})" for r in dropped]))  # fmt: skip
    if nodata:
        log.info("predict: every pixel is nodata in %s", listed([r.source.name for r in nodata]))
    if below:
        log.info("predict: no pixel reaches the threshold %.3f in %s", threshold,
                 listed([f"{r.source.name} (probabilities {r.prob_min:.3f}..{r.prob_max:.3f})" for r in below]))  # fmt: skip


def filter_decision(info: BundleInfo, args: PredictArgs, targets: tuple[str, ...]) -> tuple[Any, float, str]:
    """The object filter predict applies (core.objects.ObjectFilter) and its cut: predict_args.object_filter,
    else the bundle's; or None, 0 and why every object is kept (a setting of 0, a bundle without a filter, bands
    the filter reads that predict leaves out of ``targets``, objects split by class otherwise than the filter
    learnt from, a cut tuned to 0)."""
    from core.objects import FEATURES, ObjectFilter, filter_mismatch

    # Why the filter cannot apply comes first: then predict_args.object_filter is unread (the contract leaves it
    # out), and what the record says must not name it.
    fitted = ObjectFilter.from_dict(info.object_filter)
    mismatch = filter_mismatch(info.object_filter, targets, info.classes, args.split_classes)
    if fitted is None:
        return (
            None,
            0.0,
            (
                "the bundle has no object filter (its validation chips held too few objects of either kind to fit "
                "one, as train said; or it was trained before filters existed): every object kept"
            ),
        )
    if mismatch == "bands":
        bands = fitted.features[len(FEATURES) : len(FEATURES) + len(info.targets) - 1]
        return (
            None,
            0.0,
            f"the object filter reads {', '.join(bands)}, which predict_args.seeds {args.seeds} leaves out: every "
            "object kept",
        )
    if mismatch == "split":
        if fitted.split_classes:
            why = (
                "learnt from roofs split by class, and predict_args.split_classes is false: every object kept (set it "
                "true to filter)"
            )
        else:
            why = (
                "learnt from roofs not split by class (the bundle was trained before predict split them), and "
                "predict_args.split_classes is true: every object kept (retrain with --overwrite, or set it false to "
                "filter)"
            )
        return None, 0.0, f"the object filter {why}"
    if args.object_filter == 0:
        return None, 0.0, "object filter off (predict_args.object_filter 0): every object kept"
    cut = fitted.cut if args.object_filter is None else args.object_filter
    own = [c["cut"] for c in fitted.by_class.values()] if args.object_filter is None else []
    if cut <= 0 and all(c <= 0 for c in own):  # (the filters of each class have cuts of their own)
        return (
            None,
            0.0,
            "object filter off (the bundle's cut is 0: on validation no cut did better): every object kept",
        )
    return fitted, cut, ""


def object_keeper(info: BundleInfo, args: PredictArgs, targets: tuple[str, ...], source: Path | None = None):
    """The object filter's decision (``keep(labels, ids, bands, window)``, for core.instances.raster_instances):
    the objects whose probability of being a roof is at least the cut of :func:`filter_decision`; None (keep
    every object) where no filter applies. A filter that reads the image reads that window of ``source`` (the
    raster predicted, on the probabilities' grid), normalized as the model read it."""
    from core.objects import class_features, object_features, reads_classes

    fitted, _, _ = filter_decision(info, args, targets)
    if fitted is None:
        return None
    core = default_seed_threshold(info.threshold, None, channels=len(info.targets) > 1)

    def keep(
        labels: np.ndarray, ids: np.ndarray, bands: np.ndarray, window: Window, class_bands: np.ndarray | None = None
    ) -> np.ndarray:
        chw = None
        if fitted.image_bands:
            with open_raster(source) as src:
                chw = src.read(window=window)
        x = object_features(labels, ids, bands, core, chw, info.normalization)
        if class_bands is not None and reads_classes(fitted.features):  # (split by class: the bands are there)
            x = np.column_stack([x, class_features(labels, ids, class_bands)])
        if class_bands is None or not fitted.by_class:
            return fitted.keep(x, cut=args.object_filter)
        kinds = object_classes(labels, ids, class_bands, args.roof_class)  # each object's class, as its roof's
        return fitted.keep(x, kinds, info.classes, args.object_filter)

    return keep


def filter_note(info: BundleInfo, args: PredictArgs, dropped: int, kept: int, small: int = 0) -> str:
    """What the object filter did, for the log; ``small`` of the ``kept`` objects are under predict_args.min_area
    (said, so the count agrees with the polygons roofs.gpkg holds)."""
    fitted, cut, why = filter_decision(info, args, seed_targets(info, args))
    if fitted is None:
        return why
    if fitted.by_class and args.object_filter is None:
        what = f"probability of a roof of its class under the cut of its class: {fitted.cuts(info.classes)}"
    elif fitted.by_class:
        what = f"probability of a roof of its class under {cut:g}"
    else:
        what = f"probability of a roof under {cut:g}"
    tiny = (
        f" ({small} of them under predict_args.min_area {args.min_area:g} m2, left out of roofs.gpkg)" if small else ""
    )
    return f"the object filter dropped {dropped} objects ({what}), kept {kept}{tiny}"


def decision_threshold(info: BundleInfo, args: PredictArgs) -> float:
    """The threshold the roof pixels must reach: predict_args.threshold, else the bundle's, tuned on
    validation; with predict_args.tta the one train tuned on the averaged probabilities, where it did
    (a U-Net's ``threshold_tta``)."""
    if args.threshold is not None:
        return args.threshold
    if args.tta and info.threshold_tta is not None:
        return info.threshold_tta
    return info.threshold


def seed_threshold(info: BundleInfo, args: PredictArgs, targets: tuple[str, ...], threshold: float) -> float:
    """Where the watershed's seeds start: predict_args.seed_threshold, else the bundle's seed fraction (tuned on
    validation, seeded with the bands it was trained on: not when predict_args.seeds footprint leaves the
    boundary and contact bands out) of the way from the decision threshold in use to 1, else the default."""
    return default_seed_threshold(threshold, args.seed_threshold, len(targets) > 1, tuned_fraction(info, targets))


def tuned_fraction(info: BundleInfo, targets: tuple[str, ...]) -> float | None:
    """The bundle's seed fraction where predict seeds with the bands it was tuned on (None: the default)."""
    return info.seed_fraction if tuple(targets) == tuple(info.targets) else None


def seed_note(info: BundleInfo, args: PredictArgs, targets: tuple[str, ...], threshold: float) -> str:
    """Where the watershed's seeds started and why, for the log."""
    seed = seed_threshold(info, args, targets, threshold)
    what = seed_words(targets) if len(targets) > 1 else "the roof probability"
    if args.seed_threshold is not None:
        source = "predict_args.seed_threshold"
    elif (tuned := tuned_fraction(info, targets)) is not None:
        how = "kept" if tuned == default_seed_fraction(len(targets) > 1) else "tuned"
        source = f"the bundle's, {tuned:g} of the way from the threshold to 1, {how} on validation"
    else:
        source = "the default, " + ("three quarters" if len(targets) > 1 else "half") + " of the way to 1"
    return f"watershed seeds where {what} >= {seed:.3f} ({source})"


def merge_limit(info: BundleInfo, args: PredictArgs, targets: tuple[str, ...]) -> float:
    """The merge limit predict applies to touching objects: predict_args.merge, else the bundle's (tuned on
    validation); 0 (never merge) for a bundle without one, or when the watershed is seeded without the boundary
    band."""
    if "boundary" not in targets:
        return 0.0
    if args.merge is not None:
        return args.merge
    return info.merge or 0.0


def merge_note(info: BundleInfo, args: PredictArgs, targets: tuple[str, ...]) -> str:
    """What predict did with touching objects, for the log (empty where there is no boundary band)."""
    if "boundary" not in targets:
        return ""
    limit = merge_limit(info, args, targets)
    if args.merge is None and info.merge is None:
        return (
            "the bundle has no merge limit (trained before touching objects were merged: retrain with --overwrite "
            "to tune one, or set predict_args.merge): touching objects kept apart"
        )
    if limit == 0:
        why = (
            "predict_args.merge 0"
            if args.merge is not None
            else "the bundle's choice: merging did not help on validation"
        )
        return f"touching objects kept apart ({why})"
    source = "predict_args.merge" if args.merge is not None else "the bundle's limit, tuned on validation"
    return f"touching objects merged where their border's mean boundary probability is under {limit:g} ({source})"


def seed_targets(info: BundleInfo, args: PredictArgs) -> tuple[str, ...]:
    """The bands predict writes and seeds its watershed with: the footprint alone, or with the boundary and
    contact bands of a U-Net trained on them (predict_args.seeds)."""
    extra = tuple(t for t in info.targets if t != "footprint")
    if args.seeds == "channels" and not extra:
        raise SettingsError(
            f"predict_args.seeds is channels but the {info.kind} bundle predicts the footprint alone (trained on "
            f"the mask bands {list(info.targets)}): set predict_args.seeds auto or footprint, or train a U-Net on "
            "masks with mask_args.targets [footprint, boundary, contact]"
        )
    if args.seeds == "footprint" or not args.instances:
        return ("footprint",)
    return tuple(info.targets)


def with_batch(args: PredictArgs, predictor: Predictor) -> PredictArgs:
    """The settings with predict_args.batch_size resolved for this predictor and machine (logged when chosen).

    Null is 4 windows, except for a U-Net on a GPU: the batch unet.device chooses for the
    window and the network's filters. A U-Net predictor, which splits what it is given into
    batches of its own, gets the same size.
    """
    batch = args.batch_size
    if batch is None:
        info = predictor.info
        batch, why = CPU_PREDICT_BATCH, "the default"
        if info.kind == "unet":
            from unet.device import choose_batch, describe, gpu_memory, padded

            side = padded(args.window, info.pad_multiple)
            model = info.settings.get("model_args", {})
            filters = int(model.get("filters", 16))
            memory = gpu_memory()
            batch = choose_batch(memory, side * side, filters, architecture=model.get("architecture", "satellite"),
                                 training=False)  # fmt: skip
            why = f"{describe(memory)}; windows of {side} x {side} padded, filters {filters}"
            networks = int(info.features.get("ensemble", 1))
            if memory is not None and networks > 1:  # the networks of an ensemble may run at once
                batch = max(1, batch // networks)
                why += f", shared by the {networks} networks of the ensemble"
        log.info("predict: predict_args.batch_size null: %d windows per batch (%s)", batch, why)
        args = args.model_copy(update={"batch_size": batch})
    if hasattr(predictor, "batch_size"):
        predictor.batch_size = batch
    return args


def _write_windows(
    predictor: Predictor,
    source: Path,
    mask_path: Path,
    prob_path: Path | None,
    class_path: Path | None,
    args: PredictArgs,
    targets: tuple[str, ...],
    threshold: float,
    bar=None,
) -> RasterResult:
    """The mask, the probabilities of ``targets`` (and of the bundle's classes) when ``prob_path`` is given, and
    the class raster when ``class_path`` is, window by window."""
    info = predictor.info
    names = (*targets, *info.classes)
    bands = len(names)
    result = RasterResult(source, mask_path, prob_path)
    with open_raster(source) as src:
        if src.count != info.bands or src.dtypes[0] != info.dtype:
            raise DataError(
                f"{source} has {src.count} bands of {src.dtypes[0]} but the bundle was trained on {info.bands} bands "
                f"of {info.dtype}: predict imagery like the training chips, or train on this imagery"
            )
        height, width = src.height, src.width
        rows, cols, wh, ww, overlap = plan_windows(height, width, args, info.features.get("context", 0))
        mask_profile = gtiff_profile(
            width=width,
            height=height,
            count=1,
            dtype="uint8",
            crs=src.crs,
            transform=src.transform,
            nodata=None,
            compression=args.compression,
        )
        prob_profile = {**mask_profile, "count": bands, "dtype": "float32", "predictor": 3}
        if args.compression == "none":
            prob_profile.pop("predictor")
        with (
            create_raster(mask_path, mask_profile) as mask_dst,
            create_raster(prob_path, prob_profile) if prob_path else _nowhere() as prob_dst,
            create_raster(class_path, {**mask_profile, "nodata": 0}) if class_path else _nowhere() as class_dst,
        ):
            mask_dst.set_band_description(1, ROOF_BAND)  # (QGIS shows it; mosaic leaves such masks' 0 a value)
            if class_dst is not None:
                class_dst.write_colormap(1, class_colormap(len(info.classes)))
                class_dst.set_band_description(1, CLASS_BAND)
                class_dst.update_tags(**{CLASSES_TAG: ",".join(info.classes)})
                write_class_style(class_path, info.classes)  # QGIS shows the classes by name and colour
            # Batches in raster order; a reader thread reads and prepares (normalizes) the next
            # batch while the model predicts this one. Only that thread touches ``src``.
            jobs: list[tuple[int, list[Window]]] = []  # (window row index, batch of windows)
            for i, r in enumerate(rows):
                windows = [Window(c, r, ww, wh) for c in cols]
                jobs += [(i, windows[b : b + args.batch_size]) for b in range(0, len(windows), args.batch_size)]

            def load(batch: list[Window]) -> tuple:
                try:
                    chips = np.stack([src.read(window=w) for w in batch])
                except Exception as exc:
                    raise DataError(f"{source} could not be read ({exc}): it may be truncated or corrupt") from exc
                valids = [valid_pixels(chip, src.nodata) for chip in chips]
                return (chips if args.tta else predictor.prepare(chips)), valids

            if prob_dst is not None and bands > 1:
                for band, name in enumerate(names, start=1):
                    prob_dst.set_band_description(band, name)
            acc = np.zeros((bands, 0, width), np.float32)
            wsum = np.zeros((0, width), np.float32)
            valid = np.zeros((0, width), bool)
            top = 0  # raster row of acc[0]
            with ThreadPoolExecutor(max_workers=1) as reader:
                ahead = reader.submit(load, jobs[0][1])
                for k, (i, batch) in enumerate(jobs):
                    r = rows[i]
                    prepared, valids = ahead.result()
                    if k + 1 < len(jobs):
                        ahead = reader.submit(load, jobs[k + 1][1])
                    need = r + wh - top
                    if acc.shape[1] < need:
                        grow = need - acc.shape[1]
                        acc = np.concatenate([acc, np.zeros((bands, grow, width), np.float32)], axis=1)
                        wsum = np.vstack([wsum, np.zeros((grow, width), np.float32)])
                        valid = np.vstack([valid, np.zeros((grow, width), bool)])
                    probs = (
                        tta_forward(predictor, prepared, targets, args.calibrated_classes)
                        if args.tta
                        else forward_targets(predictor, prepared, targets, args.calibrated_classes)
                    )
                    wr = ramp(wh, overlap, r > 0, r + wh < height)
                    for w, ok, prob in zip(batch, valids, probs, strict=True):
                        c = int(w.col_off)
                        weight = np.outer(wr, ramp(ww, overlap, c > 0, c + ww < width))
                        sl = np.s_[r - top : r - top + wh, c : c + ww]
                        acc[(slice(None), *sl)] += prob * weight
                        wsum[sl] += weight
                        valid[sl] |= ok
                    if bar is not None:
                        bar.update(len(batch))
                    if k + 1 < len(jobs) and jobs[k + 1][0] == i:
                        continue
                    # Rows above the next window row get no more contributions: write them out.
                    done_to = (rows[i + 1] if i + 1 < len(rows) else height) - top
                    _flush(
                        acc[:, :done_to], wsum[:done_to], valid[:done_to], top, threshold, (mask_dst, prob_dst,
                        class_dst), result, first_class=len(targets),
                    )  # fmt: skip
                    acc, wsum, valid = acc[:, done_to:], wsum[done_to:], valid[done_to:]
                    top += done_to
    return result


class _nowhere:
    """A stand-in for an output that is not written."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _flush(acc, wsum, valid, top, threshold, outputs, result: RasterResult, first_class: int = 1) -> None:
    if acc.shape[1] == 0:
        return
    mask_dst, prob_dst, class_dst = outputs
    bands = np.where(valid, acc / np.maximum(wsum, 1e-12), 0.0).astype(np.float32)
    prob = bands[0]  # the footprint: the roof probability
    mask = np.where(valid & (prob >= threshold), 255, 0).astype(np.uint8)
    window = Window(0, top, acc.shape[2], acc.shape[1])
    mask_dst.write(mask[None], window=window)
    if prob_dst is not None:
        prob_dst.write(bands, window=window)
    if class_dst is not None:  # each roof pixel's most probable class (each roof's own, once roofs are known)
        kind = np.argmax(bands[first_class:], axis=0).astype(np.uint8) + 1
        class_dst.write(np.where(mask > 0, kind, 0).astype(np.uint8)[None], window=window)
    if valid.any():
        seen = prob[valid]
        result.prob_min = min(result.prob_min, float(seen.min()))
        result.prob_max = max(result.prob_max, float(seen.max()))
    result.valid_pixels += int(valid.sum())
    result.roof_pixels += int((mask > 0).sum())


def polygonize(mask_path: Path) -> list:
    """Roof polygons of a 0/255 mask, strip by strip; pieces cut by strip edges are merged."""
    whole, cut = [], []
    with open_raster(mask_path) as src:
        for win in iter_windows(src.width, src.height, src.width, _POLY_STRIP):
            top = int(win.row_off)
            data = src.read(1, window=win)
            if not data.any():
                continue
            transform = src.window_transform(win)
            for geom, _ in shapes(data, mask=data > 0, transform=transform):
                poly = shapely.geometry.shape(geom)
                touches = (top > 0 and _touches_row(poly, src, top)) or (
                    top + win.height < src.height and _touches_row(poly, src, top + win.height)
                )
                (cut if touches else whole).append(poly)
    if cut:
        whole += list(shapely.get_parts(shapely.union_all(cut)))
    return whole


def _touches_row(poly, src, row: int) -> bool:
    y = (src.transform @ (0, row))[1]
    ys = shapely.get_coordinates(poly)[:, 1]
    return bool(np.isclose(ys, y, rtol=0, atol=abs(src.transform.e) * 1e-3).any())


def roofs_frame(
    results: list[RasterResult], crs, args: PredictArgs, classes: tuple[str, ...] | list[str] = ()
) -> gpd.GeoDataFrame:
    """One table of roof polygons (id from 1, as in the instance rasters; source; area in m2; mean
    probability with instances; class, class id and its mean probability with ``classes``), filtered by
    min_area and simplified."""
    rows = [(r.source.name, *polygon) for r in results for polygon in r.polygons]
    gdf = gpd.GeoDataFrame({"source": [row[0] for row in rows]}, geometry=[row[1] for row in rows], crs=crs)
    if args.instances:
        gdf["mean_probability"] = pd.Series([row[2] for row in rows], dtype=float)
    if classes:
        ids = np.array([row[3] for row in rows], np.int64)
        gdf["class"] = pd.Series([classes[k - 1] if k > 0 else None for k in ids], dtype=object)
        gdf["class_id"] = pd.Series(ids, dtype=np.int64)
        gdf["class_probability"] = pd.Series([row[4] for row in rows], dtype=float)
    if gdf.empty:
        gdf["area_m2"] = pd.Series(dtype=float)
        gdf.insert(0, "id", pd.Series(dtype=np.int64))
        return gdf
    if args.simplify > 0:
        gdf["geometry"] = gdf.geometry.simplify(args.simplify, preserve_topology=True)
    gdf["area_m2"] = ground_area(gdf)
    gdf = gdf[gdf["area_m2"] >= args.min_area].reset_index(drop=True)
    gdf.insert(0, "id", np.arange(1, len(gdf) + 1))
    return gdf


def input_extents(inputs: list[Path]) -> tuple[list[tuple[float, float, float, float]], Any]:
    """The bounds of each raster to predict and their CRS. Refused: a raster without CRS or geotransform
    (:func:`core.raster.require_georeference`), and rasters in different CRSs (roofs.gpkg and the grid hold one)."""
    bounds, crss = [], {}
    for path in inputs:
        with open_raster(path) as src:
            require_georeference(src)
            bounds.append(tuple(src.bounds))
            crss.setdefault(src.crs, path)
    if len(crss) > 1:
        (a, first), (b, second) = list(crss.items())[:2]
        raise DataError(
            f"the rasters to predict are in {len(crss)} CRSs ({first.name} {a.to_string()}, {second.name} "
            f"{b.to_string()}): roofs.gpkg holds one; predict each CRS's rasters apart (--input, "
            "predict_args.output), or reproject them onto one (python mosaic/mosaic.py with mosaic_args.reproject)"
        )
    return bounds, next(iter(crss))


def write_grid(
    roofs: gpd.GeoDataFrame, extents: list[tuple[float, float, float, float]], out: Path, size: float
) -> None:
    """grid.gpkg and grid.csv: roofs and roof area in m2 per cell of ``size`` metres over the inputs' ``extents``."""
    grid = roof_grid(roofs, extents, size)
    with atomic_path(out / "grid.gpkg") as tmp:
        grid.to_file(tmp, layer="grid", driver="GPKG", engine="pyogrio")
    with atomic_path(out / "grid.csv") as tmp:
        grid.drop(columns="geometry").to_csv(tmp, index=False, float_format="%.2f")


def resolve_inputs(tree: DataTree, args: PredictArgs, given: Path | None) -> list[Path]:
    """The rasters to predict: --input, else predict_args.input (relative to data_root)."""
    path = predict_source(args, tree, {"input": given})
    found = tree.rasters_at(
        path,
        empty=f"no GeoTIFF in {path}: set predict_args.input to a folder of chips or a raster",
        missing=f"--input {path} not found" if given else f"prediction input {path} not found: set predict_args.input",
    )
    if found == [path] and path.suffix.lower() not in (".tif", ".tiff"):
        raise InputMissingError(f"prediction input {path} is not a GeoTIFF: give a .tif raster or a folder of them")
    return found


@dataclass(frozen=True)
class PredictTask:
    """One raster to predict on a worker: paths and settings only; the worker loads the bundle."""

    bundle: str
    source: str
    mask: str
    probability: str | None
    args: PredictArgs
    threshold: float


def _bundle_key(bundle: Path) -> tuple[str, int, int]:
    """The bundle's identity for a worker's cache: a retrained bundle has a new bundle.json."""
    stat = (bundle / BUNDLE_JSON).stat()
    return str(bundle.resolve()), stat.st_mtime_ns, stat.st_size


def predict_task(task: PredictTask) -> RasterResult:
    """Predict one raster in a worker process, loading the bundle only for the worker's first raster."""
    bundle = Path(task.bundle)
    predictor = worker_cached(("predictor", *_bundle_key(bundle)), lambda: load_predictor(bundle))
    probability = Path(task.probability) if task.probability else None
    # predict_raster resolves a null batch size here, on the worker: its GPU, if it has one.
    return predict_raster(predictor, Path(task.source), Path(task.mask), probability, task.args, task.threshold)


def _on_workers(parallel: ParallelArgs | None, inputs: list[Path]) -> bool:
    """Whether to map rasters over workers: on a cluster, or several inputs and parallel.workers > 1.

    ``workers: null`` keeps one process here: the model already uses every core, and each
    extra process would import TensorFlow and load the model again.
    """
    if parallel is None:
        return False
    return bool(parallel.scheduler) or (len(inputs) > 1 and (parallel.workers or 1) > 1)


def predict_all(
    bundle: Path,
    inputs: list[Path],
    out: Path,
    args: PredictArgs,
    *,
    overwrite: bool = False,
    parallel: ParallelArgs | None = None,
) -> list[RasterResult]:
    """Predict every input with a bundle into ``out``; returns one result per input.

    With ``parallel`` naming a Dask scheduler, or more than one local worker, the rasters go
    to worker processes (each loads the bundle once); the outputs are the same.
    """
    masks_dir, probs_dir, roofs = out / "masks", out / "probabilities", out / "roofs.gpkg"
    refuse_overwrite([roofs], overwrite, "predict")
    if _on_workers(parallel, inputs):
        info = read_info(bundle)
        threshold = decision_threshold(info, args)
        tasks = [
            PredictTask(
                bundle=str(Path(bundle).resolve()),
                source=str(path),
                mask=str(masks_dir / path.name),
                probability=str(probs_dir / path.name) if args.save_probabilities else None,
                args=args,
                threshold=threshold,
            )
            for path in inputs
        ]
        results = map_tasks(predict_task, tasks, parallel, desc="predict", unit="raster", progress=cli.progress)
    else:
        predictor = load_predictor(bundle)
        info = predictor.info
        args = with_batch(args, predictor)
        threshold = decision_threshold(predictor.info, args)
        total = 0
        for path in inputs:
            with open_raster(path) as src:
                rows, cols, *_ = plan_windows(src.height, src.width, args, predictor.info.features.get("context", 0))
                total += len(rows) * len(cols)
        results = []
        with cli.progress(total=total, desc="predict", unit="window") as bar:
            for path in inputs:
                results.append(
                    predict_raster(
                        predictor,
                        path,
                        masks_dir / path.name,
                        probs_dir / path.name if args.save_probabilities else None,
                        args,
                        threshold,
                        bar,
                    )
                )
    extents, crs = input_extents(inputs)
    gdf = roofs_frame(results, crs, args, info.classes)
    if args.instances:  # each roof's id in its pixels: the polygons of roofs.gpkg, rasterized
        for r in results:
            mine = gdf[gdf["source"] == r.source.name]
            write_instances(out / "instances" / r.mask.name, r.mask, list(mine.geometry), list(mine["id"]),
                            args.compression)  # fmt: skip
    with atomic_path(roofs) as tmp:
        gdf.to_file(tmp, layer="roofs", driver="GPKG", engine="pyogrio")
    write_grid(gdf, extents, out, args.grid_size)
    blank = [r for r in results if r.roof_pixels == 0]
    log_blank(blank, threshold)
    stale = out / "classes"  # a class bundle's earlier predictions, their files removed by the stage's rerun
    if not info.classes and stale.is_dir() and not any(stale.iterdir()):
        stale.rmdir()
    if info.classes:
        counts = gdf["class"].value_counts()
        log.info("predict: roofs per class: %s -> %s", ", ".join(f"{c} {int(counts.get(c, 0))}" for c in info.classes),
                 out / "classes")  # fmt: skip
    for line in unread_warnings(info, args):
        log.warning("%s", line)
    targets = seed_targets(info, args)
    if args.instances:
        kept = sum(len(r.polygons) for r in results)  # (before predict_args.min_area drops the smallest)
        log.info("predict: %s", seed_note(info, args, targets, threshold))
        note = merge_note(info, args, targets)  # (merged before the filter judged the objects)
        if note:
            log.info("predict: %s", note)
        log.info("predict: %s", filter_note(info, args, sum(r.dropped for r in results), kept, kept - len(gdf)))
    roof = sum(r.roof_pixels for r in results)
    valid = sum(r.valid_pixels for r in results)
    log.info(
        "predict: %d raster(s), %.2f%% roof pixels, %d roof polygons (threshold %.3f%s) -> %s",
        len(results),
        100 * roof / max(valid, 1),
        len(gdf),
        threshold,
        ", test-time augmentation: 8 views averaged" if args.tta else "",
        out,
    )
    if len(blank) == len(results) and any(r.dropped for r in results):
        fitted, cut, _ = filter_decision(info, args, targets)
        cuts = fitted.cuts(info.classes) if fitted is not None and args.object_filter is None else f"{cut:g}"
        raise BlankPredictionError(
            f"every predicted mask is blank: the object filter dropped every object ({sum(r.dropped for r in results)})"
            f" at {cuts}; predict_args.object_filter=0 keeps "
            f"them, null uses the bundle's cut; outputs are in {out}",
            results,
        )
    if valid == 0:  # (no probability was seen: its range would read 1..0)
        names = ", ".join(r.source.name for r in results[:3]) + (" ..." if len(results) > 3 else "")
        raise BlankPredictionError(
            f"every predicted mask is blank: every pixel of the input is nodata ({names}): predict imagery that "
            f"covers the area; outputs are in {out}",
            results,
        )
    if len(blank) == len(results):
        lo = min(r.prob_min for r in results)
        hi = max(r.prob_max for r in results)
        raise BlankPredictionError(
            f"every predicted mask is blank: no probability reaches the threshold {threshold:.3f} (range seen "
            f"{lo:.3f}..{hi:.3f}). Check that the imagery is like the training chips (bands, scale), or lower "
            f"predict_args.threshold; outputs are in {out}",
            results,
        )
    return results


def output_records(results: list[RasterResult], tree: DataTree) -> list[dict[str, Any]]:
    """What each predicted mask is of: its input, the chip it predicts (when the input is a chip of
    the data tree) and its grid, so that evaluate pairs it with the truth by chip and grid."""
    ids = chip_ids(tree)
    rows = []
    for r in results:
        with open_raster(r.mask) as src:
            grid = grid_of(src)
        key = file_key(r.source, tree)
        rows.append({"mask": r.mask.name, "input": key, "chip": ids.get(key), **grid})
    return rows


def predicted_model(settings: Settings, model: str | None, given: dict[str, Any]) -> str:
    """Whose predictions these are: an outside bundle's (--bundle, predict_args.bundle) own kind, else --model,
    else training_args.model. --model naming another kind than the outside bundle's is refused: its
    predictions would be filed, evaluated and reported under the wrong model."""
    kind = outside_kind(settings, given)
    if kind is None:
        return model or settings.training_args.model
    if model is not None and model != kind:
        option = "--bundle" if given.get("bundle") else "predict_args.bundle"
        raise SettingsError(
            f"--model {model} but {option} {outside_bundle(settings, given)} is a {kind} bundle: its predictions "
            f"would be filed under {model}; give --model {kind}, or leave --model out"
        )
    return kind


def predict_stage(
    settings: Settings,
    tree: DataTree,
    model: str | None = None,
    *,
    overwrite: bool = False,
    bundle: Path | None = None,
    source: Path | None = None,
) -> list[RasterResult]:
    """The predict stage under the stage contract; the record says which bundle (and its hash),
    threshold and inputs made the predictions."""
    given = {"input": source, "bundle": bundle}
    for option, path in given.items():  # before the record's "inputs changed": the missing path is the news
        if path is not None and not Path(path).exists():
            raise InputMissingError(f"--{option} {path} not found")
    model = predicted_model(settings, model, given)
    run = begin("predict", settings, tree, overwrite=overwrite, model=model, given=given)
    if run.skip:
        run.say_skip()
        for line in predict_skipped(settings, tree, model, given):
            log.warning("%s", line)
        blank = ((run.status.record or {}).get("summary") or {}).get("blank")
        if blank:  # the same answer as the run that made them: a rerun must not turn the failure into success
            raise BlankPredictionError(f"{blank} (these predictions are up to date: --overwrite redoes them)")
        return []
    bundle, outside = predict_bundle(settings, tree, model, given)
    inputs = resolve_inputs(tree, settings.predict_args, source)
    # Roofs in pixel coordinates with areas in pixels are no map: refused, as chip does; and a grid_size that
    # makes too many cells is said now, not after the predictions.
    grid_layout(*input_extents(inputs), settings.predict_args.grid_size)
    split = split_of_folder(predict_source(settings.predict_args, tree, given), tree)
    if split is not None and not outside:
        refuse_leaky_bundle(settings, tree, model, split)  # predicting today's val chips with it would leak
    preflight(settings, tree, "predict", bundle=bundle, inputs=inputs)
    args = settings.predict_args
    info = read_info(bundle)
    targets = seed_targets(info, args)  # before the old predictions are removed
    run.start()
    threshold = decision_threshold(info, args)
    applied, cut, why = filter_decision(info, args, targets)

    def filtered(results: list[RasterResult]) -> dict[str, Any]:
        """The record's object_filter: its cut (and those of each class) and the objects it dropped; or why every
        object was kept."""
        if applied is None:
            return {"off": why}
        record: dict[str, Any] = {"cut": cut, "dropped": sum(r.dropped for r in results)}
        if applied.by_class:  # each class's cut (a class without a filter of its own: the filter of all objects')
            record["cuts"] = applied.class_cuts(info.classes, args.object_filter)
        return record

    def finish(results: list[RasterResult], blank: str | None = None) -> None:
        run.finish(
            bundle=str(Path(bundle).resolve()),
            bundle_hash=file_identity(Path(bundle) / BUNDLE_JSON, hashed=True),
            kind=info.kind,
            threshold=threshold,
            seeds="+".join(targets),
            **({"seed_threshold": round(seed_threshold(info, args, targets, threshold), 4),
                "merge": merge_limit(info, args, targets)} if args.instances else {}),
            outputs=output_records(results, tree),
            **({"object_filter": filtered(results)} if args.instances else {}),
            **({"blank": blank} if blank else {}),
        )  # fmt: skip

    try:
        results = predict_all(
            bundle, inputs, tree.prediction_dir(model), args, overwrite=True, parallel=settings.parallel
        )
    except BlankPredictionError as exc:
        finish(exc.results, str(exc))  # the outputs are complete, only blank: evaluate may score them
        raise
    finish(results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    parser.add_argument(
        "--model", choices=KINDS, help="whose bundle to use (default: --bundle's own kind, else training_args.model)"
    )
    parser.add_argument("--bundle", type=Path, metavar="DIR", help="model bundle folder (default: predict_args.bundle)")
    parser.add_argument("--input", type=Path, metavar="PATH", help="raster or folder of rasters to predict")

    def body(args: argparse.Namespace, settings: Settings, tree: DataTree) -> None:
        predict_stage(settings, tree, args.model, overwrite=args.overwrite, bundle=args.bundle, source=args.input)

    return cli.run(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
