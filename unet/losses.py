"""Losses for a binary roof mask: bce, dice, bce_dice (default), focal, jaccard; TargetLoss weighs them
over the mask's bands (footprint, boundary, contact) and, with a class map, over each class's band (is
this pixel a roof of that class?), and leaves pixels of unknown class out.

Dice and Jaccard are computed over every pixel of the batch together, never over the last
axis alone: keras-unet's ``jaccard_distance`` sums over the last axis, which is the size-1
channel axis of a one-class mask, so it degenerates to a per-pixel |y - p| that predicting
background everywhere wins — one cause of the original pipeline's blank masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
from keras import ops

#: Added to numerator and denominator of Dice and Jaccard so an all-background batch is defined.
SMOOTH = 1.0
_EPS = 1e-7


def _flat(y_true, y_pred, weight=None):
    y_true = ops.reshape(ops.cast(y_true, "float32"), (-1,))
    y_pred = ops.reshape(ops.cast(y_pred, "float32"), (-1,))
    weight = ops.ones_like(y_true) if weight is None else ops.reshape(ops.cast(weight, "float32"), (-1,))
    return y_true, y_pred, weight


def _mean(values, weight):
    return ops.sum(values * weight) / ops.maximum(ops.sum(weight), 1.0)


def bce(y_true, y_pred, weight=None):
    """Mean binary cross-entropy over every pixel of the batch (of weight 1; weight 0 pixels do not count)."""
    t, p, w = _flat(y_true, y_pred, weight)
    p = ops.clip(p, _EPS, 1.0 - _EPS)
    return -_mean(t * ops.log(p) + (1.0 - t) * ops.log(1.0 - p), w)


def dice(y_true, y_pred, weight=None):
    """1 - soft Dice over the whole batch."""
    t, p, w = _flat(y_true, y_pred, weight)
    t, p = t * w, p * w
    inter = ops.sum(t * p)
    return 1.0 - (2.0 * inter + SMOOTH) / (ops.sum(t) + ops.sum(p) + SMOOTH)


def bce_dice(y_true, y_pred, weight=None):
    """BCE + Dice: BCE keeps per-pixel gradients, Dice rewards overlap whatever the roof share."""
    return bce(y_true, y_pred, weight) + dice(y_true, y_pred, weight)


def focal(y_true, y_pred, weight=None, alpha: float = 0.25, gamma: float = 2.0):
    """Focal loss (Lin et al. 2017): cross-entropy down-weighted on easy pixels."""
    t, p, w = _flat(y_true, y_pred, weight)
    p = ops.clip(p, _EPS, 1.0 - _EPS)
    pt = t * p + (1.0 - t) * (1.0 - p)
    balance = t * alpha + (1.0 - t) * (1.0 - alpha)
    return -_mean(balance * (1.0 - pt) ** gamma * ops.log(pt), w)


def jaccard(y_true, y_pred, weight=None):
    """1 - soft IoU over the whole batch."""
    t, p, w = _flat(y_true, y_pred, weight)
    t, p = t * w, p * w
    inter = ops.sum(t * p)
    return 1.0 - (inter + SMOOTH) / (ops.sum(t) + ops.sum(p) - inter + SMOOTH)


LOSSES: dict[str, Callable] = {"bce": bce, "dice": dice, "bce_dice": bce_dice, "focal": focal, "jaccard": jaccard}


def get_loss(name: str) -> Callable:
    """The loss named in training_args.loss."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: use one of {', '.join(LOSSES)}")
    return LOSSES[name]


@keras.saving.register_keras_serializable(package="roof_classify")
class TargetLoss(keras.losses.Loss):
    """The loss of every target band, weighted, over the pixels of known class; with classes, each class's
    band too, over the same pixels.

    ``y_true`` holds the target bands (footprint, boundary, contact ...), then one channel per class
    (1 on the roofs of that class), and last the known channel (1 = known, 0 = unknown class or nothing
    to learn); ``y_pred`` the network's target bands and class bands (sigmoids) in the same order. Each
    band's loss is ``base`` (training_args.loss) over the known pixels of the whole batch: each target
    band's times its weight (training_args.target_weights), each of the ``classes`` class bands' times
    ``class_weight``. A class band is learnt as the one-class footprint is (is this pixel a roof of
    that class?), over background and roofs of every class alike, so a rare class's Dice counts as
    much as a common one's.
    """

    def __init__(self, base: str = "bce_dice", weights: Sequence[float] = (1.0,), name: str = "target_loss",
                 classes: int = 0, class_weight: float = 1.0, **kwargs) -> None:  # fmt: skip
        super().__init__(name=name, **kwargs)
        self.base, self.weights = base, [float(w) for w in weights]
        self.classes, self.class_weight = int(classes), float(class_weight)
        self._loss = get_loss(base)

    def call(self, y_true, y_pred):
        known = y_true[..., -1]
        total = 0.0
        for band, weight in enumerate([*self.weights, *[self.class_weight] * self.classes]):
            if weight > 0:
                total = total + weight * self._loss(y_true[..., band], y_pred[..., band], known)
        return total

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "base": self.base,
            "weights": self.weights,
            "classes": self.classes,
            "class_weight": self.class_weight,
        }
