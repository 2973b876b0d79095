"""U-Net bundles: save model.keras + bundle.json, and load them as a predictor.

The predictor normalizes with the bundle's statistics, pads to the network's multiple
(reflect), predicts, and crops back: the same steps as training, in one place.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from core.bundle import BUNDLE_JSON, BundleError, BundleInfo, new_bundle, write_info
from core.errors import DataError
from core.raster import crop_to, pad_to_multiple
from unet import losses
from unet.metrics import CUSTOM_OBJECTS

MODEL_FILE = "model.keras"


class UNetPredictor:
    """Roof probabilities from raw pixels with a trained U-Net."""

    def __init__(self, model: keras.Model, info: BundleInfo, batch_size: int = 4) -> None:
        import tensorflow as tf

        self.model = model
        self.info = info
        self.batch_size = batch_size
        # One graph, traced once, for every batch and window size: faster than calling the
        # model eagerly or model.predict per batch (bench/bench_unet.py); inference-mode batch norm.
        self._forward = tf.function(
            lambda x: self.model(x, training=False),
            input_signature=[tf.TensorSpec([None, None, None, info.bands], tf.float32)],
        )

    def prepare(self, chips: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """Raw (n, bands, rows, cols) -> normalized, padded (n, rows', cols', bands) and the original size."""
        if chips.ndim != 4 or chips.shape[1] != self.info.bands:
            raise DataError(
                f"the bundle expects {self.info.bands} bands, got an array of shape {chips.shape} (n, bands, rows, cols)"
            )
        xs = [self.info.normalization.apply(c) for c in chips]
        padded = [pad_to_multiple(x, self.info.pad_multiple) for x in xs]
        return np.stack([p for p, _ in padded]), padded[0][1]

    def predict(self, chips: np.ndarray) -> np.ndarray:
        """Raw (n, bands, rows, cols) pixels -> (n, rows, cols) float32 roof (footprint) probabilities."""
        return self.forward(self.prepare(chips))

    def forward(self, prepared: tuple[np.ndarray, tuple[int, int]]) -> np.ndarray:
        """Roof probabilities (n, rows, cols) from :meth:`prepare`'s padded input and original size."""
        return self.forward_targets(prepared)[:, 0]

    def forward_targets(self, prepared: tuple[np.ndarray, tuple[int, int]]) -> np.ndarray:
        """Every output band (n, targets + classes, rows, cols): footprint, then boundary and contact when trained
        on them, then when trained on classes each class's probability of a roof of that class: the network's
        sigmoids, scaled to add up to 1 where they add up to more (a pixel is a roof of one class at most). Where
        they add up to less, the rest is the network's doubt that the pixel is a roof of any class: the object
        filter of each class reads it (a bundle of a softmax head, from before the sigmoids, adds up to 1)."""
        x, shape = prepared
        out = []
        for start in range(0, len(x), self.batch_size):
            out.append(np.asarray(self._forward(x[start : start + self.batch_size])))
        prob = np.stack([crop_to(p, shape) for p in np.concatenate(out)])  # (n, rows, cols, targets)
        if self.info.classes:  # (a softmax head of a bundle trained before the sigmoids already adds up to 1)
            k = len(self.info.classes)
            cls = prob[..., -k:]
            prob[..., -k:] = cls / np.maximum(cls.sum(-1, keepdims=True), 1.0)
        return np.ascontiguousarray(prob.transpose(0, 3, 1, 2), dtype=np.float32)


def save(folder: Path, model: keras.Model, info: BundleInfo) -> Path:
    """Write the bundle (model.keras and bundle.json) and swap it in whole (:func:`core.bundle.new_bundle`)."""
    with new_bundle(folder) as tmp:
        model.save(tmp / MODEL_FILE)
        write_info(tmp, info)
    return folder


def load_model(folder: Path) -> keras.Model:
    """The bundle's Keras model; a missing or corrupt file raises :class:`BundleError`."""
    path = Path(folder) / MODEL_FILE
    if not path.is_file():
        raise BundleError(
            f"{path} not found: the bundle is incomplete; retrain with python train/train.py --model unet"
        )
    try:
        return keras.models.load_model(path, custom_objects={**CUSTOM_OBJECTS, **losses.LOSSES}, compile=False)
    except Exception as exc:  # Keras raises many types for a corrupt archive
        raise BundleError(f"{path} cannot be loaded ({type(exc).__name__}: {exc}): retrain or restore it") from exc


def load(folder: Path, info: BundleInfo) -> UNetPredictor:
    """Load a U-Net bundle for prediction (called by core.bundle.load_predictor); its model must have one
    output band per target bundle.json names."""
    model = load_model(folder)
    outputs = model.output_shape[-1]
    names = [*info.targets, *info.classes]
    if outputs != len(names):
        raise BundleError(
            f"{Path(folder) / MODEL_FILE} has {outputs} output bands but {Path(folder) / BUNDLE_JSON} names "
            f"{len(names)} ({', '.join(names)}): the model and bundle.json are of different trainings; "
            "retrain with python train/train.py --model unet"
        )
    return UNetPredictor(model, info)
