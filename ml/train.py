"""Train the random forest or the logistic regression; ``train/train.py --model forest|regression`` calls this.

1. Normalization from the training chips' band statistics (:func:`core.raster.band_statistics`).
2. Training pixels: with ml_args.source chips (default), drawn at random from the train
   chips — every roof pixel up to half of ml_args.max_train_pixels, background for the
   rest — with features computed on whole chips, so texture windows see real neighbours;
   with ml_args.source flat, drawn the same way from the flat table (bands and indices only).
3. Fit; save the bundle (model.skops + bundle.json) in a temporary folder and load it back
   through :func:`core.bundle.load_predictor`, the path predict takes; predict every valid
   pixel of the validation chips with it and tune the decision threshold there
   (:class:`core.metrics.ThresholdSearch`, best F1).
4. Write results/EXPERIMENT/KIND/: bundle/, metrics.json, settings.json and the feature
   importance (forest) or coefficient (regression) plot.

With classes (masks made with mask_args.classes; every train and val mask, and the flat
table's pixels.classes.json, must name the same ones) the labels are the class ids (0
background, 1..K) and both models are multi-class; the draw and the threshold stay those of
roof against background (P(roof) = 1 - P(background)); bundle.json lists the classes
(``classes``) and metrics.json adds the validation roof pixels' class confusion matrix and
material accuracy (at the argmax of P(k | roof)).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import cli
from core.bundle import BUNDLE_JSON, BundleInfo, Normalization, Predictor, load_predictor, new_bundle, write_info
from core.errors import DataError
from core.files import atomic_path
from core.index import chip_kind, split_pairs
from core.metrics import (
    ClassSample,
    ThresholdSearch,
    calibrate_classes,
    class_metrics,
    combine,
    metrics_record,
    validate_pairs,
    write_metrics,
)
from core.objects import train_object_filter
from core.raster import band_statistics, common_classes, read_labelled_pair, usable_pixels
from core.settings import Settings, dump_settings
from core.tree import DataTree, refuse_overwrite
from flatten.table import TableInfo, find_table, inspect_table, iter_chunks, iter_pixels, table_statistics
from ml.bundle import save_model
from ml.features import FeatureSpec, chip_features, pixel_features
from ml.models import CLASSICAL, build_model, plot_weights

log = logging.getLogger(__name__)

Pair = tuple[Path, Path]


@dataclass
class Sample:
    """Training pixels: features, labels (0/1, or class ids 0..K) and where each came from (chip index, row,
    col; -1 for a table)."""

    features: np.ndarray
    labels: np.ndarray
    chip: np.ndarray
    row: np.ndarray
    col: np.ndarray

    @property
    def roof(self) -> int:
        return int(np.count_nonzero(self.labels))


def keep_shares(roof: int, background: int, budget: int) -> tuple[float, float]:
    """Probabilities of drawing a roof and a background pixel: roof up to half the budget, background the rest."""
    n_roof = min(roof, budget // 2)
    n_background = min(background, budget - n_roof)
    return (n_roof / roof if roof else 0.0), (n_background / background if background else 0.0)


def _draw(roof: np.ndarray, valid: np.ndarray, shares: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    draw = rng.random(roof.shape)
    return valid & np.where(roof, draw < shares[0], draw < shares[1])


def _read_image_labels_valid(pair: Pair, nodata: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A chip, its labels (0 background, 1 roof or the class id) and its pixels to use (valid, class known)."""
    chw, labels, known, _, _ = read_labelled_pair(*pair)
    return chw, labels, usable_pixels(chw, nodata, known)


def sample_chips(pairs: list[Pair], normalization: Normalization, spec: FeatureSpec, budget: int, seed: int) -> Sample:
    """Draw training pixels from chips (see module doc); features from :func:`chip_features` on whole chips."""
    counts = []
    for pair in cli.progress(pairs, desc="count", unit="chip"):
        _, labels, valid = _read_image_labels_valid(pair, normalization.nodata)
        roof = labels > 0
        counts.append((int(np.count_nonzero(roof & valid)), int(np.count_nonzero(~roof & valid))))
    shares = keep_shares(sum(c[0] for c in counts), sum(c[1] for c in counts), budget)
    parts: list[tuple[np.ndarray, ...]] = []
    for i, pair in enumerate(cli.progress(pairs, desc="features", unit="chip")):
        chw, labels, valid = _read_image_labels_valid(pair, normalization.nodata)
        keep = _draw(labels > 0, valid, shares, np.random.default_rng([seed, i]))
        if not keep.any():
            continue
        rows, cols = np.nonzero(keep)
        feats = chip_features(chw, normalization, spec)
        parts.append((feats[rows, cols], labels[rows, cols].astype(np.uint8), np.full(rows.size, i), rows, cols))
    if not parts:
        return Sample(np.empty((0, spec.count), np.float32), *(np.empty(0, int) for _ in range(4)))
    return Sample(*(np.concatenate(p) for p in zip(*parts, strict=True)))


