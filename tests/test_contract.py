"""The stage contract, stage by stage as a user runs them: a rerun after an edit never mixes data.

Each numbered case of the issue is a test here: the user's sequence of commands, then either a
one-line refusal naming what changed, or outputs identical to a clean run with the new settings.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from conftest import SCENE_SIDE as SIDE
from conftest import interrupted, write_geotiff, write_labels

import pipeline
from chip.chip import main as chip_main
from core.errors import OutputExistsError
from core.index import read_index
from core.raster import read_raster
from core.settings import load_settings
from core.tree import DataTree
from evaluate.evaluate import main as evaluate_main
from evaluate.report import summary_frame
from mask.mask import main as mask_main
from mosaic.mosaic import main as mosaic_main
from predict.predict import main as predict_main
from split.split import main as split_main
from train.train import main as train_main
from workflow import runner
from workflow.contract import begin, file_identity, flatten, settings_of, status


def tree_of(argv: list[str]) -> DataTree:
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return DataTree.from_settings(load_settings(argv[1], sets))


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}


def error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def prepare(argv: list[str], *mains) -> None:
    for main in mains:
        assert main(argv) == 0, main.__module__


def predicted(scene) -> tuple[list[str], list[str]]:
    """The scene's data stages run, a regression (it trains in a second) trained and its predictions made: the
    stages' argv and ``--model regression``."""
    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main, split_main)
    model = ["--model", "regression"]
    prepare([*argv, *model], train_main, predict_main)
    return argv, model


# --- 1. split folders never hold old masks ------------------------------------------------------------


def test_1_new_labels_make_the_split_outdated_and_train_refuses_it(scene, capsys, tmp_path):
    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main, split_main)
    tree = tree_of(argv)
    labels = tree.labels / "roofs.geojson"
    gdf = gpd.read_file(labels)
    gdf.iloc[: len(gdf) // 2].to_file(labels, driver="GeoJSON")  # the user drops half the polygons
    assert mask_main(argv) == 1
    assert error(capsys) == (
        "error: masks/ were made from labels/roofs.geojson as it was before it changed: add --overwrite to redo "
        "them (python pipeline.py reruns outdated stages)"
    )
    assert mask_main([*argv, "--overwrite"]) == 0
    assert "split" not in read_index(tree.chips_csv).columns  # the old split does not describe the new masks
    capsys.readouterr()
    assert train_main([*argv, "--model", "regression"]) == 1
    message = error(capsys)
    assert message.startswith(
        "error: the split folders (train_frames/, val_frames/ ...) are outdated: made from an earlier run of mask"
    )
    assert message.endswith(
        "rerun python split/split.py --overwrite (or python pipeline.py --from split) before train regression"
    )
    assert not tree.bundle("regression").exists()
    # pipeline.py check says so; pipeline.py reruns the outdated split, and then every split mask is a new mask.
    assert pipeline.main([*argv, "check", "--from", "train-regression", "--to", "train-regression"]) == 1
    out = capsys.readouterr().out
    assert "FATAL    split: the split folders (train_frames/, val_frames/ ...) are outdated: made from an " \
        "earlier run of mask" in out  # fmt: skip
    assert pipeline.main([*argv, "--from", "split", "--to", "split"]) == 0
    index = read_index(tree.chips_csv, needs=("split",))
    for row in index[index["split"] != ""].itertuples():
        masks = tree.split_masks(row.split) / row.split_file
        assert masks.read_bytes() == (tree.masks / row.file).read_bytes()
    assert train_main([*argv, "--model", "regression"]) == 0


# --- 2. mask refuses chips of another grid ------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "phrase"), [("chip_args.stride=48", "chip_args.stride null"), ("chip_args.size=32", "chip_args.size 64")]
)
def test_2_mask_refuses_masks_of_another_chip_grid(change, phrase, scene, capsys):
    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main)
    assert chip_main([*scene(change), "--overwrite"]) == 0
    capsys.readouterr()
    assert mask_main(scene(change)) == 1
    assert error(capsys) == (
        f"error: masks/ were made from an earlier run of chip (made with {phrase}): add --overwrite to redo them "
        "(python pipeline.py reruns outdated stages)"
    )
    assert pipeline.main([*scene(change), "check", "--only", "split"]) == 1
    assert "FATAL    mask: masks/ are outdated: made from an earlier run of chip" in capsys.readouterr().out
    # Redone, the masks are those of a clean run on the new grid.
    assert mask_main([*scene(change), "--overwrite"]) == 0
    tree = tree_of(argv)
    index = read_index(tree.chips_csv, needs=("roof_share",))
    with (
        __import__("rasterio").open(tree.chips / index["file"].iloc[-1]) as chip,
        __import__("rasterio").open(tree.masks / index["file"].iloc[-1]) as mask,
    ):
        assert (chip.transform, chip.shape) == (mask.transform, mask.shape)


# --- 3. chip does not resume under other settings -------------------------------------------------------


def test_3_an_interrupted_chip_run_is_not_resumed_with_another_size(scene, capsys, tmp_path):
    argv = scene()
    prepare(argv, mosaic_main, chip_main)
    tree = tree_of(argv)
    interrupted(tree.root / "chip.record.json")  # killed halfway: record running, no index, some chips
    tree.chips_csv.unlink()
    for p in sorted(tree.chips.iterdir())[5:]:
        p.unlink()
    assert chip_main(scene("chip_args.size=128")) == 1
    assert error(capsys) == (
        "error: chips/ were made with chip_args.size 64, now 128: add --overwrite to redo them "
        "(python pipeline.py reruns outdated stages)"
    )
    assert chip_main([*scene("chip_args.size=128"), "--overwrite"]) == 0
    redone = files(tree.chips) | {"index": tree.chips_csv.read_bytes()}
    # A clean run with size 128 in another tree gives the same files.
    clean = tmp_path / "clean"
    (clean / "raw").mkdir(parents=True)
    (clean / "raw" / "tile.tif").write_bytes((tree.raw / "tile.tif").read_bytes())
    clean_argv = scene("chip_args.size=128", f"data_root={clean}")
    prepare(clean_argv, mosaic_main, chip_main)
    assert redone == files(clean / "chips") | {"index": (clean / "chips.csv").read_bytes()}
    assert len(redone) == 1 + 4


