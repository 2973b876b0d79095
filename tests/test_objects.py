"""The object filter: each predicted object's features, a logistic regression fitted on validation
objects, and predict dropping the objects it rejects from the roofs, the mask and the class raster."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import shapely
from conftest import write_geotiff

from core.errors import BundleError
from core.instances import burn_polygons, raster_instances
from core.objects import (
    CUTS,
    FEATURES,
    ObjectFilter,
    ValidationObjects,
    feature_names,
    fit_object_filter,
    object_features,
    validation_objects,
)

#: A fake bundle's normalization: raw values / 100, bands last, as the model input.
HUNDREDTHS = SimpleNamespace(nodata=None, apply=lambda chw: (np.moveaxis(chw, 0, -1) / 100.0).astype(np.float32))


def two_objects() -> tuple[np.ndarray, np.ndarray]:
    """A label image with a 2 x 3 object (1) and an L of 3 pixels (2), and two bands over it."""
    labels = np.zeros((5, 6), np.int32)
    labels[0:2, 0:3] = 1
    labels[3, 3:5] = 2
    labels[4, 3] = 2
    bands = np.zeros((2, 5, 6), np.float32)
    bands[0, 0:2, 0:3] = [[0.6, 0.8, 1.0], [0.6, 0.8, 1.0]]
    bands[0][labels == 2] = 0.5
    bands[1][labels == 1] = 0.25
    bands[1][labels == 2] = 0.75
    return labels, bands


def test_features_of_two_objects_are_exact():
    labels, bands = two_objects()
    x = object_features(labels, [1, 2], bands, seed_threshold=0.8)
    assert feature_names(["footprint", "boundary"]) == [*FEATURES, "mean_boundary"]
    assert x.shape == (2, 8)
    one, two = x
    assert one[0] == pytest.approx(math.log(6)) and two[0] == pytest.approx(math.log(3))
    assert one[1] == pytest.approx(0.8) and two[1] == pytest.approx(0.5)  # mean
    assert one[2] == pytest.approx(np.std([0.6, 0.8, 1.0])) and two[2] == pytest.approx(0.0)  # std
    assert one[3] == pytest.approx(1.0) and two[3] == pytest.approx(0.5)  # max
    assert one[4] == pytest.approx(4 / 6) and two[4] == 0.0  # share at or above the seed threshold
    assert one[5] == 1.0 and two[5] == pytest.approx(3 / 4)  # fill of the bounding box
    assert one[6] == pytest.approx(2 / 3) and two[6] == 1.0  # aspect
    assert one[7] == pytest.approx(0.25) and two[7] == pytest.approx(0.75)  # mean of the second band
    # Only the objects asked for, in the order asked; none gives an empty table of the right width.
    assert object_features(labels, [2], bands, 0.8).tolist() == [two.tolist()]
    assert object_features(labels, [], bands, 0.8).shape == (0, 8)
    # A class bundle's filter also reads each class band's mean over the object.
    from core.objects import class_features

    assert feature_names(["footprint"], 0, ["metal", "other"]) == [*FEATURES, "mean_class_metal", "mean_class_other"]
    classes = np.stack([bands[0], 1.0 - bands[0]])
    np.testing.assert_allclose(class_features(labels, [1, 2], classes), [[0.8, 0.2], [0.5, 0.5]])
    assert class_features(labels, [], classes).shape == (0, 2)


def objects_of(x: np.ndarray, roof: np.ndarray, pixels: int = 10) -> ValidationObjects:
    """Validation objects of ``pixels`` pixels each, all roof pixels or none."""
    on = np.where(roof, pixels, 0)
    return ValidationObjects(x, on, pixels - on, int(on.sum()))


def test_a_filter_learns_which_objects_are_roofs_and_round_trips_through_json():
    rng = np.random.default_rng(0)
    roof = np.arange(60) % 3 == 0
    x = rng.normal(size=(60, 7))
    x[:, 1] += np.where(roof, 2.0, -2.0)  # roofs have a high mean probability
    fitted, why = fit_object_filter(objects_of(x, roof), feature_names(["footprint"]))
    assert fitted is not None and fitted.objects == 60 and fitted.roofs == 20
    assert ((fitted.probability(x) >= fitted.cut) == roof).all()
    assert fitted.stats == {
        "false_dropped": 1.0, "roofs_kept": 1.0, "pixel_f1": [0.5, 1.0], "object_f1": [0.5, 1.0],
    }  # fmt: skip
    assert why == (
        f"object filter fitted on 60 validation objects (20 on roofs), cut {fitted.cut:g}: it drops 100% of the "
        "false ones and keeps 100% of the roofs; validation pixel F1 0.500 -> 1.000, object F1 0.500 -> 1.000"
    )
    p = fitted.probability(x)
    assert fitted.cut == min(c for c in CUTS if ((p >= c) == roof).all())  # the lowest cut that separates them
    # An object larger than any it learnt from is not judged but kept, whatever its other features.
    assert fitted.max_pixels == pytest.approx(math.exp(x[:, 0].max()))
    larger = x[~roof][:1].copy()
    assert fitted.probability(larger)[0] < fitted.cut
    larger[0, 0] = x[:, 0].max() + 0.01
    assert fitted.probability(larger)[0] == 1.0
    again = ObjectFilter.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert again == fitted and np.allclose(again.probability(x), fitted.probability(x))
    assert ObjectFilter.from_dict({}) is None
    with pytest.raises(BundleError, match=r"the bundle's object filter reads 7 features .* but the objects have 9"):
        fitted.probability(np.zeros((1, 9)))


def test_the_cut_keeps_a_large_object_that_holds_most_roof_pixels():
    """Big blobs under half roof are false objects, yet dropping them would lose most roof pixels: the cut
    tuned on the mean of pixel F1 and object F1 keeps them (Rio's regression lost 90% of its pixel IoU
    to a cut of 0.5)."""
    n = 40
    x = np.zeros((n, 7))
    x[:, 0] = np.log(np.r_[[5000.0] * 4, [40.0] * 12, [8.0] * 24])  # 4 blobs, 12 roofs, 24 specks
    roof_px = np.r_[[2000] * 4, [36] * 12, [0] * 24]
    other_px = np.r_[[3000] * 4, [4] * 12, [8] * 24]
    objects = ValidationObjects(x, roof_px, other_px, int(roof_px.sum()) + 500)
    assert objects.roof.tolist() == [False] * 4 + [True] * 12 + [False] * 24
    fitted, _ = fit_object_filter(objects, feature_names(["footprint"]))
    keep = fitted.probability(x) >= fitted.cut
    assert keep[:16].all()  # the blobs and the roofs
    pixel, _ = objects.scores(keep)
    assert pixel >= objects.scores(np.ones(n, bool))[0]
    assert objects.scores(np.r_[[False] * 4, [True] * 36])[0] < 0.1  # what dropping the blobs would cost


def test_a_feature_every_object_shares_does_not_break_the_filter():
    """A band without any signal (no contact anywhere: its mean 0 for every object, or a spread of 1e-10) is
    standardised to 0 and kept through bundle.json; a damaged entry is a BundleError."""
    roof = np.arange(30) % 2 == 0
    x = np.zeros((30, 8))
    x[:, 1] = np.where(roof, 0.9, 0.3)
    x[:, 7] = 1e-10 * (np.arange(30) % 3)
    fitted, _ = fit_object_filter(objects_of(x, roof), feature_names(["footprint", "contact"]))
    again = ObjectFilter.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert fitted.scale[7] == 1.0 and np.isfinite(again.probability(x)).all()
    assert ((again.probability(x) >= again.cut) == roof).all()
    with pytest.raises(BundleError, match=r"bundle.json's object_filter entry is damaged .*: retrain"):
        ObjectFilter.from_dict({"features": ["log_pixels"]})


def test_erasing_a_dropped_object_spares_the_kept_roofs():
    from predict.predict import outside_roofs

    kept = [shapely.box(0, 0, 4, 4)]
    dropped = [shapely.box(2, 0, 8, 4), shapely.box(10, 10, 12, 12), shapely.box(1, 1, 3, 3)]
    erase = outside_roofs(dropped, kept)
    assert [round(g.area, 6) for g in erase] == [16.0, 4.0]  # the third lies inside the kept roof: nothing
    assert erase[0].equals(shapely.box(4, 0, 8, 4))
    assert outside_roofs(dropped[:1], []) == dropped[:1]


def test_the_object_f1_counts_objects_of_at_least_4_m2():
    """Specks under 4 m2 (predict drops them by default; SpaceNet ignores them) do not count in the object F1
    the cut is tuned on; the pixel F1 counts every pixel."""
    area = np.array([40.0, 30.0, 1.0, 2.0, 12.0])
    objects = ValidationObjects(np.zeros((5, 7)), np.array([40, 30, 0, 0, 0]), np.array([0, 0, 1, 2, 12]), 70, area)
    assert objects.roof.tolist() == [True, True, False, False, False]
    every = np.ones(5, bool)
    assert objects.scores(every) == (pytest.approx(2 * 70 / (140 + 15)), pytest.approx(2 * 2 / (3 + 2)))
    assert objects.scores(np.array([True, True, True, True, False]))[1] == 1.0  # the specks kept cost nothing
    tiny = ValidationObjects(np.zeros((2, 7)), np.array([1, 0]), np.array([0, 1]), 1, np.array([1.0, 1.0]))
    assert tiny.scores(np.array([True, False]))[1] == 1.0  # none of 4 m2: every object counts


def test_too_few_objects_of_a_kind_fit_no_filter():
    x = np.zeros((12, 7))
    roof = np.array([True] * 4 + [False] * 8)
    fitted, why = fit_object_filter(objects_of(x, roof), feature_names(["footprint"]))
    assert fitted is None
    assert why == (
        "the validation chips hold 4 objects on roofs and 8 false ones, under 5 of either kind: no object "
        "filter (predict keeps every object)"
    )


def test_validation_objects_are_labelled_by_their_share_of_roof_pixels(tmp_path):
    """Three objects: on a roof, off any roof, and mostly on pixels of unknown class (left out)."""
    from core.raster import write_raster

    chip = np.zeros((1, 20, 20), np.uint16)
    chip[0, 1:5, 1:5] = 90  # object 1, on a roof
    chip[0, 10:14, 1:5] = 90  # object 2, on background
    chip[0, 1:5, 10:14] = 90  # object 3, on an unknown building
    mask = np.zeros((1, 20, 20), np.uint8)
    mask[0, 1:5, 1:5] = 255
    mask[0, 0:6, 9:15] = 128
    transform = rasterio.transform.from_origin(0, 20, 1, 1)
    frame = write_raster(tmp_path / "f.tif", chip, crs="EPSG:32644", transform=transform)
    truth = write_raster(tmp_path / "m.tif", mask, crs="EPSG:32644", transform=transform)

    class Fake:
        info = SimpleNamespace(targets=["footprint"], classes=[], bands=1, normalization=HUNDREDTHS)

        def prepare(self, chips):
            return chips

        def forward_targets(self, chips):
            return (chips / 100.0).astype(np.float32)

    objects = validation_objects(Fake(), [(frame, truth)], threshold=0.5, seed_threshold=0.75)
    assert objects.roof.tolist() == [True, False]
    assert objects.roof_pixels.tolist() == [16, 0] and objects.other_pixels.tolist() == [0, 16]
    assert objects.all_roof_pixels == 16 and objects.area_m2.tolist() == pytest.approx([16.0, 16.0], rel=0.01)
    x = objects.x
    assert x[:, 0].tolist() == pytest.approx([math.log(16)] * 2) and x[:, 1].tolist() == pytest.approx([0.9, 0.9])
    # Then what the objects look like in the image: the band's mean and spread (normalized) and share (raw).
    assert x.shape == (2, 10) and x[:, 7:].ravel().tolist() == pytest.approx([0.9, 0.0, 1.0] * 2)


def test_instances_leave_out_what_the_filter_drops_and_burning_erases_it(tmp_path):
    prob = np.full((30, 40), 0.05, np.float32)
    prob[2:12, 2:14] = 0.95  # 120 px: kept
    prob[20:23, 30:33] = 0.9  # 9 px: dropped
    path = write_geotiff(tmp_path / "p.tif", array=prob, nodata=None)
    dropped: list = []

    windows = []

    def big(labels, ids, bands, window, class_bands=None):
        windows.append((window.col_off, window.row_off, window.width, window.height))
        return np.bincount(labels.ravel())[ids] >= 50

    found = raster_instances(path, 0.5, 0.75, keep=big, dropped=dropped)
    assert [round(g.area / 0.25) for g, _ in found] == [120] and [round(g.area / 0.25) for g in dropped] == [9]
    assert windows == [(0, 0, 40, 30)]  # the block's window, for a filter that reads the image there
    mask = write_geotiff(tmp_path / "m.tif", array=np.where(prob >= 0.5, 255, 0).astype(np.uint8), nodata=None)
    assert burn_polygons(mask, dropped, [0]) == 9
    with rasterio.open(mask) as src:
        kept = src.read(1)
    assert (kept == 255).sum() == 120 and not kept[20:23, 30:33].any()
    assert burn_polygons(mask, [shapely.box(*found[0][0].bounds)], [7]) == 0  # a value, not an erasure
    with rasterio.open(mask) as src:
        assert (src.read(1) == 7).sum() == 120


def test_predict_drops_the_objects_the_filter_rejects(scene, tmp_path, capsys):
    """A filter on the objects' size alone (the bundle's, written by hand): predict keeps roofs of at least
    40 px in roofs.gpkg, the mask and the instances alike; predict_args.object_filter 0 keeps every object."""
    import geopandas as gpd

    from chip.chip import main as chip_main
    from mask.mask import main as mask_main
    from mosaic.mosaic import main as mosaic_main
    from predict.predict import main as predict_main
    from split.split import main as split_main
    from train.train import main as train_main

    argv = scene()
    for main in (mosaic_main, chip_main, mask_main, split_main):
        assert main(argv) == 0
    model = ["--model", "regression"]
    assert train_main([*argv, *model]) == 0
    bundle = tmp_path / "results" / "contract" / "regression" / "bundle" / "bundle.json"
    info = json.loads(bundle.read_text())
    metrics = json.loads((bundle.parent.parent / "metrics.json").read_text())
    # The scene's validation chips hold 8 objects, 3 on roofs: too few for a filter, so train fits none.
    assert metrics["object_filter"] == {"objects": 8, "roofs": 3} and info["object_filter"] == {}
    info["object_filter"] = ObjectFilter(
        features=feature_names(["footprint"]), mean=[0.0] * 7, scale=[1.0] * 7,
        coef=[20.0, 0, 0, 0, 0, 0, 0], intercept=-20.0 * math.log(40), cut=0.5,
    ).to_dict()  # fmt: skip
    bundle.write_text(json.dumps(info))
    out = tmp_path / "predictions" / "contract" / "regression"

    def predicted(*extra: str) -> gpd.GeoDataFrame:
        assert predict_main([*argv, *model, "--overwrite", *extra]) == 0
        return gpd.read_file(out / "roofs.gpkg")

    every = predicted("--set", "predict_args.object_filter=0", "--set", "predict_args.min_area=0")
    record = json.loads((out / "predict.record.json").read_text())
    assert record["summary"]["object_filter"] == {  # off: nothing applied, and the record says why
        "off": "object filter off (predict_args.object_filter 0): every object kept"
    }
    kept = predicted("--set", "predict_args.min_area=0")
    record = json.loads((out / "predict.record.json").read_text())
    small = int((every["area_m2"] < 40 * 0.25).sum())
    assert small > 0 and len(kept) == len(every) - small and (kept["area_m2"] >= 40 * 0.25).all()
    assert record["summary"]["object_filter"] == {"cut": 0.5, "dropped": small}
    for name in kept["source"].unique():
        with rasterio.open(out / "masks" / name) as m, rasterio.open(out / "instances" / name) as i:
            assert ((m.read(1) > 0) == (i.read(1) > 0)).all()  # the mask holds the kept roofs, no more
    # With min_area the log's count of kept objects names those left out of roofs.gpkg, so the two agree.
    limit = float(np.median(kept["area_m2"]))
    capsys.readouterr()
    loud = [a for a in argv if a != "--quiet"]
    assert predict_main([*loud, *model, "--overwrite", "--set", f"predict_args.min_area={limit}"]) == 0
    large = gpd.read_file(out / "roofs.gpkg")
    under = int((kept["area_m2"] < limit).sum())
    assert under > 0 and len(large) == len(kept) - under
    assert (f"the object filter dropped {small} objects (probability of a roof under 0.5), kept {len(kept)} ({under} "
            f"of them under predict_args.min_area {limit:g} m2, left out of roofs.gpkg)") in capsys.readouterr().err  # fmt: skip
    # A filter that drops every object says so, not that no pixel reached the threshold.
    capsys.readouterr()
    assert predict_main([*argv, *model, "--overwrite", "--set", "predict_args.object_filter=1"]) != 0
    err = capsys.readouterr().err
    assert f"every predicted mask is blank: the object filter dropped every object ({len(every)}) at 1;" in err
    # A rerun says the same, not "up to date" and success.
    assert predict_main([*argv, *model, "--set", "predict_args.object_filter=1"]) != 0
    again = capsys.readouterr().err
    assert "every predicted mask is blank: the object filter dropped every object" in again
    assert "(these predictions are up to date: --overwrite redoes them)" in again


def test_the_log_says_what_the_filter_did():
    from core.bundle import BundleInfo, Normalization
    from core.settings import PredictArgs
    from predict.predict import filter_note

    norm = Normalization("percentile", (0.0,) * 3, (1.0,) * 3, (0.0,) * 3, (1.0,) * 3, None)
    fitted = ObjectFilter(features=feature_names(["footprint", "boundary", "contact"]), mean=[0.0] * 9,
                          scale=[1.0] * 9, coef=[0.0] * 9, intercept=0.0).to_dict()  # fmt: skip
    info = BundleInfo(kind="unet", bands=3, dtype="uint8", normalization=norm, threshold=0.5,
                      targets=["footprint", "boundary", "contact"], object_filter=fitted)  # fmt: skip
    args = PredictArgs()
    assert filter_note(info, args, 3, 10) == (
        "the object filter dropped 3 objects (probability of a roof under 0.5), kept 10"
    )
    assert filter_note(info, args.model_copy(update={"object_filter": 0.0}), 0, 13) == (
        "object filter off (predict_args.object_filter 0): every object kept"
    )
    assert filter_note(info, args.model_copy(update={"seeds": "footprint"}), 0, 13) == (
        "the object filter reads mean_boundary, mean_contact, which predict_args.seeds footprint leaves out: every "
        "object kept"
    )
    old = BundleInfo(kind="unet", bands=3, dtype="uint8", normalization=norm, threshold=0.5)
    assert filter_note(old, args, 0, 13).startswith(
        "the bundle has no object filter (its validation chips held too few"
    )
    assert filter_note(info, args.model_copy(update={"object_filter": 0.8}), 1, 2) == (
        "the object filter dropped 1 objects (probability of a roof under 0.8), kept 2"
    )
    assert filter_note(info, args, 3, 10, small=4) == (  # as many objects kept as roofs.gpkg holds, with the 4
        "the object filter dropped 3 objects (probability of a roof under 0.5), kept 10 (4 of them under "
        "predict_args.min_area 4 m2, left out of roofs.gpkg)"
    )
    info.object_filter = {**fitted, "cut": 0.0}
    assert filter_note(info, args, 0, 13) == (
        "object filter off (the bundle's cut is 0: on validation no cut did better): every object kept"
    )
    # A class bundle's filter applies only to objects split by class as the ones it learnt from.
    info.classes, info.object_filter = ["metal", "other_roof"], {**fitted, "split_classes": True}
    assert filter_note(info, args, 3, 10).startswith("the object filter dropped 3 objects")
    assert filter_note(info, args.model_copy(update={"split_classes": False}), 0, 13) == (
        "the object filter learnt from roofs split by class, and predict_args.split_classes is false: every object "
        "kept (set it true to filter)"
    )
    info.object_filter = fitted  # a class bundle trained before predict split roofs by class
    assert filter_note(info, args, 0, 13) == (
        "the object filter learnt from roofs not split by class (the bundle was trained before predict split them), "
        "and predict_args.split_classes is true: every object kept (retrain with --overwrite, or set it false to "
        "filter)"
    )
    assert filter_note(info, args.model_copy(update={"split_classes": False}), 3, 10).startswith(
        "the object filter dropped"
    )


def test_the_report_says_what_the_filter_learnt():
    from evaluate.report import _object_filter_note

    stats = {"objects": 124, "roofs": 58, "cut": 0.45, "false_dropped": 1.0, "roofs_kept": 0.9655,
             "pixel_f1": [0.99, 0.993], "object_f1": [0.637, 0.982]}  # fmt: skip
    assert _object_filter_note(stats) == (
        '<p class="note">Object filter, fitted on the 124 objects of the validation chips (58 on roofs): cut 0.45; '
        "it drops 100% of the false objects and keeps 97% of the roofs; validation pixel F1 0.990 &rarr; 0.993, "
        "object F1 (objects of 4 m&sup2; or more) 0.637 &rarr; 0.982.</p>"
    )
    metal = {"objects": 70, "roofs": 20, "cut": 0.65, "false_dropped": 0.94, "roofs_kept": 0.21,
             "pixel_f1": [0.6317, 0.6392], "object_f1": [0.6771, 0.6985]}  # fmt: skip
    assert _object_filter_note({**stats, "by_class": {"metal": metal}}).endswith(
        "0.637 &rarr; 0.982. The metal objects have a filter of their own, fitted on 70 (20 on metal roofs): cut "
        "0.65; it drops 94% of the metal objects on no metal roof and keeps 21% of those on metal roofs; metal pixel "
        "F1 0.632 &rarr; 0.639, object F1 "
        "0.677 &rarr; 0.699.</p>"
    )
    off = {
        "predict_applied": {
            "instances": True,
            "object_filter": {"off": "object filter off (predict_args.object_filter 0): every object kept"},
        }
    }
    assert _object_filter_note(stats, off).endswith(
        "0.637 &rarr; 0.982. It was not applied to the scored predictions: object filter off (predict_args."
        "object_filter 0): every object kept.</p>"
    )
    assert _object_filter_note(stats, {"predict_applied": {"instances": False}}).endswith(
        "It was not applied to the scored predictions: they were made without objects (predict_args.instances "
        "false).</p>"
    )
    applied = {"predict_applied": {"instances": True, "object_filter": {"cut": 0.45, "dropped": 3}}}
    assert _object_filter_note(stats, applied) == _object_filter_note(stats)
    assert _object_filter_note({"objects": 8, "roofs": 3}) == (
        '<p class="note">No object filter: the validation chips held 8 objects, 3 on roofs, too few of a kind; '
        "predict keeps every object.</p>"
    )
    assert _object_filter_note(None) == ""


def test_the_report_says_which_threshold_tta_uses():
    from evaluate.report import _tta_note

    train = {"threshold": 0.445, "pixel": {"iou": 0.969}, "threshold_tta": 0.431, "tta_pixel": {"iou": 0.976}}
    assert _tta_note(train) == (
        '<p class="note">With test-time augmentation (predict_args.tta) predict uses the threshold 0.431, tuned on '
        "the averaged validation probabilities: validation pixel IoU 0.976, against 0.969 without at 0.445.</p>"
    )
    assert _tta_note({"threshold": 0.8, "pixel": {"iou": 0.98}}) == "" and _tta_note(None) == ""  # forest, none


def test_the_report_says_why_polygons_went_unmatched():
    from evaluate.report import _errors_note

    ev = {
        "split": "val",
        "polygon": {"tp": 42, "fp": 58, "fn": 42},
        "polygon_errors": {
            "false": {"merges": 5, "misfits": 3, "pieces": 19, "off_roofs": 31},
            "missed": {"merged": 15, "misfit": 3, "split": 4, "not_found": 20},
        },
    }
    assert _errors_note(ev) == (
        '<p class="note">Polygon errors (val): of the 58 false roofs, 5 hold two true roofs or more, 3 hold one but '
        "miss the IoU (too large or offset), 19 lie on roofs without holding one (pieces, or astride two) and 31 lie "
        "mostly off the true roofs; of the 42 missed roofs, 15 were found together with another, 3 inside one object "
        "too large or offset, 4 in pieces and 20 not found (under half covered). Merges are for a U-Net's boundary band "
        "and the merge limit to separate; pieces and roofs not found are the footprint's.</p>"
    )
    one = {"split": "val", "polygon": {"tp": 7, "fp": 4, "fn": 2}, "polygon_errors": {
        "false": {"merges": 1, "misfits": 1, "pieces": 1, "off_roofs": 1},
        "missed": {"merged": 1, "misfit": 0, "split": 0, "not_found": 1}}}  # fmt: skip
    assert _errors_note(one).startswith(
        '<p class="note">Polygon errors (val): of the 4 false roofs, 1 holds two true roofs or more, 1 holds one but '
        "misses the IoU (too large or offset), 1 lies on roofs without holding one (pieces, or astride two) and 1 lies "
        "mostly off the true roofs; of the 2 missed roofs, 1 was found together with another, 0 inside one object"
    )
    perfect = {**ev, "polygon": {"tp": 42, "fp": 0, "fn": 0}}
    assert _errors_note(perfect) == "" and _errors_note({"split": "val"}) == "" and _errors_note(None) == ""


def test_the_report_says_the_merge_limit_train_chose():
    from evaluate.report import _merge_note

    merge = {"limit": 0.6, "object_f1": {"0": 0.332, "0.3": 0.3445, "0.6": 0.4055, "1.01": 0.3455}}
    assert _merge_note({"merge": merge}) == (
        '<p class="note">Touching objects are merged where the boundary band along their border averages under 0.6 '
        "(predict_args.merge): validation object F1 0.406, against 0.332 unmerged.</p>"
    )
    assert _merge_note({"merge": {"limit": 0.0, "object_f1": {"0": 0.9}}}) == (
        '<p class="note">Touching objects are kept apart: no merge limit (predict_args.merge) did better on the '
        "validation chips than none (object F1 0.900).</p>"
    )
    assert _merge_note({"threshold": 0.5}) == "" and _merge_note(None) == ""  # no boundary band, nothing trained
    # Predictions made with another limit than the bundle's (predict's record says which it applied): the line
    # says so; the same limit set by hand is no other.
    chose = '<p class="note">Train chose the merge limit 0.6 for touching objects; '
    assert _merge_note({"merge": merge}, {"predict_applied": {"instances": True, "merge": 1.01}}) == (
        chose + "in the scored predictions touching objects were merged at 1.01.</p>"
    )
    assert _merge_note({"merge": merge}, {"predict_applied": {"instances": True, "merge": 0.0}}) == (
        chose + "in the scored predictions touching objects were kept apart (predict_args.merge 0).</p>"
    )
    assert _merge_note({"merge": merge}, {"predict_applied": {"instances": False}}) == (
        chose + "the scored predictions were made without objects (predict_args.instances false): nothing merged.</p>"
    )
    same = {"predict_applied": {"instances": True, "merge": 0.6}, "predict_settings": {"predict_args.merge": 0.6}}
    assert _merge_note({"merge": merge}, same) == _merge_note({"merge": merge})
    # An evaluation from before predict_applied: the setting the predictions were made with.
    assert _merge_note({"merge": merge}, {"predict_settings": {"predict_args.merge": 1.01}}) == (
        chose + "in the scored predictions touching objects were merged at 1.01.</p>"
    )
    assert _merge_note({"merge": merge}, {"predict_settings": {}}) == _merge_note({"merge": merge})


def test_the_report_says_where_the_seeds_start():
    from evaluate.report import _seed_note

    tuned = {
        "fraction": 0.0,
        "default": 0.75,
        "threshold": 0.47,
        "object_f1": {"0": 0.458, "0.125": 0.426, "0.75": 0.054},
    }
    assert _seed_note({"seeds": tuned}) == (
        '<p class="note">The watershed\'s seeds start 0 of the way from the decision threshold to 1 (0.470; '
        "predict_args.seed_threshold): validation object F1 0.458, against 0.054 from the default 0.75, beyond one "
        "standard error.</p>"
    )
    default = {**tuned, "fraction": 0.75, "threshold": 0.8675, "object_f1": {"0": 0.9, "0.75": 0.975}}
    assert _seed_note({"seeds": default}) == (
        '<p class="note">The watershed\'s seeds start at the default 0.75 of the way from the decision threshold to '
        "1 (0.868): validation object F1 0.975, and no other start beat it by more than one standard error.</p>"
    )
    assert _seed_note({"threshold": 0.5}) == "" and _seed_note(None) == ""  # a classical model, nothing trained
    # Predictions seeded otherwise: the note says from where and why; the same seeds are no other.
    assert _seed_note({"seeds": tuned}, {"predict_applied": {"instances": True, "seed_threshold": 0.47}}) == (
        _seed_note({"seeds": tuned})
    )
    other = {"predict_applied": {"instances": True, "seed_threshold": 0.9},
             "predict_settings": {"predict_args.seed_threshold": 0.9}}  # fmt: skip
    assert _seed_note({"seeds": tuned}, other).endswith(
        " The scored predictions were seeded from 0.900 (predict_args.seed_threshold).</p>"
    )
    # What the rule read: the default's best over the merge limits, and the standard error, where recorded.
    recorded = {**tuned, "default_f1": 0.07, "standard_error": 0.0412}
    assert _seed_note({"seeds": recorded}) == (
        '<p class="note">The watershed\'s seeds start 0 of the way from the decision threshold to 1 (0.470; '
        "predict_args.seed_threshold): validation object F1 0.458, against 0.070 from the default 0.75, beyond one "
        "standard error, 0.041.</p>"
    )
    assert _seed_note({"seeds": tuned}, {"predict_applied": {"instances": False}}).endswith(
        " The scored predictions were made without objects (predict_args.instances false): nothing seeded.</p>"
    )
    both = {"predict_applied": {"instances": True, "seed_threshold": 0.35},
            "predict_settings": {"predict_args.threshold": 0.2, "predict_args.tta": True}}  # fmt: skip
    assert _seed_note({"seeds": tuned}, both).endswith(
        " The scored predictions were seeded from 0.350 (the same share of the way from predict_args.threshold).</p>"
    )
    tta = {
        "predict_applied": {"instances": True, "seed_threshold": 0.4},
        "predict_settings": {"predict_args.tta": True},
    }
    assert _seed_note({"seeds": tuned}, tta).endswith(
        " The scored predictions were seeded from 0.400 (the same share of the way from the threshold of test-time "
        "augmentation).</p>"
    )


def test_validation_objects_of_a_class_bundle_are_split_by_class_as_predict_splits_them(tmp_path):
    """A bundle trained on classes: one 8 x 8 object whose left half the model calls metal and right half
    other; split by the (offset) class probabilities, as predict does by default, it is two validation
    objects. An offset that makes metal win everywhere leaves it one."""
    chip = np.zeros((1, 20, 20), np.uint16)
    chip[0, 2:10, 2:10] = 90
    mask = np.zeros((2, 20, 20), np.uint8)
    mask[0, 2:10, 2:10] = 255
    mask[1, 2:10, 2:10] = 1  # a metal roof ...
    mask[1, 2:10, 8:10] = 2  # ... whose two right columns are of the other class

    def forward(chips):
        prob = (chips / 100.0).astype(np.float32)
        metal = np.full_like(prob, 0.8)
        metal[..., 6:] = 0.3  # columns 6.. (the object's right half): other
        return np.concatenate([prob, metal, 1.0 - metal], axis=1)

    frame, truth, fake = class_pair(tmp_path, chip, mask, forward)
    split = validation_objects(fake, [(frame, truth)], threshold=0.5, seed_threshold=0.75)
    assert split.roof_pixels.tolist() == [32, 32] and split.other_pixels.tolist() == [0, 0]
    # Each object's class as predict gives it, its pixels of each class, and the chip's of each class.
    assert split.kinds.tolist() == [0, 1] and split.class_pixels.tolist() == [[32, 0], [16, 16]]
    assert split.all_class_pixels.tolist() == [48, 16]
    # Judged on its own class, the object called other lies half on metal roof pixels.
    metal, other = split.of_class(0), split.of_class(1)
    assert (metal.roof_pixels.tolist(), metal.other_pixels.tolist(), metal.all_roof_pixels) == ([32], [0], 48)
    assert (other.roof_pixels.tolist(), other.other_pixels.tolist(), other.all_roof_pixels) == ([16], [16], 16)
    whole = validation_objects(fake, [(frame, truth)], threshold=0.5, seed_threshold=0.75, class_bias=[0.0, -2.0])
    assert whole.roof_pixels.tolist() == [64] and whole.kinds.tolist() == [0]


def test_image_features_are_each_bands_mean_spread_and_share():
    labels, _ = two_objects()
    chw = np.zeros((2, 5, 6), np.uint16)
    chw[0, 0:2, 0:3] = [[20, 40, 60], [20, 40, 60]]  # object 1: band 1 varies, band 2 is 20
    chw[1, 0:2, 0:3] = 20
    chw[:, labels == 2] = np.array([[30], [90]])  # object 2: a quarter band 1, three quarters band 2
    from core.objects import image_features

    mean1, mean2, std1, std2, share1, share2 = image_features(labels, np.array([1, 2]), chw, HUNDREDTHS)
    assert mean1.tolist() == pytest.approx([0.4, 0.3]) and mean2.tolist() == pytest.approx([0.2, 0.9])
    assert std1.tolist() == pytest.approx([np.std([0.2, 0.4, 0.6]), 0.0]) and std2.tolist() == pytest.approx([0, 0])
    # Each band's share of the pixel's sum, averaged: object 1 (20/40 + 40/60 + 60/80) / 3; brightness aside.
    assert share1.tolist() == pytest.approx([(1 / 2 + 2 / 3 + 3 / 4) / 3, 0.25])
    assert share2.tolist() == pytest.approx([1 - (1 / 2 + 2 / 3 + 3 / 4) / 3, 0.75])
    twice = image_features(labels, np.array([1, 2]), chw * 2, HUNDREDTHS)
    assert twice[4].tolist() == pytest.approx(share1.tolist())  # twice as bright: the same colour
    assert feature_names(["footprint", "boundary"], 2)[8:] == [
        "mean_band1", "mean_band2", "std_band1", "std_band2", "share_band1", "share_band2"
    ]  # fmt: skip
    assert object_features(labels, [], two_objects()[1], 0.8, chw, HUNDREDTHS).shape == (0, 14)


def test_predicts_filter_reads_the_image_of_the_window_it_judges(tmp_path):
    """A filter that reads the image (image_bands) keeps the object on bright pixels and drops the one on dark
    pixels of the same probability: predict reads the source raster's window and normalizes it as the model."""
    from rasterio.windows import Window

    from core.bundle import BundleInfo, Normalization
    from core.settings import PredictArgs
    from predict.predict import object_keeper

    image = np.full((1, 12, 12), 10, np.uint16)
    image[0, 1:4, 1:4] = 90  # under object 1: bright
    source = write_geotiff(tmp_path / "s.tif", array=image, nodata=None)
    labels = np.zeros((12, 12), np.int32)
    labels[1:4, 1:4], labels[6:9, 6:9] = 1, 2
    bands = np.where(labels > 0, 0.9, 0.0).astype(np.float32)[np.newaxis]
    names = feature_names(["footprint"], 1)
    coef = [0.0] * len(names)
    coef[names.index("mean_band1")] = 10.0
    fitted = ObjectFilter(features=names, mean=[0.0] * len(names), scale=[1.0] * len(names), coef=coef,
                          intercept=-5.0, cut=0.5, image_bands=1)  # fmt: skip
    norm = Normalization("percentile", (0.0,), (100.0,), (0.0,), (1.0,), None)
    info = BundleInfo(kind="unet", bands=1, dtype="uint16", normalization=norm, threshold=0.5,
                      object_filter=fitted.to_dict())  # fmt: skip
    keep = object_keeper(info, PredictArgs(), ("footprint",), source)
    assert keep(labels, np.array([1, 2]), bands, Window(0, 0, 12, 12)).tolist() == [True, False]
    # The window is where the block lies in the raster: the same objects seen from an offset block.
    shifted = np.zeros((11, 11), np.int32)
    shifted[0:3, 0:3] = 1
    assert keep(shifted, np.array([1]), bands[:, 1:, 1:], Window(1, 1, 11, 11)).tolist() == [True]


