"""Score a model's predictions against the truth: python evaluate/evaluate.py [--model M] [--split val|test]

Compares predictions/EXPERIMENT/MODEL/masks/NAME.tif (MODEL from --model, default
predict_args.bundle's kind, else training_args.model) with the truth masks of the same names in the split's masks folder
(evaluate_args.split, default val; --split test), and writes
results/EXPERIMENT/MODEL/evaluation/SPLIT/:

  metrics.json              pixel scores (IoU, F1, precision, recall, accuracy and the counts)
                            and "object" scores (precision, recall, F1 of matched roofs)
  chips.csv                 the same for every chip
  best.png, worst.png       the chips with the highest and lowest pixel IoU: the image with
                            the truth (cyan) and predicted (magenta) roof outlines
  instances.png             the chips with the most true roofs: each predicted roof (roofs.gpkg)
                            outlined in its own colour, the true roofs white on black
  threshold_sweep.csv/.png  precision, recall and F1 against the threshold, from probabilities/
  confusion.csv/.png        a model trained on classes (mask_args.classes): the confusion matrix of
                            the classes' pixels, and of the roofs found; metrics.json adds each
                            class's pixel scores and the share of found roofs given their class
  classes.png               with classes: the chips of instances.png, true classes above, predicted below

then refreshes results/summary.csv and summary.md (one row per experiment and model) and the
experiment's report, results/EXPERIMENT/report.html. Train's own metrics.json, one level up,
is left as it is.

Object scores follow the SpaceNet building challenge: objects are 4-connected groups of roof
pixels (scipy.ndimage.label: the same pieces rasterio.features.shapes turns into the
polygons of roofs.gpkg, so the IoU of two pixel sets is the IoU of their polygons, exact);
objects under evaluate_args.min_area pixels are ignored on both sides; each prediction, in
turn, takes the unmatched truth object it overlaps with the highest IoU, and is a true
positive when that IoU is at least evaluate_args.iou_threshold (0.5). Chips are scored one
by one, so a roof cut by a chip edge is one object in each chip. Nodata pixels of the image
do not count in the pixel scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely
from rasterio.transform import from_bounds

from core import cli  # first: it makes `import evaluate` find the package

if __name__ == "__main__":
    cli.unshadow_package(__file__)

from core.bundle import BUNDLE_JSON, KINDS, read_info
from core.errors import DataError, LabelError
from core.files import atomic_path
from core.index import read_index
from core.instances import label_objects
from core.metrics import (
    Confusion,
    MatchCounts,
    ThresholdSearch,
    drop_unknown,
    match_labels,
    metrics_record,
    write_metrics,
)
from core.polygons import (
    PolygonErrors,
    group_counts,
    match_polygons,
    polygon_errors,
    read_spacenet_csv,
    score_spacenet,
    to_pixels,
    unshared_images,
    write_spacenet_csv,
)
from core.raster import (
    UNKNOWN,
    class_colors,
    mask_labels,
    open_raster,
    read_mask,
    read_mask_bands,
    read_raster,
    rgb_preview,
    same_transform,
    usable_pixels,
)
from core.settings import EvaluateArgs, Settings
from core.tree import DataTree, require
from core.vector import at_least_m2, clip_to, close_attribute, load_labels
from evaluate.classes import ClassScores, scored_classes, share
from evaluate.report import evaluation_dir, settings_changes, write_experiments_table, write_report
from workflow.contract import begin, read_record, refuse_leaky_bundle
from workflow.stages import outside_kind, spec_of

log = logging.getLogger(__name__)

#: Names of the scores in pictures.
LABELS = {"precision": "precision", "recall": "recall", "f1": "F1", "iou": "IoU"}

#: Chips shown in each of best.png and worst.png.
SHOWN = 4


# --- objects ---------------------------------------------------------------------------------


def match_objects(
    truth: np.ndarray, pred: np.ndarray, args: EvaluateArgs, known: np.ndarray | None = None
) -> MatchCounts:
    """SpaceNet object counts of two boolean masks (:func:`core.metrics.match_labels`): objects under
    ``args.min_area`` pixels are ignored, and so are predicted objects lying mostly (half or more) on pixels of
    unknown class (``~known``)."""
    t_labels, n_t = label_objects(truth, args.min_area)
    p_labels, n_p = label_objects(pred, args.min_area)
    if known is not None and n_p and not known.all():
        p_labels, n_p = drop_unknown(p_labels, n_p, known)
    return match_labels(t_labels, n_t, p_labels, n_p, args.iou_threshold)


# --- one chip, a whole folder ------------------------------------------------------------------


@dataclass
class ChipScore:
    """The scores of one chip."""

    name: str
    confusion: Confusion
    objects: MatchCounts
    truth_objects: int
    predicted_objects: int
    prediction: str = ""  # the predicted mask's file name, when not the truth's

    def row(self) -> dict[str, Any]:
        c = self.confusion
        s = c.scores()
        o = self.objects.scores()
        return {
            "chip": self.name,
            "truth_pixels": c.tp + c.fn,
            "predicted_pixels": c.tp + c.fp,
            **{k: s[k] for k in ("tp", "fp", "fn", "tn", "iou", "f1", "precision", "recall", "accuracy")},
            "truth_objects": self.truth_objects,
            "predicted_objects": self.predicted_objects,
            "object_tp": o["tp"],
            "object_fp": o["fp"],
            "object_fn": o["fn"],
            "object_f1": o["f1"],
        }


def score_chip(
    name: str,
    truth: np.ndarray,
    pred: np.ndarray,
    args: EvaluateArgs,
    valid: np.ndarray | None = None,
    known: np.ndarray | None = None,
) -> ChipScore:
    """Pixel counts (only where ``valid`` and ``known``) and object counts of boolean truth and prediction."""
    if truth.shape != pred.shape:
        raise DataError(
            f"{name}: the prediction is {pred.shape[1]}x{pred.shape[0]}, the truth {truth.shape[1]}x{truth.shape[0]}"
        )
    where = valid if known is None else (known if valid is None else valid & known)
    confusion = Confusion().add(truth, pred, where)
    objects = match_objects(truth, pred, args, known)
    return ChipScore(name, confusion, objects, objects.tp + objects.fn, objects.tp + objects.fp)


@dataclass
class Evaluation:
    """Scores of a folder of predictions against the truth."""

    chips: list[ChipScore] = field(default_factory=list)
    confusion: Confusion = field(default_factory=Confusion)
    objects: MatchCounts = field(default_factory=MatchCounts)
    search: ThresholdSearch | None = None
    classes: ClassScores | None = None

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([c.row() for c in self.chips])


def matching_names(pred_masks: Path, truth_masks: Path, frames: Path, tree: DataTree) -> list[tuple[str, str]]:
    """(truth, prediction) file names paired by name, for predictions without a record of their chips."""
    predicted = {p.name for p in tree.list_rasters(pred_masks)}
    truth = {p.name for p in tree.list_rasters(truth_masks)}
    names = sorted(predicted & truth, key=_natural)
    if not names:
        raise DataError(
            f"no prediction in {pred_masks} has a truth mask of the same name in {truth_masks}: predict that split's "
            f"chips (python predict/predict.py --input {frames})"
        )
    _warn_unpredicted(len(truth - predicted), len(truth), truth_masks, len(names))
    return [(n, n) for n in names]


def _warn_unpredicted(missing: int, total: int, truth_masks: Path, scored: int) -> None:
    if missing:
        log.warning(
            "evaluate: %d of %d truth masks in %s have no prediction; scoring the %d that do",
            missing, total, truth_masks, scored,
        )  # fmt: skip


def pair_by_chip(
    outputs: list[dict[str, Any]], split: str, truth_masks: Path, frames: Path, tree: DataTree
) -> list[tuple[str, str]]:
    """(truth, prediction) file names paired by chip id, from predict's record of what each mask predicts.

    A prediction of another chip never meets a truth mask of the same file name; a prediction on
    another grid than its truth is an error naming both.
    """
    index = read_index(tree.chips_csv, needs=("split", "split_file"), stage="split")
    truth_ids = {
        name: int(i)
        for i, s, name in zip(index["id"], index["split"], index["split_file"], strict=True)
        if s == split and name
    }
    by_chip = {o["chip"]: o for o in outputs if o.get("chip") is not None}
    present = [p.name for p in tree.list_rasters(truth_masks)]
    pairs = [(name, by_chip[truth_ids[name]]["mask"]) for name in present if truth_ids.get(name) in by_chip]
    if not pairs:
        raise DataError(
            f"no prediction in the record of predict is of a {split} chip ({len(outputs)} predicted, none of the "
            f"{len(present)} chips of {truth_masks}): predict that split's chips (python predict/predict.py "
            f"--input {frames} --overwrite)"
        )
    _warn_unpredicted(len(present) - len(pairs), len(present), truth_masks, len(pairs))
    return sorted(pairs, key=lambda p: _natural(p[0]))


def same_grid(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two rasters' profiles describe the same pixels: CRS, size and transform (to a millionth of a pixel)."""
    same_pixels = (a["width"], a["height"]) == (b["width"], b["height"]) and a.get("crs") == b.get("crs")
    return same_pixels and same_transform(a["transform"], b["transform"])