def test_3_an_interrupted_chip_run_resumes_with_the_same_settings(scene, capsys):
    argv = scene()
    prepare(argv, mosaic_main, chip_main)
    tree = tree_of(argv)
    clean = files(tree.chips) | {"index": tree.chips_csv.read_bytes()}
    interrupted(tree.root / "chip.record.json")
    tree.chips_csv.unlink()
    kept = sorted(tree.chips.iterdir())[:5]
    times = {p: p.stat().st_mtime_ns for p in kept}
    for p in sorted(tree.chips.iterdir())[5:]:
        p.unlink()
    (tree.chips / ".chip_000006.1234abcd.tmp.tif").write_bytes(b"half")
    assert chip_main(argv) == 0
    assert files(tree.chips) | {"index": tree.chips_csv.read_bytes()} == clean
    assert {p: p.stat().st_mtime_ns for p in kept} == times  # finished chips were kept, not rewritten
    assert json.loads((tree.root / "chip.record.json").read_text())["state"] == "complete"


# --- 4. mask does not resume under another filter -------------------------------------------------------


def test_4_an_interrupted_mask_run_is_not_resumed_with_another_filter(scene, capsys, tmp_path):
    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main)
    tree = tree_of(argv)
    interrupted(tree.root / "mask.record.json")
    for p in sorted(tree.masks.iterdir())[8:]:
        p.unlink()
    both = 'mask_args.filter={"attribute": "roof_type", "values": ["metal", "concrete"]}'
    assert mask_main(scene(both)) == 1
    assert error(capsys) == (
        'error: masks/ were made with mask_args.filter.values ["metal"], now ["metal", "concrete"]: add --overwrite '
        "to redo them (python pipeline.py reruns outdated stages)"
    )
    assert mask_main([*scene(both), "--overwrite"]) == 0
    redone = files(tree.masks)
    assert len(redone) == 16
    for p in sorted(tree.masks.iterdir()):  # every mask as a clean run with both values burns it
        p.unlink()
    (tree.root / "mask.record.json").unlink()
    assert mask_main(scene(both)) == 0
    assert files(tree.masks) == redone


# --- 5. evaluate never scores predictions of another split ---------------------------------------------


def test_5_evaluate_refuses_predictions_of_an_earlier_split(scene, capsys):
    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main, split_main)
    model = ["--model", "regression"]
    prepare([*argv, *model], train_main, predict_main, evaluate_main)
    tree = tree_of(argv)
    metrics = tree.model_dir("regression") / "evaluation" / "val" / "metrics.json"
    first = json.loads(metrics.read_text())
    assert first["pixel"]["iou"] > 0.5
    assert split_main([*scene("split_args.seed=7"), "--overwrite"]) == 0
    capsys.readouterr()
    assert evaluate_main([*scene("split_args.seed=7"), *model, "--overwrite"]) == 1
    assert error(capsys) == (
        "error: the predictions are outdated: made from an earlier run of split (made with split_args.seed 0): "
        "rerun python predict/predict.py --model regression --overwrite (or python pipeline.py --from predict) "
        "before evaluate regression"
    )
    assert json.loads(metrics.read_text()) == first  # nothing was scored
    # Predicting the new val chips with the bundle trained on the old split would leak training chips.
    assert predict_main([*scene("split_args.seed=7"), *model, "--overwrite"]) == 1
    assert error(capsys) == (
        "error: the regression bundle was trained on an earlier split than the val chips of today's split: some "
        "may have been its training chips. Retrain first: python train/train.py --model regression --overwrite"
    )
    # Retrained and predicted again, the new split's chips are scored: never a 0.000 from mismatched files.
    for main in (train_main, predict_main, evaluate_main):
        assert main([*scene("split_args.seed=7"), *model, "--overwrite"]) == 0, main.__module__
    assert json.loads(metrics.read_text())["pixel"]["iou"] > 0.5


def test_5_predictions_are_paired_with_the_truth_by_chip_not_by_name(scene, capsys):
    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main, split_main)
    model = ["--model", "regression"]
    tree = tree_of(argv)
    prepare([*argv, *model], train_main)
    # Predict every chip of chips/ (chip_NNNNNN.tif): evaluate finds each val chip's prediction by its id.
    assert predict_main([*argv, *model, "--input", str(tree.chips)]) == 0
    assert evaluate_main([*argv, *model]) == 0
    record = json.loads((tree.model_dir("regression") / "evaluation" / "val" / "metrics.json").read_text())
    index = read_index(tree.chips_csv, needs=("split",))
    assert record["chips"] == int((index["split"] == "val").sum())
    record_file = tree.prediction_dir("regression") / "predict.record.json"
    outputs = json.loads(record_file.read_text())["summary"]["outputs"]
    assert [o["chip"] for o in outputs] == index["id"].tolist()
    assert outputs[0]["mask"] == "chip_000000.tif" and outputs[0]["input"] == "chips/chip_000000.tif"


def test_5_a_prediction_on_another_grid_is_an_error(scene, capsys):
    argv, model = predicted(scene)
    tree = tree_of(argv)
    # Another program wrote val_0's prediction one pixel off (its record says otherwise).
    path = tree.prediction_dir("regression") / "masks" / "val_0.tif"
    import rasterio

    with rasterio.open(path) as src:
        data, profile = src.read(), src.profile
    profile["transform"] = profile["transform"] * profile["transform"].translation(1, 0)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    capsys.readouterr()
    assert evaluate_main([*argv, *model]) == 1
    assert "lies on another grid than its truth" in error(capsys)


# --- 6. zero chips is an error ----------------------------------------------------------------------


def test_6_chips_larger_than_the_raster_are_an_error(scene, capsys):
    argv = scene("chip_args.size=1024")
    prepare(argv, mosaic_main)
    capsys.readouterr()
    assert chip_main(argv) == 1
    assert error(capsys) == (
        "error: no chip kept: the source raster(s) (256x256 px) are too small for chips of 1024 px, which would be "
        "more than 50% padding (chip_args.max_nodata): lower chip_args.size"
    )
    assert not tree_of(argv).chips_csv.exists()


def test_6_an_all_nodata_raster_is_an_error(scene, capsys, tmp_path):
    write_geotiff(tmp_path / "data" / "raw" / "tile.tif", array=np.zeros((3, SIDE, SIDE), np.uint16), nodata=0)
    argv = scene()
    prepare(argv, mosaic_main)
    capsys.readouterr()
    assert chip_main(argv) == 1
    assert error(capsys) == (
        "error: no chip kept: all 16 chips of 64 px are more than 50% nodata (chip_args.max_nodata): the source "
        "raster(s) (256x256 px) hold (almost) no valid pixel — check their nodata value and that they hold imagery"
    )


# --- the contract's own pieces -------------------------------------------------------------------------