def rows_of_roofs(tmp_path):
    """A chip with three rows of six 4 x 4 objects the model finds alike (probability 0.9, metal 0.8 of each
    roof pixel): on metal roofs (bright, 90), on other roofs (60) and on no roof (30); and a fake class model."""
    chip = np.full((1, 24, 40), 10, np.uint16)
    mask = np.zeros((2, 24, 40), np.uint8)
    for row, (value, kind) in enumerate(((90, 1), (60, 2), (30, 0))):
        for col in range(6):
            r, c = 2 + 8 * row, 2 + 6 * col
            chip[0, r : r + 4, c : c + 4] = value
            mask[0, r : r + 4, c : c + 4] = 255 if kind else 0
            mask[1, r : r + 4, c : c + 4] = kind

    def forward(chips):
        prob = np.where(chips > 20, 0.9, 0.02).astype(np.float32)
        return np.concatenate([prob, np.full_like(prob, 0.8), np.full_like(prob, 0.2)], axis=1)

    return class_pair(tmp_path, chip, mask, forward)


def class_pair(tmp_path, chip: np.ndarray, mask: np.ndarray, forward):
    """A chip and its class mask (footprint, class; classes metal and other) written on a 1 m grid, and a fake
    class model of one band whose outputs (footprint, then each class's probability) are ``forward(chips)``."""
    from core.raster import write_raster

    transform = rasterio.transform.from_origin(0, chip.shape[1], 1, 1)
    frame = write_raster(tmp_path / "f.tif", chip, crs="EPSG:32644", transform=transform)
    truth = write_raster(tmp_path / "m.tif", mask, crs="EPSG:32644", transform=transform,
                         descriptions=("footprint", "class"), tags={"ROOF_CLASSES": "metal,other"})  # fmt: skip

    class Fake:
        info = SimpleNamespace(targets=["footprint"], classes=["metal", "other"], bands=1, normalization=HUNDREDTHS)

        def prepare(self, chips):
            return chips

        def forward_targets(self, chips):
            return forward(chips)

    return frame, truth, Fake()