def _natural(name: str) -> tuple:
    """val_2 before val_10."""
    stem, _, number = Path(name).stem.rpartition("_")
    return (stem, int(number)) if number.isdigit() else (name, 0)


def evaluate_folder(
    pred_dir: Path,
    frames: Path,
    truth_masks: Path,
    args: EvaluateArgs,
    tree: DataTree,
    pairs: list[tuple[str, str]] | None = None,
) -> Evaluation:
    """Score every (truth, prediction) pair (default: by file name, grids checked: :func:`check_grids`;
    given pairs are the caller's, checked by it); sweep thresholds when probabilities exist.
    """
    if pairs is None:
        pairs = matching_names(pred_dir / "masks", truth_masks, frames, tree)
        check_grids(pairs, pred_dir / "masks", truth_masks)
    probs_dir = pred_dir / "probabilities"
    with_probs = all((probs_dir / p).is_file() for _, p in pairs)
    if not with_probs:
        log.warning(
            "evaluate: %s lacks some chips' probabilities (predict_args.save_probabilities false?): no threshold sweep",
            probs_dir,
        )
    result = Evaluation(search=ThresholdSearch() if with_probs else None)
    names = scored_classes(truth_masks / pairs[0][0], pred_dir / "classes" / pairs[0][1]) if pairs else ()
    if names:
        result.classes = ClassScores(names)
    for name, predicted in cli.progress(pairs, desc="evaluate", unit="chip"):
        bands, band_names, mask_names, _ = read_mask_bands(truth_masks / name)  # once: footprint and classes
        truth, known = bands[0] == 255, bands[0] != UNKNOWN
        pred, _ = read_mask(pred_dir / "masks" / predicted)
        valid = known  # pixels of unknown class count nowhere, as nodata
        if (frames / name).is_file():
            image, profile = read_raster(frames / name)
            valid = usable_pixels(image, profile.get("nodata"), known)
        chip = score_chip(name, truth, pred, args, valid, known)
        chip.prediction = predicted if predicted != name else ""
        result.chips.append(chip)
        result.confusion.merge(chip.confusion)
        result.objects.merge(chip.objects)
        if result.search is not None:
            prob, _ = read_raster(probs_dir / predicted)
            result.search.add(truth, prob[0], valid)
        if result.classes is not None:
            kinds, _ = read_raster(pred_dir / "classes" / predicted)
            labels, _ = mask_labels(bands, band_names, mask_names, truth_masks / name)
            result.classes.add_pixels(labels, kinds[0], valid)
    return result


