"""The U-Net: model shapes, data generator contracts, losses and metrics against numpy,
training on a tiny scene, the bundle, and predict.py (sliding windows, georeferencing,
bad inputs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

keras = pytest.importorskip("keras")

from core.bundle import BundleError, BundleInfo, Normalization, load_predictor, read_info  # noqa: E402
from core.errors import DataError, PipelineError  # noqa: E402
from core.raster import (  # noqa: E402
    band_statistics,
    read_raster,
    window_starts,
)
from core.settings import LoadDatasetArgs, ModelArgs, OutputArgs, PredictArgs, load_settings  # noqa: E402
from core.tree import DataTree  # noqa: E402
from predict.predict import predict_all, predict_raster  # noqa: E402
from unet import losses  # noqa: E402
from unet.bundle import UNetPredictor  # noqa: E402
from unet.datagen import ChipSequence, augment, read_mask, turn_hue, warp  # noqa: E402
from unet.metrics import F1, IoU, Precision, PredShare, Recall, TrueShare  # noqa: E402
from unet.model import build_model, pad_multiple  # noqa: E402

CRS = "EPSG:32644"
TRANSFORM = Affine(0.5, 0.0, 600000.0, 0.0, -0.5, 2960000.0)


def write_tif(path: Path, array: np.ndarray, transform: Affine = TRANSFORM, nodata: float | None = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = array[None] if array.ndim == 2 else array
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype.name,
        crs=CRS,
        transform=transform,
        nodata=nodata,
    ) as dst:
        dst.write(data)
    return path


def scene_chip(rng: np.random.Generator, size: int = 64, roofs: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A 3-band uint16 chip: noisy ground and bright striped 'metal roofs'; and its 0/255 mask."""
    image = rng.normal(400, 40, (3, size, size)).clip(1, 2047)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(roofs):
        h, w = rng.integers(8, 16, 2)
        r, c = rng.integers(0, size - h), rng.integers(0, size - w)
        stripes = 150 * (np.arange(w) % 4 < 2)
        image[0, r : r + h, c : c + w] = 1500 + stripes
        image[1, r : r + h, c : c + w] = 1300 + stripes
        image[2, r : r + h, c : c + w] = 900
        mask[r : r + h, c : c + w] = 255
    # A darker building that is not a roof of interest: the network must not take every building.
    image[:, 2:8, 2:8] = 250
    return image.astype(np.uint16), mask


