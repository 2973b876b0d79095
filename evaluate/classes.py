"""Scores of a model trained on roof classes (mask_args.classes): per class, and per roof.

With a class map the truth masks hold a class band (0 background, 1, 2 ... the classes, 128
unknown) and predict writes classes/NAME.tif (the class of each roof pixel, each roof one
class). Evaluate then adds, beside the roof-or-not scores:

- a confusion matrix over the pixels of known class (rows: true class, background first;
  columns: predicted class), as confusion.csv and confusion.png (shares of each true class,
  counts written in);
- each class's pixel IoU, F1, precision and recall, read off the matrix;
- per-roof material accuracy: of the true roofs found (matched one to one at IoU >=
  evaluate_args.iou_threshold by the polygon scores), the share whose predicted roof has their
  class, and the per-roof confusion matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.errors import DataError
from core.files import atomic_path
from core.raster import UNKNOWN, mask_classes

#: The name of class id 0 in tables and pictures.
BACKGROUND = "background"


@dataclass
class ClassScores:
    """Pixel and roof confusion counts of the classes ``names`` (ids 1, 2 ...; 0 is background)."""

    names: tuple[str, ...]
    pixels: np.ndarray = field(default=None)  # (K + 1, K + 1): true class rows, predicted class columns
    roofs: np.ndarray = field(default=None)  # (K, K): true roof class rows, predicted roof class columns

    def __post_init__(self) -> None:
        k = len(self.names)
        if self.pixels is None:
            self.pixels = np.zeros((k + 1, k + 1), np.int64)
        if self.roofs is None:
            self.roofs = np.zeros((k, k), np.int64)

    @property
    def labels(self) -> list[str]:
        return [BACKGROUND, *self.names]

    def add_pixels(self, truth: np.ndarray, predicted: np.ndarray, where: np.ndarray) -> None:
        """Count the pixels ``where`` (valid, of known class) of a true class band and a predicted one."""
        n = len(self.names) + 1
        keep = where & (truth != UNKNOWN)
        t, p = truth[keep].astype(np.int64), predicted[keep].astype(np.int64)
        for side, ids in (("a truth mask", t), ("a predicted class raster", p)):
            if ids.size and ids.max() >= n:
                raise DataError(
                    f"{side} holds class id {int(ids.max())} but the classes are {list(self.names)} (ids 1..{n - 1}): "
                    "mask and predict again with one class map"
                )
        self.pixels += np.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def add_roofs(self, truth: list[int], predicted: list[int]) -> None:
        """Count found roofs: each true roof's class id and its predicted roof's."""
        for t, p in zip(truth, predicted, strict=True):
            if 1 <= t <= len(self.names) and 1 <= p <= len(self.names):
                self.roofs[t - 1, p - 1] += 1

    def per_class(self) -> dict[str, dict[str, float | int]]:
        """Each class's pixel IoU, F1, precision, recall and true pixels (background included)."""
        out = {}
        for k, name in enumerate(self.labels):
            tp = int(self.pixels[k, k])
            fp, fn = int(self.pixels[:, k].sum()) - tp, int(self.pixels[k].sum()) - tp
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            iou = tp / (tp + fp + fn) if tp + fp + fn else 0.0
            out[name] = {"iou": iou, "f1": f1, "precision": precision, "recall": recall, "pixels": tp + fn}
        return out

    def roof_accuracy(self) -> tuple[float, int]:
        """The share of found roofs given their true class, and how many roofs were found (0, 0 when none)."""
        found = int(self.roofs.sum())
        return (float(np.trace(self.roofs)) / found if found else 0.0), found

    def record(self) -> dict[str, Any]:
        """What metrics.json holds under "classes"."""
        accuracy, found = self.roof_accuracy()
        return {
            "names": list(self.names),
            "pixel": self.per_class(),
            "pixel_confusion": self.pixels.tolist(),
            "roof_accuracy": accuracy,
            "roofs_found": found,
            "roof_confusion": self.roofs.tolist(),
        }

    def write_csv(self, path: Path) -> Path:
        """The pixel confusion matrix: a row per true class, a column per predicted class."""
        table = pd.DataFrame(self.pixels, index=self.labels, columns=[f"predicted_{n}" for n in self.labels])
        table.index.name = "true"
        with atomic_path(path) as tmp:
            table.to_csv(tmp)
        return path

    def plot(self, path: Path, title: str) -> Path:
        """The pixel confusion matrix as shares of each true class (counts written in), and the roofs' one."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        accuracy, found = self.roof_accuracy()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), gridspec_kw={"width_ratios": [len(self.labels),
                                                                                     len(self.names)]})  # fmt: skip
        for ax, counts, names, what in (
            (axes[0], self.pixels, self.labels, "pixels"),
            (axes[1], self.roofs, list(self.names), f"found roofs ({found}; material right {share(accuracy)})"),
        ):
            shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
            ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
            for (r, c), n in np.ndenumerate(counts):
                colour = "white" if shares[r, c] > 0.6 else "black"
                ax.text(c, r, f"{share(shares[r, c])}\n{n:,}", ha="center", va="center", fontsize=8, color=colour)
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
            ax.set_yticks(range(len(names)), names)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(what, fontsize=10)
        fig.suptitle(title)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        return path


def share(x: float) -> str:
    """A share as a percentage that reads 0% or 100% only when it is exactly that: 0.996 is "99.6%",
    not "100%" (a confusion matrix with one roof wrong must not say all are right)."""
    for digits in range(4):
        text = f"{x:.{digits}%}"
        if not 0 < x < 1 or float(text[:-1]) not in (0.0, 100.0):
            return text
    return "<0.001%" if x < 0.5 else ">99.999%"


def scored_classes(truth_mask: Path, predicted_classes: Path) -> tuple[str, ...]:
    """The classes both sides hold (empty: a one-class evaluation); one line when they disagree: a bundle
    trained on classes scored against one-class masks, or the other way round, or other classes."""
    truth = mask_classes(truth_mask)
    predicted = mask_classes(predicted_classes) if predicted_classes.is_file() else ()
    if truth == predicted:
        return truth
    said = {True: "the classes {}", False: "one class"}
    t = said[bool(truth)].format(list(truth))
    p = said[bool(predicted)].format(list(predicted))
    raise DataError(
        f"the predictions are of a bundle trained on {p} but the truth masks ({truth_mask.parent}) hold {t}: "
        "predict with a bundle trained on the masks' classes (python train/train.py, then predict), or rerun "
        "python mask/mask.py with mask_args.classes as the bundle's"
    )