def test_rerun_with_unchanged_settings_skips_every_data_stage(scene, capsys):
    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main, split_main)
    tree = tree_of(argv)
    before = {p: p.stat().st_mtime_ns for p in tree.root.rglob("*") if p.is_file()}
    prepare(argv, mosaic_main, chip_main, mask_main, split_main)
    assert {p: p.stat().st_mtime_ns for p in tree.root.rglob("*") if p.is_file()} == before
    settings = load_settings(argv[1], [argv[i + 1] for i, a in enumerate(argv) if a == "--set"])
    for name in ("mosaic", "chip", "mask", "split"):
        assert status(name, settings, tree).describe() == "done"


def test_an_edit_of_raw_imagery_makes_the_mosaic_outdated(scene, capsys):
    argv = scene()
    prepare(argv, mosaic_main, chip_main)
    tree = tree_of(argv)
    write_geotiff(tree.raw / "tile.tif", bands=3, rows=SIDE, cols=SIDE, seed=9)
    assert chip_main(argv) == 1
    assert error(capsys).startswith(
        "error: mosaic/mosaic.tif is outdated: made from raw/tile.tif as it was before it changed: rerun "
        "python mosaic/mosaic.py --overwrite"
    )


def test_a_mosaic_put_there_by_hand_is_used_and_known_by_its_file(scene, capsys, tmp_path):
    argv = scene()
    tree = tree_of(argv)
    write_geotiff(tree.mosaic, bands=3, rows=128, cols=128, seed=1)
    assert chip_main(argv) == 0  # no record: used as it is
    write_geotiff(tree.mosaic, bands=3, rows=128, cols=128, seed=2)
    capsys.readouterr()
    assert chip_main(argv) == 1
    assert error(capsys).startswith("error: chips/ were made from an earlier run of mosaic")


def test_a_refused_fresh_start_keeps_old_outputs_until_the_stage_checks_pass(scene, capsys):
    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main)
    tree = tree_of(argv)
    before = files(tree.masks)
    (tree.labels / "roofs.geojson").write_text("not json {")
    assert mask_main([*argv, "--overwrite"]) == 1
    assert "cannot be read" in error(capsys)
    assert files(tree.masks) == before


def test_a_new_data_root_without_a_split_keeps_the_bundle_trained_on_another(scene, capsys, tmp_path):
    """results/ are per experiment, not per data root: train --overwrite in a data root whose split was never
    made removed the bundle trained on another, then failed on the missing split, and its record read as a run
    to resume. Now the missing split is said before anything is removed or recorded."""
    argv, model = predicted(scene)
    tree = tree_of(argv)
    bundle, record = files(tree.bundle("regression")), (tree.model_dir("regression") / "train.record.json")
    before = record.read_bytes()
    shutil.copytree(tree.raw, tmp_path / "other" / "raw")
    shutil.copytree(tree.labels, tmp_path / "other" / "labels")
    other = [*argv, "--set", f"data_root={tmp_path / 'other'}"]
    capsys.readouterr()
    for flags in ([], ["--overwrite"]):  # ("made from a run of split since removed: add --overwrite", it said)
        assert train_main([*other, *model, *flags]) == 1
        assert error(capsys) == (
            "error: train regression reads the split folders (train_frames/, val_frames/ ...), which are not there "
            "(none made here, or removed since): run python split/split.py first"
        )
    assert files(tree.bundle("regression")) == bundle and record.read_bytes() == before
    assert predict_main([*argv, *model]) == 0  # the bundle still predicts in its own data root
    # Once the other root has a split, the refusal names the data root the bundle was trained in; the data
    # stages' records move with their root (a copy of it is the same data: an earlier run, not another root).
    shutil.copytree(tree.root, tmp_path / "copy")
    copy = [*argv, "--set", f"data_root={tmp_path / 'copy'}", "--set", "chip_args.stride=16"]
    assert chip_main([*copy, "--overwrite"]) == 0
    assert mask_main(copy) == 1
    assert "error: masks/ were made from an earlier run of chip" in error(capsys)
    prepare(other, mosaic_main, chip_main, mask_main, split_main)
    capsys.readouterr()
    assert train_main([*other, *model]) == 1
    assert error(capsys) == (
        f"error: the bundle was made from a run of split in another data root, {tree.root.resolve()} (now "
        f"{(tmp_path / 'other').resolve()}): add --overwrite to redo it (python pipeline.py reruns outdated stages)"
    )


def test_evaluate_after_the_predictions_moved_says_to_predict(scene, capsys, tmp_path):
    argv, model = predicted(scene)
    prepare([*argv, *model], evaluate_main)
    capsys.readouterr()
    moved = [*argv, "--set", f"predict_args.output={tmp_path / 'elsewhere'}"]
    for flags in ([], ["--overwrite"]):  # (it said "made from a run of predict since removed: add --overwrite")
        assert evaluate_main([*moved, *model, *flags]) == 1
        assert error(capsys) == (
            "error: evaluate regression reads the predictions, which are not there (none made here, or removed "
            "since): run python predict/predict.py --model regression first"
        )
    assert evaluate_main([*argv, *model]) == 0  # the evaluation of the predictions where they are: up to date
    # The check says the same, fatal, where it said "the run redoes it" (and the run then refused); with predict
    # among the stages chosen, the run makes them first: no such finding.
    assert pipeline.main(["check", *moved, "--only", "evaluate"]) == 1
    out = capsys.readouterr().out
    assert (
        "  FATAL    evaluate regression reads the predictions, which are not there (none made here, or removed " in out
    )
    assert "since): run python predict/predict.py --model regression --settings " in out
    assert pipeline.main(["check", *moved, "--only", "predict", "evaluate"]) == 0
    assert "which are not there" not in capsys.readouterr().out


def test_an_up_to_date_bundle_of_another_band_count_than_the_settings_say_is_refused(scene, capsys):
    argv, model = predicted(scene)
    capsys.readouterr()
    four = ["--set", "load_dataset_args.channels=4", "--set", "model_args.input_shape=[64,64]"]
    assert train_main([*argv, *model, *four]) == 1  # (it said "up to date")
    assert error(capsys) == (
        "error: the regression bundle is up to date, but it was trained on 3 bands and the settings say 4 "
        "(load_dataset_args.channels or model_args.input_shape): set them to 3, or null to take the chips' count"
    )
    assert train_main([*argv, *model, "--set", "model_args.input_shape=[64,64]"]) == 0  # null: the chips' count