def tiny_tree(root: Path, n_train: int = 12, n_val: int = 4, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            image, mask = scene_chip(rng)
            write_tif(root / f"{split}_frames" / f"{split}_{i}.tif", image)
            write_tif(root / f"{split}_masks" / f"{split}_{i}.tif", mask, nodata=None)


TINY = [
    "load_dataset_args.channels=3",
    "model_args.input_shape=[64,64,3]",
    "model_args.filters=8",
    "model_args.upconv_filters=8",
    "model_args.num_layers=2",
    "load_dataset_args.batch_size=4",
    "training_args.epochs=12",
    "training_args.steps_per_epoch=3",  # every tiny chip once; null would train 20 batches per epoch
    "training_args.learning_rate=0.003",
    "training_args.verbose=0",
]


def tiny_overrides(root: Path) -> list[str]:
    """TINY, with the data tree, results and predictions under ``root`` (experiment tiny)."""
    return [
        *TINY,
        f"data_root={root / 'data'}",
        f"training_args.results_folder={root / 'results'}",
        f"predict_args.output={root / 'predictions'}",
        "experiment=tiny",
    ]


@pytest.fixture
def tiny(tmp_path: Path, settings_file: Path):
    tiny_tree(tmp_path / "data")
    overrides = tiny_overrides(tmp_path)
    settings = load_settings(settings_file, overrides)
    return settings, DataTree.from_settings(settings), settings_file, overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """One tiny U-Net trained through train.py's main, shared by the tests that need a bundle."""
    from train.train import main

    tmp = tmp_path_factory.mktemp("trained")
    tiny_tree(tmp / "data")
    settings_path = Path(__file__).resolve().parent.parent / "settings.json"
    overrides = tiny_overrides(tmp)
    argv = ["--settings", str(settings_path), "--quiet", "--model", "unet"]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 0
    settings = load_settings(settings_path, overrides)
    return settings, DataTree.from_settings(settings), argv


# --- model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [256, 650])
def test_model_output_shape_any_chip_size(side: int) -> None:
    m = ModelArgs(filters=4, upconv_filters=4, num_layers=2, input_shape=(side, side, 3))
    model = build_model(3, m, OutputArgs())
    assert pad_multiple(m) == 8  # satellite U-Net: num_layers + 1 poolings
    norm = Normalization("percentile", (0.0,) * 3, (100.0,) * 3, (0.0,) * 3, (1.0,) * 3, None)
    info = BundleInfo(kind="unet", bands=3, dtype="uint16", normalization=norm, threshold=0.5, pad_multiple=8)
    predictor = UNetPredictor(model, info)
    chips = np.random.default_rng(0).integers(0, 100, (1, 3, side, side)).astype(np.uint16)
    x, shape = predictor.prepare(chips)
    assert x.shape == (1, -(-side // 8) * 8, -(-side // 8) * 8, 3)
    assert shape == (side, side)
    prob = predictor.predict(chips)
    assert prob.shape == (1, side, side)
    assert prob.dtype == np.float32
    assert ((prob >= 0) & (prob <= 1)).all()


def test_custom_architecture_builds_without_banner(capsys: pytest.CaptureFixture[str]) -> None:
    m = ModelArgs(architecture="custom", filters=4, num_layers=2, input_shape=(64, 64, 3))
    model = build_model(3, m, OutputArgs())
    assert model.output_shape == (None, None, None, 1)
    assert pad_multiple(m) == 4
    assert "keras-unet" not in capsys.readouterr().out


def test_group_normalization_replaces_every_batch_norm_with_groups_dividing_the_channels() -> None:
    m = ModelArgs(normalization="group", norm_groups=4, filters=6, upconv_filters=9, num_layers=2)
    model = build_model(3, m, OutputArgs())
    kinds = [type(layer).__name__ for layer in model.layers]
    assert "BatchNormalization" not in kinds
    groups = [
        (layer.input.shape[-1], layer.groups) for layer in model.layers if type(layer).__name__ == "GroupNormalization"
    ]
    # 6 channels: 3 groups (4 does not divide 6); a skip joined to 6 channels, 12: 4; the decoder's 9: 3.
    assert groups == [(6, 3)] * 11 + [(12, 4), (9, 3), (6, 3)] * 2 + [(12, 4), (9, 3)]
    # A chip's output depends neither on the other chips of its batch nor on training or inference mode
    # (up to float rounding of batched convolutions); with batch norm both change it.
    chips = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    chips[1] *= 3
    for norm, same in (("group", True), ("batch", False)):
        model = build_model(3, ModelArgs(normalization=norm, filters=6, upconv_filters=9, num_layers=2), OutputArgs())
        alone = np.asarray(model(chips[:1], training=True))
        together = np.asarray(model(chips, training=True)[:1])
        inference = np.asarray(model(chips[:1], training=False))
        gaps = np.abs(alone - together).max(), np.abs(alone - inference).max()
        assert (max(gaps) < 1e-3) if same else (min(gaps) > 1e-2), (norm, gaps)


def test_group_normalization_needs_the_satellite_architecture(settings_file: Path) -> None:
    from core.errors import SettingsError

    with pytest.raises(
        SettingsError, match=r"normalization group builds the satellite U-Net; architecture custom has use_batch_norm"
    ):
        load_settings(settings_file, ["model_args.architecture=custom", "model_args.normalization=group"])


def test_tiny_unet_with_group_normalization_learns(tiny, settings_file: Path) -> None:
    from unet.train import train_unet

    _, tree, _, overrides = tiny
    settings = load_settings(settings_file, [*overrides, "model_args.normalization=group"])
    train_unet(settings, tree)
    metrics = json.loads((tree.model_dir("unet") / "metrics.json").read_text())
    assert metrics["pixel"]["iou"] >= 0.5
    predictor = load_predictor(tree.bundle("unet"))
    assert "GroupNormalization" in {type(layer).__name__ for layer in predictor.model.layers}


def test_unknown_architecture_lists_the_allowed_ones(settings_file: Path) -> None:
    from core.errors import SettingsError

    with pytest.raises(SettingsError, match=r"model_args\.architecture") as err:
        load_settings(settings_file, ["model_args.architecture=resnet"])
    assert "'satellite'" in str(err.value) and "'custom'" in str(err.value)


# --- data generator ---------------------------------------------------------------------------


def test_masks_are_exactly_0_1_after_loading(tmp_path: Path) -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:6] = 255
    y = read_mask(write_tif(tmp_path / "m.tif", mask, nodata=None))
    assert y.dtype == np.float32
    assert set(np.unique(y).tolist()) == {0.0, 1.0}
    assert int(y.sum()) == 9


@pytest.mark.parametrize("values", [[0, 1], [0, 64, 255], [3]])
def test_masks_on_another_scale_are_refused(tmp_path: Path, values: list[int]) -> None:
    mask = np.array(values * 16, np.uint8)[:16].reshape(4, 4)
    with pytest.raises(DataError, match="not only 0 and 255"):
        read_mask(write_tif(tmp_path / "m.tif", mask, nodata=None))


def test_generator_normalization_is_byte_identical_to_predict(tiny) -> None:
    _settings, tree, *_ = tiny
    frames = tree.list_rasters(tree.frames("train"))
    masks = [tree.split_masks("train") / f.name for f in frames]
    norm = Normalization.from_stats(band_statistics(frames), "percentile", 0)
    seq = ChipSequence(frames, masks, norm, LoadDatasetArgs(batch_size=4), 8, augment_data=False)
    x, y = seq[0]
    info = BundleInfo(kind="unet", bands=3, dtype="uint16", normalization=norm, threshold=0.5, pad_multiple=8)
    raw = np.stack([read_raster(f)[0] for f in frames[:4]])
    prepared, _ = UNetPredictor(None, info).prepare(raw)
    assert x.dtype == prepared.dtype == np.float32
    assert x.tobytes() == prepared.tobytes()
    assert set(np.unique(y).tolist()) == {0.0, 1.0}


def test_augmentation_moves_image_and_mask_together() -> None:
    rng = np.random.default_rng(3)
    x = rng.random((32, 32, 3)).astype(np.float32)
    y = np.zeros((32, 32, 1), np.float32)
    y[4:10, 20:30] = 1
    x[..., 0] = y[..., 0] * 5  # band 0 marks the roof
    args = LoadDatasetArgs(shear_range=10.0, zoom_range=0.2)
    for _ in range(10):
        ax, ay = augment(x, y, rng, args)
        assert set(np.unique(ay).tolist()) <= {0.0, 1.0}  # nearest neighbour only for the mask
        roof = ay[..., 0] == 1
        assert ax[..., 0][roof].mean() > 3 * max(ax[..., 0][~roof].mean(), 0.1)


def test_hue_turn_keeps_grey_and_brightness_and_cycles_the_colours() -> None:
    rng = np.random.default_rng(4)
    x = rng.random((6, 5, 4)).astype(np.float32)
    third = turn_hue(x, 2 * math.pi / 3)  # red -> green -> blue -> red
    np.testing.assert_allclose(third[..., [1, 2, 0]], x[..., [0, 1, 2]], atol=1e-6)
    assert third[..., 3].tobytes() == x[..., 3].tobytes()  # a fourth band (near infrared) is not a colour
    np.testing.assert_array_equal(turn_hue(x, 0.0), x)
    pale = 0.25 + 0.5 * x[..., :3]  # pale colours: a turn stays inside 0..1, so nothing is clipped
    for angle in (0.3, -1.2, math.pi):
        turned = turn_hue(pale, angle)
        np.testing.assert_allclose(turned.mean(-1), pale.mean(-1), atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(turned - turned.mean(-1, keepdims=True), axis=-1),
                                   np.linalg.norm(pale - pale.mean(-1, keepdims=True), axis=-1), atol=1e-6)  # fmt: skip
    grey = np.full((2, 2, 3), 0.4, np.float32)
    np.testing.assert_allclose(turn_hue(grey, 1.0), grey, atol=1e-6)
    # Saturated colours leave 0..1 when turned: with limits (percentile normalization) clipped to them.
    red = np.array([[[1.0, 0.0, 0.0]]], np.float32)
    np.testing.assert_allclose(turn_hue(red, math.pi), [[[-1 / 3, 2 / 3, 2 / 3]]], atol=1e-6)
    np.testing.assert_allclose(turn_hue(red, math.pi, (0.0, 1.0)), [[[0.0, 2 / 3, 2 / 3]]], atol=1e-6)  # cyan
    # Of 8 bands (WorldView-3), red, green and blue are the 5th, 3rd and 2nd.
    eight = rng.random((3, 3, 8)).astype(np.float32)
    turned = turn_hue(eight, 2 * math.pi / 3)
    np.testing.assert_allclose(turned[..., [2, 1, 4]], eight[..., [4, 2, 1]], atol=1e-6)
    untouched = [0, 3, 5, 6, 7]
    assert turned[..., untouched].tobytes() == eight[..., untouched].tobytes()
    with pytest.raises(DataError, match=r"^a hue turn needs red, green and blue bands, not 2$"):
        turn_hue(x[..., :2], 1.0)


def test_hue_augmentation_turns_the_image_only_and_leaves_the_other_draws_alone() -> None:
    rng = np.random.default_rng(5)
    x = (0.25 + 0.5 * rng.random((16, 16, 3))).astype(np.float32)  # pale: no turn leaves 0..1, none is clipped
    y = (rng.random((16, 16, 1)) > 0.5).astype(np.float32)
    plain, hued = LoadDatasetArgs(zoom_range=0.2), LoadDatasetArgs(zoom_range=0.2, hue_range=180.0)
    for seed in range(6):
        px, py = augment(x, y, np.random.default_rng(seed), plain)
        hx, hy = augment(x, y, np.random.default_rng(seed), hued)
        assert hy.tobytes() == py.tobytes()  # the hue is drawn last: flips, turns and zoom as without it
        np.testing.assert_allclose(hx.mean(-1), px.mean(-1), atol=1e-6)
        assert not np.allclose(hx, px, atol=1e-3)
    saturated = np.zeros((4, 4, 3), np.float32)
    saturated[..., 0] = 1.0
    turned = [augment(saturated, y[:4, :4], np.random.default_rng(seed), hued)[0] for seed in range(6)]
    assert min(t.min() for t in turned) == 0.0  # a turned pure red goes below 0 (see above): clipped
    zscore = LoadDatasetArgs(zoom_range=0.2, hue_range=180.0, normalization="zscore")
    turned = [augment(saturated, y[:4, :4], np.random.default_rng(seed), zscore)[0] for seed in range(6)]
    assert min(t.min() for t in turned) < -0.1  # z-scores have no range to keep


@pytest.mark.parametrize("shear_deg, zoom", [(0.0, 1.0), (10.0, 1.0), (-8.0, 0.85), (5.0, 1.2)])
def test_warp_matches_scipy_affine_per_band(shear_deg: float, zoom: float) -> None:
    """One cv2.warpAffine for all bands samples where scipy.ndimage.affine_transform (the loader's
    warp before, one call per band, reflected edges) does: same geometry, same edges, same nearest pixels."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    x = ndimage.gaussian_filter(rng.random((40, 56, 9)), (2, 2, 0)).astype(np.float32)
    y = (x[..., :3] > 0.5).astype(np.float32)
    shear = math.radians(shear_deg)
    matrix = np.array([[1 / zoom, math.tan(shear) / zoom], [0.0, 1 / zoom]])
    centre = (np.array(x.shape[:2]) - 1) / 2
    offset = centre - matrix @ centre

    def scipy(a: np.ndarray, order: int) -> np.ndarray:
        return np.stack(
            [
                ndimage.affine_transform(a[..., b], matrix, offset, order=order, mode="reflect")
                for b in range(a.shape[-1])
            ],
            axis=-1,
        )

    out = warp(x, shear, zoom, order=1)
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, scipy(x, 1), atol=2e-3)
    nearest, reference = warp(y, shear, zoom, order=0), scipy(y, 0)
    assert set(np.unique(nearest).tolist()) <= {0.0, 1.0}
    assert np.array_equal(nearest[4:-4, 4:-4], reference[4:-4, 4:-4])  # edges: reflection rounds apart in < 1%
    assert np.mean(nearest != reference) < 0.01
    assert warp(y[..., :1], shear, zoom, order=0).shape == (40, 56, 1)  # a single band keeps its axis


def test_epochs_are_reshuffled_and_seeded(tiny) -> None:
    _settings, tree, *_ = tiny
    frames = tree.list_rasters(tree.frames("train"))
    masks = [tree.split_masks("train") / f.name for f in frames]
    norm = Normalization.from_stats(band_statistics(frames), "percentile", 0)
    a = ChipSequence(frames, masks, norm, LoadDatasetArgs(batch_size=4, seed=5), 8, augment_data=True)
    b = ChipSequence(frames, masks, norm, LoadDatasetArgs(batch_size=4, seed=5), 8, augment_data=True)
    first = a.order.copy()
    assert np.array_equal(first, b.order)
    a.on_epoch_end()
    assert not np.array_equal(first, a.order)
    assert len(a) == 3  # 12 chips / batch 4, computed when steps_per_epoch is null


@pytest.mark.parametrize(
    ("chips", "batch", "setting", "expected"),
    [
        (32, 8, None, 20),  # SpaceNet Rio: 4 batches would be one epoch; at least 20
        (12, 4, None, 20),
        (3, 8, None, 20),  # fewer chips than a batch: batches of 3, still 20 of them
        (160, 8, None, 20),
        (161, 8, None, 21),  # every chip once when that is more
        (1000, 8, None, 125),
        (32, 8, 4, 4),  # an explicit setting is kept as it is
        (1000, 8, 7, 7),
    ],
)
def test_steps_per_epoch(chips: int, batch: int, setting: int | None, expected: int) -> None:
    from unet.train import steps_per_epoch

    assert steps_per_epoch(chips, batch, setting) == expected


# --- losses and metrics against numpy -------------------------------------------------------------


def test_losses_match_numpy() -> None:
    rng = np.random.default_rng(0)
    t = (rng.random((2, 16, 16, 1)) > 0.9).astype(np.float32)
    p = rng.random((2, 16, 16, 1)).astype(np.float32)
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    bce = -np.mean(t * np.log(pc) + (1 - t) * np.log(1 - pc))
    inter = (t * p).sum()
    dice = 1 - (2 * inter + 1) / (t.sum() + p.sum() + 1)
    jac = 1 - (inter + 1) / (t.sum() + p.sum() - inter + 1)
    pt = t * pc + (1 - t) * (1 - pc)
    focal = -np.mean((t * 0.25 + (1 - t) * 0.75) * (1 - pt) ** 2 * np.log(pt))
    assert float(losses.bce(t, p)) == pytest.approx(bce, rel=1e-5)
    assert float(losses.dice(t, p)) == pytest.approx(dice, rel=1e-5)
    assert float(losses.bce_dice(t, p)) == pytest.approx(bce + dice, rel=1e-5)
    assert float(losses.jaccard(t, p)) == pytest.approx(jac, rel=1e-5)
    assert float(losses.focal(t, p)) == pytest.approx(focal, rel=1e-5)


def test_dice_does_not_reward_an_all_background_prediction() -> None:
    """keras-unet's jaccard_distance over the channel axis scores this nearly perfect; ours does not."""
    t = np.zeros((1, 32, 32, 1), np.float32)
    t[0, 10:14, 10:14] = 1
    blank = np.zeros_like(t)
    assert float(losses.dice(t, blank)) > 0.9
    assert float(losses.jaccard(t, blank)) > 0.9


def test_metrics_accumulate_counts_over_batches_like_sklearn() -> None:
    from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score

    rng = np.random.default_rng(1)
    batches = [((rng.random((2, 8, 8, 1)) > 0.8).astype("float32"), rng.random((2, 8, 8, 1)).astype("float32"))]
    batches.append((np.zeros((2, 8, 8, 1), "float32"), np.zeros((2, 8, 8, 1), "float32")))  # no roof at all
    truth = np.concatenate([b[0].ravel() for b in batches]) > 0.5
    pred = np.concatenate([b[1].ravel() for b in batches]) >= 0.5
    expected = {
        IoU: jaccard_score(truth, pred),
        F1: f1_score(truth, pred),
        Precision: precision_score(truth, pred),
        Recall: recall_score(truth, pred),
        PredShare: pred.mean(),
        TrueShare: truth.mean(),
    }
    for cls, value in expected.items():
        metric = cls()
        for t, p in batches:
            metric.update_state(t, p)
        assert float(metric.result()) == pytest.approx(value, rel=1e-9)


def test_collapse_monitor_stops_training() -> None:
    from unet.train import _Monitor

    monitor = _Monitor.make(patience=2)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.stop_training = False
    monitor.set_model(model)
    logs = {"val_pred_share": 0.0, "val_true_share": 0.04, "val_iou": 0.0}
    monitor.on_epoch_end(0, logs)
    assert not monitor.model.stop_training
    monitor.on_epoch_end(1, logs)
    assert monitor.model.stop_training and monitor.collapsed == "all background"


# --- training and the bundle -------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_unet_learns_and_its_masks_are_not_blank(trained) -> None:
    settings, tree, _ = trained
    out = tree.model_dir("unet")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "unet" and metrics["split"] == "val"
    assert metrics["pixel"]["iou"] >= 0.5
    assert set(metrics["pixel"]) >= {"iou", "f1", "precision", "recall", "tp", "fp", "fn", "tn"}
    for name in ("history.csv", "curves.png", "overlays.png", "bundle/model.keras", "bundle/bundle.json"):
        assert (out / name).is_file(), name
    info = read_info(tree.bundle("unet"))
    assert (info.kind, info.bands, info.dtype, info.pad_multiple) == ("unet", 3, "uint16", 8)
    assert 0 < info.threshold < 1
    # The threshold for test-time augmentation: tuned on the validation chips' averaged probabilities.
    from core.bundle import load_predictor
    from core.metrics import tta_threshold

    frames = sorted(tree.frames("val").glob("*.tif"))
    pairs = [(f, tree.split_masks("val") / f.name) for f in frames]
    assert info.threshold_tta == tta_threshold(load_predictor(tree.bundle("unet")), pairs)[0]
    assert 0 < info.threshold_tta < 1 and metrics["threshold_tta"] == info.threshold_tta
    assert set(metrics["tta_pixel"]) >= {"iou", "f1"}
    assert info.merge == 0.0 and "merge" not in metrics  # masks without a boundary band: nothing to merge by
    assert info.settings["model_args"]["filters"] == 8
    assert "keras" in info.versions

    from predict.predict import main as predict_main

    assert predict_main(trained[2]) == 0  # the same arguments as train.py: --model unet and the settings
    masks = sorted((tree.prediction_dir("unet") / "masks").glob("*.tif"))
    assert [m.name for m in masks] == [f"val_{i}.tif" for i in range(4)]
    total = 0
    for m in masks:
        data, profile = read_raster(m)
        src, src_profile = read_raster(tree.frames("val") / m.name)
        assert set(np.unique(data).tolist()) <= {0, 255}
        assert data.dtype == np.uint8 and data.shape == (1, *src.shape[1:])
        assert profile["transform"] == src_profile["transform"] and profile["crs"] == src_profile["crs"]
        total += int((data == 255).sum())
    assert total > 0
    prob, _ = read_raster(tree.prediction_dir("unet") / "probabilities" / "val_0.tif")
    assert prob.dtype == np.float32
    import geopandas as gpd

    roofs = gpd.read_file(tree.prediction_dir("unet") / "roofs.gpkg")
    assert len(roofs) > 0 and roofs.crs.to_string() == CRS
    assert (roofs["area_m2"] >= settings.predict_args.min_area).all()
    # With test-time augmentation predict applies, and records, the bundle's TTA threshold.
    assert predict_main([*trained[2], "--set", "predict_args.tta=true", "--overwrite"]) == 0
    record = json.loads((tree.prediction_dir("unet") / "predict.record.json").read_text())
    assert record["summary"]["threshold"] == info.threshold_tta != info.threshold


def test_training_refuses_masks_without_roofs(tiny) -> None:
    from unet.train import train_unet

    settings, tree, *_ = tiny
    for m in tree.list_rasters(tree.split_masks("train")):
        write_tif(m, np.zeros((64, 64), np.uint8), nodata=None)
    with pytest.raises(DataError, match="no roof pixel"):
        train_unet(settings, tree)


def test_training_refuses_a_band_count_other_than_channels(tiny, settings_file: Path) -> None:
    from unet.train import train_unet

    _, tree, _, overrides = tiny
    settings = load_settings(
        settings_file, [*overrides, "load_dataset_args.channels=4", "model_args.input_shape=[64,64,4]"]
    )
    with pytest.raises(
        DataError, match=r"chips have 3 bands \(train_0.tif\) but the settings say 4 \(load_dataset_args.channels"
    ):
        train_unet(settings, tree)


def test_training_refuses_hue_turns_of_chips_without_three_bands(tiny, settings_file: Path) -> None:
    from unet.train import train_unet

    _, tree, _, overrides = tiny
    for frame in [*tree.list_rasters(tree.frames("train")), *tree.list_rasters(tree.frames("val"))]:
        image, _ = read_raster(frame)
        write_tif(frame, image[:2])
    settings = load_settings(
        settings_file,
        [*overrides, "load_dataset_args.channels=2", "model_args.input_shape=[64,64,2]",
         "load_dataset_args.hue_range=30"],
    )  # fmt: skip
    with pytest.raises(
        DataError,
        match=r"^load_dataset_args.hue_range turns .* but the chips \(.*train_0.tif\) have 2 band\(s\): set it to 0$",
    ):
        train_unet(settings, tree)


def test_corrupt_and_missing_bundles(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load_predictor(tmp_path / "nope")
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError, match=r"no bundle\.json"):
        load_predictor(tmp_path / "b")
    (tmp_path / "b" / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="corrupt"):
        load_predictor(tmp_path / "b")
    norm = Normalization("zscore", (0.0,), (1.0,), (0.0,), (1.0,), None)
    from core.bundle import write_info

    write_info(tmp_path / "b", BundleInfo(kind="unet", bands=1, dtype="uint8", normalization=norm, threshold=0.5))
    with pytest.raises(BundleError, match=r"model\.keras not found"):
        load_predictor(tmp_path / "b")
    (tmp_path / "b" / "model.keras").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="cannot be loaded"):
        load_predictor(tmp_path / "b")


# --- predict: windows, blending, georeferencing, bad inputs ---------------------------------------


class PixelPredictor:
    """A per-pixel model: probability = normalized band 1. Windowing must not change it."""

    def __init__(self, bands: int = 2, dtype: str = "uint16", threshold: float = 0.5) -> None:
        norm = Normalization("percentile", (0.0,) * bands, (1000.0,) * bands, (0.0,) * bands, (1.0,) * bands, 0)
        self.info = BundleInfo(kind="unet", bands=bands, dtype=dtype, normalization=norm, threshold=threshold)

    def predict(self, chips: np.ndarray) -> np.ndarray:
        return self.forward(self.prepare(chips))

    def prepare(self, chips: np.ndarray) -> np.ndarray:
        return np.stack([self.info.normalization.apply(c) for c in chips])

    def forward(self, prepared: np.ndarray) -> np.ndarray:
        return prepared[..., 0].astype(np.float32)


def test_truncated_raster_is_named_and_no_mask_is_left(tmp_path: Path) -> None:
    # The windows are read in a reader thread; its error must reach the caller as the named one.
    image = np.random.default_rng(0).integers(1, 1000, (2, 300, 300)).astype(np.uint16)
    src = write_tif(tmp_path / "big.tif", image)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=r"big\.tif could not be read \(.*\): it may be truncated or corrupt"):
        predict_raster(PixelPredictor(), src, tmp_path / "m.tif", None, PredictArgs(window=64, overlap=16), 0.5)
    assert not (tmp_path / "m.tif").exists()


