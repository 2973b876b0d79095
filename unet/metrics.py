"""Keras metrics accumulated from confusion counts over a whole epoch or validation set.

Each metric keeps true-positive, false-positive and false-negative counts (and the pixel
total) across batches and computes its score from the sums at the end — never a mean of
per-batch ratios, and no smoothing term that scores an all-background batch 1.0 (what let
keras-unet's ``iou`` report 0.12-0.20 while the original network predicted nothing).
``pred_share`` and ``true_share`` show the share of pixels predicted and truly roof, so a
collapse to all-background is visible from the first epoch. They score the footprint band;
pixels of unknown class (mask value 128) do not count.
"""

from __future__ import annotations

import keras
from keras import ops


class _Counts(keras.metrics.Metric):
    """Confusion counts at a fixed threshold, summed over every batch since the last reset."""

    def __init__(self, threshold: float = 0.5, name: str = "counts", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.threshold = threshold
        self.tp = self.add_variable(shape=(), initializer="zeros", name="tp", dtype="float64")
        self.fp = self.add_variable(shape=(), initializer="zeros", name="fp", dtype="float64")
        self.fn = self.add_variable(shape=(), initializer="zeros", name="fn", dtype="float64")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total", dtype="float64")

    def update_state(self, y_true, y_pred, sample_weight=None) -> None:
        # The footprint is band 0; y_true's extra last band, when it has one, marks the pixels of known class.
        known = y_true[..., -1] > 0.5 if y_true.shape[-1] == y_pred.shape[-1] + 1 else None
        t = ops.cast(y_true[..., 0], "float64") > 0.5
        p = ops.cast(y_pred[..., 0], "float64") >= self.threshold
        if known is not None:
            t, p = t & known, p & known
        self.tp.assign_add(ops.sum(ops.cast(t & p, "float64")))
        self.fp.assign_add(ops.sum(ops.cast(~t & p, "float64")))
        self.fn.assign_add(ops.sum(ops.cast(t & ~p, "float64")))
        total = ops.size(t) if known is None else ops.sum(ops.cast(known, "int64"))
        self.total.assign_add(ops.cast(total, "float64"))

    def get_config(self) -> dict:
        return {**super().get_config(), "threshold": self.threshold}

    @staticmethod
    def _div(num, den):
        return ops.where(den > 0, num / ops.maximum(den, 1.0), ops.zeros_like(num))


class IoU(_Counts):
    """tp / (tp + fp + fn) over all pixels seen."""

    def __init__(self, threshold: float = 0.5, name: str = "iou", **kwargs) -> None:
        super().__init__(threshold, name=name, **kwargs)

    def result(self):
        return self._div(self.tp, self.tp + self.fp + self.fn)


class F1(_Counts):
    """2tp / (2tp + fp + fn) over all pixels seen."""

    def __init__(self, threshold: float = 0.5, name: str = "f1", **kwargs) -> None:
        super().__init__(threshold, name=name, **kwargs)

    def result(self):
        return self._div(2 * self.tp, 2 * self.tp + self.fp + self.fn)


class Precision(_Counts):
    """tp / (tp + fp) over all pixels seen."""

    def __init__(self, threshold: float = 0.5, name: str = "precision", **kwargs) -> None:
        super().__init__(threshold, name=name, **kwargs)

    def result(self):
        return self._div(self.tp, self.tp + self.fp)


class Recall(_Counts):
    """tp / (tp + fn) over all pixels seen."""

    def __init__(self, threshold: float = 0.5, name: str = "recall", **kwargs) -> None:
        super().__init__(threshold, name=name, **kwargs)

    def result(self):
        return self._div(self.tp, self.tp + self.fn)


class PredShare(_Counts):
    """Share of pixels predicted as roof."""

    def __init__(self, threshold: float = 0.5, name: str = "pred_share", **kwargs) -> None:
        super().__init__(threshold, name=name, **kwargs)

    def result(self):
        return self._div(self.tp + self.fp, self.total)


class TrueShare(_Counts):
    """Share of pixels that truly are roof."""

    def __init__(self, threshold: float = 0.5, name: str = "true_share", **kwargs) -> None:
        super().__init__(threshold, name=name, **kwargs)

    def result(self):
        return self._div(self.tp + self.fn, self.total)


class ClassAccuracy(keras.metrics.Metric):
    """Share of the roof pixels of known class whose most probable class is their class (a class map's U-Net:
    its class channels start at ``first``; ``classes`` of them)."""

    def __init__(self, first: int = 1, classes: int = 2, name: str = "class_accuracy", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.first, self.classes = first, classes
        self.right = self.add_variable(shape=(), initializer="zeros", name="right", dtype="float64")
        self.seen = self.add_variable(shape=(), initializer="zeros", name="seen", dtype="float64")

    def update_state(self, y_true, y_pred, sample_weight=None) -> None:
        span = slice(self.first, self.first + self.classes)
        t, p = y_true[..., span], y_pred[..., span]
        roof = (ops.max(t, axis=-1) > 0.5) & (y_true[..., -1] > 0.5)
        same = ops.argmax(t, axis=-1) == ops.argmax(p, axis=-1)
        self.right.assign_add(ops.sum(ops.cast(same & roof, "float64")))
        self.seen.assign_add(ops.sum(ops.cast(roof, "float64")))

    def result(self):
        return ops.where(self.seen > 0, self.right / ops.maximum(self.seen, 1.0), ops.zeros_like(self.seen))

    def get_config(self) -> dict:
        return {**super().get_config(), "first": self.first, "classes": self.classes}


def training_metrics(threshold: float = 0.5, targets: int = 1, classes: int = 0) -> list[keras.metrics.Metric]:
    """The metrics every U-Net is compiled with (and the class accuracy of one trained on ``classes``)."""
    return [
        IoU(threshold),
        F1(threshold),
        Precision(threshold),
        Recall(threshold),
        PredShare(threshold),
        TrueShare(threshold),
        *([ClassAccuracy(targets, classes)] if classes else []),
    ]


CUSTOM_OBJECTS = {c.__name__: c for c in (IoU, F1, Precision, Recall, PredShare, TrueShare, ClassAccuracy)}