def test_rasters_to_predict_in_two_crss_are_refused_before_predicting(scene, capsys, tmp_path):
    argv, model = predicted(scene)
    image = read_raster(tree_of(argv).raw / "tile.tif")[0][:, :64, :64]
    write_geotiff(tmp_path / "two" / "a.tif", array=image)
    write_geotiff(tmp_path / "two" / "b.tif", array=image, crs="EPSG:32645")
    capsys.readouterr()
    assert predict_main([*argv, *model, "--input", str(tmp_path / "two"), "--overwrite"]) == 1
    assert error(capsys) == (
        "error: the rasters to predict are in 2 CRSs (a.tif EPSG:32644, b.tif EPSG:32645): roofs.gpkg holds one; "
        "predict each CRS's rasters apart (--input, predict_args.output), or reproject them onto one (python "
        "mosaic/mosaic.py with mosaic_args.reproject)"
    )


def test_a_grid_size_of_too_many_cells_is_refused_before_predicting(scene, capsys, tmp_path):
    argv, model = predicted(scene)
    out = tmp_path / "predictions" / "contract" / "regression"
    before = files(out)
    assert "roofs.gpkg" in before
    with rasterio.open(next((out / "masks").glob("*.tif"))) as mask:  # (named for QGIS, and for mosaic's gaps)
        assert mask.descriptions == ("roof",) and mask.nodata is None
    capsys.readouterr()
    assert predict_main([*argv, *model, "--overwrite", "--set", "predict_args.grid_size=0.001"]) == 1
    assert error(capsys).startswith("error: predict_args.grid_size 0.001 m makes ")
    assert files(out) == before  # (it built the cells after predicting: 19 GB of memory on a sample scene)


def test_settings_of_flattens_sections_and_leaves_out_excluded_keys():
    settings = load_settings(overrides=["chip_args.size=64"])
    got = settings_of(settings, ("chip_args", "mask_args.filter"), exclude=("chip_args.compression",))
    assert got == {
        "chip_args.max_nodata": 0.5, "chip_args.pad_value": None, "chip_args.size": 64, "chip_args.source": "mosaic",
        "chip_args.stride": None, "mask_args.filter.attribute": "roof_type", "mask_args.filter.values": ["metal"],
    }  # fmt: skip
    assert flatten({"a": {"b": [1, 2], "c": {}}}, "x") == {"x.a.b": [1, 2], "x.a.c": {}}


def test_file_identity_hashes_labels_and_stats_imagery(tmp_path):
    a = tmp_path / "a.geojson"
    a.write_text("one")
    first = file_identity(a, hashed=True)
    assert first == "sha256:" + __import__("hashlib").sha256(b"a.geojson" + b"one").hexdigest()
    a.write_text("two")
    assert file_identity(a, hashed=True) != first
    assert file_identity(tmp_path / "none.tif", hashed=False) == "missing"
    assert file_identity(a, hashed=False) == f"3:{a.stat().st_mtime_ns}"


def test_begin_refuses_outputs_of_another_run_by_function_too(scene):
    argv = scene()
    prepare(argv, mosaic_main, chip_main)
    tree = tree_of(argv)
    settings = load_settings(argv[1], [*[argv[i + 1] for i, a in enumerate(argv) if a == "--set"], "chip_args.size=32"])
    with pytest.raises(OutputExistsError, match=r"^chips/ were made with chip_args.size 64, now 32: add --overwrite"):
        begin("chip", settings, tree)
    assert begin("chip", settings, tree, overwrite=True).mode == "fresh"


def test_labels_outside_the_imagery_do_not_touch_the_record(scene, capsys):
    argv = scene()
    prepare(argv, mosaic_main, chip_main)
    tree = tree_of(argv)
    write_labels(tree.labels / "roofs.geojson", [shapely.box(10, 10, 10.001, 10.001)], crs="EPSG:4326",
                 roof_type=["metal"])  # fmt: skip
    assert mask_main(argv) == 1
    assert not (tree.root / "mask.record.json").exists()


# --- the remaining failures of the same trial ----------------------------------------------------------


def test_data_root_under_a_file_is_one_line(scene, capsys, tmp_path):
    (tmp_path / "blocker").write_text("a file, not a folder")
    argv = scene(f"data_root={tmp_path / 'blocker' / 'data'}")
    assert chip_main([*argv, "--input", str(tmp_path / "data" / "raw")]) == 1
    line = error(capsys)
    assert line.startswith(f"error: cannot use {tmp_path / 'blocker'}") and "Not a directory" in line
    assert line.endswith("a file may sit where a folder should be (run with --verbose for the traceback)")


def test_a_file_where_the_mosaic_folder_should_be_is_one_line(scene, capsys, tmp_path):
    (tmp_path / "data" / "mosaic").write_text("oops")
    assert mosaic_main(scene()) == 1
    line = error(capsys)
    assert line.startswith("error: cannot use ") and "mosaic" in line


@pytest.mark.parametrize(("crs", "georeferenced", "what"), [(None, True, "has no CRS"),
                                                            ("EPSG:32644", False, "has no georeferencing")])  # fmt: skip