@pytest.mark.parametrize(
    ("length", "window", "overlap", "expected"),
    [
        (100, 128, 16, [0]),
        (128, 128, 16, [0]),
        (200, 64, 16, [0, 48, 96, 136]),
        (112, 64, 16, [0, 48]),
    ],
)
def test_window_starts_cover_with_overlap(length: int, window: int, overlap: int, expected: list[int]) -> None:
    starts = window_starts(length, window, window - overlap)
    assert starts == expected
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered.all()


def test_sliding_windows_equal_whole_raster_prediction(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(1, 1000, (2, 150, 230)).astype(np.uint16)
    image[:, :5, :7] = 0  # nodata corner
    src = write_tif(tmp_path / "big.tif", image)
    predictor = PixelPredictor()
    whole = predict_raster(
        predictor, src, tmp_path / "w_mask.tif", tmp_path / "w_prob.tif", PredictArgs(window=512, overlap=16), 0.5
    )
    tiled = predict_raster(
        predictor,
        src,
        tmp_path / "t_mask.tif",
        tmp_path / "t_prob.tif",
        PredictArgs(window=64, overlap=16, batch_size=3),
        0.5,
    )
    pw, _prof_w = read_raster(whole.probability)
    pt, _prof_t = read_raster(tiled.probability)
    expected = np.clip(image[0] / 1000.0, 0, 1).astype(np.float32)
    expected[:5, :7] = 0
    np.testing.assert_allclose(pw[0], expected, atol=1e-6)
    np.testing.assert_allclose(pt[0], expected, atol=1e-6)
    mw, _ = read_raster(whole.mask)
    mt, prof_m = read_raster(tiled.mask)
    assert np.array_equal(mw, mt)
    assert (mt[0, :5, :7] == 0).all()
    assert prof_m["transform"] == TRANSFORM and prof_m["crs"].to_string() == CRS
    assert (prof_m["width"], prof_m["height"], prof_m["dtype"]) == (230, 150, "uint8")
    assert tiled.roof_pixels == int((expected >= 0.5).sum())


def test_unet_windows_match_chip_prediction_away_from_edges(tmp_path: Path) -> None:
    model = build_model(2, ModelArgs(filters=4, upconv_filters=4, num_layers=2, input_shape=(64, 64, 2)), OutputArgs())
    predictor = PixelPredictor()
    unet = UNetPredictor(
        model,
        BundleInfo(
            kind="unet",
            bands=2,
            dtype="uint16",
            normalization=predictor.info.normalization,
            threshold=0.5,
            pad_multiple=8,
        ),
    )
    image = np.random.default_rng(0).integers(1, 1000, (2, 96, 96)).astype(np.uint16)
    src = write_tif(tmp_path / "r.tif", image)
    res = predict_raster(unet, src, tmp_path / "m.tif", tmp_path / "p.tif", PredictArgs(window=64, overlap=24), 0.5)
    windowed, _ = read_raster(res.probability)
    chip = unet.predict(image[None, :, :64, :64])[0]
    # Pixels that only the first window covers (the second starts at 32) equal its chip prediction.
    np.testing.assert_allclose(windowed[0, :32, :32], chip[:32, :32], atol=1e-5)


def test_predict_refuses_other_bands_or_dtype(tmp_path: Path) -> None:
    src = write_tif(tmp_path / "a.tif", np.ones((3, 16, 16), np.uint16))
    with pytest.raises(DataError, match=r"3 bands of uint16 .* 2 bands of uint16"):
        predict_raster(PixelPredictor(2), src, tmp_path / "m.tif", None, PredictArgs(), 0.5)
    src8 = write_tif(tmp_path / "b.tif", np.ones((2, 16, 16), np.uint8))
    with pytest.raises(DataError, match=r"uint8 .* uint16"):
        predict_raster(PixelPredictor(2), src8, tmp_path / "m.tif", None, PredictArgs(), 0.5)
    assert not (tmp_path / "m.tif").exists()


def test_blank_prediction_is_never_silent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_tif(tmp_path / "in" / "a.tif", np.full((2, 16, 16), 100, np.uint16))
    monkeypatch.setattr("predict.predict.load_predictor", lambda _: PixelPredictor(2, threshold=0.5))
    with pytest.raises(
        PipelineError, match=r"blank: no probability reaches the threshold 0.500 \(range seen 0.100..0.100\)"
    ):
        predict_all(tmp_path / "bundle", [src], tmp_path / "out", PredictArgs())
    assert (tmp_path / "out" / "masks" / "a.tif").is_file()  # outputs are kept for inspection


def test_train_without_split_folders_says_what_to_run(tmp_path: Path, settings_file: Path, capsys) -> None:
    from train.train import main

    argv = [
        "--settings",
        str(settings_file),
        "--set",
        f"data_root={tmp_path / 'empty'}",
        "--model",
        "unet",
        "--set",
        f"training_args.results_folder={tmp_path / 'results'}",
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: train chips folder ") and err.rstrip().endswith("run python split/split.py first")
    # Said before the run began: no record of a run to resume (predict then said "train unet did not finish").
    assert not any((tmp_path / "results").rglob("train.record.json"))


@pytest.mark.slow
def test_training_continues_from_a_bundle(trained, tmp_path: Path) -> None:
    from unet.train import train_unet

    settings, tree, _ = trained
    previous = read_info(tree.bundle("unet"))
    moved = settings.model_copy(update={"experiment": "continued"}, deep=True)
    moved.training_args.epochs = 1
    new_tree = DataTree.from_settings(moved)
    bundle = train_unet(moved, new_tree, from_bundle=tree.bundle("unet"))
    info = read_info(bundle)
    assert info.normalization == previous.normalization  # the first training's statistics are kept
    assert json.loads((new_tree.model_dir("unet") / "metrics.json").read_text())["epochs"] == 1


def test_tensorflow_start_up_noise_is_filtered_and_nothing_else() -> None:
    from unet import without_import_noise

    text = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        "I0000 00:00:1795661898.676888   14490 port.cc:153] oneDNN custom operations are on. You may see ...\n"
        "\n"
        "E0000 something TensorFlow really wants to say\n"
        "Traceback (most recent call last):\n"
    )
    assert without_import_noise(text) == [
        "E0000 something TensorFlow really wants to say",
        "Traceback (most recent call last):",
    ]


def test_importing_the_unet_package_writes_nothing_to_stderr() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import unet.model"], capture_output=True, text=True, check=True)
    assert done.stderr == ""


@pytest.mark.slow
def test_pretrained_continues_from_the_checkpoint_when_there_is_no_bundle(trained, caplog) -> None:
    import shutil

    from unet.train import train_unet

    settings, tree, _ = trained
    moved = settings.model_copy(update={"experiment": "from-checkpoint"}, deep=True)
    moved.training_args.epochs = 1
    moved.training_args.pretrained = True
    new_tree = DataTree.from_settings(moved)
    new_tree.model_dir("unet").mkdir(parents=True)
    shutil.copy(tree.model_dir("unet") / "checkpoint.weights.h5", new_tree.model_dir("unet"))
    with caplog.at_level("INFO", logger="unet.train"):
        bundle = train_unet(moved, new_tree)
    assert f"train: continuing from the checkpoint {new_tree.model_dir('unet') / 'checkpoint.weights.h5'}" in [
        r.getMessage() for r in caplog.records
    ]
    assert (bundle / "model.keras").is_file()


def test_pretrained_with_nothing_to_continue_from_is_one_line(tiny) -> None:
    from unet.train import train_unet

    settings, tree, _, _ = tiny
    settings.training_args.pretrained = True
    with pytest.raises(DataError, match=r"^training_args.pretrained is true but there is neither a bundle \("):
        train_unet(settings, tree)


def kill_once_backed_up(argv: list[str], state: Path, epochs: int = 2, wait: float = 300) -> None:
    """Run ``argv`` from the repository root and kill -9 it once the backup's ``state`` (state.json) counts
    ``epochs`` finished epochs (or after ``wait`` seconds)."""
    import os
    import signal
    import subprocess
    import time

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(argv, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text()).get("epochs", 0) >= epochs:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)


