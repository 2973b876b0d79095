"""Bundles of the classical models: ``model.skops`` beside bundle.json, loaded without running code.

The model is saved with skops, not pickle: loading a pickle runs whatever code the file
names. :func:`load_model` asks skops which types in the file it does not trust by default and
accepts them only when every one is in :data:`ALLOWED_TYPES` (the scikit-learn and numpy types
the forest and the regression are made of); anything else is refused with a
:class:`~core.bundle.BundleError`. :func:`load` is what ``core.bundle.load_predictor`` calls
for kinds forest and regression.

A bundle trained on classes (``BundleInfo.classes``, names of ids 1..K) holds a multi-class
model: :meth:`ClassicalPredictor.forward` still gives P(roof) = 1 - P(background), and
:meth:`ClassicalPredictor.forward_targets` P(roof) then P(k | roof) for every class.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import skops.io as sio
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import Pipeline

from core.bundle import BundleError, BundleInfo
from core.errors import DataError
from core.files import atomic_path
from core.raster import valid_pixels
from ml.features import FeatureSpec, chip_features
from ml.models import class_probabilities, class_targets, roof_probability

MODEL_FILE = "model.skops"

#: Types skops does not trust by default that our models contain; nothing else is loaded.
ALLOWED_TYPES = frozenset(
    {
        "sklearn.tree._tree.Tree",
        "numpy.dtype",
        "numpy.float32",
        "numpy.float64",
        "numpy.int32",
        "numpy.int64",
        "numpy.uint8",
    }
)

#: The model class each kind must load as.
MODEL_TYPES = {"forest": RandomForestClassifier, "regression": Pipeline}

#: Pixels per predict_proba call: bounds memory on large windows.
PREDICT_ROWS = 1 << 18


def save_model(model: Any, folder: Path) -> Path:
    """Write ``model`` as ``folder/model.skops``, atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODEL_FILE
    with atomic_path(path) as tmp:
        sio.dump(model, tmp)
    return path


def load_model(path: Path, kind: str) -> Any:
    """Load a skops file, trusting only :data:`ALLOWED_TYPES`; a corrupt or foreign file is a BundleError."""
    if not path.is_file():
        raise BundleError(f"{path} not found: the bundle is incomplete; retrain (python train/train.py --model {kind})")
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as exc:
        raise BundleError(f"{path} is corrupt ({type(exc).__name__}: {exc}): retrain, or restore the bundle") from exc
    refused = sorted(set(untrusted) - ALLOWED_TYPES)
    if refused:
        raise BundleError(
            f"{path} contains types that are not part of a {kind} model ({', '.join(refused)}): refusing to load it; "
            "use a bundle train.py wrote"
        )
    try:
        model = sio.load(path, trusted=list(untrusted))
    except Exception as exc:  # skops raises many kinds on damaged content
        raise BundleError(f"{path} is corrupt ({type(exc).__name__}: {exc}): retrain, or restore the bundle") from exc
    expected = MODEL_TYPES[kind]
    if not isinstance(model, expected):
        raise BundleError(f"{path} holds a {type(model).__name__}, not the {expected.__name__} of a {kind} bundle")
    return model


class ClassicalPredictor:
    """A loaded forest or regression bundle: raw chips in, roof probabilities out."""

    def __init__(self, info: BundleInfo, model: Any) -> None:
        self.info = info
        self.model = model
        self.spec = FeatureSpec.from_dict(info.features)
        if self.spec.bands != info.bands:
            raise BundleError(f"bundle.json is inconsistent: features for {self.spec.bands} bands, bundle {info.bands}")
        n_model = getattr(model, "n_features_in_", self.spec.count)
        if n_model != self.spec.count:
            raise BundleError(f"the model expects {n_model} features but bundle.json describes {self.spec.count}")
        ids = [int(c) for c in getattr(model, "classes_", ())]
        k = len(info.classes)
        if k and (not ids or ids[0] != 0 or ids[-1] > k):
            raise BundleError(
                f"the {info.kind} model's classes are {ids} but bundle.json names background and {k} classes "
                f"({', '.join(info.classes)}): retrain, or restore the bundle"
            )

    def _check(self, chips: np.ndarray) -> None:
        if chips.ndim != 4:
            raise DataError(f"predict expects chips as (n, bands, rows, cols), got shape {chips.shape}")
        if chips.shape[1] != self.info.bands:
            raise DataError(
                f"the imagery has {chips.shape[1]} bands but the {self.info.kind} bundle was trained on "
                f"{self.info.bands}: predict imagery of the same sensor and bands, or retrain on it"
            )

    def features(self, chw: np.ndarray) -> np.ndarray:
        """Raw (bands, rows, cols) -> (rows, cols, features): exactly what training computed."""
        self._check(chw[np.newaxis])
        return chip_features(chw, self.info.normalization, self.spec)

    def predict(self, chips: np.ndarray) -> np.ndarray:
        """Raw (n, bands, rows, cols) pixels -> (n, rows, cols) float32 roof probabilities (0 on nodata)."""
        return self.forward(self.prepare(chips))

    def prepare(self, chips: np.ndarray) -> np.ndarray:
        """The chips, checked (features are computed in :meth:`forward`, chip by chip, to bound memory)."""
        self._check(chips)
        return chips

    def forward(self, chips: np.ndarray) -> np.ndarray:
        """Roof probabilities (n, rows, cols) of checked chips (see :meth:`prepare`); with classes
        P(roof) = 1 - P(background)."""
        if self.info.classes:
            return self.forward_targets(chips)[:, 0]
        n, _, rows, cols = chips.shape
        out = np.zeros((n, rows, cols), np.float32)
        for i, chw in enumerate(chips):
            flat = self.features(chw).reshape(rows * cols, -1)
            prob = out[i].reshape(-1)
            for start in range(0, flat.shape[0], PREDICT_ROWS):
                prob[start : start + PREDICT_ROWS] = roof_probability(self.model, flat[start : start + PREDICT_ROWS])
            if self.info.normalization.nodata is not None:
                out[i][~valid_pixels(chw, self.info.normalization.nodata)] = 0.0
        return out

    def forward_targets(self, chips: np.ndarray) -> np.ndarray:
        """Every output band (n, 1 + K, rows, cols) float32 of checked chips: P(roof), then P(k | roof) for
        the K classes (summing to 1 at every pixel; 1 / K each on nodata, where P(roof) is 0). A one-class
        bundle: :meth:`forward` as (n, 1, rows, cols)."""
        k = len(self.info.classes)
        if not k:
            return self.forward(chips)[:, np.newaxis]
        n, _, rows, cols = chips.shape
        out = np.zeros((n, 1 + k, rows, cols), np.float32)
        for i, chw in enumerate(chips):
            flat = self.features(chw).reshape(rows * cols, -1)
            bands = out[i].reshape(1 + k, -1)
            for start in range(0, flat.shape[0], PREDICT_ROWS):
                proba = class_probabilities(self.model, flat[start : start + PREDICT_ROWS], k)
                bands[:, start : start + PREDICT_ROWS] = class_targets(proba).T
            if self.info.normalization.nodata is not None:
                nodata = ~valid_pixels(chw, self.info.normalization.nodata)
                out[i, 0][nodata] = 0.0
                out[i, 1:, nodata] = 1.0 / k
        return out


def load(folder: Path, info: BundleInfo) -> ClassicalPredictor:
    """The predictor of a forest or regression bundle (called by ``core.bundle.load_predictor``)."""
    return ClassicalPredictor(info, load_model(Path(folder) / MODEL_FILE, info.kind))
