"""Classical models: features, training on a tiny separable scene, the skops bundle, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from conftest import REPO_SETTINGS, write_geotiff
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from core.bundle import BundleError, Normalization, load_predictor, read_info
from core.errors import DataError
from core.index import split_pairs
from core.raster import read_raster
from core.settings import FlattenArgs, ParallelArgs, load_settings
from core.tree import DataTree
from flatten.flatten import flatten_chips
from ml import bundle as ml_bundle
from ml.features import FeatureSpec, chip_features, pixel_features
from ml.train import sample_chips, train_classical
from train.train import main as train_main

SIZE = 48


def write_scene(root: Path, seed: int = 0, roofs: bool = True) -> None:
    """Train (4 chips) and val (2 chips) splits of 3-band uint16 chips: bright, striped roofs on dark ground.

    A nodata corner (0 in every band) in each chip; masks 0 there, as mask.py writes them.
    """
    rng = np.random.default_rng(seed)
    for split, count in (("train", 4), ("val", 2)):
        for i in range(count):
            image = rng.normal(400, 60, (3, SIZE, SIZE))
            mask = np.zeros((SIZE, SIZE), np.uint8)
            for _ in range(2 if roofs else 0):
                r, c = rng.integers(4, SIZE - 16, 2)
                h, w = rng.integers(8, 14, 2)
                mask[r : r + h, c : c + w] = 255
            stripes = np.where(np.arange(SIZE) % 2, 80.0, -80.0)[np.newaxis, :]
            roof = mask > 0
            image[:, roof] = (900 + stripes + rng.normal(0, 40, (SIZE, SIZE)))[roof]
            image = np.clip(image, 1, 4000).astype(np.uint16)
            image[:, :3, :3] = 0
            mask[:3, :3] = 0
            write_geotiff(root / f"{split}_frames" / f"{split}_{i}.tif", array=image, nodata=0)
            write_geotiff(root / f"{split}_masks" / f"{split}_{i}.tif", array=mask, nodata=None)


def make_settings(tmp: Path, *overrides: str):
    return load_settings(
        REPO_SETTINGS,
        [
            f"data_root={tmp / 'data'}",
            f"training_args.results_folder={tmp / 'results'}",
            "experiment=test",
            "load_dataset_args.channels=3",
            f"model_args.input_shape=[{SIZE},{SIZE},3]",
            "ml_args.forest.n_estimators=10",
            "ml_args.forest.n_jobs=1",
            "ml_args.max_train_pixels=3000",
            "ml_args.texture_windows=[3,5]",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One scene, a forest and a regression trained on it: (settings, tree)."""
    tmp = tmp_path_factory.mktemp("ml")
    write_scene(tmp / "data")
    settings = make_settings(tmp)
    tree = DataTree.from_settings(settings)
    for kind in ("forest", "regression"):
        train_classical(kind, settings, tree)
    return settings, tree


def metrics(tree: DataTree, kind: str) -> dict:
    return json.loads((tree.model_dir(kind) / "metrics.json").read_text())


# --- features -----------------------------------------------------------------------------------


def test_feature_values_and_names():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (9, 10, 2)).astype(np.float32)
    spec = FeatureSpec(bands=2, indices=True, texture_windows=(3,))
    f = pixel_features(x, spec)
    assert spec.names() == ["band 1", "band 2", "nd(b1, b2)", "mean3x3 b1", "mean3x3 b2", "std3x3 b1", "std3x3 b2"]
    assert f.shape == (9, 10, 7) and f.dtype == np.float32
    np.testing.assert_array_equal(f[..., :2], x)
    np.testing.assert_allclose(f[..., 2], (x[..., 0] - x[..., 1]) / (x[..., 0] + x[..., 1] + 1e-6), rtol=1e-5)
    window = x[3:6, 4:7, 1]  # centred on (4, 5)
    assert f[4, 5, 4] == pytest.approx(window.mean(), rel=1e-5)
    assert f[4, 5, 6] == pytest.approx(window.std(), rel=1e-4)
    edge = np.pad(x[..., 0], 1, mode="symmetric")[0:3, 0:3]  # scipy's "reflect" repeats the edge pixel
    assert f[0, 0, 3] == pytest.approx(edge.mean(), rel=1e-5)
    assert spec.context == 1 and FeatureSpec(bands=2, texture_windows=()).context == 0


