"""Roof material classes: the class map, masks with a class band, and its bad inputs.

The class map's settings errors (two classes claiming one value, too few classes, a name that
is taken, num_classes that disagrees); the labels' (an attribute the file lacks, values no
polygon has: listed with the values present); masks of hand-placed roofs with exact class ids,
unknown pixels where a value has no class; the mask stage writing the class band and its tag; the
U-Net's class bands (each learnt as a footprint over every known pixel, scaled by the predictor to
each class's probability given a roof).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import cells, material_labels
from rasterio.transform import from_origin

from core.errors import DataError, LabelError, SettingsError
from core.raster import UNKNOWN, check_mask, mask_labels, read_mask_bands, read_truth, write_raster
from core.settings import MaskArgs, load_settings, validate_settings
from core.targets import make_targets
from core.vector import load_labels

#: A 32 x 32 px chip of 1 m pixels: pixel (row, col) covers x in [col, col + 1], y in [31 - row, 32 - row].
T32 = from_origin(0, 32, 1, 1)


CLASS_MAP = {"metal": ["tin", "metal"], "other_roof": ["concrete", "clay_tiles"]}


def _args(classes=CLASS_MAP, attribute="roof:material", **more) -> MaskArgs:
    return MaskArgs.model_validate({"classes": classes, "class_attribute": attribute, **more})


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ({"metal": ["tin"], "other_roof": ["tin", "concrete"]},
         r"value 'tin' is claimed by two classes \(metal and other_roof\): one value, one class"),
        ({"metal": ["tin"]}, r"names 1 class\(es\): name 2 to 32"),
        ({"metal": ["tin"], "background": ["concrete"]}, r"class name 'background' is reserved \(background, unknown, "
                                                         r"footprint, boundary, contact and class already mean "
                                                         r"something here\): call the class otherwise$"),
        ({"metal": ["tin"], "footprint": ["concrete"]}, r"class name 'footprint' is reserved"),
        ({"metal": ["tin"], "2nd": ["concrete"]}, r"class name '2nd' must start with a letter"),
        ({"metal": ["tin"], "other": []}, r"class other names no value"),
    ],
)  # fmt: skip
def test_a_bad_class_map_is_one_line_naming_the_setting(classes, message):
    with pytest.raises(SettingsError, match=r"mask_args\.classes.*" + message):
        validate_settings({"mask_args": {"classes": classes}})


def test_num_classes_must_agree_with_the_class_map(settings_file: Path):
    with pytest.raises(SettingsError, match=r"model_args.num_classes is 3 but mask_args.classes names 2 class\(es\): "
                                            r"set num_classes null to take it from the class map"):  # fmt: skip
        load_settings(settings_file, [f"mask_args.classes={_json(CLASS_MAP)}", "model_args.num_classes=3"])
    with pytest.raises(SettingsError, match=r"num_classes is 2 but mask_args.classes names 1 class\(es\) \(it is null"):
        load_settings(settings_file, ["model_args.num_classes=2"])
    settings = load_settings(settings_file, [f"mask_args.classes={_json(CLASS_MAP)}", "model_args.num_classes=2"])
    assert settings.mask_args.class_names == ("metal", "other_roof")
    assert load_settings(settings_file, ["model_args.num_classes=null"]).mask_args.class_names == ()


def _json(value) -> str:
    import json

    return json.dumps(value)


# --- labels --------------------------------------------------------------------------------------


def test_the_class_map_gives_ids_in_its_order_and_unmapped_values_are_unknown(tmp_path: Path):
    folder = material_labels(tmp_path, ["tin", "concrete", None, "metal", "plastic", "clay_tiles"])
    roofs, unknown, _ = load_labels(folder, _args())
    assert roofs["class_id"].tolist() == [1, 2, 1, 2]
    assert len(unknown) == 2  # no value, and a value no class names


@pytest.mark.parametrize(
    ("classes", "attribute", "message"),
    [
        ({"metal": ["tin", "aluminium"], "other_roof": ["concrete", "slate"]}, "roof:material",
         r"^mask_args.classes names values no polygon of roofs.geojson has in roof:material \(metal: \['aluminium'\]; "
         r"other_roof: \['slate'\]\); values present: \['concrete', 'tin'\]: fix the class map$"),
        (CLASS_MAP, "material",
         r"^mask_args.class_attribute 'material' is not an attribute of roofs.geojson \(it has roof:material\)"),
    ],
)  # fmt: skip
def test_a_class_map_naming_absent_values_lists_those_present(tmp_path: Path, classes, attribute, message):
    folder = material_labels(tmp_path, ["tin", "concrete", None])
    with pytest.raises(LabelError, match=message):
        load_labels(folder, _args(classes, attribute))


def test_the_class_attribute_defaults_to_the_filters(tmp_path: Path):
    folder = material_labels(tmp_path, ["tin", "concrete"])
    classes = {"metal": ["tin"], "other_roof": ["concrete"]}
    args = MaskArgs.model_validate({"classes": classes, "filter": {"attribute": "roof:material", "values": ["x"]}})
    roofs, _, _ = load_labels(folder, args)  # the filter's values are not used with a class map
    assert roofs["class_id"].tolist() == [1, 2]


# --- masks ---------------------------------------------------------------------------------------


def test_the_class_band_holds_each_roofs_id_unknown_and_nodata():
    a, b, c = cells(4, 12, 2, 10), cells(4, 12, 10, 18), cells(20, 24, 20, 28)
    valid = np.ones((32, 32), bool)
    valid[:, 30:] = False
    bands = make_targets([a, b], [c], (32, 32), T32, targets=("footprint", "boundary"),
                         widths=(1, 2), valid=valid, classes=[2, 1])  # fmt: skip
    assert bands.shape == (3, 32, 32)
    klass = bands[2]
    assert (klass == 2).sum() == 64 and (klass[4:12, 2:10] == 2).all()
    assert (klass == 1).sum() == 64 and (klass[4:12, 10:18] == 1).all()
    assert (klass == UNKNOWN).sum() == 32 and (bands[0] == UNKNOWN).sum() == 32
    assert (klass == 0).sum() == 32 * 32 - 160
    assert not bands[:, :, 30:].any()


def read_classes(path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    data, bands, names, _ = read_mask_bands(path)
    return mask_labels(data, bands, names, path)[0], names


def test_a_mask_with_a_class_band_is_checked_and_read(tmp_path: Path):
    data = np.zeros((2, 4, 4), np.uint8)
    data[0, :2] = 255
    data[1, :2, :2], data[1, :2, 2:] = 1, 2
    data[0, 3, 3] = data[1, 3, 3] = UNKNOWN
    path = write_raster(tmp_path / "m.tif", data, crs="EPSG:32644", transform=from_origin(0, 4, 1, 1),
                        descriptions=("footprint", "class"), tags={"ROOF_CLASSES": "metal,other_roof"})  # fmt: skip
    ids, names = read_classes(path)
    assert names == ("metal", "other_roof")
    assert ids.tolist() == data[1].tolist()
    roof, known, _ = read_truth(path)
    assert int(roof.sum()) == 8 and int((~known).sum()) == 1
    # Class ids are not 0/255: only a band named class may hold them.
    with pytest.raises(DataError, match=r"holds values \[0, 1, 2, 128\] in band 2, not only 0 and 255"):
        check_mask(data, "m.tif", ("footprint", "contact"))
    data[1, 0, 0] = 77
    with pytest.raises(DataError, match=r"in band 2, not only class ids 0..32 and 128 \(unknown\)"):
        check_mask(data, "m.tif", ("footprint", "class"))
    # A one-class mask reads as class 1.
    one = write_raster(tmp_path / "one.tif", data[:1], crs="EPSG:32644", transform=from_origin(0, 4, 1, 1))
    ids, names = read_classes(one)
    assert names == () and int((ids == 1).sum()) == 8 and int((ids == UNKNOWN).sum()) == 1


def test_the_mask_stage_writes_the_class_band_and_names_the_classes(scene, settings_file: Path, tmp_path: Path, capsys):
    import geopandas as gpd

    from chip.chip import main as chip_main
    from core.tree import DataTree
    from mask.mask import main as mask_main
    from mosaic.mosaic import main as mosaic_main

    argv = scene()
    tree = DataTree.from_settings(load_settings(settings_file, [f"data_root={tmp_path / 'data'}"]))
    labels = gpd.read_file(tree.labels / "roofs.geojson")
    labels.loc[labels.index[:2], "roof_type"] = None  # two roofs of unknown material
    labels.to_file(tree.labels / "roofs.geojson", driver="GeoJSON")
    for main in (mosaic_main, chip_main):
        assert main(argv) == 0
    classes = _json({"metal": ["metal"], "other_roof": ["concrete"]})
    assert mask_main([*argv, "--set", f"mask_args.classes={classes}"]) == 0
    seen = set()
    for path in sorted(tree.masks.glob("*.tif")):
        with rasterio.open(path) as src:
            assert src.descriptions == ("footprint", "boundary", "contact", "class")
            assert src.tags()["ROOF_CLASSES"] == "metal,other_roof"
            data = src.read()
        roof = data[0] == 255
        assert ((data[3] > 0) & (data[3] != UNKNOWN) == roof).all()  # a class wherever a roof is
        assert ((data[3] == UNKNOWN) == (data[0] == UNKNOWN)).all()
        seen |= set(np.unique(data[3]).tolist())
    assert seen == {0, 1, 2, UNKNOWN}
    # A class map naming a value the labels lack: one line, nothing written; with or without --overwrite, the
    # line says what is wrong with the map (not "add --overwrite", which would fail next).
    before = sorted(p.read_bytes() for p in tree.masks.glob("*.tif"))
    bad = _json({"metal": ["metal"], "other_roof": ["slate"]})
    capsys.readouterr()
    for overwrite in ([], ["--overwrite"]):
        assert mask_main([*argv, *overwrite, "--set", f"mask_args.classes={bad}"]) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "error: mask_args.classes names values no polygon of roofs.geojson has in roof_type (other_roof: "
            "['slate']); values present: ['concrete', 'metal']: fix the class map"
        )
        assert sorted(p.read_bytes() for p in tree.masks.glob("*.tif")) == before


# --- a tiny U-Net on two classes -------------------------------------------------------------------

TRANSFORM = rasterio.transform.from_origin(600000.0, 2960000.0, 0.5, 0.5)
#: Two materials by colour: metal bright in band 1, other roofs bright in band 3.
TONES = {1: (1500, 700, 500), 2: (600, 700, 1500)}


def _class_chip(rng: np.random.Generator, side: int = 64) -> tuple[np.ndarray, np.ndarray, list]:
    """Four roofs (two of each class, one pair touching), one unknown building; the image, its mask (footprint,
    boundary, contact, class) and the roofs as (polygon, class id)."""
    import shapely

    image = rng.normal(400, 40, (3, side, side)).clip(1, 2047)
    roofs = []
    spots = [(4, 4), (4, 34), (34, 4), (34, 34)]
    for k, (r, c) in enumerate(spots):
        kind = 1 + k % 2
        h, w = int(rng.integers(9, 13)), int(rng.integers(9, 13))
        r, c = r + int(rng.integers(0, 8)), c + int(rng.integers(0, 8))
        for band, tone in enumerate(TONES[kind]):
            image[band, r : r + h, c : c + w] = tone + rng.normal(0, 30, (h, w))
        at = TRANSFORM @ rasterio.Affine.translation(c, r)
        roofs.append((shapely.box(*rasterio.transform.array_bounds(h, w, at)), kind))
    unknown = [shapely.box(*rasterio.transform.array_bounds(5, 5, TRANSFORM @ rasterio.Affine.translation(56, 56)))]
    bands = make_targets([g for g, _ in roofs], unknown, (side, side), TRANSFORM,
                         targets=("footprint", "boundary", "contact"), widths=(1, 3),
                         classes=[k for _, k in roofs])  # fmt: skip
    return image.astype(np.uint16), bands, roofs


def test_a_unet_trained_on_classes_maps_each_roofs_material(tmp_path: Path, settings_file: Path):
    import geopandas as gpd
    import pandas as pd

    from core.tree import DataTree
    from predict.predict import main as predict_main
    from train.train import main as train_main

    rng = np.random.default_rng(3)
    data = tmp_path / "data"
    truth = {}
    for split, n in (("train", 12), ("val", 4)):
        for i in range(n):
            image, bands, roofs = _class_chip(rng)
            name = f"{split}_{i}.tif"
            write_raster(data / f"{split}_frames" / name, image, crs="EPSG:32644", transform=TRANSFORM, nodata=0)
            write_raster(data / f"{split}_masks" / name, bands, crs="EPSG:32644", transform=TRANSFORM,
                         descriptions=("footprint", "boundary", "contact", "class"),
                         tags={"ROOF_CLASSES": "metal,other_roof"})  # fmt: skip
            truth[name] = roofs
    sets = ["model_args.input_shape=[64,64]", "model_args.filters=8", "model_args.upconv_filters=8",
            "model_args.num_layers=2", "load_dataset_args.batch_size=4", "training_args.epochs=30",
            "training_args.steps_per_epoch=3", "training_args.learning_rate=0.003", "training_args.verbose=0",
            f"data_root={data}", f"training_args.results_folder={tmp_path / 'results'}",
            f"predict_args.output={tmp_path / 'predictions'}", "experiment=classes"]  # fmt: skip
    argv = ["--settings", str(settings_file), "--quiet"]
    for item in sets:
        argv += ["--set", item]
    assert train_main([*argv, "--model", "unet"]) == 0
    tree = DataTree.from_settings(load_settings(settings_file, sets))
    info = _read_json(tree.bundle("unet") / "bundle.json")
    assert info["classes"] == ["metal", "other_roof"] and info["targets"] == ["footprint", "boundary", "contact"]
    history = pd.read_csv(tree.model_dir("unet") / "history.csv")
    assert history["val_class_accuracy"].iloc[-1] >= 0.9
    trained = _read_json(tree.model_dir("unet") / "metrics.json")
    assert trained["classes"] == ["metal", "other_roof"] and trained["material_accuracy"] >= 0.9
    assert set(trained["class_recall"]) == {"metal", "other_roof"} and len(trained["class_confusion"]) == 2

    assert predict_main([*argv, "--model", "unet"]) == 0
    out = tree.prediction_dir("unet")
    with rasterio.open(out / "probabilities" / "val_0.tif") as src:
        assert src.descriptions == ("footprint", "boundary", "contact", "metal", "other_roof")
        probs = src.read()
    assert (probs[3] + probs[4] <= 1.0 + 1e-4).all()  # a roof of one class at most: they add up to 1 or less
    with rasterio.open(out / "classes" / "val_0.tif") as src, rasterio.open(out / "masks" / "val_0.tif") as m:
        assert src.dtypes[0] == "uint8" and src.tags()["ROOF_CLASSES"] == "metal,other_roof"
        assert src.colormap(1)[1] == (217, 95, 2, 255) and src.colormap(1)[2] == (117, 112, 179, 255)  # as plotted
        assert src.nodata == 0  # background: QGIS draws it transparent
        classes, mask = src.read(1), m.read(1)
    style = (out / "classes" / "val_0.qml").read_text()
    assert '<paletteEntry value="1" color="#d95f02" alpha="255" label="metal"/>' in style
    assert '<paletteEntry value="2" color="#7570b3" alpha="255" label="other_roof"/>' in style
    assert ((classes > 0) == (mask > 0)).all() and set(np.unique(classes)) <= {0, 1, 2}
    roofs = gpd.read_file(out / "roofs.gpkg")
    assert {"class", "class_id", "class_probability"} <= set(roofs.columns)
    assert set(roofs["class"]) <= {"metal", "other_roof"}
    assert (roofs["class"] == np.where(roofs["class_id"] == 1, "metal", "other_roof")).all()
    assert roofs["class_probability"].between(0.5, 1.0).all()
    # Every true roof found has its class; each roof is one class in the class raster.
    right = found = 0
    for name, polys in truth.items():
        if not name.startswith("val"):
            continue
        mine = roofs[roofs["source"] == name]
        for geom, kind in polys:
            hit = mine[mine.intersects(geom.centroid)]
            if len(hit):
                found += 1
                right += int(hit["class_id"].iloc[0] == kind)
    assert found >= 14 and right == found
    # A bundle trained on classes continued on one-class masks: one line.
    for path in (data / "train_masks").glob("*.tif"):
        bands, _ = _read(path)
        write_raster(path, bands[:3], crs="EPSG:32644", transform=TRANSFORM,
                     descriptions=("footprint", "boundary", "contact"))  # fmt: skip
    for path in (data / "val_masks").glob("*.tif"):
        bands, _ = _read(path)
        write_raster(path, bands[:3], crs="EPSG:32644", transform=TRANSFORM,
                     descriptions=("footprint", "boundary", "contact"))  # fmt: skip
    err = _stderr_of(train_main, [*argv, "--model", "unet", "--overwrite", "--set", "training_args.pretrained=true"])
    assert "was trained on the classes ['metal', 'other_roof'], the masks now hold one class: set " in err


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def _read(path: Path):
    from core.raster import read_raster

    return read_raster(path)


def _stderr_of(main, argv) -> str:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(argv) == 1
    return err.getvalue()


# --- evaluate: per-class scores, confusion matrix, per-roof material -----------------------------


def test_class_scores_are_read_off_the_confusion_matrix_exactly(tmp_path: Path):
    from evaluate.classes import ClassScores

    scores = ClassScores(("metal", "other_roof"))
    truth = np.array([[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, UNKNOWN, 0]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [1, 2, 2, 2], [2, 0, 1, 0]], np.uint8)
    scores.add_pixels(truth, pred, np.ones(truth.shape, bool))
    # true rows background, metal, other_roof; predicted columns in the same order (the unknown pixel left out)
    assert scores.pixels.tolist() == [[2, 1, 0], [0, 3, 1], [1, 0, 3]]
    per = scores.per_class()
    assert per["metal"]["iou"] == pytest.approx(3 / 5) and per["metal"]["precision"] == pytest.approx(3 / 4)
    assert per["other_roof"]["f1"] == pytest.approx(2 * 0.75 * 0.75 / 1.5) and per["other_roof"]["pixels"] == 4
    assert per["background"]["recall"] == pytest.approx(2 / 3)
    scores.add_roofs([1, 1, 2, 2, 2], [1, 2, 2, 2, 2])
    assert scores.roof_accuracy() == (pytest.approx(0.8), 5)
    assert scores.record()["roof_confusion"] == [[1, 1], [0, 3]]
    scores.write_csv(tmp_path / "confusion.csv")
    assert (tmp_path / "confusion.csv").read_text().splitlines() == [
        "true,predicted_background,predicted_metal,predicted_other_roof",
        "background,2,1,0",
        "metal,0,3,1",
        "other_roof,1,0,3",
    ]
    scores.plot(tmp_path / "confusion.png", "test")
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("x", "text"),
    [(0.0, "0%"), (1.0, "100%"), (0.8, "80%"), (0.996, "99.6%"), (0.9996, "99.96%"), (0.004, "0.4%"),
     (0.0004, "0.04%"), (1e-9, "<0.001%"), (1 - 1e-9, ">99.999%")],
)  # fmt: skip
def test_a_share_reads_none_or_all_only_when_it_is(x, text):
    from evaluate.classes import share

    assert share(x) == text


def test_evaluate_scores_classes_and_refuses_a_class_bundle_against_one_class_masks(tmp_path: Path):
    from core.settings import EvaluateArgs
    from evaluate.classes import scored_classes
    from evaluate.evaluate import evaluate_folder

    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth = np.zeros((2, 8, 8), np.uint8)
    truth[0, :4, :4], truth[1, :4, :4] = 255, 1
    truth[0, 4:, 4:], truth[1, 4:, 4:] = 255, 2
    write_raster(truth_dir / "a.tif", truth, crs="EPSG:32644", transform=T32, descriptions=("footprint", "class"),
                 tags={"ROOF_CLASSES": "metal,other_roof"})  # fmt: skip
    kinds = np.zeros((8, 8), np.uint8)
    kinds[:4, :4] = 1
    kinds[4:, 4:6] = 2
    kinds[4:, 6:] = 1  # half the other roof called metal
    write_raster(pred_dir / "masks" / "a.tif", np.where(kinds > 0, 255, 0).astype(np.uint8), crs="EPSG:32644",
                 transform=T32)  # fmt: skip
    write_raster(pred_dir / "classes" / "a.tif", kinds, crs="EPSG:32644", transform=T32,
                 tags={"ROOF_CLASSES": "metal,other_roof"})  # fmt: skip
    result = evaluate_folder(
        pred_dir, tmp_path / "frames", truth_dir, EvaluateArgs(min_area=0), None, [("a.tif", "a.tif")]
    )
    assert result.classes.pixels.tolist() == [[32, 0, 0], [0, 16, 0], [0, 8, 8]]
    assert result.confusion.tp == 32  # roofs of any class: every roof pixel found
    # Predictions of a bundle trained on classes scored against one-class masks: one line.
    write_raster(truth_dir / "b.tif", truth[:1], crs="EPSG:32644", transform=T32)
    with pytest.raises(DataError, match=r"^the predictions are of a bundle trained on the classes \['metal', "
                                        r"'other_roof'\] but the truth masks \(.*truth\) hold one class: predict "):  # fmt: skip
        scored_classes(truth_dir / "b.tif", pred_dir / "classes" / "a.tif")
    with pytest.raises(DataError, match=r"bundle trained on one class but the truth masks .* hold the classes"):
        scored_classes(truth_dir / "a.tif", pred_dir / "classes" / "missing.tif")


# --- the stages end to end, as a user runs them ----------------------------------------------------


def test_the_stages_map_materials_end_to_end(scene, tmp_path: Path):
    """The scene's concrete roofs repainted (bright in band 3, metal bright in band 1); mask with a class
    map, split, train the regression, predict, evaluate: class raster, roofs with classes, per-class
    scores, confusion matrix and the report."""
    import json

    import geopandas as gpd
    from conftest import SCENE_SIDE, roof_rects, write_geotiff

    from chip.chip import main as chip_main
    from core.tree import DataTree
    from evaluate.evaluate import main as evaluate_main
    from mask.mask import main as mask_main
    from mosaic.mosaic import main as mosaic_main
    from predict.predict import main as predict_main
    from split.split import main as split_main
    from train.train import main as train_main

    classes = _json({"metal": ["metal"], "other_roof": ["concrete"]})
    argv = scene("experiment=materials", f"mask_args.classes={classes}", "mask_args.class_attribute=roof_type")
    rng = np.random.default_rng(0)
    image = rng.normal(400, 60, (3, SCENE_SIDE, SCENE_SIDE))
    for i, (c0, r0, c1, r1) in enumerate(roof_rects()):
        image[:, r0:r1, c0:c1] = np.array((1500, 700, 500) if i % 3 else (500, 700, 1500))[:, None, None]
    write_geotiff(tmp_path / "data" / "raw" / "tile.tif", array=np.clip(image, 1, 4000).astype(np.uint16), nodata=0)
    for main in (mosaic_main, chip_main, mask_main, split_main):
        assert main(argv) == 0
    # Settings the class map leaves unread do not outdate the masks: a rerun skips.
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "data" / "masks").glob("*.tif"))
    unread = 'mask_args.filter={"attribute": "roof_type", "values": ["brick"]}'
    assert mask_main([*argv, "--set", unread]) == 0
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "data" / "masks").glob("*.tif")) == before
    from flatten.flatten import main as flatten_main
    from summarize.summarize import main as summarize_main

    assert flatten_main(argv) == 0 and summarize_main(argv) == 0
    model = ["--model", "regression"]
    assert train_main([*argv, *model]) == 0
    assert predict_main([*argv, *model]) == 0
    assert evaluate_main([*argv, *model]) == 0
    tree = DataTree.from_settings(load_settings(argv[1], argv[4::2]))
    out = tree.prediction_dir("regression")
    assert sorted(p.name for p in (out / "classes").glob("*.tif")) == sorted(
        p.name for p in (out / "masks").glob("*.tif")
    )
    roofs = gpd.read_file(out / "roofs.gpkg")
    assert set(roofs["class"]) == {"metal", "other_roof"}
    folder = tree.model_dir("regression") / "evaluation" / "val"
    metrics = json.loads((folder / "metrics.json").read_text())
    kinds = metrics["classes"]
    assert kinds["names"] == ["metal", "other_roof"]
    assert kinds["pixel"]["metal"]["iou"] >= 0.8 and kinds["pixel"]["other_roof"]["iou"] >= 0.8
    assert kinds["roofs_found"] >= 3 and kinds["roof_accuracy"] == 1.0
    assert (folder / "confusion.png").is_file() and (folder / "classes.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "confusion.csv").read_text().splitlines()[0] == (
        "true,predicted_background,predicted_metal,predicted_other_roof"
    )
    report = (tree.results_root / "materials" / "report.html").read_text()
    assert "Material right for 100.0% of the" in report and "Classes: the confusion matrix" in report
    assert "Classes: the class of each roof pixel, true (top) and predicted (bottom)" in report
    assert ">metal mean</th>" in report and "How far apart the classes lie in each band" in report
    assert "figures are of an earlier run" not in report
    # After an edit of the class map the report says the figures are of the earlier run.
    from evaluate.report import write_report

    renamed = _json({"tin": ["metal"], "other_roof": ["concrete"]})
    edited = load_settings(argv[1], [*argv[4::2], f"mask_args.classes={renamed}"])
    report = write_report(edited, DataTree.from_settings(edited)).read_text()
    assert (
        "figures are of an earlier run" in report
        and "<b>regression</b>: masks/ are outdated: made with mask_args.classes [[&quot;metal&quot;" in report
        and "Rerun what each line names (python pipeline.py reruns every outdated stage)" in report
        and "this command's --set" not in report
    )
    # Written by a command given the edit as --set (a one-off evaluate --set ...), the note says so.
    once = f"mask_args.classes={renamed}"
    report = write_report(edited, DataTree.from_settings(edited), [once]).read_text()
    assert (
        "would give others (these settings are the file's with this command's --set mask_args.classes={&quot;tin"
        in report
        and "evaluate without it judges them by the file). Rerun what each line names" in report
    )


def test_the_check_reads_the_labels_as_mask_does(scene, tmp_path: Path):
    """With a class map the check tests its values (not the unread filter's), as mask would."""
    from chip.chip import main as chip_main
    from core.tree import DataTree
    from mosaic.mosaic import main as mosaic_main
    from workflow.check import run_checks

    argv = scene()
    for main in (mosaic_main, chip_main):
        assert main(argv) == 0
    sets = argv[4::2]

    def fatal(*more: str) -> list[str]:
        settings = load_settings(argv[1], [*sets, *more])
        found, _ = run_checks(settings, DataTree.from_settings(settings), ["mask"])
        return [f.message for f in found if f.fatal]

    good = _json({"metal": ["metal"], "other_roof": ["concrete"]})
    assert fatal(f"mask_args.classes={good}", 'mask_args.filter={"attribute": "roof_type", "values": ["tin"]}') == []
    bad = _json({"metal": ["metal"], "other_roof": ["concrete", "slate"]})
    (message,) = fatal(f"mask_args.classes={bad}")
    assert (
        "mask_args.classes names values no polygon of roofs.geojson has in roof_type (other_roof: ['slate'])" in message
    )
    (message,) = fatal(f"mask_args.classes={good}", "mask_args.class_attribute=roof_typ")
    assert message.startswith("mask_args.class_attribute 'roof_typ' is not an attribute of roofs.geojson")


def test_class_offsets_tuned_on_validation_make_the_decision_fair_to_an_under_called_class():
    from core.metrics import ClassSample, calibrate_classes, shift_classes, tune_class_bias

    truth = np.array([0] * 50 + [1] * 50)
    probs = np.array([[0.8, 0.2]] * 50 + [[0.6, 0.4]] * 50, np.float32)  # class 1 always under-called
    assert tune_class_bias(truth, probs) == [0.0, 0.5]  # the first offset of the grid that calls it: log(0.6/0.4) < 0.5
    sample = ClassSample(2, 1)
    sample.add(np.array([1] * 50 + [2] * 50), probs.T.copy(), np.ones(100, bool))
    bias, calibrated, raw = calibrate_classes(sample)
    assert calibrated.tolist() == [[50, 0], [0, 50]] and raw.tolist() == [[50, 0], [50, 0]]
    shifted = shift_classes(probs.T, bias, axis=0)
    np.testing.assert_allclose(shifted.sum(axis=0), 1.0, rtol=1e-6)
    assert shifted[1, 50] == pytest.approx(0.4 * np.exp(0.5) / (0.6 + 0.4 * np.exp(0.5)), rel=1e-6)
    # Sigmoid bands adding up to less than 1 keep their sum (the network's doubt of any roof), shifted alike.
    low = shift_classes(np.array([[0.2], [0.1]], np.float32), [0.0, np.log(2.0)], axis=0)
    np.testing.assert_allclose(low[:, 0], [0.15, 0.15], rtol=1e-6)
    # Already fair: no offset.
    assert tune_class_bias(np.array([0, 1]), np.array([[0.9, 0.1], [0.1, 0.9]])) == [0.0, 0.0]


def test_a_reordered_class_map_is_a_change_and_settings_added_at_their_default_are_not(settings_file: Path):
    from workflow.contract import _changes, settings_of

    def mask_settings(*sets: str) -> dict:
        return settings_of(load_settings(settings_file, list(sets)), ("mask_args",))

    one = mask_settings(f"mask_args.classes={_json({'metal': ['tin'], 'other': ['concrete']})}")
    two = mask_settings(f"mask_args.classes={_json({'other': ['concrete'], 'metal': ['tin']})}")
    assert one != two  # the ids follow the map's order
    (change,) = _changes({"settings": one}, {"settings": two})
    assert change.startswith('with mask_args.classes [["metal", ["tin"]], ["other", ["concrete"]]], now [["other"')
    # Without a class map its keys are left out, as records made before class maps hold them; a setting added
    # since, at its default, changed nothing; away from its default it did.
    plain = mask_settings()
    assert plain["mask_args.classes"] is None and "mask_args.class_attribute" not in plain
    # The class map removed: masks of classes are not the metal masks asked for now.
    assert _changes({"settings": one}, {"settings": plain}) == [
        'with mask_args.classes [["metal", ["tin"]], ["other", ["concrete"]]], now null',
        f"with mask_args.filter null, now {json.dumps(load_settings(settings_file).mask_args.filter.model_dump(mode='json'))}",
    ]
    # A record from before class maps (no classes key) is not outdated by the null now.
    before = {k: v for k, v in plain.items() if k != "mask_args.classes"}
    assert _changes({"settings": before}, {"settings": plain}) == []
    old = settings_of(load_settings(settings_file), ("predict_args",))
    new = dict(old)
    del old["predict_args.roof_class"]
    assert _changes({"settings": old}, {"settings": new}) == []
    new["predict_args.roof_class"] = "majority"
    assert _changes({"settings": old}, {"settings": new}) == ['with predict_args.roof_class unset, now "majority"']


def test_validation_with_a_chip_without_roofs(tmp_path: Path):
    """The calibration sample takes every n-th roof pixel of each chip; a chip without roofs gives none."""
    from types import SimpleNamespace

    from core.metrics import ClassSample, calibrate_classes, combine, validate_pairs

    class Fake:
        info = SimpleNamespace(classes=["metal", "other"], normalization=SimpleNamespace(nodata=None))

        def prepare(self, chips):
            return chips

        def forward_targets(self, chips):  # P(roof) = band 1 / 100; P(metal | roof) 0.7 everywhere
            n, _, rows, cols = chips.shape
            out = np.empty((n, 3, rows, cols), np.float32)
            out[:, 0] = chips[:, 0] / 100.0
            out[:, 1], out[:, 2] = 0.7, 0.3
            return out

    pairs = []
    for name, roof in (("a.tif", True), ("b.tif", False)):
        chip = np.full((1, 8, 8), 10, np.uint16)
        mask = np.zeros((2, 8, 8), np.uint8)
        if roof:
            chip[0, :4] = 90
            mask[0, :4], mask[1, :4, :4], mask[1, :4, 4:] = 255, 1, 2
        frame = write_raster(tmp_path / "frames" / name, chip, crs="EPSG:32644", transform=T32)
        write_raster(tmp_path / "masks" / name, mask, crs="EPSG:32644", transform=T32,
                     descriptions=("footprint", "class"), tags={"ROOF_CLASSES": "metal,other"})  # fmt: skip
        pairs.append((frame, tmp_path / "masks" / name))
    sample = ClassSample(2, len(pairs))
    search = combine(validate_pairs(Fake(), pairs, classes=sample))
    truth, probs = sample.arrays()
    _, _, confusion = calibrate_classes(sample)  # (without the offsets)
    assert confusion.tolist() == [[16, 0], [16, 0]]  # every roof pixel called metal
    assert truth.tolist() == [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4
    assert probs.shape == (32, 2)
    _, counts = search.best()
    assert counts.tp == 32 and counts.fp == 0


# --- the U-Net's class bands -------------------------------------------------------------------


def test_each_class_band_is_learnt_as_a_footprint_over_every_known_pixel():
    pytest.importorskip("keras")
    from unet.losses import TargetLoss

    rng = np.random.default_rng(5)
    footprint = (rng.random((2, 8, 8)) < 0.4).astype(np.float32)
    metal = footprint * (rng.random((2, 8, 8)) < 0.5)
    other = footprint - metal
    known = (rng.random((2, 8, 8)) < 0.8).astype(np.float32)
    y = np.stack([footprint, metal, other, known], axis=-1)
    pred = rng.uniform(0.05, 0.95, (2, 8, 8, 3)).astype(np.float32)
    k = known > 0

    def numpy_bce(t, p):
        return float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))

    bands = [numpy_bce(y[..., b][k], pred[..., b][k]) for b in range(3)]
    loss = float(TargetLoss("bce", [1.0], classes=2, class_weight=0.5)(y, pred))
    assert loss == pytest.approx(bands[0] + 0.5 * (bands[1] + bands[2]), rel=1e-5)
    assert float(TargetLoss("bce", [1.0], classes=2, class_weight=0.0)(y, pred)) == pytest.approx(bands[0], rel=1e-5)
    # Background pixels count in a class band's loss (a class called on the ground costs), unknown ones do not.
    ground = k & (footprint == 0)
    moved = pred.copy()
    moved[..., 1][ground] = 0.9
    assert float(TargetLoss("bce", [1.0], classes=2, class_weight=0.5)(y, moved)) > loss + 0.1
    moved = pred.copy()
    moved[~k] = 0.99
    assert float(TargetLoss("bce", [1.0], classes=2, class_weight=0.5)(y, moved)) == pytest.approx(loss, rel=1e-6)
    config = TargetLoss("bce", [1.0], classes=2, class_weight=0.5).get_config()
    assert (config["classes"], config["class_weight"]) == (2, 0.5)


