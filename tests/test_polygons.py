"""Polygon scores as SpaceNet's (one-to-one, greedy by IoU, minimum area) and SpaceNet's CSV layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import shapely
from affine import Affine

from core.errors import DataError
from core.metrics import MatchCounts
from core.polygons import (
    PolygonErrors,
    match_polygons,
    polygon_errors,
    read_spacenet_csv,
    score_spacenet,
    to_pixels,
    write_spacenet_csv,
)


def square(x: float, y: float, w: float = 10, h: float = 10) -> shapely.Polygon:
    return shapely.box(x, y, x + w, y + h)


def test_touching_roofs_merged_into_one_polygon_match_none():
    truth = [square(0, 0), square(10, 0), square(20, 0)]  # three touching roofs in a row
    merged = [square(0, 0, 30)]
    counts, pairs = match_polygons(truth, merged)
    assert (counts.tp, counts.fp, counts.fn) == (0, 1, 3)
    assert pairs == []
    counts, pairs = match_polygons(truth, [square(0, 0), square(10, 0), square(20.5, 0, 9.5)])
    assert (counts.tp, counts.fp, counts.fn) == (3, 0, 0)
    assert [(t, p) for t, p, _ in pairs] == [(0, 0), (1, 1), (2, 2)]
    assert pairs[2][2] == pytest.approx(0.95)


def test_matching_is_one_to_one_and_greedy_by_iou():
    truth = [square(0, 0), square(0, 0, 10, 9)]
    predicted = [square(0, 0, 10, 9.5)]  # IoU 0.95 with the first, 0.947 with the second
    counts, pairs = match_polygons(truth, predicted)
    assert (counts.tp, counts.fp, counts.fn) == (1, 0, 1)
    assert pairs[0][:2] == (0, 0)
    counts, _ = match_polygons(truth, [square(0, 0, 10, 4)])  # IoU 0.4 and 0.44: under 0.5
    assert (counts.tp, counts.fp, counts.fn) == (0, 1, 2)
    assert match_polygons([], [])[0].scores() == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0,
                                                  "fn": 0}  # fmt: skip


def errors_of(truth, predicted) -> PolygonErrors:
    return polygon_errors(truth, predicted, match_polygons(truth, predicted)[1])


def test_polygon_errors_name_each_unmatched_polygon_once():
    truth = [
        square(0, 0), square(10, 0), square(20, 0),  # a row of touching roofs, found as one object
        square(100, 0),  # found whole: matched
        square(200, 0),  # found in three pieces
        square(300, 0),  # inside a yard-sized object
        square(400, 0),  # a corner found
        square(500, 0),  # nothing found
    ]  # fmt: skip
    predicted = [
        square(0, 0, 30),  # merge of 0, 1, 2
        square(100, 0),  # match
        square(200, 0, 4), square(204, 0, 3), square(207, 0, 3),  # pieces of roof 4, each under half of it: split
        square(295, -5, 20, 20),  # roof 5 and its yard: IoU 0.25, misfits; roof 5 misfit
        square(400, 0, 3, 3),  # a piece of roof 6 (9% of it): roof 6 not found
        square(700, 0),  # on no roof
        square(600, 0, 4, 10), square(604, 0, 6, 2),  # off every roof too (nothing there)
    ]  # fmt: skip
    errors = errors_of(truth, predicted)
    assert errors == PolygonErrors(merges=1, misfits=1, pieces=4, off_roofs=3, merged=3, misfit=1, split=1,
                                   not_found=2)  # fmt: skip
    assert errors.scores() == {
        "false": {"merges": 1, "misfits": 1, "pieces": 4, "off_roofs": 3},
        "missed": {"merged": 3, "misfit": 1, "split": 1, "not_found": 2},
    }
    counts, _ = match_polygons(truth, predicted)  # every unmatched polygon has exactly one kind
    assert (counts.fp, counts.fn) == (9, 7)
    assert sum(errors.scores()["false"].values()) == counts.fp
    assert sum(errors.scores()["missed"].values()) == counts.fn
    assert errors.line() == (
        "false objects: 1 merges, 1 misfits, 4 pieces, 3 off roofs; missed roofs: 3 merged, 1 misfit, 1 split, "
        "2 not found"
    )


def test_polygon_errors_a_matched_object_that_also_covers_a_small_roof_merged_it():
    truth = [square(0, 0, 20, 10), square(20, 0, 4, 4)]  # a large roof and a shed against it
    predicted = [square(0, 0, 24, 10)]  # IoU 200/240 with the roof: matched; holds the whole shed
    errors = errors_of(truth, predicted)
    assert errors == PolygonErrors(merged=1)
    assert errors_of([], []) == PolygonErrors()
    assert errors_of([], [square(0, 0)]) == PolygonErrors(off_roofs=1)
    assert errors_of([square(0, 0)], []) == PolygonErrors(not_found=1)
    total = PolygonErrors(merges=1).merge(PolygonErrors(merges=2, split=1))
    assert total == PolygonErrors(merges=3, split=1)


def test_polygon_errors_misfits_and_overlapping_true_roofs():
    roof = square(0, 0)
    shifted = square(4, 0)  # the same size, 4 of 10 off: IoU 0.43
    assert errors_of([roof], [shifted]) == PolygonErrors(misfits=1, misfit=1)
    assert errors_of([roof], [roof, square(0, 0)]) == PolygonErrors(misfits=1)  # a duplicate loses the match
    inside = square(0, 0, 6)  # 60% of the roof inside it: IoU 0.6, a match at 0.5 ...
    assert match_polygons([roof], [inside], 0.75)[0].tp == 0  # ... none at 0.75: a misfit, though not larger
    assert polygon_errors([roof], [inside], []) == PolygonErrors(misfits=1, misfit=1)
    # Two true roofs drawn twice over the same ground: a third of an object on them is a third, not two.
    twice = [square(0, 0), square(0, 0)]
    assert errors_of(twice, [square(7, 0, 9, 10)]) == PolygonErrors(off_roofs=1, not_found=2)
    # 40% of each: a piece; 60% of each: it matches one twin and the other, which it holds too, is merged.
    assert errors_of(twice, [square(0, 0, 10, 4), square(0, 4, 10, 6)]) == PolygonErrors(pieces=1, merged=1)


def test_scores_from_counts():
    assert MatchCounts(tp=3, fp=1, fn=2).scores() == {
        "precision": 0.75, "recall": 0.6, "f1": pytest.approx(2 / 3), "tp": 3, "fp": 1, "fn": 2,
    }  # fmt: skip


def test_spacenet_csv_round_trip_and_scores(tmp_path: Path):
    transform = Affine(0.5, 0, 500000, 0, -0.5, 2960000)
    roof = shapely.box(500001, 2959990, 500006, 2959995)  # 10 x 10 px
    pixels = to_pixels(roof, transform)
    assert shapely.equals_exact(pixels.normalize(), shapely.box(2, 10, 12, 20).normalize(), tolerance=1e-9)
    truth = write_spacenet_csv(tmp_path / "t.csv", {"img_1": [(pixels, 1.0)], "img_2": []})
    pred = write_spacenet_csv(tmp_path / "p.csv", {"img_1": [(pixels, 0.9), (shapely.box(40, 40, 42, 42), 0.3)]})
    lines = truth.read_text().splitlines()
    assert lines[0] == "ImageId,BuildingId,PolygonWKT_Pix,Confidence"
    assert lines[2] == "img_2,-1,POLYGON EMPTY,1"
    read = read_spacenet_csv(truth)
    assert list(read) == ["img_1", "img_2"] and read["img_2"] == [] and read["img_1"][0].area == 100
    assert score_spacenet(read, read_spacenet_csv(pred)).scores()["tp"] == 1
    assert score_spacenet(read, read_spacenet_csv(pred)).fp == 1
    assert score_spacenet(read, read_spacenet_csv(pred), min_area=5).fp == 0  # the 4 px polygon is ignored


def test_a_csv_that_is_not_spacenet_is_one_clear_error(tmp_path: Path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,wkt\n1,POLYGON((0 0,1 0,1 1,0 0))\n")
    with pytest.raises(
        DataError, match=r"is not a SpaceNet CSV: it lacks the column\(s\) \['ImageId', 'PolygonWKT_Pix'\]"
    ):
        read_spacenet_csv(bad)
    worse = tmp_path / "worse.csv"
    worse.write_text('ImageId,BuildingId,PolygonWKT_Pix\nimg,0,"POLYGON((0 0, 1"\n')
    with pytest.raises(DataError, match=r"line 2: PolygonWKT_Pix is not WKT"):
        read_spacenet_csv(worse)
    short = tmp_path / "short.csv"  # (it crashed: 'NoneType' object has no attribute 'is_empty')
    short.write_text("ImageId,BuildingId,PolygonWKT_Pix\nimg,0,POLYGON EMPTY\nval_0,5\n")
    with pytest.raises(DataError) as caught:
        read_spacenet_csv(short)
    assert str(caught.value) == f"{short}, line 3: 2 fields, the header names 3"
    long = tmp_path / "long.csv"  # a polygon's commas unquoted
    long.write_text("ImageId,BuildingId,PolygonWKT_Pix\nimg,0,POLYGON ((0 0, 4 0, 4 4, 0 0))\n")
    with pytest.raises(DataError) as caught:
        read_spacenet_csv(long)
    assert str(caught.value) == (
        f"{long}, line 2: 6 fields, the header names 3: quote the PolygonWKT_Pix, which holds commas"
    )
    line = tmp_path / "line.csv"
    line.write_text('ImageId,BuildingId,PolygonWKT_Pix\nimg,0,"LINESTRING (0 0, 4 4)"\n')
    with pytest.raises(DataError, match=r"line 2: PolygonWKT_Pix is a LineString, not a polygon \(an image without "):
        read_spacenet_csv(line)


def test_csvs_that_share_no_image_say_so():
    from core.polygons import unshared_images

    square = [shapely.box(0, 0, 4, 4)]
    assert unshared_images({"val_0": square, "val_1": []}, {"val_0.tif": square, "val_1.tif": square}) == (
        "the two CSVs share no ImageId (truth val_0, val_1 ..., predictions val_0.tif, val_1.tif ...): every polygon is "
        "unmatched; name the images alike in both"
    )
    assert unshared_images({"val_0": square}, {"val_0": square, "x": square}) == ""
    assert unshared_images({"val_0": square}, {"val_9": []}) == ""  # no predicted polygon: nothing to match anyway
    assert unshared_images({"a": square, "b": []}, {"a": [], "b": square}) == ""  # both name a and b


def test_evaluate_scores_polygons_and_writes_spacenet_files(scene, tmp_path: Path, capsys):
    from chip.chip import main as chip_main
    from evaluate.evaluate import main as evaluate_main
    from mask.mask import main as mask_main
    from mosaic.mosaic import main as mosaic_main
    from predict.predict import main as predict_main
    from split.split import main as split_main
    from train.train import main as train_main

    argv = scene("evaluate_args.min_area=16")
    for main in (mosaic_main, chip_main, mask_main, split_main):
        assert main(argv) == 0
    for main in (train_main, predict_main, evaluate_main):
        assert main([*argv, "--model", "regression"]) == 0
    out = tmp_path / "results" / "contract" / "regression" / "evaluation" / "val"
    metrics = json.loads((out / "metrics.json").read_text())
    polygon = metrics["polygon"]
    assert set(polygon) == {"precision", "recall", "f1", "tp", "fp", "fn"}
    assert polygon["tp"] + polygon["fn"] > 0
    truth = read_spacenet_csv(out / "truth.csv")
    assert sum(len(v) for v in truth.values()) == polygon["tp"] + polygon["fn"]
    assert all(0 <= c <= 64 for polys in truth.values() for g in polys for c in g.bounds)
    errors = metrics["polygon_errors"]  # every unmatched polygon once, by kind
    assert set(errors["false"]) == {"merges", "misfits", "pieces", "off_roofs"}
    assert set(errors["missed"]) == {"merged", "misfit", "split", "not_found"}
    assert (sum(errors["false"].values()), sum(errors["missed"].values())) == (polygon["fp"], polygon["fn"])
    capsys.readouterr()
    assert evaluate_main([*argv, "--spacenet", str(out / "truth.csv"), str(out / "predictions.csv")]) == 0
    assert json.loads(capsys.readouterr().out) == polygon  # min_area 16 px = 4 m2 at 0.5 m: the same polygons


def test_group_counts_score_each_group_of_true_polygons_apart():
    from core.polygons import group_counts

    left, right, alone = shapely.box(0, 0, 10, 10), shapely.box(10, 0, 20, 10), shapely.box(40, 0, 50, 10)
    merged = shapely.box(-1, 0, 21, 10)  # the two touching roofs found as one (IoU 100/220 with each)
    counts = group_counts([left, right, alone], ["row", "row", "detached"], [merged, alone, shapely.box(80, 0, 90, 9)])
    assert counts["row"].scores()["tp"] == 0 and (counts["row"].fp, counts["row"].fn) == (1, 2)
    assert (counts["detached"].tp, counts["detached"].fp, counts["detached"].fn) == (1, 0, 0)
    split = group_counts([left, right, alone], ["row", "row", "detached"], [left, right])
    assert (split["row"].tp, split["row"].fp, split["row"].fn) == (2, 0, 0)
    assert (split["detached"].tp, split["detached"].fn) == (0, 1)