def test_a_halo_of_context_pixels_gives_the_full_raster_features():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (40, 40, 3)).astype(np.float32)
    spec = FeatureSpec(bands=3, texture_windows=(3, 11))
    full = pixel_features(x, spec)
    c = spec.context
    window = pixel_features(x[10 - c : 30 + c, 12 - c : 32 + c], spec)[c:-c, c:-c]
    np.testing.assert_allclose(window, full[10:30, 12:32], rtol=1e-5, atol=1e-6)


# --- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["forest", "regression"])
def test_models_learn_the_separable_scene(trained, kind):
    _, tree = trained
    record = metrics(tree, kind)
    assert record["model"] == kind and record["split"] == "val"
    assert record["pixel"]["iou"] >= 0.8
    assert 0.0 < record["threshold"] < 1.0
    p = record["pixel"]
    assert p["tp"] + p["fp"] + p["fn"] + p["tn"] == 2 * (SIZE * SIZE - 9)  # every valid val pixel, nodata out
    plot = "feature_importance.png" if kind == "forest" else "coefficients.png"
    assert sorted(x.name for x in tree.model_dir(kind).iterdir()) == sorted(["bundle", "metrics.json", plot,
                                                                              "settings.json"])  # fmt: skip
    assert sorted(x.name for x in tree.bundle(kind).iterdir()) == ["bundle.json", "model.skops"]
    info = read_info(tree.bundle(kind))
    assert (info.kind, info.bands, info.dtype, info.threshold) == (kind, 3, "uint16", record["threshold"])
    assert info.features["texture_windows"] == [3, 5] and info.features["context"] == 2
    assert len(info.features["names"]) == 3 + 3 + 2 * 3 * 2
    assert info.settings["ml_args"]["forest"]["n_estimators"] == 10
    assert "scikit-learn" in info.versions and "skops" in info.versions


def test_features_identical_at_training_and_prediction(trained):
    settings, tree = trained
    predictor = load_predictor(tree.bundle("forest"))
    info = predictor.info
    pairs = split_pairs(tree, "train")
    spec = FeatureSpec.from_dict(info.features)
    sample = sample_chips(pairs, info.normalization, spec, settings.ml_args.max_train_pixels, settings.ml_args.seed)
    assert sample.labels.size > 1000
    for i, (frame, _) in enumerate(pairs):
        chw, _ = read_raster(frame)
        at_predict = predictor.features(chw)
        sel = sample.chip == i
        np.testing.assert_array_equal(at_predict[sample.row[sel], sample.col[sel]], sample.features[sel])


def test_normalization_comes_from_the_training_chips(trained):
    _, tree = trained
    info = read_info(tree.bundle("regression"))
    frames = tree.list_rasters(tree.frames("train"))
    values = np.concatenate([read_raster(f)[0].reshape(3, -1) for f in frames], axis=1)
    values = values[:, (values != 0).any(axis=0)]
    np.testing.assert_array_equal(info.normalization.low, np.percentile(values, 2, axis=1))
    assert info.normalization.nodata == 0


def test_skops_round_trip(trained, tmp_path):
    _, tree = trained
    chw, _ = read_raster(tree.list_rasters(tree.frames("val"))[0])
    for kind in ("forest", "regression"):
        predictor = load_predictor(tree.bundle(kind))
        prob = predictor.predict(chw[np.newaxis])
        assert prob.shape == (1, SIZE, SIZE) and prob.dtype == np.float32
        assert (prob[0, :3, :3] == 0).all()  # nodata
        copy = tmp_path / kind
        ml_bundle.save_model(predictor.model, copy)
        again = ml_bundle.load_model(copy / ml_bundle.MODEL_FILE, kind)
        features = chip_features(chw, predictor.info.normalization, predictor.spec).reshape(SIZE * SIZE, -1)
        np.testing.assert_array_equal(again.predict_proba(features), predictor.model.predict_proba(features))