def sample_table(
    info: TableInfo, normalization: Normalization, spec: FeatureSpec, budget: int, seed: int, chunk_rows: int
) -> Sample:
    """Draw training pixels from a flat table; features from :func:`pixel_features` (no texture)."""
    if spec.texture_windows:
        raise DataError("texture features need neighbouring pixels, which a flat table does not hold")
    if not info.has_label:
        raise DataError(
            f"flat table {info.path} has no label column, so it cannot train a model: flatten chips with masks"
        )
    roof = total = 0
    for chunk in iter_chunks(info.path, chunk_rows, ["label"]):
        roof += int(np.count_nonzero(chunk["label"].to_numpy()))
        total += len(chunk)
    per_pixel = info.bands if info.layout == "long" else 1
    shares = keep_shares(roof // per_pixel, (total - roof) // per_pixel, budget)
    rng = np.random.default_rng(seed)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for values, labels in iter_pixels(info, chunk_rows):
        roofs = labels > 0
        keep = _draw(roofs, np.ones_like(roofs), shares, rng)
        if keep.any():
            chw = values[keep].T[:, :, np.newaxis]  # (bands, n, 1): a one-column image
            feats = pixel_features(normalization.apply(chw), spec)[:, 0, :]
            parts.append((feats, (labels[keep] if info.classes else roofs[keep]).astype(np.uint8)))
    features = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, spec.count), np.float32)
    labels = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.uint8)
    none = np.full(labels.size, -1)
    return Sample(features, labels, none, none, none)


def validate(predictor: Predictor, pairs: list[Pair], classes: ClassSample | None = None) -> ThresholdSearch:
    """Probabilities of every valid pixel of the validation chips, chip by chip, through ``predictor`` (and
    with ``classes`` its roof pixels' class probabilities gathered)."""
    return combine(validate_pairs(predictor, pairs, classes=classes))


def classes_of(pairs: list[Pair], table: TableInfo | None) -> tuple[str, ...]:
    """The class names of the masks (train and val) and of the flat table when it is the source; they must agree."""
    classes = common_classes([m for _, m in pairs])
    if table is not None and table.classes != classes:

        def say(names: tuple[str, ...]) -> str:
            return ",".join(names) if names else "one class"

        raise DataError(
            f"flat table {table.path} has classes {say(table.classes)} but mask {pairs[0][1]} {say(classes)}: "
            "rerun python flatten/flatten.py --overwrite"
        )
    return classes


def _check_classes(sample: Sample, source: str) -> None:
    n = sample.labels.size
    if n == 0:
        raise DataError(f"no training pixels in {source}: check the chips' nodata value and ml_args.max_train_pixels")
    if sample.roof in (0, n):
        only = "background" if sample.roof == 0 else "roof"
        raise DataError(
            f"the training pixels from {source} are all {only} ({n} pixels): a model needs roof and background; "
            "check the masks (python mask/mask.py) and split_args.keep_empty"
        )


