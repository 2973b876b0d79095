"""The classical models (scikit-learn): build them from settings, read probabilities, plot them.

- forest: ``RandomForestClassifier`` (ml_args.forest);
- regression: ``Pipeline(StandardScaler, LogisticRegression)`` (ml_args.regression): features
  are standardized so that the coefficients compare.

With classes (a class map's masks) both are multi-class models on labels 0 (background),
1..K: :func:`class_probabilities` gives P(0..K) in class-id order (0 for a class the training
pixels lacked), :func:`class_targets` the bands predict reads: P(roof) = 1 - P(background),
then P(k | roof) for k = 1..K. ``class_weight`` "balanced" weighs every class by the inverse
of its share of the training pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from core.files import atomic_path
from core.raster import class_colors
from core.settings import MlArgs

CLASSICAL = ("forest", "regression")

#: Bars shown in the importance / coefficient plot (the strongest ones).
TOP_FEATURES = 30


def build_model(kind: str, args: MlArgs) -> Any:
    """An unfitted model of ``kind`` (forest or regression) with the settings' hyper-parameters."""
    if kind == "forest":
        f = args.forest
        return RandomForestClassifier(
            n_estimators=f.n_estimators,
            max_depth=f.max_depth,
            min_samples_leaf=f.min_samples_leaf,
            class_weight=f.class_weight,
            n_jobs=f.n_jobs,
            random_state=args.seed,
        )
    if kind == "regression":
        r = args.regression
        return Pipeline(
            [
                ("scale", StandardScaler()),
                (
                    "model",
                    LogisticRegression(C=r.C, class_weight=r.class_weight, max_iter=r.max_iter, random_state=args.seed),
                ),
            ]
        )
    raise ValueError(f"unknown classical model {kind!r}: use one of {', '.join(CLASSICAL)}")


def roof_probability(model: Any, features: np.ndarray) -> np.ndarray:
    """P(roof) of each row of ``features`` (n, f) as float32."""
    classes = list(model.classes_)
    proba = model.predict_proba(features)
    return proba[:, classes.index(1)].astype(np.float32)


def class_probabilities(model: Any, features: np.ndarray, k: int) -> np.ndarray:
    """P(class id) of each row of ``features`` (n, f) as float64 (n, k + 1), columns in class-id order 0..k;
    a class the model never saw (absent from its training pixels) gets 0."""
    proba = model.predict_proba(features)
    ids = np.asarray(model.classes_).astype(np.int64)
    if proba.shape[1] == k + 1 and (ids == np.arange(k + 1)).all():
        return proba.astype(np.float64, copy=False)
    out = np.zeros((proba.shape[0], k + 1), np.float64)
    out[:, ids] = proba
    return out


def class_targets(proba: np.ndarray) -> np.ndarray:
    """P(0..K) (n, K + 1) -> float32 (n, 1 + K): P(roof) = 1 - P(background), then P(k | roof) for
    k = 1..K, which sum to 1 in every row (equal shares where no class has any probability)."""
    k = proba.shape[1] - 1
    out = np.empty((proba.shape[0], 1 + k), np.float32)
    out[:, 0] = np.clip(1.0 - proba[:, 0], 0.0, 1.0)
    classes = proba[:, 1:]
    total = classes.sum(axis=1, keepdims=True)
    some = total[:, 0] > 0
    out[some, 1:] = classes[some] / total[some]
    out[~some, 1:] = 1.0 / k
    return out


def regression_coefficients(model: Any) -> tuple[list[int], np.ndarray]:
    """The class ids (> 0) the regression saw and, for each, its coefficients (log-odds against background)."""
    coef = np.asarray(model.named_steps["model"].coef_)
    ids = [int(c) for c in model.classes_]
    if coef.shape[0] == 1:  # two classes: one row, the second class against the first
        return ids[1:], coef
    return ids[1:], coef[1:] - coef[:1]


def feature_weights(kind: str, model: Any) -> tuple[np.ndarray, str]:
    """Importances (forest) or standardized coefficients (regression; with classes, (classes, features)
    log-odds against background), and the axis label."""
    if kind == "forest":
        return np.asarray(model.feature_importances_), "impurity-based importance (sums to 1)"
    _, coef = regression_coefficients(model)
    if coef.shape[0] == 1:
        return coef.ravel(), "coefficient on the standardized feature (> 0: more roof-like)"
    return coef, "coefficient on the standardized feature: log-odds of the class against background"


def plot_weights(
    kind: str, model: Any, names: list[str], path: Path, top: int = TOP_FEATURES, classes: Sequence[str] = ()
) -> Path:
    """Horizontal bar chart of the strongest features, labelled by name, written atomically (a multi-class
    regression: a bar per class, ``classes`` naming ids 1..K)."""
    weights, _ = feature_weights(kind, model)
    if weights.ndim == 2:
        return _plot_class_coefficients(model, names, path, top, classes)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    weights, label = feature_weights(kind, model)
    order = np.argsort(-np.abs(weights))[:top][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(order) + 1.6), layout="constrained")
    colors = ["#d95f02" if weights[i] >= 0 else "#1b9e77" for i in order]
    ax.barh([names[i] for i in order], weights[order], color=colors)
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel(label)
    shown = (
        f"the {len(order)} strongest of {len(names)} features" if len(order) < len(names) else f"{len(names)} features"
    )
    title = "Random forest: feature importance" if kind == "forest" else "Logistic regression: coefficients"
    ax.set_title(f"{title} ({shown})")
    ax.tick_params(axis="y", labelsize=8)
    if kind == "regression":
        ax.legend(
            handles=[Patch(color="#d95f02", label="towards roof"), Patch(color="#1b9e77", label="towards background")],
            loc="lower right",
            fontsize=8,
        )
    fig.supxlabel(
        "band N: normalized band;  nd(bi, bj): normalized difference (bi - bj) / (bi + bj);  "
        "meanWxW / stdWxW bN: mean / std of band N in a W x W window",
        fontsize=7,
        color="0.3",
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def _plot_class_coefficients(model: Any, names: list[str], path: Path, top: int, classes: Sequence[str]) -> Path:
    """A multi-class regression's coefficients: per feature a bar per class (log-odds against background)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids, coef = regression_coefficients(model)
    colors = class_colors(max(ids))
    order = np.argsort(-np.abs(coef).max(axis=0))[:top][::-1]
    height = 0.8 / len(ids)
    fig, ax = plt.subplots(figsize=(8, 0.22 * len(order) * max(2, len(ids)) + 1.8), layout="constrained")
    for n, k in enumerate(ids):
        name = classes[k - 1] if k - 1 < len(classes) else f"class {k}"
        ax.barh(np.arange(len(order)) + (n - (len(ids) - 1) / 2) * height, coef[n, order], height=height,
                color=colors[k], label=name)  # fmt: skip
    ax.set_yticks(range(len(order)), [names[i] for i in order])
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel("coefficient on the standardized feature: log-odds of the class against background (> 0: towards it)")
    shown = f"the {len(order)} strongest of {len(names)}" if len(order) < len(names) else f"{len(names)}"
    ax.set_title(f"Logistic regression: coefficients per class ({shown} features)")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(loc="lower right", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