def test_the_predictor_gives_each_class_its_probability_of_a_roof_of_that_class():
    pytest.importorskip("keras")
    from core.bundle import BundleInfo, Normalization
    from core.settings import ModelArgs, OutputArgs
    from unet.bundle import UNetPredictor
    from unet.model import build_model

    m = ModelArgs(filters=4, upconv_filters=4, num_layers=2, input_shape=(32, 32, 3))
    model = build_model(3, m, OutputArgs(), channels=3, classes=2)
    assert model.output_shape == (None, None, None, 5)
    assert model.get_layer("roof_class").get_config()["activation"] == "sigmoid"
    norm = Normalization("percentile", (0.0,) * 3, (100.0,) * 3, (0.0,) * 3, (1.0,) * 3, None)
    info = BundleInfo(kind="unet", bands=3, dtype="uint16", normalization=norm, threshold=0.5, pad_multiple=8,
                      targets=["footprint", "boundary", "contact"], classes=["metal", "other_roof"])  # fmt: skip
    predictor = UNetPredictor(model, info)
    chips = np.random.default_rng(0).integers(0, 100, (2, 3, 32, 32)).astype(np.uint16)
    prepared = predictor.prepare(chips)
    head = model.get_layer("roof_class")
    kernel = np.zeros_like(head.get_weights()[0])
    # Two sigmoids sure of both classes (0.88 each) are scaled to add up to 1; two doubting any roof (0.12 and
    # 0.27) are kept as they are: the rest is the doubt, which the filters of each class read.
    for bias, expected in (([2.0, 2.0], [0.5, 0.5]), ([-2.0, -1.0], [1 / (1 + np.exp(2)), 1 / (1 + np.exp(1))])):
        head.set_weights([kernel, np.array(bias, np.float32)])
        raw = np.asarray(model(prepared[0], training=False)).transpose(0, 3, 1, 2)
        bands = predictor.forward_targets(prepared)
        assert bands.shape == (2, 5, 32, 32)
        assert np.allclose(bands[:, :3], raw[:, :3])  # the targets as the network gives them
        np.testing.assert_allclose(bands[:, 3:].reshape(2, 2, -1).transpose(1, 0, 2).reshape(2, -1),
                                   np.repeat(np.array(expected)[:, None], 2 * 32 * 32, axis=1), rtol=1e-5)  # fmt: skip
