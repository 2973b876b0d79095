"""Resume an interrupted U-Net training from the end of its last finished epoch.

Keras's ``BackupAndRestore`` keeps the model's weights and the epoch only; a run continued
from them would restart the optimizer's moments, the learning-rate schedule and early
stopping. This backup holds all of it: at every epoch's end, ``backup/`` in the model's
results folder receives the weights, the optimizer's variables (iteration count and learning
rate included), and the state of the callbacks that count epochs (early stopping, the
learning-rate schedule, the best checkpoint's score, the collapse monitor). A rerun of the
same training restores it, says so in one line, and runs the remaining epochs; the history
file is continued. A finished training removes the backup; ``--overwrite`` starts over.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import keras
import numpy as np

from core.files import atomic_path

log = logging.getLogger(__name__)

WEIGHTS = "model.weights.h5"
OPTIMIZER = "optimizer.npz"
STATE = "state.json"

#: Attributes of each callback that carry over epochs, by class name.
_KEPT = {
    "EarlyStopping": ("wait", "best", "best_epoch"),
    "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
    "ModelCheckpoint": ("best",),
    "CollapseMonitor": ("bad_epochs",),
    "BestEpochs": ("kept",),
}


def backup_dir(out: Path) -> Path:
    """Where a training run in ``out`` (results/EXPERIMENT/unet/) keeps its backup."""
    return Path(out) / "backup"


def finished_epochs(folder: Path) -> int:
    """Epochs a backup holds (0 when there is none or it is incomplete)."""
    try:
        state = json.loads((Path(folder) / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    complete = all((Path(folder) / name).is_file() for name in (WEIGHTS, OPTIMIZER))
    return int(state.get("epochs", 0)) if complete else 0


def _callback_state(callbacks: list[keras.callbacks.Callback]) -> dict[str, dict[str, Any]]:
    state = {}
    for cb in callbacks:
        keys = _KEPT.get(type(cb).__name__)
        if keys:
            state[type(cb).__name__] = {k: _plain(getattr(cb, k, None)) for k in keys}
    return state


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


class Backup(keras.callbacks.Callback):
    """Writes the backup at every epoch's end and restores it at the start of training.

    Put it after the callbacks whose state it keeps: its ``on_train_begin`` runs after they have
    reset themselves, and overwrites what they reset with the saved state. (The TensorBoard logs,
    unet/logs.py, come after it: an epoch is logged once it is backed up.)
    """

    def __init__(self, folder: Path, callbacks: list[keras.callbacks.Callback], restore: bool) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.others = callbacks
        self.restore = restore

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not self.restore:
            return
        state = json.loads((self.folder / STATE).read_text(encoding="utf-8"))
        for cb in self.others:
            for key, value in state.get("callbacks", {}).get(type(cb).__name__, {}).items():
                setattr(cb, key, value)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / WEIGHTS) as tmp:
            self.model.save_weights(tmp.with_suffix(".weights.h5"))
            tmp.with_suffix(".weights.h5").replace(tmp)
        with atomic_path(self.folder / OPTIMIZER) as tmp, tmp.open("wb") as f:
            np.savez(f, *[np.asarray(v) for v in self.model.optimizer.variables])
        state = {"epochs": epoch + 1, "callbacks": _callback_state(self.others)}
        with atomic_path(self.folder / STATE) as tmp:
            tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")


def restore(model: keras.Model, folder: Path) -> int:
    """Load a backup's weights and optimizer variables into a compiled model; return its finished epochs."""
    model.load_weights(Path(folder) / WEIGHTS)
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    with np.load(Path(folder) / OPTIMIZER) as saved:
        values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if len(values) != len(optimizer.variables):
        raise ValueError(f"the backup has {len(values)} optimizer variables, the model {len(optimizer.variables)}")
    for variable, value in zip(optimizer.variables, values, strict=True):
        variable.assign(value)
    return finished_epochs(folder)


def remove(folder: Path) -> None:
    """A finished training needs no backup."""
    shutil.rmtree(folder, ignore_errors=True)