def check_grids(pairs: list[tuple[str, str]], pred_masks: Path, truth_masks: Path) -> None:
    """Every prediction lies on its truth's grid (CRS, size, transform), read from the headers alone."""
    for name, predicted in pairs:
        with open_raster(truth_masks / name) as t, open_raster(pred_masks / predicted) as p:
            a, b = dict(t.profile), dict(p.profile)
        if not same_grid(a, b):
            raise DataError(
                f"prediction {pred_masks / predicted} lies on another grid than its truth {truth_masks / name} "
                f"({_grid(b)} vs {_grid(a)}): it is not a prediction of that chip; predict the split's chips again "
                "(python predict/predict.py --overwrite)"
            )


def _grid(profile: dict[str, Any]) -> str:
    t = profile["transform"]
    return f"{profile['width']}x{profile['height']} px at ({t.c:.6g}, {t.f:.6g})"


# --- polygons ----------------------------------------------------------------------------------


def polygon_scores(
    settings: Settings, tree: DataTree, split: str, pairs: list[tuple[str, str]], pred_dir: Path, out: Path,
    groups: dict[Any, MatchCounts] | None = None, classes: ClassScores | None = None,
    errors: PolygonErrors | None = None,
) -> MatchCounts | None:  # fmt: skip
    """SpaceNet polygon scores: each chip's true roofs (the label file's polygons, as mask keeps them,
    clipped to the chip) against the roofs.gpkg polygons predicted from it; also writes both as
    SpaceNet CSVs (truth.csv, predictions.csv) in pixel coordinates. None when there is no roofs.gpkg
    or no usable label file. With ``classes``, each matched roof's true and predicted class is counted; with
    ``errors``, why each unmatched polygon is unmatched (:func:`core.polygons.polygon_errors`)."""
    import geopandas as gpd

    roofs_file = pred_dir / "roofs.gpkg"
    if not roofs_file.is_file():
        log.info("evaluate: %s not found: no polygon scores", roofs_file)
        return None
    try:
        labels, unknown, _ = load_labels(tree.labels, settings.mask_args)
    except LabelError as exc:
        log.warning("evaluate: no polygon scores, the true polygons are not readable: %s", exc)
        return None
    index = read_index(tree.chips_csv, needs=("split", "split_file"), stage="split")
    rows = {r.split_file: r for r in index[index["split"] == split].itertuples()}
    predicted = gpd.read_file(roofs_file, engine="pyogrio")
    args = settings.evaluate_args
    if groups is not None and args.group_by not in labels.columns:
        close, names = close_attribute(labels, args.group_by)
        log.warning(
            "evaluate: evaluate_args.group_by %r is not an attribute of the labels (%s): no polygon scores by group",
            args.group_by, f"did you mean {close!r}?" if close else "they have " + (", ".join(names) or "none"),
        )  # fmt: skip
    total = MatchCounts()
    truth_csv: dict[str, list] = {}
    pred_csv: dict[str, list] = {}
    in_crs: dict[str, tuple] = {}
    for truth_name, pred_name in pairs:
        row = rows.get(truth_name)
        if row is None:
            continue
        if row.crs not in in_crs:  # each side once per CRS, with a spatial index
            t = labels.to_crs(row.crs) if labels.crs != row.crs else labels
            u = unknown.to_crs(row.crs) if len(unknown) and unknown.crs != row.crs else unknown
            p = predicted.to_crs(row.crs) if predicted.crs is not None and predicted.crs != row.crs else predicted
            in_crs[row.crs] = (t, u, p)
        t_all, u_all, p_all = in_crs[row.crs]
        chip = shapely.box(row.left, row.bottom, row.right, row.top)
        t_keep = at_least_m2(clip_to(t_all, chip), args.min_area_m2)
        p_keep = at_least_m2(clip_to(p_all[p_all["source"] == pred_name], chip), args.min_area_m2)
        p_keep = off_unknown(p_keep, clip_to(u_all, chip) if len(u_all) else u_all)
        counts, matched = match_polygons(list(t_keep.geometry), list(p_keep.geometry), args.iou_threshold)
        total.merge(counts)
        if errors is not None:
            errors.merge(polygon_errors(list(t_keep.geometry), list(p_keep.geometry), matched))
        if classes is not None and "class_id" in t_keep.columns and "class_id" in p_keep.columns:
            t_ids, p_ids = t_keep["class_id"].to_numpy(), p_keep["class_id"].to_numpy()
            classes.add_roofs([int(t_ids[t]) for t, _, _ in matched], [int(p_ids[p]) for _, p, _ in matched])
        if groups is not None and args.group_by in t_keep.columns:
            values = t_keep[args.group_by].astype(str).to_numpy()
            for value, counts in group_counts(list(t_keep.geometry), values, list(p_keep.geometry),
                                              args.iou_threshold).items():  # fmt: skip
                groups.setdefault(value, MatchCounts()).merge(counts)
        transform = from_bounds(row.left, row.bottom, row.right, row.top, row.width, row.height)
        stem = Path(truth_name).stem
        truth_csv[stem] = [(to_pixels(g, transform), 1.0) for g in t_keep.geometry]
        conf = p_keep["mean_probability"] if "mean_probability" in p_keep.columns else [1.0] * len(p_keep)
        pred_csv[stem] = [(to_pixels(g, transform), float(c)) for g, c in zip(p_keep.geometry, conf, strict=True)]
    out.mkdir(parents=True, exist_ok=True)
    write_spacenet_csv(out / "truth.csv", truth_csv)
    write_spacenet_csv(out / "predictions.csv", pred_csv)
    return total