def test_a_raster_without_crs_or_geotransform_is_refused(crs, georeferenced, what, scene, capsys, tmp_path):
    import warnings

    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.transform import Affine

    tile = tmp_path / "data" / "raw" / "tile.tif"
    transform = None if georeferenced else Affine.identity()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        write_geotiff(tile, bands=3, rows=SIDE, cols=SIDE, crs=crs, transform=transform)
    assert mosaic_main(scene()) == 1
    assert error(capsys).startswith(f"error: {tile} {what}")
    assert chip_main(scene("chip_args.source=raw")) == 1  # never chipped silently
    assert error(capsys).startswith(f"error: {tile} {what}")
    assert not (tmp_path / "data" / "chips.csv").exists()
    # Nor predicted into roofs in pixel coordinates with areas in pixels (the check comes before the bundle's).
    assert predict_main([*scene(), "--model", "regression", "--input", str(tile)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tile} {what}") and "Warning" not in err  # one line, no rasterio warning


def test_one_tile_of_another_band_count_is_refused_by_chip_and_mosaic(scene, capsys, tmp_path):
    write_geotiff(tmp_path / "data" / "raw" / "tile2.tif", bands=8, rows=SIDE, cols=SIDE)
    assert chip_main(scene("chip_args.source=raw")) == 1
    assert error(capsys) == (
        "error: tile2.tif has 8 bands of uint16, tile.tif 3 bands of uint16: chips of one run must be alike; move "
        "the odd raster out of the input"
    )
    assert mosaic_main(scene()) == 1
    line = error(capsys)
    assert "tile2.tif: 8 bands of uint16" in line and "reproject" not in line


def test_split_advice_names_a_setting_that_can_be_changed(scene, capsys):
    from split.split import ensure_each

    with pytest.raises(Exception, match=r"make more chips \(smaller chip_args.size or stride\)$"):
        ensure_each({"train": 1, "val": 0, "test": 0}, {"train": 0.8, "val": 0.2, "test": 0.0})
    with pytest.raises(Exception, match=r"or set split_args.fractions.test to 0$"):
        ensure_each({"train": 1, "val": 1, "test": 0}, {"train": 0.6, "val": 0.2, "test": 0.2})


def test_roof_areas_are_ground_areas_in_web_mercator(tmp_path):
    from predict.predict import RasterResult, roofs_frame

    utm = gpd.GeoSeries([shapely.box(500000, 2960000, 500010, 2960010)], crs="EPSG:32644")  # 100 m2
    mercator = utm.to_crs("EPSG:3857")
    assert mercator.area.iloc[0] == pytest.approx(127.0, rel=0.01)  # what the old areas said
    result = RasterResult(Path("t.tif"), Path("m.tif"), None, polygons=[(g, 0.9) for g in mercator])
    from core.settings import PredictArgs

    gdf = roofs_frame([result], "EPSG:3857", PredictArgs(min_area=101))
    assert gdf.empty  # min_area is in true m2 too
    gdf = roofs_frame([result], "EPSG:3857", PredictArgs(min_area=99))
    assert gdf["area_m2"].iloc[0] == pytest.approx(100.0, rel=0.002)


def test_after_a_failed_run_pipeline_prints_no_metrics_table(scene, capsys, tmp_path):
    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main, split_main)
    prepare([*argv, "--model", "regression"], train_main)
    capsys.readouterr()
    (tmp_path / "data" / "labels" / "roofs.geojson").write_text("broken {")
    assert pipeline.main([*argv, "--from", "mask", "--to", "split", "--overwrite"]) == 1
    out = capsys.readouterr().out
    assert "mask        failed (exit 1)" in out
    assert "validation metrics" not in out


# --- one rule each ---------------------------------------------------------------------------------


def test_a_bundle_is_swapped_in_whole_or_not_at_all(tmp_path):
    from core.bundle import new_bundle

    bundle = tmp_path / "unet" / "bundle"
    with new_bundle(bundle) as tmp:
        (tmp / "model.keras").write_text("model 1")
        (tmp / "bundle.json").write_text("info 1")
    with pytest.raises(RuntimeError), new_bundle(bundle) as tmp:
        (tmp / "model.keras").write_text("model 2")
        raise RuntimeError("killed before bundle.json")  # the old bundle stays whole
    assert files(bundle) == {"bundle.json": b"info 1", "model.keras": b"model 1"}
    with new_bundle(bundle) as tmp:
        (tmp / "model.keras").write_text("model 3")
        (tmp / "bundle.json").write_text("info 3")
    assert files(bundle) == {"bundle.json": b"info 3", "model.keras": b"model 3"}
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["bundle"]  # nothing left beside it


def test_a_killed_training_leaves_a_folder_the_next_run_removes(scene, capsys, tmp_path):
    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main, split_main)
    tree = tree_of(argv)
    half = tree.model_dir("regression") / ".bundle.0badf00d.tmp"
    half.mkdir(parents=True)
    (half / "model.skops").write_bytes(b"half")
    assert train_main([*argv, "--model", "regression"]) == 0
    assert not half.exists()
    assert (tree.bundle("regression") / "bundle.json").is_file()


@pytest.mark.parametrize("values", [[0, 1], [0, 64, 255]])
def test_every_reader_refuses_masks_on_another_scale(values, scene, capsys):
    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main, split_main)
    tree = tree_of(argv)
    name = sorted(tree.split_masks("train").iterdir())[0]
    import rasterio

    with rasterio.open(name) as src:
        profile = {**src.profile, "count": 1}
    bad = np.resize(np.array(values, np.uint8), (profile["height"], profile["width"]))
    name.unlink()  # a hard link to masks/: write a new file, not through the link
    with rasterio.open(name, "w", **profile) as dst:
        dst.write(bad[None])
    from core.raster import read_mask
    from flatten.flatten import main as flatten_main

    with pytest.raises(Exception, match=r"not only 0 and 255"):
        read_mask(name)
    capsys.readouterr()
    assert flatten_main(argv) == 1  # the forest's flat table, as the U-Net: one rule
    assert "not only 0 and 255" in error(capsys)
    assert train_main([*argv, "--model", "regression", "--set", "ml_args.source=chips"]) == 1
    assert "than 0, 255 (and 128, unknown) (train_0.tif: " in error(
        capsys
    )  # the pre-flight check reads the masks first
    from core.metrics import validate_pairs

    with pytest.raises(Exception, match=r"not only 0 and 255"):  # and the threshold search, as every reader
        validate_pairs(types.SimpleNamespace(info=types.SimpleNamespace(normalization=types.SimpleNamespace(nodata=0))),
                       [(tree.frames("train") / name.name, name)])  # fmt: skip


def test_masks_of_wholly_nodata_chips_blame_the_imagery_not_the_polygons(scene, capsys, tmp_path):
    write_geotiff(tmp_path / "data" / "raw" / "tile.tif", array=np.zeros((3, SIDE, SIDE), np.uint16), nodata=0)
    argv = scene("chip_args.max_nodata=1.0")
    prepare(argv, mosaic_main, chip_main)
    capsys.readouterr()
    assert mask_main(argv) == 0
    assert capsys.readouterr().err == (
        "WARNING: mask: every chip is wholly nodata, so no mask has a roof pixel: check the imagery\n"
    )


def test_evaluate_reports_the_threshold_predict_applied_and_refuses_predictions_of_other_settings(scene, capsys):
    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main, split_main)
    model = ["--model", "regression"]
    prepare([*argv, *model], train_main)
    at_03 = [*argv, *model, "--set", "predict_args.threshold=0.3"]
    prepare(at_03, predict_main)
    capsys.readouterr()
    assert evaluate_main([*argv, *model]) == 1  # the setting was edited back: these predictions are not of it
    assert error(capsys).startswith(
        "error: the predictions are outdated: made with predict_args.threshold 0.3, now null: rerun "
        "python predict/predict.py --model regression --overwrite"
    )
    assert evaluate_main(at_03) == 0
    tree = tree_of(argv)
    metrics = json.loads((tree.model_dir("regression") / "evaluation" / "val" / "metrics.json").read_text())
    assert metrics["threshold"] == 0.3
    assert metrics["predict_settings"] == {"predict_args.threshold": 0.3}  # and so the summary says it
    row = summary_frame(tree.results.parent).set_index("model").loc["regression"]
    assert [c for c in row["settings"].split("; ") if c.startswith("predict_args.")] == ["predict_args.threshold=0.3"]
    assert "predict_args.threshold=0.3 |" in (tree.results.parent / "summary.md").read_text()
    assert (
        json.loads((tree.prediction_dir("regression") / "predict.record.json").read_text())["summary"]["threshold"]
        == 0.3
    )


