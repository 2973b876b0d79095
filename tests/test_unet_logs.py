"""TensorBoard logs of a U-Net training: scalars every epoch, validation images every N epochs, a
resumed training continuing the logs without logging an epoch twice, --overwrite starting new ones,
and logs that are not results (removing them leaves the training done)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorboard")

from core.bundle import BundleInfo, Normalization  # noqa: E402
from core.settings import ModelArgs, OutputArgs, load_settings  # noqa: E402
from unet.bundle import UNetPredictor  # noqa: E402
from unet.logs import EpochLogs, read_scalars  # noqa: E402
from unet.model import build_model  # noqa: E402
from unet.plots import probability_strip  # noqa: E402


def chip(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A 3-band uint16 chip of noise with one bright roof, and its 0/255 mask."""
    image = rng.normal(400, 40, (3, size, size)).clip(1, 2047).astype(np.uint16)
    mask = np.zeros((size, size), np.uint8)
    r, c = rng.integers(2, size - 12, 2)
    image[:, r : r + 10, c : c + 10] = 1500
    mask[r : r + 10, c : c + 10] = 255
    return image, mask


def write_split(root: Path, make_geotiff, n_train: int = 8, n_val: int = 2) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            image, mask = chip(rng)
            make_geotiff(root / f"{split}_frames", f"{split}_{i}.tif", array=image)
            make_geotiff(root / f"{split}_masks", f"{split}_{i}.tif", array=mask, nodata=None)


def image_steps(folder: Path) -> dict[str, list[int]]:
    """Steps of every image summary in a run's event files, by tag."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[str, list[int]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "images":
                    out.setdefault(value.tag, []).append(event.step)
    return out


def test_probability_strip_shows_image_truth_and_probability_side_by_side() -> None:
    rgb = np.full((4, 5, 3), 100, np.uint8)
    truth = np.zeros((4, 5), bool)
    truth[0, 0] = True
    prob = np.zeros((4, 5), np.float32)
    prob[1, 1] = 1.0
    strip = probability_strip(rgb, truth, prob, gap=2)
    assert strip.shape == (4, 3 * 5 + 2 * 2, 3) and strip.dtype == np.uint8
    assert (strip[:, :5] == 100).all() and (strip[:, 5:7] == 255).all()
    marked = strip[:, 7:12]
    assert marked[0, 0, 0] < 100 < marked[0, 0, 2] and (marked[1:] == 100).all()  # cyan over the truth only
    colour = strip[:, 14:]
    assert (colour[0, 0] == [0, 0, 4]).all() and colour[1, 1].sum() > 600  # magma: black-ish 0, pale yellow 1


def test_epoch_logs_scalars_every_epoch_images_every_n_and_a_resumed_run_appends(tmp_path: Path, make_geotiff):
    rng = np.random.default_rng(1)
    frames, masks = [], []
    for i in range(2):
        image, mask = chip(rng)
        frames.append(make_geotiff(tmp_path / "f", f"val_{i}.tif", array=image))
        masks.append(make_geotiff(tmp_path / "m", f"val_{i}.tif", array=mask, nodata=None))
    m = ModelArgs(filters=4, upconv_filters=4, num_layers=1, input_shape=(32, 32, 3))
    info = BundleInfo(
        kind="unet",
        bands=3,
        dtype="uint16",
        normalization=Normalization("zscore", (0.0,) * 3, (2047.0,) * 3, (400.0,) * 3, (300.0,) * 3, 0),
        threshold=0.5,
        pad_multiple=4,
    )
    model = build_model(3, m, OutputArgs())
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    x = rng.random((4, 32, 32, 3)).astype(np.float32)
    y = (rng.random((4, 32, 32, 1)) > 0.5).astype(np.float32)
    folder = tmp_path / "tensorboard"

    def fit(first: int, last: int) -> None:
        logs = EpochLogs(folder, UNetPredictor(model, info), frames, masks, images_every=2)
        model.fit(x, y, validation_data=(x, y), epochs=last, initial_epoch=first, verbose=0, callbacks=[logs])

    fit(0, 3)
    fit(3, 5)  # resumed after epoch 3: new event files in the same folders
    train, validation = read_scalars(folder / "train"), read_scalars(folder / "validation")
    assert [step for step, _ in train["loss"]] == [1, 2, 3, 4, 5]
    assert [step for step, _ in validation["loss"]] == [1, 2, 3, 4, 5]
    assert [round(v, 6) for _, v in train["learning_rate"]] == [0.001] * 5
    assert set(train) == {"loss", "learning_rate", "epoch_seconds"}
    assert image_steps(folder / "validation") == {"chips/val_0.tif": [2, 4], "chips/val_1.tif": [2, 4]}
    assert image_steps(folder / "train") == {}


def tiny_training(tmp_path: Path, experiment: str, *more: str) -> list[str]:
    """Overrides of a U-Net trained in seconds on write_split's chips."""
    return [
        "load_dataset_args.channels=3", "model_args.input_shape=[32,32,3]", "model_args.filters=4",
        "model_args.upconv_filters=4", "model_args.num_layers=1", "load_dataset_args.batch_size=4",
        "training_args.steps_per_epoch=2", "training_args.verbose=0",
        f"training_args.results_folder={tmp_path / 'results'}", f"experiment={experiment}", *more,
    ]  # fmt: skip


