"""Losses for a binary roof mask: bce, dice, bce_dice (default), focal, jaccard.

Dice and Jaccard are computed over every pixel of the batch together, never over the last
axis alone: keras-unet's ``jaccard_distance`` sums over the last axis, which is the size-1
channel axis of a one-class mask, so it degenerates to a per-pixel |y - p| that predicting
background everywhere wins — one cause of the original pipeline's blank masks.
"""

from __future__ import annotations

from collections.abc import Callable

from keras import ops

#: Added to numerator and denominator of Dice and Jaccard so an all-background batch is defined.
SMOOTH = 1.0
_EPS = 1e-7


def _flat(y_true, y_pred):
    y_true = ops.reshape(ops.cast(y_true, "float32"), (-1,))
    y_pred = ops.reshape(ops.cast(y_pred, "float32"), (-1,))
    return y_true, y_pred


def bce(y_true, y_pred):
    """Mean binary cross-entropy over every pixel of the batch."""
    t, p = _flat(y_true, y_pred)
    p = ops.clip(p, _EPS, 1.0 - _EPS)
    return -ops.mean(t * ops.log(p) + (1.0 - t) * ops.log(1.0 - p))


def dice(y_true, y_pred):
    """1 - soft Dice over the whole batch."""
    t, p = _flat(y_true, y_pred)
    inter = ops.sum(t * p)
    return 1.0 - (2.0 * inter + SMOOTH) / (ops.sum(t) + ops.sum(p) + SMOOTH)


def bce_dice(y_true, y_pred):
    """BCE + Dice: BCE keeps per-pixel gradients, Dice rewards overlap whatever the roof share."""
    return bce(y_true, y_pred) + dice(y_true, y_pred)


def focal(y_true, y_pred, alpha: float = 0.25, gamma: float = 2.0):
    """Focal loss (Lin et al. 2017): cross-entropy down-weighted on easy pixels."""
    t, p = _flat(y_true, y_pred)
    p = ops.clip(p, _EPS, 1.0 - _EPS)
    pt = t * p + (1.0 - t) * (1.0 - p)
    weight = t * alpha + (1.0 - t) * (1.0 - alpha)
    return -ops.mean(weight * (1.0 - pt) ** gamma * ops.log(pt))


def jaccard(y_true, y_pred):
    """1 - soft IoU over the whole batch."""
    t, p = _flat(y_true, y_pred)
    inter = ops.sum(t * p)
    return 1.0 - (inter + SMOOTH) / (ops.sum(t) + ops.sum(p) - inter + SMOOTH)


LOSSES: dict[str, Callable] = {"bce": bce, "dice": dice, "bce_dice": bce_dice, "focal": focal, "jaccard": jaccard}


def get_loss(name: str) -> Callable:
    """The loss named in training_args.loss."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: use one of {', '.join(LOSSES)}")
    return LOSSES[name]
