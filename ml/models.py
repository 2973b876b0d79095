"""The classical models (scikit-learn): build them from settings, read probabilities, plot them.

- forest: ``RandomForestClassifier`` (ml_args.forest);
- regression: ``Pipeline(StandardScaler, LogisticRegression)`` (ml_args.regression): features
  are standardized so that the coefficients compare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from core.files import atomic_path
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


def feature_weights(kind: str, model: Any) -> tuple[np.ndarray, str]:
    """Importances (forest) or standardized coefficients (regression), and the axis label."""
    if kind == "forest":
        return np.asarray(model.feature_importances_), "impurity-based importance (sums to 1)"
    coef = np.asarray(model.named_steps["model"].coef_).ravel()
    return coef, "coefficient on the standardized feature (> 0: more roof-like)"


def plot_weights(kind: str, model: Any, names: list[str], path: Path, top: int = TOP_FEATURES) -> Path:
    """Horizontal bar chart of the strongest features, labelled by name, written atomically."""
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