def train_argv(settings_file: Path, overrides: list[str]) -> list[str]:
    argv = ["--settings", str(settings_file), "--quiet", "--model", "unet"]
    for item in overrides:
        argv += ["--set", item]
    return argv


@pytest.mark.slow
def test_training_writes_logs_overwrite_starts_new_ones_and_removing_them_keeps_it_done(
    tmp_path: Path, settings_file: Path, make_geotiff
) -> None:
    from core.tree import DataTree
    from train.train import main
    from workflow.contract import status

    write_split(tmp_path / "data", make_geotiff)
    overrides = tiny_training(tmp_path, "logs", "training_args.epochs=2", "training_args.tensorboard_images_every=1")
    argv = train_argv(settings_file, overrides)
    assert main(argv) == 0
    board = tmp_path / "results" / "logs" / "unet" / "tensorboard"
    scalars = read_scalars(board / "validation")
    assert {"loss", "iou", "f1", "pred_share", "true_share"} <= set(scalars)
    assert [step for step, _ in scalars["iou"]] == [1, 2]
    assert image_steps(board / "validation") == {"chips/val_0.tif": [1, 2], "chips/val_1.tif": [1, 2]}

    (board / "validation" / "old").write_text("a file of an earlier training")
    assert main([*argv, "--overwrite", "--set", "training_args.epochs=1"]) == 0
    assert not (board / "validation" / "old").exists()
    assert [step for step, _ in read_scalars(board / "train")["loss"]] == [1]

    import shutil

    shutil.rmtree(board)  # logs are not results: the training is still done, and a rerun skips
    settings = load_settings(settings_file, [*overrides, "training_args.epochs=1"])
    assert status("train", settings, DataTree.from_settings(settings), "unet").done
    # The log settings do not shape the bundle: changing them does not make it outdated.
    quiet = load_settings(settings_file, [*overrides, "training_args.epochs=1", "training_args.tensorboard=false"])
    assert status("train", quiet, DataTree.from_settings(quiet), "unet").done


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["plateau", "cosine"])
def test_the_learning_rate_follows_the_schedule_set(
    tmp_path: Path, settings_file: Path, make_geotiff, schedule: str
) -> None:
    from train.train import main

    write_split(tmp_path / "data", make_geotiff)
    overrides = tiny_training(
        tmp_path, "lr", "training_args.epochs=3", "training_args.patience=8", "training_args.learning_rate=0.002",
        f"training_args.lr_schedule={schedule}", "training_args.tensorboard_images_every=0",
    )  # fmt: skip
    assert main(train_argv(settings_file, overrides)) == 0
    rates = [
        v for _, v in read_scalars(tmp_path / "results" / "lr" / "unet" / "tensorboard" / "train")["learning_rate"]
    ]
    if schedule == "plateau":  # 3 epochs: too few for a plateau of patience 8 // 2 = 4 to halve it
        expected = [0.002] * 3
    else:  # after 2, 4 and 6 of the 6 batches: 0.002 * (0.01 + 0.99 * (1 + cos(pi * k / 3)) / 2)
        expected = [0.002 * (0.01 + 0.99 * (1 + math.cos(math.pi * k / 3)) / 2) for k in (1, 2, 3)]
    assert rates == pytest.approx(expected, rel=1e-5)
    assert rates[-1] == pytest.approx(0.00002 if schedule == "cosine" else 0.002, rel=1e-5)
    with open(tmp_path / "results" / "lr" / "unet" / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert [float(row["learning_rate"]) for row in history] == pytest.approx(expected, rel=1e-5)