def test_train_from_the_flat_table(tmp_path):
    write_scene(tmp_path / "data", seed=2)
    settings = make_settings(tmp_path, "ml_args.source=flat", "ml_args.texture_windows=[]")
    tree = DataTree.from_settings(settings)
    flatten_chips(tree.frames("train"), tree.split_masks("train"), tree, FlattenArgs(), ParallelArgs(workers=1))
    train_classical("forest", settings, tree)
    assert metrics(tree, "forest")["pixel"]["iou"] >= 0.8
    assert read_info(tree.bundle("forest")).features["context"] == 0


def test_script_trains_and_refuses_to_overwrite(tmp_path, capsys):
    write_scene(tmp_path / "data", seed=3)
    argv = ["--settings", str(REPO_SETTINGS), "--quiet"]
    for item in (f"data_root={tmp_path / 'data'}", f"training_args.results_folder={tmp_path / 'results'}",
                 "experiment=cli", "load_dataset_args.channels=3", "model_args.input_shape=[48,48,3]",
                 "ml_args.max_train_pixels=2000", "training_args.model=regression"):  # fmt: skip
        argv += ["--set", item]
    assert train_main(argv) == 0
    assert (tmp_path / "results/cli/regression/bundle/bundle.json").is_file()
    made = (tmp_path / "results/cli/regression/bundle/bundle.json").stat().st_mtime_ns
    assert train_main(argv) == 0  # same settings, same split: up to date
    assert (tmp_path / "results/cli/regression/bundle/bundle.json").stat().st_mtime_ns == made
    capsys.readouterr()
    assert train_main([*argv, "--set", "ml_args.regression.max_iter=50"]) == 1
    assert capsys.readouterr().err.startswith(
        "error: the bundle was made with ml_args.regression.max_iter 1000, now 50: add --overwrite"
    )
    assert train_main([*argv, "--set", "ml_args.forest.n_estimators=3"]) == 0  # the forest's settings: no change
    assert train_main([*argv, "--set", "ml_args.regression.max_iter=50", "--overwrite"]) == 0


# --- bad input ----------------------------------------------------------------------------------


def test_one_class_only(tmp_path):
    write_scene(tmp_path / "data", roofs=False)
    settings = make_settings(tmp_path)
    with pytest.raises(DataError, match="all background"):
        train_classical("forest", settings, DataTree.from_settings(settings))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("latitude,longitude,row,col,band_1,band_2,band_3\n1,2,0,0,5,6,7\n", "no label column"),
        ("latitude,longitude,row,col,band,value,label,chip\n", "no rows"),
    ],
    ids=["without label column", "empty"],
)
def test_bad_flat_table(tmp_path, table, message):
    write_scene(tmp_path / "data")
    settings = make_settings(tmp_path, "ml_args.source=flat", "ml_args.texture_windows=[]")
    flat = tmp_path / "data" / "flat"
    flat.mkdir()
    (flat / "pixels.csv").write_text(table)
    with pytest.raises(DataError, match=message):
        train_classical("forest", settings, DataTree.from_settings(settings))


def test_flat_source_with_texture_is_a_settings_error(tmp_path):
    with pytest.raises(Exception, match="texture features need each pixel's neighbours"):
        make_settings(tmp_path, "ml_args.source=flat")


def test_band_count_differs_from_the_bundle(trained):
    _, tree = trained
    predictor = load_predictor(tree.bundle("forest"))
    with pytest.raises(DataError, match="imagery has 4 bands but the forest bundle was trained on 3"):
        predictor.predict(np.ones((1, 4, 8, 8), np.uint16))


def test_chips_and_settings_disagree_on_bands(trained):
    _, tree = trained
    eight = make_settings(tree.root.parent, "load_dataset_args.channels=8", f"model_args.input_shape=[{SIZE},{SIZE},8]")
    with pytest.raises(DataError, match=r"the chips have 3 bands \(train_0\.tif\) but the settings say 8"):
        train_classical("forest", eight, tree, overwrite=True)


