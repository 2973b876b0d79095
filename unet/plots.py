"""Training curves and validation overlays: the pictures people look at before the numbers."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from core.files import atomic_path
from core.raster import read_raster, rgb_preview


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _curve_axes(axes, title: str) -> None:
    """Whole epochs on the x axes (two epochs showed 1.2, 1.4 ...) and the figure's title above the panels' own
    (over the middle one, it was)."""
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].figure.suptitle(title, y=1.03)


def plot_curves(history_csv: Path, path: Path) -> Path:
    """Loss, IoU and predicted-vs-true roof share per epoch, training and validation (and the class
    accuracy of a U-Net trained on classes)."""
    h = pd.read_csv(history_csv)
    epochs = h["epoch"] + 1
    panels_n = 4 if "class_accuracy" in h else 3
    fig, axes = plt.subplots(1, panels_n, figsize=(5 * panels_n, 4))
    panels = [
        ("loss", "loss", "Loss"),
        ("iou", "IoU (threshold 0.5)", "Pixel IoU, whole set"),
    ]
    for ax, (key, ylabel, title) in zip(axes, panels, strict=False):
        ax.plot(epochs, h[key], "o-", label="train")
        if f"val_{key}" in h:
            ax.plot(epochs, h[f"val_{key}"], "o-", label="validation")
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[2]
    if "val_pred_share" in h:
        ax.plot(epochs, 100 * h["val_pred_share"], "o-", label="predicted roof (validation)")
        ax.plot(epochs, 100 * h["val_true_share"], "--", label="true roof (validation)")
    ax.set(xlabel="epoch", ylabel="% of pixels", title="Roof share: a collapse shows here first")
    ax.grid(alpha=0.3)
    ax.legend()
    if "class_accuracy" in h:  # a U-Net trained on classes: its roofs' material, on the same epochs
        ax = axes[3]
        ax.plot(epochs, h["class_accuracy"], "o-", label="train")
        if "val_class_accuracy" in h:
            ax.plot(epochs, h["val_class_accuracy"], "o-", label="validation")
        ax.set(xlabel="epoch", ylabel="share of roof pixels", title="Material (class) accuracy on roofs")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    _curve_axes(axes, "U-Net training")
    return _save(fig, path)


def plot_member_curves(histories: list[tuple[str, Path]], path: Path) -> Path:
    """The members of a seed ensemble side by side: validation loss, validation IoU and training IoU per epoch,
    one line per member (``histories``: its label and history.csv), each member's best epoch marked."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [("val_loss", "loss", "Validation loss"), ("val_iou", "IoU (threshold 0.5)", "Validation pixel IoU"),
              ("iou", "IoU (threshold 0.5)", "Training pixel IoU")]  # fmt: skip
    for label, csv in histories:
        h = pd.read_csv(csv)
        epochs = h["epoch"] + 1
        best = int(h["val_iou"].idxmax())
        for ax, (key, _, _) in zip(axes, panels, strict=True):
            (line,) = ax.plot(epochs, h[key], "-", label=label)
            ax.plot(epochs[best], h[key][best], "o", color=line.get_color())
    for ax, (_, ylabel, title) in zip(axes, panels, strict=True):
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _curve_axes(axes, f"U-Net seed ensemble: {len(histories)} members (dots: each one's best validation epoch, kept)")
    return _save(fig, path)


#: True roofs in every overlay: cyan, over the image.
TRUTH_RGBA = (0.0, 1.0, 1.0, 0.55)


def draw_comparison(axes, rgb: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> None:
    """Three panels: the image; truth in cyan; hits green, false alarms magenta, misses yellow."""
    for ax in axes:
        ax.imshow(rgb)
        ax.set_axis_off()
    truth_rgba = np.zeros((*truth.shape, 4))
    truth_rgba[truth] = TRUTH_RGBA
    axes[1].imshow(truth_rgba)
    result = np.zeros((*truth.shape, 4))
    result[pred & truth] = (0, 1, 0, 0.6)
    result[pred & ~truth] = (1, 0, 1, 0.6)
    result[~pred & truth] = (1, 1, 0, 0.7)
    axes[2].imshow(result)


def probability_strip(rgb: np.ndarray, truth: np.ndarray, prob: np.ndarray, gap: int = 4) -> np.ndarray:
    """One (rows, 3 x cols + 2 x gap, 3) uint8 picture: the image; the true roofs in cyan over it; the
    predicted roof probability (magma: black 0, yellow 1). TensorBoard shows it as one image."""
    alpha = TRUTH_RGBA[3]
    image = rgb.astype(np.float32) / 255
    marked = image.copy()
    marked[truth] = (1 - alpha) * image[truth] + alpha * np.asarray(TRUTH_RGBA[:3], np.float32)
    colour = matplotlib.colormaps["magma"](np.clip(prob, 0, 1))[..., :3]
    white = np.ones((rgb.shape[0], gap, 3), np.float32)
    strip = np.concatenate([image, white, marked, white, colour], axis=1)
    return np.round(255 * strip).astype(np.uint8)


def plot_overlays(
    frames: list[Path], masks: list[Path], predictor, threshold: float, scores: list[float], path: Path, n: int = 3
) -> Path:
    """Image, truth and prediction for the best and worst validation chips with roofs, by IoU."""
    has_roof = []
    for m in masks:
        truth, _ = read_raster(m)
        has_roof.append(bool((truth > 0).any()))
    candidates = [i for i in range(len(frames)) if has_roof[i]] or list(range(len(frames)))
    ranked = sorted(candidates, key=lambda i: scores[i])
    picks = list(dict.fromkeys([*ranked[::-1][:n], *ranked[:n]]))
    norm = predictor.info.normalization
    fig, axes = plt.subplots(len(picks), 3, figsize=(10, 3.4 * len(picks)), squeeze=False)
    for row, i in enumerate(picks):
        image, profile = read_raster(frames[i])
        truth, _ = read_raster(masks[i])
        t = truth[0] > 0
        pred = predictor.predict(image[None])[0] >= threshold
        draw_comparison(axes[row], rgb_preview(image, profile.get("nodata"), norm.low, norm.high), t, pred)
        axes[row, 0].set_title(f"{frames[i].name}: IoU {scores[i]:.2f}", fontsize=10)
        axes[row, 1].set_title("truth (cyan)", fontsize=10)
        axes[row, 2].set_title("hit green, false magenta, missed yellow", fontsize=10)
    height = 3.4 * len(picks)
    fig.suptitle(f"Validation chips with roofs, best and worst by IoU (threshold {threshold:.2f})")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))  # keep the title clear of the first row
    return _save(fig, path)
