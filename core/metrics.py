"""Pixel metrics from confusion counts, and the decision threshold that maximizes F1.

Every model and evaluate use these: scores come from counts accumulated over a whole split,
never from a mean of per-batch ratios (a smoothed per-batch IoU scores 1.0 on every batch
without roofs — how the original pipeline reported decent IoU while predicting nothing).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.files import atomic_path

#: Probability bins of :class:`ThresholdSearch`; thresholds are tried at bin edges.
BINS = 1000


@dataclass
class Confusion:
    """Pixel confusion counts of a binary roof mask."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, truth: np.ndarray, pred: np.ndarray, valid: np.ndarray | None = None) -> Confusion:
        """Accumulate counts of boolean ``truth`` vs ``pred`` (only where ``valid``); returns self."""
        t = np.asarray(truth, bool)
        p = np.asarray(pred, bool)
        if valid is not None:
            t, p = t[valid], p[valid]
        tp = int(np.count_nonzero(t & p))
        fp = int(np.count_nonzero(~t & p))
        fn = int(np.count_nonzero(t & ~p))
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.tn += int(t.size) - tp - fp - fn
        return self

    def merge(self, other: Confusion) -> Confusion:
        """Add another's counts (a chip's to a split's); returns self."""
        self.tp, self.fp, self.fn, self.tn = (
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            self.tn + other.tn,
        )
        return self

    def scores(self) -> dict[str, float | int]:
        """IoU, F1, precision, recall, accuracy (0 where undefined) and the counts."""
        return {**pixel_scores(self.tp, self.fp, self.fn, self.tn), **asdict(self)}


@dataclass
class MatchCounts:
    """Objects or polygons matched one to one: matched (tp), unmatched predicted (fp) and unmatched true (fn)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def merge(self, other: MatchCounts) -> MatchCounts:
        """Add another's counts (a chip's to a split's); returns self."""
        self.tp, self.fp, self.fn = self.tp + other.tp, self.fp + other.fp, self.fn + other.fn
        return self

    def scores(self) -> dict[str, float | int]:
        """Precision, recall and F1 (0 where undefined, as for pixels) and the counts."""
        s = pixel_scores(self.tp, self.fp, self.fn, 0)
        return {"precision": s["precision"], "recall": s["recall"], "f1": s["f1"], "tp": self.tp, "fp": self.fp,
                "fn": self.fn}  # fmt: skip


def object_ious(truth: np.ndarray, n_truth: int, pred: np.ndarray, n_pred: int) -> tuple[np.ndarray, ...]:
    """Every overlapping pair of objects of two label images: (truth label, predicted label, IoU) arrays."""
    both = (truth > 0) & (pred > 0)
    pairs = truth[both].astype(np.int64) * (n_pred + 1) + pred[both]
    codes, inter = np.unique(pairs, return_counts=True)
    t, p = codes // (n_pred + 1), codes % (n_pred + 1)
    area_t = np.bincount(truth.ravel(), minlength=n_truth + 1)
    area_p = np.bincount(pred.ravel(), minlength=n_pred + 1)
    return t, p, inter / (area_t[t] + area_p[p] - inter)


def match_labels(
    truth: np.ndarray, n_truth: int, pred: np.ndarray, n_pred: int, iou_threshold: float = 0.5
) -> MatchCounts:
    """SpaceNet object counts of two label images (1..n each): each predicted object, in raster order, takes the
    still unmatched true object with the highest IoU; a match at ``iou_threshold`` or above is a true positive
    and uses the true object up."""
    t, p, iou = object_ious(truth, n_truth, pred, n_pred)
    used: set[int] = set()
    decided: set[int] = set()
    tp = 0
    for i in np.lexsort((t, -iou, p)):  # by prediction, then highest IoU first
        if p[i] in decided or t[i] in used:
            continue
        decided.add(p[i])
        if iou[i] >= iou_threshold:
            used.add(t[i])
            tp += 1
    return MatchCounts(tp=tp, fp=n_pred - tp, fn=n_truth - tp)