def train_classical(kind: str, settings: Settings, tree: DataTree, *, overwrite: bool = False) -> Path:
    """Train ``kind`` (forest or regression) and write its results folder; return the bundle folder."""
    if kind not in CLASSICAL:
        raise ValueError(f"train_classical trains {', '.join(CLASSICAL)}, not {kind!r}")
    args = settings.ml_args
    out, bundle = tree.model_dir(kind), tree.bundle(kind)
    refuse_overwrite([bundle / BUNDLE_JSON], overwrite, f"train --model {kind}")
    train_pairs, val_pairs = split_pairs(tree, "train"), split_pairs(tree, "val")
    bands, dtype, nodata = chip_kind([p[0] for p in train_pairs + val_pairs], settings.bands)
    spec = FeatureSpec(bands=bands, indices=args.indices, texture_windows=tuple(args.texture_windows))
    method = settings.load_dataset_args.normalization

    if args.source == "chips":
        classes = classes_of(train_pairs + val_pairs, None)
        source = str(tree.frames("train"))
        normalization = Normalization.from_stats(band_statistics([p[0] for p in train_pairs]), method, nodata)
        sample = sample_chips(train_pairs, normalization, spec, args.max_train_pixels, args.seed)
    else:
        info = inspect_table(find_table(tree.flat, settings.flatten_args.format))
        source = str(info.path)
        if info.bands != bands:
            raise DataError(f"flat table {info.path} has {info.bands} bands, the chips {bands}: rerun flatten")
        if not info.has_label:
            raise DataError(f"flat table {info.path} has no label column, so it cannot train a model")
        classes = classes_of(train_pairs + val_pairs, info)
        # The table holds no nodata pixels; the chips' nodata value still marks them at predict time.
        stats, _ = table_statistics(info.path, settings.summarize_args.chunk_rows)
        normalization = Normalization.from_stats(stats.result()["all"], method, nodata)
        sample = sample_table(
            info, normalization, spec, args.max_train_pixels, args.seed, settings.summarize_args.chunk_rows
        )
    _check_classes(sample, source)
    per_class = np.bincount(sample.labels, minlength=len(classes) + 1)[1:].tolist() if classes else []
    log.info(
        "train %s: %d pixels (%.1f%% roof%s) x %d features from %s",
        kind,
        sample.labels.size,
        100 * sample.roof / sample.labels.size,
        "".join(f", {n} {name}" for name, n in zip(classes, per_class, strict=True)),
        spec.count,
        source,
    )
    absent = [name for name, n in zip(classes, per_class, strict=True) if n == 0]
    if absent:
        log.warning(
            "train %s: no training pixel of class %s: the model never predicts it (probability 0)",
            kind,
            ", ".join(absent),
        )

    model = build_model(kind, args)
    started = time.perf_counter()
    model.fit(sample.features, sample.labels)
    fit_seconds = time.perf_counter() - started
    log.info("train %s: fitted in %.1f s", kind, fit_seconds)

    with new_bundle(bundle) as tmp:
        save_model(model, tmp)
        info0 = BundleInfo(
            kind=kind,
            bands=bands,
            dtype=dtype,
            normalization=normalization,
            threshold=0.5,
            classes=list(classes),
            features=spec.to_dict(),
            settings=settings.model_dump(mode="json"),
        )
        write_info(tmp, info0)
        # Validation goes through the saved bundle, exactly as predict will load it.
        calibration = ClassSample(len(classes), len(val_pairs)) if classes else None
        predictor = load_predictor(tmp)
        search = validate(predictor, val_pairs, calibration)
        bias: list[float] = []
        if calibration is not None:
            bias, class_confusion, raw_confusion = calibrate_classes(calibration, per_class)
        threshold, confusion = search.best()
        entry, objects, why = train_object_filter(predictor, val_pairs, threshold, bias)
        log.info("train %s: %s", kind, why)
        write_info(tmp, dataclasses.replace(info0, threshold=threshold, class_bias=bias, object_filter=entry))

    total = confusion.tp + confusion.fp + confusion.fn + confusion.tn
    truth, predicted = (confusion.tp + confusion.fn) / max(total, 1), (confusion.tp + confusion.fp) / max(total, 1)
    if confusion.tp + confusion.fn == 0:
        log.warning("train %s: the validation chips hold no roof pixel: the threshold (0.5) was not tuned", kind)
    record = metrics_record(
        kind,
        "val",
        threshold,
        confusion,
        truth_share=truth,
        predicted_share=predicted,
        train_pixels=int(sample.labels.size),
        train_roof_pixels=sample.roof,
        train_seconds=round(fit_seconds, 3),
        object_filter=objects,
        **(class_metrics(classes, per_class, class_confusion, bias, raw_confusion) if classes else {}),
    )
    write_metrics(out / "metrics.json", record)
    plot_name = "feature_importance.png" if kind == "forest" else "coefficients.png"
    plot_weights(kind, model, spec.names(), out / plot_name, classes=classes)
    with atomic_path(out / "settings.json") as tmp_settings:
        tmp_settings.write_text(dump_settings(settings), encoding="utf-8")
    scores = record["pixel"]
    log.info(
        "train %s: validation IoU %.3f, F1 %.3f, precision %.3f, recall %.3f at threshold %.3f "
        "(%.2f%% of pixels called roof, %.2f%% are) -> %s",
        kind,
        scores["iou"],
        scores["f1"],
        scores["precision"],
        scores["recall"],
        threshold,
        100 * predicted,
        100 * truth,
        out,
    )
    if classes:
        recalls = ", ".join(f"{n} {'-' if r is None else format(r, '.3f')}" for n, r in record["class_recall"].items())
        accuracy = record["material_accuracy"]
        log.info(
            "train %s: validation material accuracy %s on the roof pixels (recall: %s)",
            kind,
            "-" if accuracy is None else f"{accuracy:.3f}",
            recalls,
        )
    return bundle
