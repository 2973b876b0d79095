"""Boundary and contact targets, unknown (ignored) roofs, and the U-Net trained on them.

Exact band counts of the mask of hand-placed roofs; the widths' defaults and bad values; the
ignore filter's bad values; the mask stage end to end; the loss and metrics leaving unknown
pixels out; the seeded watershed splitting touching roofs with the boundary band; a tiny
U-Net trained on three mask bands whose predict writes them and seeds with them; and the
one-line refusals of a bundle without those bands or with a model of another band count.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from conftest import cells, material_labels
from rasterio.transform import from_origin

from core.bundle import BundleInfo, Normalization
from core.errors import LabelError, SettingsError
from core.instances import label_instances, seed_score
from core.raster import read_raster, read_truth, write_raster
from core.settings import EvaluateArgs, MaskArgs, PredictArgs, load_settings
from core.targets import ROOF, UNKNOWN, band_widths, make_targets, pixel_size_m
from core.tree import DataTree
from core.vector import load_labels
from evaluate.evaluate import score_chip

#: A 32 x 32 px chip of 1 m pixels: pixel (row, col) covers x in [col, col + 1], y in [31 - row, 32 - row].
T32 = from_origin(0, 32, 1, 1)


A, B, C = cells(4, 12, 2, 10), cells(4, 12, 10, 18), cells(4, 12, 20, 28)  # A and B touch; a 2 px gap to C


def test_bands_of_touching_and_separate_roofs_exactly():
    bands = make_targets([A, B, C], [], (32, 32), T32, targets=("footprint", "boundary", "contact"), widths=(1, 3))
    footprint, boundary, contact = bands
    assert bands.dtype == np.uint8 and set(np.unique(bands).tolist()) == {0, ROOF}
    assert (footprint == ROOF).sum() == 3 * 64
    # A 1 px ring inside each roof (28 px of 8 x 8), on both sides of the line A and B share.
    assert (boundary == ROOF).sum() == 3 * 28
    assert (boundary[4:12, 9] == ROOF).all() and (boundary[4:12, 10] == ROOF).all()
    assert not boundary[5:11, 3:9].any()
    # Contact (gaps under 3 px: two roofs within 2 px): the 2 px gap between B and C, rows 2..13,
    # and the ground at the ends of the wall A and B share (columns 8..11, rows 2-3 and 12-13).
    assert (contact == ROOF).sum() == 12 * 2 + 4 * 4
    assert (contact[2:14, 18:20] == ROOF).all()
    assert (contact[2:4, 8:12] == ROOF).all() and (contact[12:14, 8:12] == ROOF).all()
    assert not (contact & footprint).any()


def test_a_gap_as_wide_as_the_contact_width_is_not_contact_and_a_chip_edge_is_not_a_boundary():
    bands = make_targets([B, C, cells(20, 32, 0, 8)], [], (32, 32), T32, targets=("footprint", "boundary", "contact"),
                         widths=(2, 2))  # fmt: skip
    assert not bands[2][:, 18:20].any()
    # The roof cut by the chip's left and bottom edges: a 2 px band on its two inner sides only.
    edge_roof = bands[1][20:32, 0:8]
    assert (edge_roof == ROOF).sum() == 12 * 8 - 10 * 6


def test_unknown_polygons_are_128_except_where_a_roof_is_and_nodata_is_0_in_every_band():
    valid = np.ones((32, 32), bool)
    valid[:, 30:] = False
    bands = make_targets([A], [cells(8, 20, 6, 14), cells(20, 32, 28, 32)], (32, 32), T32,
                         targets=("footprint", "boundary", "contact"), widths=(1, 2), valid=valid)  # fmt: skip
    footprint = bands[0]
    assert (footprint == ROOF).sum() == 64
    # 12 x 8 unknown, less the 4 x 4 under roof A; the other unknown polygon: 12 x 2 valid columns.
    assert (footprint == UNKNOWN).sum() == 96 - 16 + 24
    assert not bands[:, :, 30:].any()


@pytest.mark.parametrize(("pixel", "expected"), [(0.5, (2, 6)), (0.3, (3, 10)), (0.13, (7, 23)), (2.0, (1, 2))])
def test_default_widths_follow_the_ground_size_of_a_pixel(pixel: float, expected: tuple[int, int]):
    assert band_widths(None, None, pixel, 512) == expected


def test_widths_that_do_not_fit_the_chip_are_one_line_and_derived_ones_are_capped():
    with pytest.raises(SettingsError) as err:
        band_widths(20, None, 0.5, 64)
    assert str(err.value) == (
        "mask_args.boundary_width 20 px does not fit chips of 64 px: a band that wide covers whole roofs; use at most "
        "16 px (a quarter of the chip), or larger chips (chip_args.size)"
    )
    with pytest.raises(SettingsError, match=r"^mask_args.contact_width 17 px does not fit chips of 64 px"):
        band_widths(None, 17, 0.5, 64)
    assert band_widths(None, None, 0.13, 32) == (7, 8)  # 23 px of contact capped at a quarter of 32


def test_pixel_size_in_metres_of_degrees_and_metres():
    assert pixel_size_m(from_origin(0, 0, 0.5, 0.5), rasterio.crs.CRS.from_epsg(32644), 0) == 0.5
    deg = pixel_size_m(from_origin(0, 0, 1e-5, 1e-5), rasterio.crs.CRS.from_epsg(4326), 60.0)
    assert deg == pytest.approx((1e-5 * 0.5 + 1e-5) / 2 * 111_320)


# --- the ignore filter -------------------------------------------------------------------------


def _args(**ignore) -> MaskArgs:
    return MaskArgs.model_validate(
        {"filter": {"attribute": "roof:material", "values": ["tin"]}, "ignore": ignore or None}
    )


def test_ignore_takes_the_untagged_polygons_out_of_the_roofs(tmp_path: Path):
    folder = material_labels(tmp_path, ["tin", "concrete", None, "tin", None])
    roofs, unknown, _ = load_labels(folder, _args(attribute="roof:material", values=[None]))
    assert (len(roofs), len(unknown)) == (2, 2)
    roofs, unknown, _ = load_labels(folder, _args(attribute="roof:material", values=["concrete", None]))
    assert (len(roofs), len(unknown)) == (2, 3)


@pytest.mark.parametrize(
    ("ignore", "message"),
    [
        ({"attribute": "roof:material", "values": ["clay"]},
         r"^mask_args.ignore matches none of the 3 polygons of roofs.geojson \(roof:material in \['clay'\]; values "
         r"present: \['concrete', 'tin'\], and missing\): fix its values, or set it null$"),
        ({"attribute": "roof:material", "values": ["tin", "concrete", None]},
         r"^mask_args.ignore matches all 3 polygons of roofs.geojson .*nothing would be left to learn from; narrow its "
         r"values, or set it null$"),
        ({"attribute": "material", "values": [None]},
         r"^mask_args.ignore.attribute 'material' is not an attribute of roofs.geojson \(it has roof:material\)"),
    ],
)  # fmt: skip
def test_an_ignore_filter_that_matches_nothing_or_everything_is_one_line(tmp_path: Path, ignore, message):
    folder = material_labels(tmp_path, ["tin", "concrete", None])
    with pytest.raises(LabelError, match=message):
        load_labels(folder, _args(**ignore))


def test_the_mask_stage_writes_named_bands_and_unknown_pixels(scene, settings_file: Path, tmp_path: Path):
    from chip.chip import main as chip_main
    from mask.mask import main as mask_main
    from mosaic.mosaic import main as mosaic_main

    argv = scene()
    tree = DataTree.from_settings(load_settings(settings_file, [f"data_root={tmp_path / 'data'}"]))
    import geopandas as gpd

    labels = gpd.read_file(tree.labels / "roofs.geojson")
    labels["roof_type"] = ["metal"] * (len(labels) - 4) + [None] * 4  # four roofs of unknown material
    labels.to_file(tree.labels / "roofs.geojson", driver="GeoJSON")
    for main in (mosaic_main, chip_main):
        assert main(argv) == 0
    assert mask_main([*argv, "--set", 'mask_args.ignore={"attribute": "roof_type", "values": [null]}']) == 0
    names = sorted(tree.masks.glob("*.tif"))
    unknown = 0
    for name in names:
        with rasterio.open(name) as src:
            assert src.descriptions == ("footprint", "boundary", "contact")
            assert src.count == 3 and src.dtypes[0] == "uint8"
        _, known, _ = read_truth(name)
        unknown += int((~known).sum())
    assert unknown > 0
    from core.index import read_index

    index = read_index(tree.chips_csv, needs=("roof_share",))
    first = names[0]
    data, _ = read_raster(first)
    known = data[0] != UNKNOWN
    assert index.loc[index["file"] == first.name, "roof_share"].item() == pytest.approx(
        (data[0][known] == ROOF).sum() / known.sum(), rel=1e-9
    )
    # A width that does not fit the chips: one line, and the masks stay as they were.
    before = first.read_bytes()
    assert mask_main([*argv, "--overwrite", "--set", "mask_args.boundary_width=100"]) == 1
    assert first.read_bytes() == before


# --- loss, metrics, scores leave unknown pixels out ---------------------------------------------


def test_target_loss_weighs_bands_and_leaves_unknown_pixels_out():
    keras = pytest.importorskip("keras")
    from unet.losses import TargetLoss, bce

    rng = np.random.default_rng(0)
    truth = (rng.random((2, 8, 8, 3)) < 0.3).astype(np.float32)
    known = (rng.random((2, 8, 8, 1)) < 0.7).astype(np.float32)
    pred = rng.uniform(0.05, 0.95, (2, 8, 8, 3)).astype(np.float32)
    y = np.concatenate([truth, known], axis=-1)
    loss = float(TargetLoss("bce", [1.0, 0.25, 0.1])(y, pred))
    k = known[..., 0] > 0

    def numpy_bce(t, p):
        return float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))

    expected = sum(w * numpy_bce(truth[..., b][k], pred[..., b][k]) for b, w in enumerate((1.0, 0.25, 0.1)))
    assert loss == pytest.approx(expected, rel=1e-5)
    # Whatever is predicted on unknown pixels changes nothing.
    moved = pred.copy()
    moved[~k] = 0.99
    assert float(TargetLoss("bce", [1.0, 0.25, 0.1])(y, moved)) == pytest.approx(loss, rel=1e-6)
    assert float(bce(truth[..., 0], pred[..., 0])) == pytest.approx(numpy_bce(truth[..., 0], pred[..., 0]), rel=1e-5)
    config = TargetLoss("dice", [1.0, 0.5]).get_config()
    assert (config["base"], config["weights"]) == ("dice", [1.0, 0.5])
    assert isinstance(keras.losses.deserialize(keras.losses.serialize(TargetLoss("bce", [1.0]))), TargetLoss)


def test_metrics_count_footprint_pixels_of_known_class_only():
    pytest.importorskip("keras")
    from unet.metrics import IoU, TrueShare

    truth = np.zeros((1, 4, 4, 3), np.float32)
    truth[0, :2, :, 0] = 1  # 8 roof pixels
    known = np.ones((1, 4, 4, 1), np.float32)
    known[0, 3, :] = 0  # the last row is unknown
    pred = np.zeros((1, 4, 4, 3), np.float32)
    pred[0, :3, :, 0] = 0.9  # 8 right, 4 wrong on known pixels
    pred[0, 3, :, 0] = 0.9  # on unknown pixels: not counted
    y = np.concatenate([truth, known], axis=-1)
    iou, share = IoU(), TrueShare()
    iou.update_state(y, pred)
    share.update_state(y, pred)
    assert float(iou.result()) == pytest.approx(8 / 12)
    assert float(share.result()) == pytest.approx(8 / 12)


def test_evaluate_leaves_unknown_pixels_and_objects_on_them_out():
    truth = np.zeros((32, 32), bool)
    truth[2:10, 2:10] = True
    known = np.ones((32, 32), bool)
    known[20:30, 20:30] = False
    pred = truth.copy()
    pred[21:29, 21:29] = True  # a roof found on a building of unknown material
    chip = score_chip("c", truth, pred, EvaluateArgs(), None, known)
    assert (chip.confusion.tp, chip.confusion.fp, chip.confusion.fn) == (64, 0, 0)
    assert (chip.objects.tp, chip.objects.fp, chip.objects.fn) == (1, 0, 0)
    plain = score_chip("c", truth, pred, EvaluateArgs())
    assert (plain.confusion.fp, plain.objects.fp) == (64, 1)


# --- instances from the bands --------------------------------------------------------------------


def test_the_boundary_band_splits_touching_roofs_the_footprint_merges():
    bands = make_targets([A, B], [], (32, 32), T32, targets=("footprint", "boundary"), widths=(1, 2)).astype(np.float32)
    prob = 0.9 * (bands[0] > 0) + 0.05
    # Without the boundary band: one blob, one seed.
    _, n = label_instances(prob, 0.5, 0.75)
    assert n == 1
    predicted = np.stack([prob, 0.8 * (bands[1] > 0)])
    labels, n = label_instances(prob, 0.5, 0.75, seed_score(predicted, ("footprint", "boundary")))
    assert n == 2
    assert len(np.unique(labels[4:12, 2:10])) == 1 and len(np.unique(labels[4:12, 10:18])) == 1
    assert labels[6, 5] != labels[6, 14]
    assert ((labels > 0) == (prob >= 0.5)).all()  # the roof pixels are exactly the mask's


def test_seeds_channels_on_a_bundle_without_them_is_one_line():
    from predict.predict import seed_targets

    norm = Normalization.from_dict({"method": "none", "low": [0] * 3, "high": [1] * 3, "mean": [0] * 3,
                                    "std": [1] * 3, "nodata": None})  # fmt: skip
    forest = BundleInfo(kind="forest", bands=3, dtype="uint8", normalization=norm, threshold=0.5)
    with pytest.raises(SettingsError) as err:
        seed_targets(forest, PredictArgs(seeds="channels"))
    assert str(err.value) == (
        "predict_args.seeds is channels but the forest bundle predicts the footprint alone (trained on the mask bands "
        "['footprint']): set predict_args.seeds auto or footprint, or train a U-Net on masks with mask_args.targets "
        "[footprint, boundary, contact]"
    )
    unet = BundleInfo(kind="unet", bands=3, dtype="uint8", normalization=norm, threshold=0.5,
                      targets=["footprint", "boundary", "contact"])  # fmt: skip
    assert seed_targets(unet, PredictArgs()) == ("footprint", "boundary", "contact")
    assert seed_targets(unet, PredictArgs(seeds="footprint")) == ("footprint",)
    assert seed_targets(unet, PredictArgs(instances=False)) == ("footprint",)
    assert seed_targets(forest, PredictArgs()) == ("footprint",)


# --- a tiny U-Net on three bands -----------------------------------------------------------------

TRANSFORM = rasterio.transform.from_origin(600000.0, 2960000.0, 0.5, 0.5)


def _chip(rng: np.random.Generator, side: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Bright striped roofs in pairs that touch, one unknown building; the image and its 3 mask bands."""
    image = rng.normal(400, 40, (3, side, side)).clip(1, 2047)
    roofs = []
    for _ in range(2):
        r, c = int(rng.integers(2, side - 14)), int(rng.integers(2, side - 26))
        w1, w2 = int(rng.integers(8, 12)), int(rng.integers(8, 12))
        for c0, c1, tone in ((c, c + w1, 1500), (c + w1, c + w1 + w2, 1200)):
            image[0, r : r + 10, c0:c1] = tone + 150 * (np.arange(c1 - c0) % 4 < 2)
            image[1, r : r + 10, c0:c1] = tone - 200
            image[2, r : r + 10, c0:c1] = 900
            at = TRANSFORM * rasterio.Affine.translation(c0, r)
            roofs.append(shapely.box(*rasterio.transform.array_bounds(10, c1 - c0, at)))
    unknown = [shapely.box(*rasterio.transform.array_bounds(6, 6, TRANSFORM * rasterio.Affine.translation(50, 50)))]
    bands = make_targets(roofs, unknown, (side, side), TRANSFORM, targets=("footprint", "boundary", "contact"),
                         widths=(1, 3))  # fmt: skip
    return image.astype(np.uint16), bands