def off_unknown(predicted, unknown):
    """The predicted polygons lying less than half on polygons of unknown class (mask_args.ignore):
    a roof of unknown material found is neither right nor wrong."""
    if not len(unknown) or not len(predicted):
        return predicted
    grey = shapely.union_all(unknown.geometry.to_numpy())
    geoms = predicted.geometry.to_numpy()
    covered = shapely.area(shapely.intersection(geoms, grey))
    return predicted[2 * covered < shapely.area(geoms)]


# --- pictures --------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    _plt().close(fig)
    return path


def plot_sweep(rows: list[dict[str, float]], used: float | None, path: Path, title: str) -> Path:
    """Precision, recall, F1 and IoU against the threshold, with the threshold used and the best one."""
    plt = _plt()
    table = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, style in (("precision", "-"), ("recall", "-"), ("f1", "-"), ("iou", ":")):
        ax.plot(table["threshold"], table[key], style, label=LABELS[key], lw=2 if key == "f1" else 1.4)
    best = table.loc[table["f1"].idxmax()]
    ax.axvline(
        best["threshold"],
        color="0.4",
        ls="--",
        lw=1,
        label=f"best F1 of the sweep {best['f1']:.3f} at {best['threshold']:.2f}",
    )
    if used is not None:
        ax.axvline(used, color="k", lw=1, label=f"threshold used {used:.2f}")
    ax.set(xlabel="threshold", ylabel="score", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    return _save(fig, path)


def plot_chips(
    picks: list[ChipScore], frames: Path, truth_masks: Path, pred_masks: Path, path: Path, title: str,
    stretch: tuple[list[float], list[float]] | None = None,
) -> Path:  # fmt: skip
    """Each chip's image with the truth (cyan) and predicted (magenta) roof outlines."""
    plt = _plt()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 4.4), squeeze=False)
    for ax, chip in zip(axes[0], picks, strict=True):
        truth, _ = read_mask(truth_masks / chip.name)
        pred, _ = read_mask(pred_masks / (chip.prediction or chip.name))
        if (frames / chip.name).is_file():
            image, profile = read_raster(frames / chip.name)
            low, high = stretch if stretch and len(stretch[0]) == image.shape[0] else (None, None)
            ax.imshow(rgb_preview(image, profile.get("nodata"), low, high))
        else:
            ax.imshow(np.zeros((*truth.shape, 3), np.uint8))
        # The truth drawn wider underneath: where the two agree, both colours show.
        for mask, colour, width in ((truth, "cyan", 2.6), (pred, "magenta", 1.1)):
            if mask.any() and not mask.all():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=colour, linewidths=width)
        s = chip.row()
        ax.set_title(
            f"{chip.name}: IoU {s['iou']:.2f}\nobjects {s['object_tp']} matched, {s['object_fp']} false, "
            f"{s['object_fn']} missed",
            fontsize=9,
        )
        ax.set_axis_off()
    handles = [Line2D([], [], color="cyan", label="truth"), Line2D([], [], color="magenta", label="prediction")]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 0.92))
    return _save(fig, path)