def test_a_class_bundles_filter_judges_each_class_on_roofs_of_that_class(tmp_path):
    """Every object is called metal; those on other roofs are roofs, but not metal ones. The filter of all
    objects keeps them; the metal objects' own filter drops them, by their colour."""
    from core.objects import train_object_filter

    frame, truth, fake = rows_of_roofs(tmp_path)
    entry, record, why = train_object_filter(fake, [(frame, truth)], 0.5)
    fitted = ObjectFilter.from_dict(json.loads(json.dumps(entry)))
    assert list(fitted.by_class) == ["metal"] and fitted.roofs == 12 and record["by_class"]["metal"]["roofs"] == 6
    assert record["by_class"]["metal"]["objects"] == 18 and record["by_class"]["metal"]["false_dropped"] == 1.0
    assert "; the metal objects' own object filter fitted on 18 validation objects (6 on metal roofs), " in why
    assert (
        "it drops 100% of the metal objects on no metal roof and keeps 100% of those on metal roofs; validation "
        "pixel F1 0.500 -> 1.000" in why
    )
    assert why.endswith(
        "; the other objects judged by the filter of all objects (the validation chips hold 0 objects on other "
        "roofs and 0 false ones, under 5 of either kind)"
    )
    assert fitted.features[-2:] == ["mean_class_metal", "mean_class_other"]  # the class bands' means read too
    x = np.array([[math.log(16), 0.9, 0.0, 0.9, 1.0, 1.0, 1.0, v / 100, 0.0, 1.0, 0.8, 0.2] for v in (90, 60, 30)])
    assert fitted.keep(x).tolist() == [True, True, False]  # as roofs
    assert fitted.keep(x, np.array([0, 0, 0]), ["metal", "other"]).tolist() == [True, False, False]  # as metal
    assert fitted.keep(x, np.array([1, 1, 1]), ["metal", "other"]).tolist() == [True, True, False]  # other: as roofs
    assert fitted.keep(x, np.array([0, 0, 0]), ["metal", "other"], cut=0.0).tolist() == [True, True, True]
    assert fitted.cuts(["metal", "other"]) == f"metal {fitted.by_class['metal']['cut']:g}, other {fitted.cut:g}"
    assert fitted.cuts() == f"{fitted.cut:g}"