@pytest.mark.slow
def test_training_killed_mid_run_resumes_from_its_last_epoch(tmp_path: Path, settings_file: Path) -> None:
    import subprocess
    import sys

    tiny_tree(tmp_path / "data")
    argv = [sys.executable, "train/train.py", "--settings", str(settings_file), "--model", "unet"]
    for item in (*TINY, "training_args.epochs=6", "training_args.patience=20", "training_args.ensemble=2",
                 f"data_root={tmp_path / 'data'}",
                 f"training_args.results_folder={tmp_path / 'results'}", "experiment=resume"):  # fmt: skip
        argv += ["--set", item]
    out = tmp_path / "results" / "resume" / "unet"
    repo = Path(__file__).resolve().parent.parent
    state = out / "backup" / "state.json"
    kill_once_backed_up(argv, state)  # a preempted node: no chance to clean up
    backed_up = json.loads(state.read_text())
    done = backed_up["epochs"]
    assert 2 <= done < 6 and not (out / "bundle").exists()
    kept = [epoch for _, epoch in backed_up["callbacks"]["BestEpochs"]["kept"]]
    assert len(kept) == 2 and set(kept) <= set(range(1, done + 1))  # the best epochs the backup names are there
    assert all((out / "backup" / "snapshots" / f"epoch_{e:04d}.weights.h5").is_file() for e in kept)
    again = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"train: resuming from the end of epoch {done} of 6 (backup in {out / 'backup'})" in again.stderr
    history = (out / "history.csv").read_text().strip().splitlines()
    header = history[0].split(",")
    assert [int(line.split(",")[0]) for line in history[1:]] == list(range(6))  # one history, every epoch once
    from unet.logs import read_scalars

    logged = [step for step, _ in read_scalars(out / "tensorboard" / "train")["loss"]]
    # The TensorBoard logs continue too: no epoch twice (the kill may land before epoch `done` was logged).
    assert logged == sorted(set(logged)) and set(logged) <= set(range(1, 7))
    assert set(range(1, done)) | set(range(done + 1, 7)) <= set(logged)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 6
    # The two best epochs' weights were kept across the kill (in the backup): the bundle averages them.
    scores = [(float(line.split(",")[header.index("val_iou")]), int(line.split(",")[0]) + 1) for line in history[1:]]
    assert metrics["ensemble"] == [epoch for _, epoch in sorted(scores, key=lambda p: (-p[0], p[1]))[:2]]
    assert not (out / "backup").exists() and (out / "bundle" / "model.keras").is_file()