def test_a_predict_setting_the_bundle_does_not_read_leaves_its_predictions_up_to_date(scene, capsys):
    from core.bundle import read_info, unread_predict_args

    argv, model = predicted(scene)
    tree = tree_of(argv)
    info = read_info(tree.bundle("regression"))
    unused = ["--set", "predict_args.merge=0.5", "--set", "predict_args.roof_class=majority"]
    assert not info.object_filter  # (the scene's validation chips hold too few objects to fit one)
    assert set(unread_predict_args(info, load_settings(argv[1], []).predict_args)) == {
        "seeds", "merge", "object_filter", "roof_class", "split_classes", "calibrated_classes",
    }  # fmt: skip
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"] + unused[1::2]
    assert status("predict", load_settings(argv[1], sets), tree, "regression").changes == []
    capsys.readouterr()
    assert evaluate_main([*argv, *model, *unused]) == 0  # the regression reads neither: nothing to redo
    metrics = json.loads((tree.model_dir("regression") / "evaluation" / "val" / "metrics.json").read_text())
    assert "predict_settings" not in metrics or not metrics["predict_settings"]
    made = files(tree.prediction_dir("regression") / "masks")
    assert predict_main([*argv, *model, *unused]) == 0  # up to date: nothing to do, and why the setting is unused
    assert "predict_args.merge 0.5 is unused" in capsys.readouterr().err
    record = tree.prediction_dir("regression") / "predict.record.json"
    run = json.loads(record.read_text())["run"]
    assert pipeline.main([*argv, *unused, "--only", "predict"]) == 0  # the pipeline skips it, and says why too
    assert json.loads(record.read_text())["run"] == run  # (skipped: predict.py did not run)
    assert capsys.readouterr().err.count("predict_args.merge 0.5 is unused") == 1
    assert predict_main([*argv, *model, *unused, "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert (
        "predict_args.merge 0.5 is unused: merging reads the boundary band, which the regression bundle does not "
        "predict" in err
    )
    assert 'predict_args.roof_class "majority" is unused: the bundle was not trained on classes' in err
    assert files(tree.prediction_dir("regression") / "masks") == made
    # A setting it reads still makes them outdated.
    threshold = load_settings(argv[1], [*sets, "predict_args.threshold=0.3"])
    assert status("predict", threshold, tree, "regression").changes == ["with predict_args.threshold null, now 0.3"]
    # A setting unread then (no objects, no watershed) and read now: the change that made it read is the news.
    flat = ["--set", "predict_args.instances=false", "--set", "predict_args.seed_threshold=0.9"]
    assert predict_main([*argv, *model, *flat, "--overwrite"]) == 0
    back = load_settings(argv[1], [*sets, "predict_args.seed_threshold=0.9"])
    assert status("predict", back, tree, "regression").changes == ["with predict_args.instances false, now true"]
    other = load_settings(argv[1], [*sets, "predict_args.seed_threshold=0.8"])
    assert status("predict", other, tree, "regression").changes == [
        "with predict_args.instances false, now true", "with predict_args.seed_threshold 0.9 (unused), now 0.8",
    ]  # fmt: skip


def test_the_advice_to_rerun_predict_names_the_bundle_it_was_given(scene, capsys, tmp_path):
    import shutil

    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main, split_main)
    model = ["--model", "regression"]
    prepare([*argv, *model], train_main)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tree_of(argv).bundle("regression"), elsewhere)
    assert predict_main([*argv, *model, "--bundle", str(elsewhere), "--set", "predict_args.threshold=0.3"]) == 0
    capsys.readouterr()
    assert evaluate_main([*argv, *model]) == 1
    assert error(capsys) == (
        "error: the predictions are outdated: made with predict_args.threshold 0.3, now null: rerun python "
        f"predict/predict.py --model regression --bundle {elsewhere} --overwrite (or python pipeline.py --from "
        "predict) before evaluate regression"
    )
    # Without --model the predictions are the outside bundle's own kind's; another --model is refused.
    record = tree_of(argv).prediction_dir("regression") / "predict.record.json"
    run = json.loads(record.read_text())["run"]
    assert predict_main([*argv, "--bundle", str(elsewhere), "--set", "predict_args.threshold=0.3"]) == 0
    assert json.loads(record.read_text())["run"] == run  # the regression's, up to date: skipped
    assert not tree_of(argv).prediction_dir("unet").exists()  # (training_args.model is unet)
    assert predict_main([*argv, "--model", "unet", "--bundle", str(elsewhere)]) == 1
    assert error(capsys) == (
        f"error: --model unet but --bundle {elsewhere} is a regression bundle: its predictions would be filed under "
        "unet; give --model regression, or leave --model out"
    )
    assert predict_main([*argv, "--model", "unet", "--set", f"predict_args.bundle={elsewhere}"]) == 1
    assert error(capsys).startswith(f"error: --model unet but predict_args.bundle {elsewhere} is a regression")
    # Another bundle named in the settings: the first is no longer read, not gone.
    other = tmp_path / "other"
    shutil.copytree(elsewhere, other)
    assert predict_main([*argv, *model, "--set", f"predict_args.bundle={elsewhere}", "--overwrite"]) == 0
    # evaluate's default is the same: the outside bundle's kind (training_args.model is unet).
    assert evaluate_main([*argv, "--set", f"predict_args.bundle={elsewhere}"]) == 0
    results = tree_of(argv).results
    assert (results / "regression" / "evaluation" / "val" / "metrics.json").is_file()
    assert not (results / "unet").exists()
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    now = load_settings(argv[1], [*sets, f"predict_args.bundle={other}"])
    assert status("predict", now, tree_of(argv), "regression").changes == [
        f'with predict_args.bundle "{elsewhere}", now "{other}"',
        f"from {elsewhere / 'bundle.json'} (no longer read), without {other / 'bundle.json'} (new)",
    ]