def test_a_unet_trained_on_three_bands_predicts_them_and_seeds_with_them(
    tmp_path: Path, settings_file: Path, caplog, monkeypatch
):
    pytest.importorskip("keras")
    from predict.predict import main as predict_main
    from train.train import main as train_main

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for split, n in (("train", 12), ("val", 4)):
        for i in range(n):
            image, bands = _chip(rng)
            write_raster(data / f"{split}_frames" / f"{split}_{i}.tif", image, crs="EPSG:32644", transform=TRANSFORM,
                         nodata=0)  # fmt: skip
            write_raster(data / f"{split}_masks" / f"{split}_{i}.tif", bands, crs="EPSG:32644", transform=TRANSFORM,
                         descriptions=("footprint", "boundary", "contact"))  # fmt: skip
    # No band count in the settings: the U-Net takes the chips' 3 bands.
    sets = ["load_dataset_args.channels=null", "model_args.input_shape=[64,64]", "model_args.filters=8",
            "model_args.upconv_filters=8", "model_args.num_layers=2", "load_dataset_args.batch_size=4",
            "training_args.epochs=12", "training_args.steps_per_epoch=3", "training_args.learning_rate=0.003",
            "training_args.verbose=0", f"data_root={data}", f"training_args.results_folder={tmp_path / 'results'}",
            f"predict_args.output={tmp_path / 'predictions'}", "experiment=bands"]  # fmt: skip
    argv = ["--settings", str(settings_file), "--quiet"]
    for item in sets:
        argv += ["--set", item]
    caplog.set_level(logging.INFO)
    assert train_main([*argv, "--model", "unet"]) == 0
    tree = DataTree.from_settings(load_settings(settings_file, sets))
    info = json.loads((tree.bundle("unet") / "bundle.json").read_text())
    assert info["targets"] == ["footprint", "boundary", "contact"] and info["bands"] == 3
    metrics = json.loads((tree.model_dir("unet") / "metrics.json").read_text())
    assert metrics["pixel"]["iou"] >= 0.5
    assert predict_main([*argv, "--model", "unet"]) == 0
    out = tree.prediction_dir("unet")
    with rasterio.open(out / "probabilities" / "val_0.tif") as src:
        assert src.count == 3 and src.descriptions == ("footprint", "boundary", "contact")
    record = json.loads((tmp_path / "predictions" / "bands" / "unet" / "predict.record.json").read_text())
    assert record["summary"]["seeds"] == "footprint+boundary+contact"
    # The merge limit for touching objects: tuned on the validation chips, applied and recorded by predict.
    from core.bundle import load_predictor
    from core.objects import MERGE_LIMITS, SEED_FRACTIONS, tune_instances

    pairs = [(f, tree.split_masks("val") / f.name) for f in sorted(tree.frames("val").glob("*.tif"))]
    tuned = tune_instances(load_predictor(tree.bundle("unet")), pairs, info["threshold"])
    assert (info["merge"], info["seed_fraction"]) == (tuned.merge, tuned.seed_fraction)
    assert info["merge"] in MERGE_LIMITS and metrics["merge"]["limit"] == info["merge"]
    assert list(metrics["merge"]["object_f1"]) == [f"{v:g}" for v in MERGE_LIMITS]
    assert info["seed_fraction"] in SEED_FRACTIONS and metrics["seeds"]["fraction"] == info["seed_fraction"]
    assert list(metrics["seeds"]["object_f1"]) == [f"{v:g}" for v in SEED_FRACTIONS]
    assert record["summary"]["merge"] == info["merge"]
    seed = info["threshold"] + info["seed_fraction"] * (1 - info["threshold"])  # the tuned seeds, as predict seeded
    assert record["summary"]["seed_threshold"] == round(seed, 4)
    # Predict hands the limit to the watershed (a spy on core.instances.merge_fragments), and records it.
    import core.instances

    limits = []
    merge_fragments = core.instances.merge_fragments

    def spy(labels, boundary, limit, borders=None, max_side=None):
        limits.append((limit, max_side))
        return merge_fragments(labels, boundary, limit, borders, max_side)

    monkeypatch.setattr(core.instances, "merge_fragments", spy)
    for limit in ("0", "0.7"):
        assert predict_main([*argv, "--model", "unet", "--overwrite", "--set", f"predict_args.merge={limit}"]) == 0
        record = json.loads((out / "predict.record.json").read_text())
        assert record["summary"]["merge"] == float(limit)
    assert limits and set(limits) == {(0.7, 256)}  # merge 0 never calls it; 256: the block margin
    # A model of 3 bands with a bundle.json that names one: refused in one line.
    info["targets"] = ["footprint"]
    (tree.bundle("unet") / "bundle.json").write_text(json.dumps(info))
    from core.bundle import BundleError

    with pytest.raises(BundleError, match=r"model.keras has 3 output bands but .*bundle.json names 1 \(footprint\)"):
        load_predictor(tree.bundle("unet"))
