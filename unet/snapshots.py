"""A snapshot ensemble: the bundle averages the networks of the epochs with the best validation IoU.

``training_args.ensemble: N`` keeps, while training, the weights of the N epochs with the best
validation IoU (``BestEpochs``, in the backup folder, so an interrupted run resumes with them),
and the bundle's model is then one Keras model that runs each of them on the same input and
averages their output bands (``ensemble``): predict reads it as any other bundle, at N times
the cost. The members are float32 copies, as every bundle is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras

from unet.model import float32_copy

#: The name of an ensemble's model, and of its members (``snapshot_0`` is the best epoch).
ENSEMBLE = "snapshot_ensemble"
MEMBER = "snapshot_{}"


def snapshot_dir(backup: Path) -> Path:
    """Where the kept epochs' weights wait for the end of training: inside the backup, removed with it."""
    return Path(backup) / "snapshots"


class BestEpochs(keras.callbacks.Callback):
    """Keeps the weights of the ``n`` epochs with the best ``monitor`` in ``folder``.

    ``kept`` is ``[[score, epoch], ...]``, best first (ties: the earlier epoch first); the
    backup (unet/resume.py) saves and restores it. A file that leaves the list is deleted at
    the start of the next epoch, after the backup of this one is written: whenever training
    stops, the files the backup's list names exist.
    """

    def __init__(self, folder: Path, n: int, monitor: str = "val_iou") -> None:
        super().__init__()
        self.folder = Path(folder)
        self.n = n
        self.monitor = monitor
        self.kept: list[list[float]] = []

    @staticmethod
    def name(epoch: int) -> str:
        return f"epoch_{int(epoch):04d}.weights.h5"

    def files(self) -> list[Path]:
        """The kept epochs' weights, best first (at most ``n``: a restored list may be longer)."""
        return [self.folder / self.name(epoch) for _, epoch in self.kept[: self.n]]

    def epochs(self) -> list[int]:
        return [int(epoch) for _, epoch in self.kept[: self.n]]

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        keep = {path.name for path in self.files()}
        for path in self.folder.glob("epoch_*.weights.h5"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        score = (logs or {}).get(self.monitor)
        if score is None or score != score:  # missing or NaN: never among the best
            return
        score = float(score)
        del self.kept[self.n :]
        if len(self.kept) >= self.n and score <= self.kept[-1][0]:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model.save_weights(self.folder / self.name(epoch + 1))
        self.kept.append([score, epoch + 1])
        self.kept.sort(key=lambda pair: (-pair[0], pair[1]))
        del self.kept[self.n :]


def ensemble(model: keras.Model, files: list[Path]) -> keras.Model:
    """One model averaging the output bands of ``model``'s network with each of ``files``' weights.

    With one file it is that network alone (float32). ``model`` is left with the last file's weights.
    """
    members = []
    for i, path in enumerate(files):
        model.load_weights(path)
        members.append(float32_copy(model, MEMBER.format(i)))
    return _averaged(members)


def average(networks: list[keras.Model]) -> keras.Model:
    """One model running each of ``networks`` (float32 copies named snapshot_0, ...: the first is the one training
    continues from) on the same input and averaging their output bands; one network alone is its copy."""
    return _averaged([float32_copy(network, MEMBER.format(i)) for i, network in enumerate(networks)])


def _averaged(members: list[keras.Model]) -> keras.Model:
    """The ensemble of ``members`` (named float32 networks): one alone is itself."""
    if len(members) == 1:
        return members[0]
    x = keras.Input(shape=members[0].input_shape[1:], name="image")
    return keras.Model(x, keras.layers.Average(dtype="float32")([m(x) for m in members]), name=ENSEMBLE)


def size(model: keras.Model) -> int:
    """How many networks a bundle's model averages (1 for a plain network)."""
    return len(_members(model)) or 1


def best_member(model: keras.Model) -> keras.Model:
    """The network of the best epoch in an ensemble (the model itself otherwise): what training continues."""
    members = _members(model)
    return members[0] if members else model


def _members(model: keras.Model) -> list[Any]:
    if model.name != ENSEMBLE:
        return []
    return [layer for layer in model.layers if layer.name.startswith(MEMBER.format(""))]