def plot_instances(
    picks: list[ChipScore], frames: Path, truth_masks: Path, pred_dir: Path, path: Path, title: str,
    stretch: tuple[list[float], list[float]] | None = None,
) -> Path | None:  # fmt: skip
    """Roofs as objects: each chip's image with every predicted roof (roofs.gpkg) outlined in its own colour
    and the true roofs white on a black halo beneath; None without roofs.gpkg."""
    import geopandas as gpd

    roofs_file = pred_dir / "roofs.gpkg"
    if not roofs_file.is_file() or not picks:
        return None
    roofs = gpd.read_file(roofs_file, engine="pyogrio")
    plt = _plt()
    colours = plt.get_cmap("tab10").colors  # (tab20's pale halves vanish on light roofs)
    fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 4.4), squeeze=False)
    for ax, chip in zip(axes[0], picks, strict=True):
        truth, _ = read_mask(truth_masks / chip.name)
        predicted = chip.prediction or chip.name
        if (frames / chip.name).is_file():
            image, profile = read_raster(frames / chip.name)
            low, high = stretch if stretch and len(stretch[0]) == image.shape[0] else (None, None)
            ax.imshow(rgb_preview(image, profile.get("nodata"), low, high))
            inverse = ~profile["transform"]
        else:
            ax.imshow(np.zeros((*truth.shape, 3), np.uint8))
            with open_raster(pred_dir / "masks" / predicted) as src:
                inverse = ~src.transform
        if truth.any() and not truth.all():  # white on a black halo: seen on light roofs and dark ground alike
            for colour, width in (("black", 3.6), ("white", 1.8)):
                ax.contour(truth.astype(np.float32), levels=[0.5], colors=colour, linewidths=width)
        mine = roofs[roofs["source"] == predicted]
        for k, geom in enumerate(mine.geometry):
            for part in getattr(geom, "geoms", [geom]):
                xs, ys = part.exterior.xy
                cols, rows = inverse * (np.asarray(xs), np.asarray(ys))
                ax.plot(cols - 0.5, rows - 0.5, color=colours[k % len(colours)], lw=1.4)
        ax.set_xlim(-0.5, truth.shape[1] - 0.5)
        ax.set_ylim(truth.shape[0] - 0.5, -0.5)
        ax.set_title(f"{chip.name}: {len(mine)} roofs predicted, {chip.truth_objects} true", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save(fig, path)


def plot_classes(
    picks: list[ChipScore], frames: Path, truth_masks: Path, pred_dir: Path, path: Path, title: str,
    stretch: tuple[list[float], list[float]] | None = None,
) -> Path | None:  # fmt: skip
    """A bundle trained on classes: each chip's image with its true classes above (unknown roofs grey) and the
    predicted ones (classes/) below, each class in its colour of the class rasters; None without chips."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if not picks:
        return None
    plt = _plt()
    names: tuple[str, ...] = ()
    fig, axes = plt.subplots(2, len(picks), figsize=(4 * len(picks), 8.8), squeeze=False, layout="constrained")
    for col, chip in enumerate(picks):
        bands, band_names, names, _ = read_mask_bands(truth_masks / chip.name)
        labels, known = mask_labels(bands, band_names, names, truth_masks / chip.name)
        kinds, _ = read_raster(pred_dir / "classes" / (chip.prediction or chip.name))
        colours = ListedColormap(class_colors(len(names)))
        image = None
        if (frames / chip.name).is_file():
            pixels, profile = read_raster(frames / chip.name)
            low, high = stretch if stretch and len(stretch[0]) == pixels.shape[0] else (None, None)
            image = rgb_preview(pixels, profile.get("nodata"), low, high)
        roofs = known & (labels > 0)
        right = int((roofs & (kinds[0] == labels)).sum())
        for row, (ids, shown) in enumerate(((labels, roofs), (kinds[0], kinds[0] > 0))):
            ax = axes[row, col]
            ax.imshow(image if image is not None else np.zeros((*labels.shape, 3), np.uint8))
            ax.imshow(np.ma.masked_where(~shown, ids), cmap=colours, vmin=-0.5, vmax=len(names) + 0.5,
                      alpha=0.45, interpolation="nearest")  # fmt: skip
            for k, colour in enumerate(class_colors(len(names))[1:], start=1):  # outlines in the class's own colour
                inside = shown & (ids == k)
                if inside.any() and not inside.all():
                    ax.contour(inside.astype(np.float32), levels=[0.5], colors=colour, linewidths=1.6)
            ax.set(xlim=(-0.5, ids.shape[1] - 0.5), ylim=(ids.shape[0] - 0.5, -0.5), aspect="equal")
            if row == 0 and (~known).any():
                ax.imshow(np.ma.masked_where(known, np.ones(labels.shape)), cmap="Greys", vmin=0, vmax=2, alpha=0.6,
                          interpolation="nearest")  # fmt: skip
            ax.set_axis_off()
        axes[0, col].set_title(f"{chip.name}: true classes", fontsize=9)
        axes[1, col].set_title(
            f"predicted: {share(right / roofs.sum()) if roofs.any() else '-'} of the true roof pixels right", fontsize=9
        )
    handles = [Patch(color=c, alpha=0.6, label=n) for n, c in zip(names, class_colors(len(names))[1:], strict=True)]
    handles.append(Patch(color="grey", alpha=0.6, label="roof of unknown class (true)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title)
    return _save(fig, path)


def best_and_worst(chips: list[ChipScore], n: int = SHOWN) -> tuple[list[ChipScore], list[ChipScore]]:
    """Chips with roofs (true or predicted), highest pixel IoU first, and lowest first; no chip in both."""
    scored = [c for c in chips if c.confusion.tp + c.confusion.fp + c.confusion.fn > 0]
    ranked = sorted(scored, key=lambda c: (-c.confusion.scores()["iou"], _natural(c.name)))
    k = min(n, max(1, len(ranked) // 2))
    best = ranked[:k]
    worst = [c for c in ranked[::-1] if c not in best][:k]
    return best, worst


# --- the stage -------------------------------------------------------------------------------


def used_threshold(settings: Settings, tree: DataTree, model: str) -> float | None:
    """The threshold predict applied: predict_args.threshold, else the bundle's tuned one (None if unknown)."""
    if settings.predict_args.threshold is not None:
        return settings.predict_args.threshold
    if (tree.bundle(model) / BUNDLE_JSON).is_file():
        return read_info(tree.bundle(model)).threshold
    return None


def applied_of(predicted: dict[str, Any]) -> dict[str, Any]:
    """What predict applied, from its record's summary: whether it found roofs as objects (instances), and then
    the seed threshold, the merge limit and the object filter's cut (or why it kept every object)."""
    summary = predicted.get("summary") or {}
    instances = bool((predicted.get("settings") or {}).get("predict_args.instances", True))
    out: dict[str, Any] = {"instances": instances}
    for key in ("seed_threshold", "merge", "object_filter"):
        if instances and key in summary:
            out[key] = summary[key]
    return out


def evaluate_model(
    settings: Settings,
    tree: DataTree,
    model: str,
    split: str | None = None,
    *,
    overwrite: bool = False,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Evaluate one model's predictions on a split; write its evaluation folder, the summary and the report
    (``overrides``: the command's --set items, which the report names where it judges models by them).

    Returns the metrics record written to metrics.json.
    """
    split = split or settings.evaluate_args.split
    if split != settings.evaluate_args.split:  # --split: the record and outputs are of that split
        settings = settings.model_copy(
            update={"evaluate_args": settings.evaluate_args.model_copy(update={"split": split})}
        )
    args = settings.evaluate_args
    pred_dir = tree.prediction_dir(model)
    out = evaluation_dir(tree, model, split)
    run = begin("evaluate", settings, tree, overwrite=overwrite, model=model)
    if run.skip:
        run.say_skip()
        return json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    fix = "run python split/split.py first"
    if split == "test" and settings.split_args.fractions.test == 0:
        fix = (
            "there is no test split: set split_args.fractions.test above 0 and rerun python split/split.py --overwrite"
        )
    truth = require(tree.split_masks(split), f"{split} masks folder", fix)
    require(pred_dir / "masks", f"{model} predictions", f"run python predict/predict.py --model {model}")
    predicted = read_record(spec_of("predict").record(settings, tree, model))
    if predicted is not None and Path(predicted.get("summary", {}).get("bundle", "")) == tree.bundle(model).resolve():
        refuse_leaky_bundle(settings, tree, model, split)  # whatever the predictions' input was
    if predicted is not None and predicted.get("state") == "complete":
        # Paired by chip, as predict recorded what each mask is of; never by file name alone.
        pairs = pair_by_chip(predicted["summary"]["outputs"], split, truth, tree.frames(split), tree)
    else:
        log.info(
            "evaluate: %s carries no record of its inputs: predictions paired with the truth by file name", pred_dir
        )
        pairs = matching_names(pred_dir / "masks", truth, tree.frames(split), tree)
    check_grids(pairs, pred_dir / "masks", truth)  # before the previous evaluation is removed
    if pairs:  # a bundle trained on classes against one-class masks, or the other way round: one line
        scored_classes(truth / pairs[0][0], pred_dir / "classes" / pairs[0][1])
    run.start()
    result = evaluate_folder(pred_dir, tree.frames(split), truth, args, tree, pairs)
    # The threshold predict applied, as it recorded it; else what settings and bundle say now.
    threshold = (predicted or {}).get("summary", {}).get("threshold", used_threshold(settings, tree, model))
    scored = [(c.name, c.prediction or c.name) for c in result.chips]
    groups: dict[Any, MatchCounts] = {}
    errors = PolygonErrors()
    polygons = polygon_scores(settings, tree, split, scored, pred_dir, out, groups if args.group_by else None,
                              result.classes, errors)  # fmt: skip
    extra: dict[str, Any] = {
        "object": result.objects.scores(),
        **(
            {"polygon": polygons.scores(), "polygon_errors": errors.scores(), "min_area_m2": args.min_area_m2}
            if polygons is not None
            else {}
        ),
        **(
            {"polygon_by": {"attribute": args.group_by, **{k: v.scores() for k, v in groups.items()}}} if groups else {}
        ),
        **({"classes": result.classes.record()} if result.classes is not None else {}),
        "chips": len(result.chips),
        "min_area": args.min_area,
        "iou_threshold": args.iou_threshold,
        "predictions": str(pred_dir),
        "truth": str(truth),
        # What the predictions were made with, where it is not the default (TTA, a threshold of one's own...):
        # the summary lists it beside the bundle's settings. Unknown without predict's record: left out.
        **({"predict_settings": settings_changes(predicted.get("settings") or {})} if predicted is not None else {}),
        # And what predict applied (its record's summary): the merge limit and object filter, or why none.
        **({"predict_applied": applied_of(predicted)} if predicted is not None else {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    if result.search is not None:
        rows = result.search.sweep()
        best_t, best_c = result.search.best()
        extra["best_threshold"] = {"threshold": best_t, "f1": best_c.scores()["f1"]}
        with atomic_path(out / "threshold_sweep.csv") as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g")
        plot_sweep(
            rows, threshold, out / "threshold_sweep.png", f"{model}, {split}: pixel scores against the threshold"
        )
    with atomic_path(out / "chips.csv") as tmp:
        result.table().to_csv(tmp, index=False, float_format="%.6g")
    if result.classes is not None:
        result.classes.write_csv(out / "confusion.csv")
        result.classes.plot(out / "confusion.png", f"{model}, {split}: classes of pixels and of the roofs found")
    stretch = None
    if (tree.bundle(model) / BUNDLE_JSON).is_file():
        norm = read_info(tree.bundle(model)).normalization
        stretch = (list(norm.low), list(norm.high))
    best, worst = best_and_worst(result.chips)
    for name, picks, what in (("best.png", best, "highest"), ("worst.png", worst, "lowest")):
        (out / name).unlink(missing_ok=True)
        if picks:
            plot_chips(picks, tree.frames(split), truth, pred_dir / "masks", out / name,
                       f"{model}, {split}: chips with the {what} pixel IoU", stretch)  # fmt: skip
    (out / "instances.png").unlink(missing_ok=True)
    crowded = sorted(result.chips, key=lambda c: (-c.truth_objects, _natural(c.name)))[:SHOWN]
    plot_instances([c for c in crowded if c.truth_objects], tree.frames(split), truth, pred_dir,
                   out / "instances.png", f"{model}, {split}: one outline per predicted roof (true roofs white on black)",
                   stretch)  # fmt: skip
    (out / "classes.png").unlink(missing_ok=True)
    if result.classes is not None:
        plot_classes([c for c in crowded if c.truth_objects], tree.frames(split), truth, pred_dir,
                     out / "classes.png", f"{model}, {split}: the class of each roof pixel, true and predicted",
                     stretch)  # fmt: skip
    record = metrics_record(model, split, threshold, result.confusion, **extra)
    write_metrics(out / "metrics.json", record)
    p, o = record["pixel"], record["object"]
    log.info(
        "evaluate: %s on %d %s chips: pixel IoU %.3f, F1 %.3f, precision %.3f, recall %.3f; "
        "objects F1 %.3f (%d matched, %d false, %d missed) -> %s",
        model, len(result.chips), split, p["iou"], p["f1"], p["precision"], p["recall"], o["f1"], o["tp"], o["fp"],
        o["fn"], out,
    )  # fmt: skip
    if result.classes is not None:
        accuracy, found = result.classes.roof_accuracy()
        per = result.classes.per_class()
        log.info("evaluate: %s classes, pixel IoU %s; material right for %.1f%% of the %d true roofs the polygon scores matched", model,
                 ", ".join(f"{n} {per[n]['iou']:.3f}" for n in result.classes.names), 100 * accuracy, found)  # fmt: skip
    if polygons is not None:
        g = polygons.scores()
        log.info("evaluate: %s polygons F1 %.3f (%d matched, %d false, %d missed); %s", model, g["f1"], g["tp"],
                 g["fp"], g["fn"], errors.line())  # fmt: skip
    for value, counts in groups.items():
        g = counts.scores()
        log.info("evaluate: %s roofs with %s %s: polygon F1 %.3f (%d matched, %d false, %d missed)",
                 model, args.group_by, value, g["f1"], g["tp"], g["fp"], g["fn"])  # fmt: skip
    run.finish(pixel_iou=p["iou"], object_f1=o["f1"], chips=len(result.chips))
    write_experiments_table(tree.results_root)
    report = write_report(settings, tree, overrides)
    log.info("evaluate: report %s", report)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    parser.add_argument(
        "--model",
        choices=KINDS,
        help="whose predictions to score (default: predict_args.bundle's kind, else training_args.model)",
    )
    parser.add_argument("--split", choices=("val", "test"), help="truth split (default: evaluate_args.split)")
    parser.add_argument(
        "--spacenet",
        nargs=2,
        type=Path,
        metavar=("TRUTH.csv", "PREDICTIONS.csv"),
        help="only score two SpaceNet CSVs (ImageId,BuildingId,PolygonWKT_Pix) against each other and print the "
        "scores (IoU evaluate_args.iou_threshold, polygons under evaluate_args.min_area pixels ignored)",
    )

    def body(args: argparse.Namespace, settings: Settings, tree: DataTree) -> None:
        if args.spacenet:
            a = settings.evaluate_args
            truth, predicted = (read_spacenet_csv(p) for p in args.spacenet)
            unshared = unshared_images(truth, predicted)
            if unshared:
                log.warning("evaluate: %s", unshared)
            log.info("evaluate: polygons under %g px ignored on both sides (evaluate_args.min_area; metrics.json's "
                     "polygon scores ignore those under evaluate_args.min_area_m2, %g m2)", a.min_area, a.min_area_m2)  # fmt: skip
            counts = score_spacenet(truth, predicted, a.iou_threshold, a.min_area)
            print(json.dumps(counts.scores()))
            return
        model = args.model or outside_kind(settings) or settings.training_args.model  # (predict's default too)
        evaluate_model(settings, tree, model, args.split, overwrite=args.overwrite, overrides=args.overrides)

    return cli.run(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