def copy_bundle(tree: DataTree, kind: str, tmp_path: Path) -> Path:
    folder = tmp_path / "bundle"
    shutil.copytree(tree.bundle(kind), folder)
    return folder


def test_corrupt_model_file(trained, tmp_path):
    _, tree = trained
    folder = copy_bundle(tree, "forest", tmp_path)
    (folder / "model.skops").write_bytes(b"not a zip file")
    with pytest.raises(BundleError, match="corrupt"):
        load_predictor(folder)
    (folder / "model.skops").unlink()
    with pytest.raises(BundleError, match="incomplete"):
        load_predictor(folder)


def test_a_missing_bundle_names_the_training_that_makes_it(tmp_path):
    with pytest.raises(BundleError) as err:
        read_info(tmp_path / "results" / "demo" / "forest" / "bundle")
    assert str(err.value) == (
        f"model bundle {tmp_path / 'results' / 'demo' / 'forest' / 'bundle'} not found: train a model first "
        "(python train/train.py --model forest)"
    )
    with pytest.raises(BundleError, match=r"not found: train a model first \(python train/train.py\)$"):
        read_info(tmp_path / "elsewhere")


def test_corrupt_bundle_json(trained, tmp_path):
    _, tree = trained
    folder = copy_bundle(tree, "regression", tmp_path)
    (folder / "bundle.json").write_text("{ not json")
    with pytest.raises(BundleError, match="corrupt"):
        load_predictor(folder)


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        ('"x"', 'TypeError: not a JSON object but "x"'),
        ({"pad_multiple": True}, "pad_multiple is true"),
        ({"classes": ["metal", "other"], "class_bias": [0.0]}, "class_bias is [0.0]"),
        ({"object_filter": {"cut": "x"}}, 'object_filter is {"cut": "x"}'),
        ({"targets": None}, "targets is null"),
        ({"targets": ["boundary"]}, 'targets is ["boundary"]'),
        ({"merge": "0.5"}, 'merge is "0.5"'),
        ({"seed_fraction": 1.0}, "seed_fraction is 1.0"),
        ({"seed_fraction": "0.25"}, 'seed_fraction is "0.25"'),
        ({"threshold": None}, "threshold is null"),
        ({"classes": None}, "classes is null"),
        ({"class_bias": [0, "x"]}, 'class_bias is [0, "x"]'),
        ({"object_filter": []}, "object_filter is []"),
        ({"bands": True}, "bands is true"),
    ],
)
def test_a_bundle_json_edited_wrong_by_hand_is_one_line(edit, said, trained, tmp_path):
    _, tree = trained
    folder = copy_bundle(tree, "regression", tmp_path)
    path = folder / "bundle.json"
    if isinstance(edit, dict):
        path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    else:
        path.write_text(edit)
    with pytest.raises(BundleError) as caught:
        load_predictor(folder)
    assert str(caught.value) == f"{path} is corrupt ({said}): retrain, or restore the bundle"


def test_model_with_foreign_types_is_refused(trained, tmp_path):
    _, tree = trained
    folder = copy_bundle(tree, "regression", tmp_path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 15))
    evil = Pipeline([("f", FunctionTransformer(func=abs)), ("model", LogisticRegression())]).fit(x, x[:, 0] > 0)
    sio.dump(evil, folder / "model.skops")
    with pytest.raises(BundleError, match=r"builtins.abs.*refusing"):
        load_predictor(folder)


def test_model_of_another_kind_is_refused(trained, tmp_path):
    _, tree = trained
    folder = copy_bundle(tree, "forest", tmp_path)
    shutil.copy(tree.bundle("regression") / "model.skops", folder / "model.skops")
    with pytest.raises(BundleError, match="not the RandomForestClassifier"):
        load_predictor(folder)


def test_normalization_is_the_only_preprocessing(trained):
    _, tree = trained
    predictor = load_predictor(tree.bundle("forest"))
    assert isinstance(predictor.info.normalization, Normalization)
    chw = np.full((3, 5, 5), 400, np.uint16)
    expected = pixel_features(predictor.info.normalization.apply(chw), predictor.spec)
    np.testing.assert_array_equal(predictor.features(chw), expected)