def drop_unknown(labels: np.ndarray, n: int, known: np.ndarray) -> tuple[np.ndarray, int]:
    """The objects of a label image of which less than half lies on unknown pixels, renumbered 1..m."""
    from core.instances import keep_labels

    area = np.bincount(labels.ravel(), minlength=n + 1)
    unknown = np.bincount(labels[~known], minlength=n + 1)
    return keep_labels(labels, 2 * unknown < area)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def pixel_scores(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    """Scores of confusion counts; a score whose denominator is 0 is 0."""
    return {
        "iou": _ratio(tp, tp + fp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
    }


class ThresholdSearch:
    """Histograms of predicted probabilities per true class, accumulated over a split.

    :meth:`best` returns the threshold (a bin edge) that maximizes F1, from the counts
    alone: memory does not grow with the number of pixels.
    """

    def __init__(self, bins: int = BINS) -> None:
        self.bins = bins
        self.pos = np.zeros(bins, np.int64)
        self.neg = np.zeros(bins, np.int64)

    def add(self, truth: np.ndarray, prob: np.ndarray, valid: np.ndarray | None = None) -> None:
        t = np.asarray(truth, bool)
        p = np.asarray(prob, np.float64)
        if valid is not None:
            t, p = t[valid], p[valid]
        idx = np.clip((p * self.bins).astype(np.int64), 0, self.bins - 1)
        self.pos += np.bincount(idx[t], minlength=self.bins)
        self.neg += np.bincount(idx[~t], minlength=self.bins)

    def confusion_at(self, threshold: float) -> Confusion:
        """Counts if pixels with probability >= threshold (a bin edge) were called roofs."""
        k = round(threshold * self.bins)
        tp = int(self.pos[k:].sum())
        fp = int(self.neg[k:].sum())
        return Confusion(tp=tp, fp=fp, fn=int(self.pos.sum()) - tp, tn=int(self.neg.sum()) - fp)

    def best(self) -> tuple[float, Confusion]:
        """The threshold in (0, 1) maximizing F1, and the counts there (0.5 when there is no roof)."""
        if self.pos.sum() == 0:
            return 0.5, self.confusion_at(0.5)
        tp = np.cumsum(self.pos[::-1])[::-1]  # tp[k]: positives with bin >= k
        fp = np.cumsum(self.neg[::-1])[::-1]
        fn = self.pos.sum() - tp
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
        f1[0] = -1.0  # threshold 0 calls everything a roof
        k = int(np.argmax(f1))
        threshold = k / self.bins
        return threshold, self.confusion_at(threshold)

    def sweep(self, steps: int = 99) -> list[dict[str, float]]:
        """Precision, recall and F1 at evenly spaced thresholds (0.01 ... 0.99 by default)."""
        rows = []
        for i in range(1, steps + 1):
            t = i / (steps + 1)
            rows.append({"threshold": t, **self.confusion_at(t).scores()})
        return rows


def metrics_record(model: str, split: str, threshold: float, confusion: Confusion, **extra: Any) -> dict[str, Any]:
    """The metrics.json layout every model and evaluate write."""
    return {"model": model, "split": split, "threshold": threshold, "pixel": confusion.scores(), **extra}


def write_metrics(path: Path, record: dict[str, Any]) -> Path:
    """Write metrics.json atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def validate_pairs(
    predictor: Any,
    pairs: list[tuple[Path, Path]],
    desc: str = "validate",
    classes: ClassSample | None = None,
    tta: bool = False,
) -> list[ThresholdSearch]:
    """Each validation chip's probability histograms through ``predictor``, valid pixels only.

    The one threshold search every trainer uses: the sum of the chips' searches tunes the
    threshold; each chip's alone gives its score. Nodata pixels never count (the bundle's
    nodata value decides which they are, as at predict time), nor do pixels of unknown class.
    With ``classes`` (a bundle trained on classes) the same pass also gathers its roof pixels'
    classes and class probabilities there, to tune the class offsets with. With ``tta`` (and no
    ``classes``) the roof probabilities are averaged over the 8 flips and quarter turns, as
    predict_args.tta predicts (core.bundle.tta_forward).
    """
    from core.bundle import tta_forward
    from core.cli import progress
    from core.raster import read_labelled_pair, read_pair, usable_pixels

    nodata = predictor.info.normalization.nodata
    chips = []
    for frame, mask in progress(pairs, desc=desc, unit="chip"):
        if classes is None:
            chw, roof, known, _ = read_pair(frame, mask)
            prob = tta_forward(predictor, chw[np.newaxis])[0, 0] if tta else predictor.predict(chw[np.newaxis])[0]
        else:
            chw, labels, known, _, _ = read_labelled_pair(frame, mask)
            bands = predictor.forward_targets(predictor.prepare(chw[np.newaxis]))[0]
            roof, prob = labels > 0, bands[0]
        use = usable_pixels(chw, nodata, known)
        chip = ThresholdSearch()
        chip.add(roof, prob, use)
        chips.append(chip)
        if classes is not None:
            classes.add(labels, bands, use & roof)
    return chips


class ClassSample:
    """The true classes (0..K-1) and class probabilities (n, K) of validation roof pixels, at most
    :data:`CALIBRATION_PIXELS` of them (every n-th of each of ``chips`` chips): what the class offsets are
    tuned on (:func:`calibrate_classes`)."""

    def __init__(self, k: int, chips: int) -> None:
        self.k = k
        self.cap = max(1, CALIBRATION_PIXELS // max(chips, 1))  # pixels kept of each chip: memory stays bounded
        self._truth: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []

    def add(self, labels: np.ndarray, bands: np.ndarray, roof: np.ndarray) -> None:
        """One chip: its labels (class ids), the predictor's bands (the class bands last) and its roof pixels."""
        truth = labels[roof].astype(np.int64) - 1
        step = max(1, -(-truth.size // self.cap))  # every step-th roof pixel of the chip (a chip may have none)
        self._truth.append(truth[::step])
        self._probs.append(bands[-self.k :, roof].T[::step])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        truth = np.concatenate(self._truth) if self._truth else np.zeros(0, np.int64)
        probs = np.concatenate(self._probs) if self._probs else np.zeros((0, self.k), np.float32)
        return truth, probs


def tta_threshold(predictor: Any, pairs: list[tuple[Path, Path]]) -> tuple[float, Confusion]:
    """The F1-best threshold over the validation chips' roof probabilities averaged over the 8 flips and
    quarter turns (as predict_args.tta predicts), and the counts there: averaged probabilities are smoother,
    and their best threshold may lie elsewhere (on the Rio sample 0.38, against 0.05 for the plain ones)."""
    return combine(validate_pairs(predictor, pairs, desc="validate with TTA", tta=True)).best()


def combine(searches: list[ThresholdSearch]) -> ThresholdSearch:
    """One search over every chip's pixels."""
    total = ThresholdSearch()
    for search in searches:
        total.pos += search.pos
        total.neg += search.neg
    return total


#: Validation roof pixels the class offsets are tuned on, at most.
CALIBRATION_PIXELS = 1_000_000
#: The offsets tried for each class (log-probability units) and the sweeps over the classes.
_BIAS_GRID, _BIAS_SWEEPS = np.linspace(-2.0, 2.0, 41), 3


def shift_classes(probs: np.ndarray, bias: list[float] | np.ndarray, axis: int = 0) -> np.ndarray:
    """Class probabilities (classes along ``axis``) with per-class log offsets ``bias`` added, renormalised to
    the sum they had (1 for P(class | roof); a U-Net's sigmoid bands can add up to less): a shift of the
    classes' priors; the offsets :func:`tune_class_bias` finds make the decision fair to a class the network
    under-calls."""
    shape = [1] * probs.ndim
    shape[axis] = -1
    weighted = probs * np.exp(np.asarray(bias, np.float32)).reshape(shape)
    total = probs.sum(axis=axis, keepdims=True)
    return (weighted * (total / np.maximum(weighted.sum(axis=axis, keepdims=True), 1e-12))).astype(np.float32)


def tune_class_bias(truth: np.ndarray, probs: np.ndarray, learned: list[bool] | None = None) -> list[float]:
    """Per-class log offsets (the first class's 0) that maximise the mean recall of the classes (balanced
    accuracy) of argmax(log P(k | roof) + offset) over validation roof pixels: ``truth`` (n,) class index
    0..K-1, ``probs`` (n, K). A coordinate search over a grid of offsets in [-2, 2]; all zeros (the plain
    argmax) unless that is beaten. Classes ``learned`` says False keep 0."""
    k = probs.shape[1] if probs.ndim == 2 else 0
    bias = np.zeros(k)
    if k < 2 or truth.size == 0:
        return bias.tolist()
    logp = np.log(np.maximum(probs, 1e-7))
    counts = np.bincount(truth, minlength=k)
    present = counts > 0

    def balanced(b: np.ndarray) -> float:
        right = np.bincount(truth[np.argmax(logp + b, axis=1) == truth], minlength=k)
        return float(np.mean(right[present] / counts[present]))

    best = balanced(bias)
    for _ in range(_BIAS_SWEEPS):
        for c in range(1, k):
            if learned is not None and not learned[c]:
                continue
            for value in _BIAS_GRID:
                trial = bias.copy()
                trial[c] = value
                score = balanced(trial)
                if score > best + 1e-9:
                    best, bias = score, trial
    return [round(float(b), 3) for b in bias]


def calibrate_classes(
    sample: ClassSample, train_pixels: list[int] | None = None
) -> tuple[list[float], np.ndarray, np.ndarray]:
    """The class offsets tuned on a validation sample (:class:`ClassSample`, gathered by
    :func:`validate_pairs`), and the sample's class confusion matrices (K, K: rows the true class, columns
    the most probable one) with them and without. A class without training pixels keeps offset 0: the
    model never learned it, and no offset should make it appear."""
    k = sample.k
    truth, probs = sample.arrays()
    learned = [n > 0 for n in train_pixels] if train_pixels is not None else None
    bias = tune_class_bias(truth, probs, learned)

    def confusion(b: list[float] | None) -> np.ndarray:
        predicted = np.argmax(shift_classes(probs, b, axis=1) if b else probs, axis=1)
        return np.bincount(truth * k + predicted, minlength=k * k).reshape(k, k)

    return bias, confusion(bias), confusion(None)


def class_metrics(
    classes: tuple[str, ...], train_pixels: list[int], confusion: np.ndarray, bias: list[float] | None = None,
    raw: np.ndarray | None = None,
) -> dict:  # fmt: skip
    """metrics.json's class entries: the classes, their training pixels, and on the validation roof pixels the
    confusion matrix (rows truth, columns predicted), the material accuracy and each class's recall (with the
    class offsets ``bias`` when given, and the accuracy without them, ``raw``'s)."""
    truth = confusion.sum(axis=1)
    total = int(truth.sum())
    return {
        "classes": list(classes),
        "train_class_pixels": dict(zip(classes, train_pixels, strict=True)),
        "class_confusion": confusion.tolist(),
        "material_accuracy": float(np.trace(confusion) / total) if total else None,
        "class_recall": {
            name: float(confusion[k, k] / truth[k]) if truth[k] else None for k, name in enumerate(classes)
        },
        **({"class_bias": dict(zip(classes, bias, strict=True))} if bias is not None else {}),
        **(
            {"material_accuracy_uncalibrated": float(np.trace(raw) / total) if total else None}
            if raw is not None
            else {}
        ),
    }
