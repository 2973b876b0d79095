"""TensorBoard logs of a U-Net training: scalars every epoch, validation chips as images every N.

``results/EXPERIMENT/unet/tensorboard/`` holds two runs, ``train/`` and ``validation/``, so
that each metric's training and validation curves share one chart; the learning rate and the
epoch's seconds are under ``train/``. The step is the epoch, counted from 1. Every
``training_args.tensorboard_images_every`` epochs a few validation chips with roofs appear as
images: the chip, its true roofs in cyan, and the predicted roof probability.

The logs of an epoch are written after its backup (unet/resume.py), so a resumed training
never logs an epoch twice: a run killed between the two only misses that epoch's point. A
resumed run appends new event files to the same folders, which TensorBoard reads as one run;
a fresh training (``--overwrite``, or a new training from a bundle) starts new logs.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from core.raster import read_mask, read_raster, rgb_preview

log = logging.getLogger(__name__)

#: The logs' folder in results/EXPERIMENT/unet/.
FOLDER = "tensorboard"

#: Validation chips shown as images, and how many masks are read at most to find chips with roofs.
SHOWN = 3
_LOOKED_AT = 100


def log_dir(out: Path) -> Path:
    """Where a training run in ``out`` (results/EXPERIMENT/unet/) writes its TensorBoard logs."""
    return Path(out) / FOLDER


def available() -> bool:
    """Whether the tensorboard package is installed (TensorFlow writes summaries only with it); logs why not."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        log.warning(
            "train: no TensorBoard logs: the tensorboard package is not installed (pip install -r requirements.txt, "
            "or set training_args.tensorboard false)"
        )
        return False
    return True


def remove(folder: Path) -> None:
    """A fresh training starts new logs (a training continued from a bundle counts its epochs from 1 again)."""
    shutil.rmtree(folder, ignore_errors=True)


def pick_chips(frames: list[Path], masks: list[Path], n: int = SHOWN) -> list[int]:
    """The first ``n`` validation chips with roof pixels (among the first few), else the first ``n``."""
    with_roofs = []
    for i, mask in enumerate(masks[:_LOOKED_AT]):
        if read_mask(mask)[0].any():
            with_roofs.append(i)
            if len(with_roofs) == n:
                break
    return with_roofs or list(range(min(n, len(frames))))


class RateInHistory(keras.callbacks.Callback):
    """Puts the optimizer's learning rate at the end of each epoch into the epoch's logs, so history.csv has
    the column for a schedule of the optimizer's own (cosine), as ReduceLROnPlateau adds it for its own.
    Put it before the CSVLogger."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class EpochLogs(keras.callbacks.Callback):
    """Writes the epoch's scalars (and every ``images_every`` epochs the validation images) to TensorBoard.

    Put it after the backup callback: its epoch is then logged once the backup holds it.

    Args:
        folder: the logs' folder (train/ and validation/ are made in it).
        predictor: a :class:`unet.bundle.UNetPredictor` over the model being trained.
        frames, masks: the validation chips shown as images (none: no images).
        images_every: epochs between images; 0 = never.
    """

    def __init__(self, folder: Path, predictor, frames: list[Path], masks: list[Path], images_every: int) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.predictor = predictor
        self.images_every = images_every
        self.samples = []
        if images_every:
            norm = predictor.info.normalization
            for frame, mask in zip(frames, masks, strict=True):
                image, profile = read_raster(frame)
                truth, _ = read_mask(mask)
                rgb = rgb_preview(image, profile.get("nodata"), norm.low, norm.high)
                self.samples.append((frame.name, image, truth, rgb))
        self._writers: dict = {}
        self._started = 0.0

    def _writer(self, run: str):
        import tensorflow as tf

        if run not in self._writers:
            self._writers[run] = tf.summary.create_file_writer(str(self.folder / run))
        return self._writers[run]

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        import tensorflow as tf

        step = epoch + 1
        seconds = time.perf_counter() - self._started
        scalars: dict[str, dict[str, float]] = {"train": {}, "validation": {}}
        for key, value in (logs or {}).items():
            if key == "learning_rate" or np.ndim(value) != 0:  # the rate is read from the optimizer below
                continue
            run, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            scalars[run][name] = float(value)
        scalars["train"]["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        scalars["train"]["epoch_seconds"] = seconds
        for run, values in scalars.items():
            with self._writer(run).as_default():
                for name, value in values.items():
                    tf.summary.scalar(name, value, step=step)
        if self.images_every and self.samples and step % self.images_every == 0:
            with self._writer("validation").as_default():
                for name, image, truth, rgb in self.samples:
                    tf.summary.image(f"chips/{name}", self.picture(image, truth, rgb)[np.newaxis], step=step)
        for writer in self._writers.values():
            writer.flush()  # a killed run keeps every epoch it logged

    def picture(self, image: np.ndarray, truth: np.ndarray, rgb: np.ndarray) -> np.ndarray:
        """The chip, its true roofs and the predicted roof probability side by side, as the model is now."""
        from unet.plots import probability_strip

        prob = self.predictor.predict(image[np.newaxis])[0]
        return probability_strip(rgb, truth, prob)

    def on_train_end(self, logs: dict | None = None) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's event files as ``{tag: [(step, value), ...]}`` in the order written (tests, benches)."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    number = float(tf.make_ndarray(value.tensor))
                    out.setdefault(value.tag, []).append((event.step, number))
    return out