def test_predict_says_so_when_the_bundle_it_reads_is_outdated(scene, capsys):
    argv, model = predicted(scene)
    edit = ["--set", "ml_args.regression.C=2"]
    assert predict_main([*argv, *model, *edit]) == 0  # the predictions are the bundle's: up to date
    assert (
        "predict regression: the bundle is outdated against the current settings (made with ml_args.regression.C "
        "1.0, now 2.0): predict uses it as it is; rerun python train/train.py --model regression --overwrite to "
        "apply the edit"
    ) in capsys.readouterr().err
    assert predict_main([*argv, *model]) == 0
    assert "outdated" not in capsys.readouterr().err


def test_polygon_scores_by_group_and_a_group_by_the_labels_lack(scene, capsys):
    argv, model = predicted(scene)
    tree = tree_of(argv)
    metrics = tree.results / "regression" / "evaluation" / "val" / "metrics.json"
    assert evaluate_main([*argv, *model, "--set", "evaluate_args.group_by=roof_type"]) == 0
    assert json.loads(metrics.read_text())["polygon_by"]["attribute"] == "roof_type"
    assert evaluate_main([*argv, *model, "--set", "evaluate_args.group_by=roof_typ", "--overwrite"]) == 0
    assert (
        "evaluate: evaluate_args.group_by 'roof_typ' is not an attribute of the labels (did you mean 'roof_type'?): "
        "no polygon scores by group"
    ) in capsys.readouterr().err
    assert "polygon_by" not in json.loads(metrics.read_text())
    assert evaluate_main([*argv, *model, "--set", "evaluate_args.group_by=zone", "--overwrite"]) == 0
    assert "'zone' is not an attribute of the labels (they have roof_type): no polygon" in capsys.readouterr().err


def test_predicting_a_raster_that_is_all_nodata_says_so(scene, capsys, tmp_path):
    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main, split_main)
    model = ["--model", "regression"]
    prepare([*argv, *model], train_main)
    empty = write_geotiff(tmp_path / "empty.tif", array=np.zeros((3, 64, 64), np.uint16), nodata=0)
    assert predict_main([*argv, *model, "--input", str(empty)]) == 1
    out = tree_of(argv).prediction_dir("regression")
    assert error(capsys) == (
        f"error: every predicted mask is blank: every pixel of the input is nodata (empty.tif): predict imagery that "
        f"covers the area; outputs are in {out}"
    )


def test_a_bundle_edited_by_hand_makes_its_predictions_outdated(scene, capsys):
    argv, model = predicted(scene)
    tree = tree_of(argv)
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    settings = load_settings(argv[1], sets)
    assert status("predict", settings, tree, "regression").done
    info = tree.bundle("regression") / "bundle.json"
    edited = json.loads(info.read_text())
    edited["threshold"] = 0.3  # the user tunes the threshold by hand
    info.write_text(json.dumps(edited))
    assert status("predict", settings, tree, "regression").changes == [
        "from the bundle as it was before bundle.json changed (not by a run of train: by hand, or copied over)"
    ]
    assert status("train", settings, tree, "regression").done  # train's own outputs are what they are
    capsys.readouterr()
    assert evaluate_main([*argv, *model]) == 1
    assert error(capsys).startswith(
        "error: the predictions are outdated: made from the bundle as it was before bundle.json changed"
    )
    assert predict_main([*argv, *model]) == 1
    assert error(capsys) == (
        "error: the predictions were made from the bundle as it was before bundle.json changed (not by a run of "
        "train: by hand, or copied over): add --overwrite to redo them (python pipeline.py reruns outdated stages)"
    )
    assert predict_main([*argv, *model, "--overwrite"]) == 0  # predicts again, reading 0.3
    record = json.loads((tree.prediction_dir("regression") / "predict.record.json").read_text())
    assert record["summary"]["threshold"] == 0.3
    assert status("predict", settings, tree, "regression").done
    # A run of train makes it outdated by that run alone (one phrase, not two).
    prepare([*argv, *model, "--overwrite"], train_main)
    assert status("predict", settings, tree, "regression").changes == ["from an earlier run of train"]


# --- what a new user's trial found next ------------------------------------------------------------


def test_a_deleted_output_folder_is_remade_not_called_up_to_date(scene, capsys, tmp_path):
    import shutil

    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main, split_main)
    tree = tree_of(argv)
    clean = files(tree.masks)
    shutil.rmtree(tree.masks)
    assert pipeline.main([*argv, "check", "--only", "split"]) == 1
    assert "FATAL" in capsys.readouterr().out  # split would read a mask folder removed by hand
    assert mask_main(argv) == 0  # resumes: the missing masks are made again, the split still holds
    assert files(tree.masks) == clean
    index = read_index(tree.chips_csv, needs=("split",))
    assert set(index["split"]) >= {"train", "val"}
    shutil.rmtree(tree.chips)
    capsys.readouterr()
    assert mask_main(argv) == 1
    assert error(capsys) == (
        "error: chips/ are incomplete: files were removed since chip ran: rerun python chip/chip.py to remake them"
    )
    assert chip_main(argv) == 0 and len(list(tree.chips.iterdir())) == 16


def test_deleted_predictions_are_made_again(scene, capsys):
    import shutil

    argv, model = predicted(scene)
    tree = tree_of(argv)
    masks = tree.prediction_dir("regression") / "masks"
    made = files(masks)
    shutil.rmtree(masks)
    assert predict_main([*argv, *model]) == 0
    assert files(masks) == made


def test_the_metrics_table_marks_scores_made_before_a_retraining(scene, capsys):
    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main, split_main)
    model = ["--model", "regression"]
    prepare([*argv, *model], train_main, predict_main, evaluate_main)
    capsys.readouterr()
    assert pipeline.main([*argv, "--only", "train-regression", "--set", "ml_args.regression.max_iter=20"]) == 0
    out = capsys.readouterr().out
    assert (
        "outdated scores: regression (evaluated before the latest changes; python pipeline.py evaluates again)" in out
    )


def test_evaluate_refuses_a_bundle_trained_on_another_split_whatever_was_predicted(scene, capsys):
    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main, split_main)
    model = ["--model", "regression"]
    prepare([*argv, *model], train_main)
    tree = tree_of(argv)
    seven = scene("split_args.seed=7")
    assert split_main([*seven, "--overwrite"]) == 0
    assert predict_main([*seven, *model, "--input", str(tree.chips)]) == 0  # every chip: not the split's folder
    capsys.readouterr()
    assert evaluate_main([*seven, *model]) == 1
    assert error(capsys).startswith("error: the regression bundle was trained on an earlier split than the val chips")