def test_a_backup_restores_weights_optimizer_and_callback_state(tmp_path: Path) -> None:
    from unet.resume import Backup, finished_epochs, restore

    def model():
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        return m

    x, y = np.random.default_rng(0).normal(size=(16, 4)), np.ones((16, 2))
    first = model()
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=50)
    first.fit(x, y, epochs=3, verbose=0, callbacks=[stop, Backup(tmp_path / "b", [stop], restore=False)])
    assert finished_epochs(tmp_path / "b") == 3
    second = model()
    assert restore(second, tmp_path / "b") == 3
    for a, b in zip(first.optimizer.variables, second.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # iteration, learning rate, moments
    np.testing.assert_array_equal(first.get_weights()[0], second.get_weights()[0])
    later = keras.callbacks.EarlyStopping(monitor="loss", patience=50)
    Backup(tmp_path / "b", [later], restore=True).on_train_begin()
    assert (later.wait, later.best) == (stop.wait, float(stop.best))
    assert finished_epochs(tmp_path / "nothing") == 0


def test_batches_do_not_depend_on_the_order_they_are_made_in(tiny) -> None:
    _settings, tree, *_ = tiny
    frames = tree.list_rasters(tree.frames("train"))
    masks = [tree.split_masks("train") / f.name for f in frames]
    norm = Normalization.from_stats(band_statistics(frames), "percentile", 0)
    args = LoadDatasetArgs(batch_size=4, seed=5, shear_range=10.0, zoom_range=0.1)
    one = ChipSequence(frames, masks, norm, args.model_copy(update={"workers": 1}), 8, augment_data=True)
    four = ChipSequence(frames, masks, norm, args.model_copy(update={"workers": 4}), 8, augment_data=True)
    assert four.workers == 4
    forward = [one[i] for i in range(len(one))]
    backward = [four[i] for i in reversed(range(len(four)))][::-1]  # as threads might make them
    for (x1, y1), (x2, y2) in zip(forward, backward, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    one.on_epoch_end()
    resumed = ChipSequence(frames, masks, norm, args, 8, augment_data=True)
    resumed.set_epoch(1)  # a training resumed at epoch 1 sees epoch 1's batches
    np.testing.assert_array_equal(one[2][0], resumed[2][0])
    assert not np.array_equal(one[2][0], forward[2][0])
