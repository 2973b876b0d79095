"""Roof material classes on the classical side: flatten's class labels, multi-class forest and regression,
summarize per class; masks that disagree on their classes.

Tiny data built here: masks with a class band (footprint 0/255/128, class ids 0..K, 128 unknown,
the names in the ROOF_CLASSES tag) as mask.py writes them, on chips whose classes differ by colour:
background dark, metal bright red, other_roof bright blue.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO_SETTINGS, TEST_TRANSFORM, write_geotiff
from sklearn.ensemble import RandomForestClassifier

from core.bundle import BundleError, BundleInfo, Normalization, load_predictor, read_info
from core.errors import DataError
from core.raster import UNKNOWN, class_band_statistics, read_raster, write_raster
from core.settings import FlattenArgs, ParallelArgs, load_settings
from core.tree import DataTree
from flatten.flatten import flatten_chips
from flatten.table import classes_path, inspect_table, iter_pixels, table_classes
from ml.bundle import ClassicalPredictor
from ml.features import FeatureSpec
from ml.models import class_probabilities, class_targets
from ml.train import train_classical
from summarize.summarize import CLASSES_PNG, OVERLAY_PNG, SEPARATION_PNG, summarize

CLASSES = ("metal", "other_roof")
ONE_WORKER = ParallelArgs(workers=1)


def write_class_mask(path: Path, ids: np.ndarray, classes=CLASSES, transform=TEST_TRANSFORM) -> Path:
    """A mask as mask.py writes it with a class map: footprint (255 any roof, 128 unknown) and the class band."""
    footprint = np.where(ids == UNKNOWN, UNKNOWN, np.where(ids > 0, 255, 0)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_raster(path, np.stack([footprint, ids.astype(np.uint8)]), crs="EPSG:32644", transform=transform,
                        descriptions=("footprint", "class"), tags={"ROOF_CLASSES": ",".join(classes)})  # fmt: skip


# --- flatten -------------------------------------------------------------------------------------

# A 3 x 5 chip of 2 bands: pixel (0, 0) nodata (left out), (2, 4) of unknown class (left out).
IDS = np.array([[0, 1, 1, 0, 2], [0, 1, 2, 2, 2], [0, 0, 0, 1, UNKNOWN]], np.uint8)
IMAGE = np.stack([np.arange(1, 16).reshape(3, 5), 100 + np.arange(15).reshape(3, 5)]).astype(np.uint16)
IMAGE[:, 0, 0] = 0


@pytest.fixture
def tiny(data_tree):
    write_geotiff(data_tree.frames("train") / "train_0.tif", array=IMAGE, nodata=0)
    write_class_mask(data_tree.split_masks("train") / "train_0.tif", IDS)
    return data_tree


def flatten(tree, overwrite=False, **kwargs):
    args = FlattenArgs(**kwargs)
    return flatten_chips(tree.frames("train"), tree.split_masks("train"), tree, args, ONE_WORKER, overwrite=overwrite)


@pytest.mark.parametrize(("layout", "fmt"), [("long", "csv"), ("wide", "parquet")])
def test_flatten_labels_are_the_class_ids(tiny, layout, fmt):
    path = flatten(tiny, layout=layout, format=fmt)
    table = pd.read_csv(path) if fmt == "csv" else pd.read_parquet(path)
    keep = (IMAGE != 0).any(axis=0) & (IDS != UNKNOWN)
    rows, cols = np.nonzero(keep)
    per_pixel = 2 if layout == "long" else 1
    assert len(table) == 13 * per_pixel  # 15 pixels, one nodata, one unknown
    np.testing.assert_array_equal(table["label"].to_numpy()[::per_pixel], IDS[rows, cols])
    assert np.bincount(table["label"].to_numpy()[::per_pixel]).tolist() == [5, 4, 4]
    sidecar = json.loads(classes_path(path).read_text())
    assert sidecar == {
        "table": path.name,
        "classes": ["metal", "other_roof"],
        "label": {"0": "background", "1": "metal", "2": "other_roof"},
        "pixels": {"background": 5, "metal": 4, "other_roof": 4},
    }
    info = inspect_table(path)
    assert info.classes == CLASSES and table_classes(path) == CLASSES
    values, labels = next(iter_pixels(info, chunk_rows=1000))
    np.testing.assert_array_equal(labels, IDS[rows, cols])
    np.testing.assert_array_equal(values, IMAGE[:, rows, cols].T)
    assert sorted(p.name for p in tiny.flat.iterdir()) == sorted([path.name, "pixels.classes.json"])


def test_a_one_class_table_has_no_sidecar_and_a_stale_one_goes(tiny, make_geotiff):
    flatten(tiny)
    assert (tiny.flat / "pixels.classes.json").is_file()
    binary = np.where(IDS == UNKNOWN, UNKNOWN, np.where(IDS > 0, 255, 0)).astype(np.uint8)
    make_geotiff(tiny.split_masks("train"), "train_0.tif", array=binary, nodata=None)
    path = flatten(tiny, overwrite=True)
    assert sorted(p.name for p in tiny.flat.iterdir()) == ["pixels.csv"]
    kept = IDS[(IMAGE != 0).any(axis=0) & (IDS != UNKNOWN)]
    assert pd.read_csv(path)["label"].to_numpy()[::2].tolist() == (kept > 0).astype(int).tolist()
    assert inspect_table(path).classes == ()


def test_masks_naming_other_classes_are_one_line_naming_both(tiny, make_geotiff):
    write_geotiff(tiny.frames("train") / "train_1.tif", array=IMAGE, nodata=0)
    write_class_mask(tiny.split_masks("train") / "train_1.tif", IDS, classes=("metal", "tiles"))
    first, second = (tiny.split_masks("train") / f"train_{i}.tif" for i in (0, 1))
    message = f"^masks {first} \\(metal,other_roof\\) and {second} \\(metal,tiles\\) name different classes: "
    with pytest.raises(DataError, match=message):
        flatten(tiny)
    make_geotiff(tiny.split_masks("train"), "train_1.tif", array=np.zeros((3, 5), np.uint8), nodata=None)
    with pytest.raises(DataError, match=r"\(metal,other_roof\) and .* \(one class, no class band\)"):
        flatten(tiny)


def test_a_table_label_beyond_the_classes_is_an_error(tiny, settings_file, tmp_path):
    path = flatten(tiny)
    table = pd.read_csv(path)
    table.loc[0:1, "label"] = 3
    table.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"holds label 3 but pixels.classes.json names 2 classes \(labels 0..2\)"):
        summarize(tiny, load_settings(settings_file, [f"data_root={tmp_path / 'data'}"]))


# --- forest and regression -----------------------------------------------------------------------

SIZE = 32
#: Colours (band 1, 2, 3) of background, metal (red) and other_roof (blue); unknown roofs are green.
COLOURS = {0: (400, 400, 400), 1: (1500, 300, 300), 2: (300, 300, 1500), UNKNOWN: (300, 1500, 300)}


def class_chip(rng: np.random.Generator, classes: tuple[int, ...] = (1, 2)) -> tuple[np.ndarray, np.ndarray]:
    """A chip (3, SIZE, SIZE) uint16 and its class ids: a roof of each class in ``classes``, an unknown one,
    a 2 x 2 nodata corner (0, as mask.py writes it)."""
    ids = np.zeros((SIZE, SIZE), np.uint8)
    spots = [(4, 4), (4, 18), (18, 4), (18, 18)]
    order = rng.permutation(4)
    for k, spot in zip((*classes, UNKNOWN), order, strict=False):
        r, c = spots[spot]
        h, w = rng.integers(7, 11, 2)
        ids[r : r + h, c : c + w] = k
    image = np.zeros((3, SIZE, SIZE))
    for k, colour in COLOURS.items():
        image[:, ids == k] = np.asarray(colour, float)[:, None]
    image = np.clip(image + rng.normal(0, 50, image.shape), 1, 4000).astype(np.uint16)
    image[:, :2, :2] = 0
    ids[:2, :2] = 0
    return image, ids


def write_class_scene(root: Path, seed: int = 0, train_classes: tuple[int, ...] = (1, 2)) -> None:
    rng = np.random.default_rng(seed)
    for split, count in (("train", 3), ("val", 2)):
        for i in range(count):
            image, ids = class_chip(rng, train_classes if split == "train" else (1, 2))
            write_geotiff(root / f"{split}_frames" / f"{split}_{i}.tif", array=image, nodata=0)
            write_class_mask(root / f"{split}_masks" / f"{split}_{i}.tif", ids)


def class_settings(tmp: Path, *overrides: str):
    return load_settings(
        REPO_SETTINGS,
        [
            f"data_root={tmp / 'data'}",
            f"training_args.results_folder={tmp / 'results'}",
            "experiment=classes",
            "load_dataset_args.channels=3",
            f"model_args.input_shape=[{SIZE},{SIZE},3]",
            "ml_args.forest.n_estimators=10",
            "ml_args.forest.n_jobs=1",
            "ml_args.max_train_pixels=2000",
            "ml_args.texture_windows=[]",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def class_scene(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classes")
    write_class_scene(tmp / "data")
    settings = class_settings(tmp)
    tree = DataTree.from_settings(settings)
    for kind in ("forest", "regression"):
        train_classical(kind, settings, tree)
    return tree


@pytest.mark.parametrize("kind", ["forest", "regression"])
def test_the_models_learn_three_classes(class_scene, kind):
    tree = class_scene
    info = read_info(tree.bundle(kind))
    assert info.classes == ["metal", "other_roof"] and info.targets == ["footprint"]
    predictor = load_predictor(tree.bundle(kind))
    image, ids = class_chip(np.random.default_rng(99))  # held out
    bands = predictor.forward_targets(predictor.prepare(image[np.newaxis]))
    assert bands.shape == (1, 3, SIZE, SIZE) and bands.dtype == np.float32
    np.testing.assert_allclose(bands[0, 1:].sum(axis=0), 1.0, atol=1e-6)  # P(k | roof) sum to 1 everywhere
    # P(roof) is 1 - P(background) of the model; forward() gives it alone.
    features = predictor.features(image).reshape(SIZE * SIZE, -1)
    background = predictor.model.predict_proba(features)[:, list(predictor.model.classes_).index(0)]
    valid = (image != 0).any(axis=0)
    np.testing.assert_allclose(bands[0, 0][valid], (1 - background.reshape(SIZE, SIZE))[valid], atol=1e-6)
    np.testing.assert_array_equal(predictor.forward(predictor.prepare(image[np.newaxis])), bands[:, 0])
    np.testing.assert_array_equal(predictor.predict(image[np.newaxis]), bands[:, 0])
    assert (bands[0, 0, :2, :2] == 0).all() and (bands[0, 1:, :2, :2] == 0.5).all()  # nodata
    # The right class on held-out pixels: roof where a roof is, the argmax of P(k | roof) its class.
    known = valid & (ids != UNKNOWN)
    called = bands[0, 0] >= info.threshold
    assert (called[known] == (ids[known] > 0)).mean() >= 0.98
    roof = known & (ids > 0)
    assert ((np.argmax(bands[0, 1:], axis=0) + 1)[roof] == ids[roof]).mean() >= 0.98
    record = json.loads((tree.model_dir(kind) / "metrics.json").read_text())
    assert record["classes"] == ["metal", "other_roof"]
    assert set(record["train_class_pixels"]) == {"metal", "other_roof"} and min(record["train_class_pixels"].values())
    confusion = np.array(record["class_confusion"])
    assert confusion.shape == (2, 2) and record["material_accuracy"] >= 0.98
    assert record["material_accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
    assert record["pixel"]["iou"] >= 0.9


def test_train_from_a_class_table(tmp_path):
    write_class_scene(tmp_path / "data", seed=4)
    settings = class_settings(tmp_path, "ml_args.source=flat")
    tree = DataTree.from_settings(settings)
    flatten_chips(tree.frames("train"), tree.split_masks("train"), tree, FlattenArgs(), ONE_WORKER)
    train_classical("forest", settings, tree)
    assert read_info(tree.bundle("forest")).classes == ["metal", "other_roof"]
    assert json.loads((tree.model_dir("forest") / "metrics.json").read_text())["material_accuracy"] >= 0.95
    # A table whose classes are not the masks': one line naming both.
    sidecar = classes_path(tree.flat / "pixels.csv")
    sidecar.write_text(sidecar.read_text().replace('"other_roof"', '"tiles"'))
    with pytest.raises(DataError, match=r"^flat table .*pixels.csv has classes metal,tiles but mask .* "
                                        r"metal,other_roof: rerun python flatten/flatten.py --overwrite$"):  # fmt: skip
        train_classical("forest", settings, tree, overwrite=True)


def test_train_refuses_masks_that_disagree(tmp_path):
    write_class_scene(tmp_path / "data", seed=5)
    settings = class_settings(tmp_path)
    tree = DataTree.from_settings(settings)
    val = tree.split_masks("val") / "val_1.tif"
    ids, _ = read_raster(val)
    write_class_mask(val, ids[1], classes=("metal", "tiles"))
    with pytest.raises(DataError, match=r"^masks .*train_0.tif \(metal,other_roof\) and .*val_1.tif \(metal,tiles\)"):
        train_classical("regression", settings, tree)


def test_a_class_absent_from_training_still_gets_its_column(tmp_path, caplog):
    # Through training: the train chips hold no other_roof; validation does.
    write_class_scene(tmp_path / "data", seed=6, train_classes=(1,))
    settings = class_settings(tmp_path)
    tree = DataTree.from_settings(settings)
    train_classical("forest", settings, tree)
    assert "no training pixel of class other_roof" in caplog.text
    predictor = load_predictor(tree.bundle("forest"))
    assert list(predictor.model.classes_) == [0, 1]
    image, _ = class_chip(np.random.default_rng(7))
    bands = predictor.forward_targets(predictor.prepare(image[np.newaxis]))
    assert bands.shape == (1, 3, SIZE, SIZE)
    np.testing.assert_allclose(bands[0, 1:].sum(axis=0), 1.0, atol=1e-6)
    roofish = bands[0, 0] > 0
    assert roofish.any() and (bands[0, 2][roofish] == 0).all() and (bands[0, 1][roofish] == 1).all()
    record = json.loads((tree.model_dir("forest") / "metrics.json").read_text())
    assert record["train_class_pixels"]["other_roof"] == 0 and record["class_recall"]["other_roof"] == 0.0


def test_class_probabilities_fill_absent_classes_in_id_order():
    x = np.array([[0.0], [1.0], [2.0], [3.0]] * 5)
    y = np.array([0, 0, 3, 3] * 5)
    model = RandomForestClassifier(n_estimators=3, random_state=0).fit(x, y)
    proba = class_probabilities(model, np.array([[0.0], [3.0]]), 3)
    np.testing.assert_array_equal(proba, [[1, 0, 0, 0], [0, 0, 0, 1]])
    # P(roof) and P(k | roof); no roof probability at all: equal shares.
    targets = class_targets(np.array([[0.5, 0.1, 0.0, 0.4], [1.0, 0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(targets, [[0.5, 0.2, 0.0, 0.8], [0.0, 1 / 3, 1 / 3, 1 / 3]], rtol=1e-6)


def test_a_model_whose_classes_exceed_the_bundles_is_refused():
    spec = FeatureSpec(bands=1, indices=False, texture_windows=())
    norm = Normalization("zscore", (0.0,), (1.0,), (0.0,), (1.0,), None)
    info = BundleInfo(kind="forest", bands=1, dtype="uint16", normalization=norm, threshold=0.5,
                      classes=["metal"], features=spec.to_dict())  # fmt: skip
    model = RandomForestClassifier(n_estimators=2, random_state=0).fit([[0.0], [1.0], [2.0]], [0, 1, 2])
    with pytest.raises(BundleError, match=r"model's classes are \[0, 1, 2\] but bundle.json names background and 1"):
        ClassicalPredictor(info, model)


# --- summarize -----------------------------------------------------------------------------------


@pytest.fixture
def class_chips(data_tree):
    """Two 12 x 10 chips of 3 uint16 bands with class masks; returns (tree, values (n, 3), class ids (n,)).

    Band 1 separates the classes completely (background 100-199, metal 500-599, other_roof 900-999);
    band 2 has the same values in every class (each class's pixels cycle through 10, 20, 30); band 3
    is random.
    """
    rng = np.random.default_rng(3)
    values, labels = [], []
    for i in range(2):
        ids = np.zeros((12, 10), np.uint8)
        ids[2:6, 1:7] = 1
        ids[7 : 10 + i, 2:8] = 2
        ids[0, 8:] = UNKNOWN
        valid = np.ones((12, 10), bool)
        valid[11, 0] = False  # nodata
        image = np.zeros((3, 12, 10), np.uint16)
        image[0] = np.choose(np.minimum(ids, 3), [100, 500, 900, 0]) + rng.integers(0, 100, (12, 10))
        for k in (0, 1, 2):
            image[1][(ids == k) & valid] = np.resize([10, 20, 30], int(((ids == k) & valid).sum()))
        image[2] = rng.integers(1, 2000, (12, 10))
        image[:, ~valid] = 0
        write_geotiff(data_tree.frames("train") / f"train_{i}.tif", array=image, nodata=0)
        write_class_mask(data_tree.split_masks("train") / f"train_{i}.tif", ids)
        keep = (image != 0).any(axis=0) & (ids != UNKNOWN)
        values.append(image[:, keep].T)
        labels.append(ids[keep])
    return data_tree, np.concatenate(values), np.concatenate(labels)


def test_summarize_per_class(class_chips, settings_file, tmp_path):
    tree, values, labels = class_chips
    assert np.bincount(labels).tolist() == [144, 48, 42]  # 240 pixels: 2 nodata, 4 unknown
    flat = flatten_chips(tree.frames("train"), tree.split_masks("train"), tree, FlattenArgs(), ONE_WORKER)
    settings = load_settings(settings_file, [f"data_root={tmp_path / 'data'}", "summarize_args.bins=16"])
    record = summarize(tree, settings)
    assert record == json.loads((tree.summary / "stats.json").read_text())
    names = ["background", "metal", "other_roof"]
    assert record["classes"] == names
    assert record["pixels"] == {"all": len(labels), "roof": int((labels > 0).sum()),
                                "classes": {"background": 144, "metal": 48, "other_roof": 42}}  # fmt: skip
    for b, entry in enumerate(record["bands"]):
        assert set(entry) == {"band", "all", "classes"}
        for k, name in enumerate(names):
            got, want = entry["classes"][name], values[labels == k, b]
            assert got["count"] == want.size and got["min"] == want.min() and got["max"] == want.max()
            assert got["mean"] == pytest.approx(want.mean(), rel=1e-12)
            assert got["std"] == pytest.approx(want.std(), rel=1e-12)
            assert got["percentiles"]["p50"] == np.percentile(want, 50)
    table = record["separation"]
    assert [(r["band"], tuple(r["classes"])) for r in table] == [
        (b, pair) for b in (1, 2, 3) for pair in combinations(names, 2)
    ]
    for r in table:
        a, c = (values[labels == names.index(n), r["band"] - 1].astype(float) for n in r["classes"])
        pooled = np.sqrt(((a.size - 1) * a.var(ddof=1) + (c.size - 1) * c.var(ddof=1)) / (a.size + c.size - 2))
        if r["band"] == 2:
            assert r["cohen_d"] == pytest.approx(0.0, abs=1e-9) and r["overlap"] == pytest.approx(1.0)
            continue
        assert r["cohen_d"] == pytest.approx((c.mean() - a.mean()) / pooled, rel=1e-9)
        if r["band"] == 1:
            assert r["overlap"] == 0.0 and r["cohen_d"] > 10
        else:
            assert 0.0 < r["overlap"] < 1.0
    assert sorted(p.name for p in tree.summary.iterdir()) == sorted(
        [CLASSES_PNG, SEPARATION_PNG, "stats.json", *(f"histogram_band_{b}.png" for b in (1, 2, 3))]
    )
    assert not (tree.summary / OVERLAY_PNG).exists()
    # Straight from the chips: the same statistics.
    frames = tree.list_rasters(tree.frames("train"))
    from_chips = class_band_statistics(frames, [tree.split_masks("train") / f.name for f in frames], block=4)
    from flatten.table import table_statistics

    from_table, _ = table_statistics(flat, chunk_rows=1000)
    assert from_chips.classes == CLASSES and from_chips.class_result() == from_table.class_result()
    assert from_chips.result() == from_table.result()
    sets = [f"data_root={tmp_path / 'data'}", "summarize_args.bins=16", "summarize_args.source=chips"]
    chips_record = summarize(tree, load_settings(settings_file, sets), overwrite=True)
    assert {k: v for k, v in chips_record.items() if k not in ("source", "kind", "layout")} == {
        k: v for k, v in record.items() if k not in ("source", "kind", "layout")
    }