def test_predict_judges_each_object_by_the_filter_of_its_class(tmp_path):
    from rasterio.windows import Window

    from core.bundle import BundleInfo, Normalization
    from core.objects import train_object_filter
    from core.settings import PredictArgs
    from predict.predict import filter_note, object_keeper

    frame, truth, fake = rows_of_roofs(tmp_path)
    entry, _, _ = train_object_filter(fake, [(frame, truth)], 0.5)
    norm = Normalization("percentile", (0.0,), (100.0,), (0.0,), (1.0,), None)
    info = BundleInfo(kind="unet", bands=1, dtype="uint16", normalization=norm, threshold=0.5,
                      classes=["metal", "other"], object_filter=entry)  # fmt: skip
    labels = np.zeros((24, 40), np.int32)
    labels[2:6, 2:6], labels[10:14, 2:6], labels[18:22, 2:6] = 1, 2, 3  # the first object of each row
    bands = np.where(labels > 0, 0.9, 0.02).astype(np.float32)[np.newaxis]
    metal = np.stack([np.full((24, 40), 0.8, np.float32), np.full((24, 40), 0.2, np.float32)])
    keep = object_keeper(info, PredictArgs(), ("footprint",), frame)
    ids, window = np.array([1, 2, 3]), Window(0, 0, 40, 24)
    assert keep(labels, ids, bands, window, metal).tolist() == [True, False, False]
    assert keep(labels, ids, bands, window, metal[::-1]).tolist() == [True, True, False]  # called other: roofs

    # A filter fitted before filters read the class bands (its entry without them) judges the same objects alike.
    def without_classes(e: dict) -> dict:
        return {**e, **{k: e[k][:-2] for k in ("features", "mean", "scale", "coef")},
                "by_class": {n: without_classes(c) for n, c in e.get("by_class", {}).items()}}  # fmt: skip

    old = dataclasses.replace(info, object_filter=without_classes(entry))
    assert object_keeper(old, PredictArgs(), ("footprint",), frame)(labels, ids, bands, window, metal).tolist() == [
        True, False, False]  # fmt: skip
    cut = ObjectFilter.from_dict(entry).by_class["metal"]["cut"]
    assert filter_note(info, PredictArgs(), 2, 1) == (
        "the object filter dropped 2 objects (probability of a roof of its class under the cut of its class: "
        f"metal {cut:g}, other {entry['cut']:g}), kept 1"
    )
    assert filter_note(info, PredictArgs(object_filter=0.3), 2, 1) == (
        "the object filter dropped 2 objects (probability of a roof of its class under 0.3), kept 1"
    )


def test_roof_free_rasters_are_logged_one_line_per_reason(caplog):
    from predict.predict import log_blank

    def result(name, dropped=0, valid=100, lo=0.0, hi=0.2):
        return SimpleNamespace(source=Path(name), dropped=dropped, valid_pixels=valid, prob_min=lo, prob_max=hi)

    blank = [result(f"chip_{k}.tif", hi=k / 10) for k in range(5)] + [result("a.tif", dropped=2),
                                                                       result("edge.tif", valid=0)]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="predict.predict"):
        log_blank(blank, 0.5)
    assert [r.getMessage() for r in caplog.records] == [
        "predict: the object filter dropped every object of a.tif (2)",
        "predict: every pixel is nodata in edge.tif",
        "predict: no pixel reaches the threshold 0.500 in chip_0.tif (probabilities 0.000..0.000), chip_1.tif "
        "(probabilities 0.000..0.100), chip_2.tif (probabilities 0.000..0.200) and 2 more",
    ]