def test_pipeline_reruns_a_chip_run_made_with_input(scene, capsys, tmp_path):
    argv = scene()
    prepare(argv, mosaic_main)
    assert chip_main([*argv, "--input", str(tmp_path / "data" / "raw" / "tile.tif")]) == 0
    capsys.readouterr()
    assert chip_main(argv) == 1
    assert error(capsys).startswith(
        f"error: chips/ were made from --input {tmp_path / 'data' / 'raw' / 'tile.tif'}, now the inputs the settings "
        "name: add --overwrite"
    )
    assert pipeline.main([*argv, "--only", "chip"]) == 0
    assert "chip        ok" in capsys.readouterr().out


def test_a_second_label_file_stops_mask_even_when_masks_were_made(scene, capsys, tmp_path):
    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main)
    labels = tmp_path / "data" / "labels"
    (labels / "other.geojson").write_bytes((labels / "roofs.geojson").read_bytes())
    capsys.readouterr()
    assert mask_main(argv) == 1
    assert "several label files" in error(capsys)
    (labels / "other.geojson").unlink()
    (labels / "roofs.geojson").rename(labels / "renamed.geojson")
    assert mask_main(argv) == 1
    assert error(capsys) == (
        "error: masks/ were made from labels/roofs.geojson (gone now), without labels/renamed.geojson (new): add "
        "--overwrite to redo them (python pipeline.py reruns outdated stages)"
    )


def test_pipeline_option_mistakes_are_usage_errors(capsys):
    assert pipeline.main(["--from", "predict", "--to", "chip"]) == 2
    assert "--from predict comes after --to chip" in capsys.readouterr().err
    assert pipeline.main(["--only", "train-forest", "--from", "chip"]) == 2
    assert "--only cannot be combined with --from or --to" in capsys.readouterr().err
    assert pipeline.main(["--demo", "--only", "download"]) == 2
    assert "--demo runs on the sample scene, not on downloaded imagery: the stages chosen (download) leave " in (
        capsys.readouterr().err
    )
    assert pipeline.main(["--demo", "--from", "download", "--to", "download"]) == 2


def test_small_mistakes_get_the_right_advice(scene, capsys, tmp_path):
    argv = scene()
    prepare(argv, mosaic_main, chip_main)
    tree = tree_of(argv)
    before = files(tree.chips)
    capsys.readouterr()
    assert chip_main([*scene("chip_args.size=1024"), "--overwrite"]) == 1  # refused before old chips go
    assert "too small for chips of 1024 px" in error(capsys)
    assert files(tree.chips) == before
    assert chip_main(scene("chip_args.size=0")) == 1
    assert "with the --set overrides: chip_args.size" in error(capsys)
    prepare(argv, mask_main, split_main)
    prepare([*argv, "--model", "regression"], train_main)
    assert predict_main([*argv, "--model", "regression", "--input", str(tree.chips_csv)]) == 1
    assert error(capsys).endswith("is not a GeoTIFF: give a .tif raster or a folder of them")
    assert evaluate_main([*argv, "--model", "regression", "--split", "test"]) == 1
    assert "there is no test split: set split_args.fractions.test above 0" in error(capsys)


def test_val_chips_never_share_pixels_with_training_chips(scene, capsys):
    argv = scene("chip_args.stride=32", "split_args.block=4")
    prepare(argv, mosaic_main, chip_main, mask_main)
    capsys.readouterr()
    assert split_main(argv) == 0
    err = capsys.readouterr().err
    assert "val chips share pixels with training chips (chip_args.stride is smaller than the size)" in err
    index = read_index(tree_of(argv).chips_csv, needs=("split",))
    train, val = index[index["split"] == "train"], index[index["split"] == "val"]
    assert len(val) > 0
    for row in val.itertuples():
        assert not ((abs(train["row_off"] - row.row_off) < 64) & (abs(train["col_off"] - row.col_off) < 64)).any()
    capsys.readouterr()
    assert split_main([*scene("chip_args.stride=32", "split_args.block=1"), "--overwrite"]) == 1
    assert error(capsys).startswith("error: every val chip shares pixels with a training chip")


# --- what a review found ------------------------------------------------------------------------------


def test_predictions_left_half_cleared_are_redone_not_skipped(scene, capsys, tmp_path):
    argv = scene()
    prepare(argv, mosaic_main, chip_main, mask_main, split_main)
    model = ["--model", "regression"]
    prepare([*argv, *model], train_main, predict_main, evaluate_main)
    tree = tree_of(argv)
    masks = sorted((tree.prediction_dir("regression") / "masks").iterdir())
    for path in masks[1:]:  # a fresh start killed while clearing: the old record, some old masks
        path.unlink()
    capsys.readouterr()
    at_09 = [*argv, "--set", "predict_args.threshold=0.9"]
    assert pipeline.main([*at_09, "--from", "predict", "--to", "evaluate"]) == 0
    out = capsys.readouterr().out
    assert "predict regression  ok" in out and "evaluate regression ok" in out
    metrics = json.loads((tree.model_dir("regression") / "evaluation" / "val" / "metrics.json").read_text())
    assert metrics["threshold"] == 0.9 and metrics["chips"] == len(masks)


def test_a_relative_input_is_recorded_as_an_absolute_path(scene, capsys, tmp_path, monkeypatch):
    argv = scene()
    prepare(argv, mosaic_main)
    monkeypatch.chdir(tmp_path)
    assert chip_main([*argv, "--input", "data/mosaic/mosaic.tif"]) == 0
    record = json.loads((tmp_path / "data" / "chip.record.json").read_text())
    assert record["given"] == {"input": str(tmp_path / "data" / "mosaic" / "mosaic.tif")}
    monkeypatch.chdir(tmp_path / "data")
    assert mask_main(argv) == 0  # from another folder, the chips are still made from that file


def test_an_interrupted_stage_s_exit_code_passes_through_the_pipeline(monkeypatch, settings_file, capsys):
    monkeypatch.setattr(runner, "STAGES", (runner.Stage("a", lambda argv: 130, exists=lambda t, m: False),))
    assert pipeline.main(["--settings", str(settings_file), "--only", "a", "--quiet"]) == 130
    assert "failed (exit 130)" in capsys.readouterr().out


def test_a_setting_the_stage_no_longer_reads_changes_nothing():
    """A record made when the stage read a key it now excludes (load_dataset_args.channels for train)
    is not outdated by it; a key it reads still is."""
    from workflow.contract import _changes

    record = {"settings": {"training_args.epochs": 20, "load_dataset_args.channels": 8}}
    assert _changes(record, {"settings": {"training_args.epochs": 20}}) == []
    assert _changes(record, {"settings": {"training_args.epochs": 30}}) == ["with training_args.epochs 20, now 30"]
