"""training_args.ensemble: the bundle averages the networks of the best epochs (unet/snapshots.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from core.settings import ModelArgs, OutputArgs, checkpoint_file, load_settings  # noqa: E402
from core.tree import DataTree  # noqa: E402
from unet import bundle as unet_bundle  # noqa: E402
from unet.model import build_model  # noqa: E402
from unet.snapshots import ENSEMBLE, BestEpochs, best_member, ensemble, size  # noqa: E402


def small_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return build_model(3, ModelArgs(filters=4, upconv_filters=4, num_layers=1, input_shape=(32, 32, 3)), OutputArgs())


def test_best_epochs_keeps_the_n_best_and_deletes_the_others_a_epoch_later(tmp_path: Path) -> None:
    best = BestEpochs(tmp_path / "snapshots", 3)
    best.set_model(small_model(0))
    scores = [0.1, 0.5, 0.3, 0.5, float("nan"), 0.2, 0.6, 0.4]
    on_disk = []
    for epoch, score in enumerate(scores):
        best.on_epoch_begin(epoch)
        best.on_epoch_end(epoch, {"val_iou": score})
        on_disk.append(sorted(p.name for p in (tmp_path / "snapshots").glob("*.h5")))
    assert best.kept == [[0.6, 7], [0.5, 2], [0.5, 4]]  # ties: the earlier epoch first; NaN never kept
    assert best.epochs() == [7, 2, 4]
    # Epoch 7 pushed epoch 3 out: its file stays until the next epoch begins (the backup of epoch 7 is written).
    assert on_disk[6] == [BestEpochs.name(e) for e in (2, 3, 4, 7)]
    assert on_disk[7] == [BestEpochs.name(e) for e in (2, 4, 7)]  # 0.4 at epoch 8 is not among the best
    assert [p.name for p in best.files()] == [BestEpochs.name(e) for e in (7, 2, 4)]

    fewer = BestEpochs(tmp_path / "snapshots", 2)  # restored from a backup of a run that kept 3
    fewer.kept = [list(pair) for pair in best.kept]
    assert fewer.epochs() == [7, 2] and [p.name for p in fewer.files()] == [BestEpochs.name(e) for e in (7, 2)]
    fewer.on_epoch_begin(8)
    assert sorted(p.name for p in (tmp_path / "snapshots").glob("*.h5")) == [BestEpochs.name(e) for e in (2, 7)]


def test_the_ensemble_averages_its_networks_and_survives_a_bundle(tmp_path: Path) -> None:
    files = []
    for seed in (1, 2, 3):
        files.append(tmp_path / f"w{seed}.weights.h5")
        small_model(seed).save_weights(files[-1])
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    outputs = []
    for path in files:
        net = small_model(0)
        net.load_weights(path)
        outputs.append(net.predict(x, verbose=0))

    model = ensemble(small_model(0), files)
    assert model.name == ENSEMBLE and size(model) == 3
    np.testing.assert_allclose(model.predict(x, verbose=0), np.mean(outputs, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(best_member(model).predict(x, verbose=0), outputs[0], rtol=1e-5, atol=1e-6)
    unet_bundle.save(tmp_path / "bundle", model, _info())
    loaded = unet_bundle.load_model(tmp_path / "bundle")
    assert size(loaded) == 3
    np.testing.assert_allclose(loaded.predict(x, verbose=0), np.mean(outputs, axis=0), rtol=1e-5, atol=1e-6)

    single = ensemble(small_model(0), files[:1])  # one epoch: the network itself
    assert size(single) == 1 and best_member(single) is single
    np.testing.assert_allclose(single.predict(x, verbose=0), outputs[0], rtol=1e-5, atol=1e-6)


def _info():
    from core.bundle import BundleInfo, Normalization

    return BundleInfo(
        kind="unet",
        bands=3,
        dtype="uint8",
        normalization=Normalization("zscore", (0.0,) * 3, (255.0,) * 3, (100.0,) * 3, (50.0,) * 3, None),
        threshold=0.5,
        pad_multiple=4,
    )


@pytest.mark.slow
def test_training_with_an_ensemble_bundles_the_best_epochs_and_continues_from_the_best(
    tmp_path: Path, settings_file: Path
) -> None:
    from tests.test_unet import TINY, tiny_tree
    from train.train import main
    from unet.train import train_unet

    tiny_tree(tmp_path / "data")
    overrides = [*TINY, "training_args.epochs=5", "training_args.patience=20", "training_args.ensemble=3",
                 f"data_root={tmp_path / 'data'}", f"training_args.results_folder={tmp_path / 'results'}",
                 "experiment=ens"]  # fmt: skip
    argv = ["--settings", str(settings_file), "--quiet", "--model", "unet"]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 0
    out = tmp_path / "results" / "ens" / "unet"
    with (out / "history.csv").open() as f:
        history = [(float(row["val_iou"]), int(row["epoch"]) + 1) for row in csv.DictReader(f)]
    top = [epoch for _, epoch in sorted(history, key=lambda pair: (-pair[0], pair[1]))[:3]]
    assert json.loads((out / "metrics.json").read_text())["ensemble"] == top
    model = unet_bundle.load_model(out / "bundle")
    assert size(model) == 3
    checkpoint = unet_bundle.load_model(out / "bundle")  # the same network with the best epoch's weights
    best_member(checkpoint).load_weights(out / checkpoint_file(load_settings(settings_file, overrides)))
    for a, b in zip(best_member(model).get_weights(), best_member(checkpoint).get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # the first network is the best epoch's
    # predict reads it as any bundle: the footprint is the mean of the three networks' footprints
    from core.bundle import load_predictor, read_info
    from core.raster import read_raster

    chip, _ = read_raster(sorted((tmp_path / "data" / "val_frames").glob("*.tif"))[0])
    prob = load_predictor(out / "bundle").predict(chip[np.newaxis])
    info = read_info(out / "bundle")
    assert info.features["ensemble"] == 3  # predict shares its GPU batch among them
    each = [unet_bundle.UNetPredictor(m, info).predict(chip[np.newaxis]) for m in model.layers[1:4]]
    assert prob.shape == (1, *chip.shape[1:]) and len({m.name for m in model.layers[1:4]}) == 3
    np.testing.assert_allclose(prob, np.mean(each, axis=0), rtol=1e-5, atol=1e-6)
    assert not (out / "backup").exists()  # the kept epochs' weights went with it

    settings = load_settings(settings_file, [*overrides, "experiment=continued", "training_args.ensemble=1",
                                             "training_args.epochs=1"])  # fmt: skip
    bundle = train_unet(settings, DataTree.from_settings(settings), from_bundle=out / "bundle")
    assert size(unet_bundle.load_model(bundle)) == 1  # the best epoch's network went on, alone


def test_the_backup_keeps_the_list_of_best_epochs(tmp_path: Path) -> None:
    from unet.resume import Backup

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x, y = np.random.default_rng(0).normal(size=(16, 4)), np.ones((16, 2))
    best = BestEpochs(tmp_path / "b" / "snapshots", 2, monitor="loss")
    model.fit(x, y, epochs=4, verbose=0, callbacks=[best, Backup(tmp_path / "b", [best], restore=False)])
    assert best.epochs() == [1, 2]  # the highest scores are kept: the loss falls every epoch
    again = BestEpochs(tmp_path / "b" / "snapshots", 2, monitor="loss")
    Backup(tmp_path / "b", [again], restore=True).on_train_begin()
    assert again.kept == best.kept and all(path.is_file() for path in again.files())
