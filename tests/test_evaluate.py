"""evaluate: pixel and object scores on hand-made masks with known answers, the stage's files on
a fake predictions folder (no model is trained), the summary and the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio.features
from conftest import REPO_SETTINGS, write_geotiff

from core.bundle import BundleInfo, Normalization, write_info
from core.errors import DataError, OutputExistsError
from core.instances import label_objects
from core.settings import EvaluateArgs, load_settings
from core.tree import DataTree
from evaluate.evaluate import best_and_worst, evaluate_model, main, match_objects, score_chip
from evaluate.report import (
    ModelResult,
    evaluation_dir,
    model_results,
    settings_changes,
    summary_frame,
    write_report,
)

ARGS = EvaluateArgs()  # min_area 20, iou_threshold 0.5
SIDE = 64


def box(mask: np.ndarray, row: int, col: int, height: int, width: int) -> np.ndarray:
    mask[row : row + height, col : col + width] = True
    return mask


def empty() -> np.ndarray:
    return np.zeros((SIDE, SIDE), bool)


def scores(truth: np.ndarray, pred: np.ndarray, args: EvaluateArgs = ARGS) -> tuple[dict, dict]:
    chip = score_chip("chip.tif", truth, pred, args)
    return chip.confusion.scores(), chip.objects.scores()


# --- pixel and object scores -------------------------------------------------------------------


def test_identical_masks_score_one() -> None:
    truth = box(box(empty(), 5, 5, 10, 10), 30, 20, 8, 12)
    pixel, objects = scores(truth, truth.copy())
    assert pixel == {"iou": 1.0, "f1": 1.0, "precision": 1.0, "recall": 1.0, "accuracy": 1.0,
                     "tp": 196, "fp": 0, "fn": 0, "tn": SIDE * SIDE - 196}  # fmt: skip
    assert objects == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 2, "fp": 0, "fn": 0}


def test_object_shifted_by_half_its_width() -> None:
    truth = box(empty(), 10, 10, 10, 10)
    pred = box(empty(), 10, 15, 10, 10)  # 50 pixels shared, union 150: IoU 1/3
    pixel, objects = scores(truth, pred)
    assert (pixel["tp"], pixel["fp"], pixel["fn"], pixel["tn"]) == (50, 50, 50, SIDE * SIDE - 150)
    assert pixel["iou"] == pytest.approx(1 / 3)
    assert (pixel["f1"], pixel["precision"], pixel["recall"]) == (0.5, 0.5, 0.5)
    assert pixel["accuracy"] == (SIDE * SIDE - 100) / (SIDE * SIDE)
    assert objects == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 1, "fn": 1}


def test_shift_against_the_iou_threshold() -> None:
    truth = box(empty(), 10, 10, 10, 10)
    pred = box(empty(), 10, 12, 10, 10)  # IoU 80 / 120 = 0.667
    assert match_objects(truth, pred, EvaluateArgs(iou_threshold=0.5)).tp == 1
    assert match_objects(truth, pred, EvaluateArgs(iou_threshold=0.7)).tp == 0


def test_split_object_matches_once_at_exactly_half() -> None:
    truth = box(empty(), 10, 10, 10, 20)  # 200 pixels
    pred = truth.copy()
    pred[:, 20] = False  # pieces of 100 (IoU 0.5, a match: >= threshold) and 90 (IoU 0.45)
    pixel, objects = scores(truth, pred)
    assert (pixel["tp"], pixel["fp"], pixel["fn"]) == (190, 0, 10)
    assert (pixel["iou"], pixel["precision"], pixel["recall"]) == (0.95, 1.0, 0.95)
    assert (objects["tp"], objects["fp"], objects["fn"]) == (1, 1, 0)
    assert (objects["precision"], objects["recall"]) == (0.5, 1.0)
    assert objects["f1"] == pytest.approx(2 / 3)


def test_split_object_in_two_small_halves_matches_nothing() -> None:
    truth = box(empty(), 10, 10, 10, 20)
    pred = truth.copy()
    pred[:, 19:21] = False  # two pieces of 90: IoU 0.45 each
    _, objects = scores(truth, pred)
    assert (objects["tp"], objects["fp"], objects["fn"]) == (0, 2, 1)


def test_merged_objects_match_nothing() -> None:
    truth = box(box(empty(), 10, 10, 10, 10), 10, 21, 10, 10)  # two roofs a pixel apart
    pred = box(empty(), 10, 10, 10, 21)  # one blob over both: IoU 100 / 210 each
    _, objects = scores(truth, pred)
    assert (objects["tp"], objects["fp"], objects["fn"]) == (0, 1, 2)


def test_objects_under_min_area_are_ignored_on_both_sides() -> None:
    truth = box(box(empty(), 5, 5, 10, 10), 40, 40, 4, 4)  # 100 and 16 pixels
    pred = box(box(empty(), 5, 5, 10, 10), 40, 10, 3, 3)  # the big roof, and a 9-pixel speck
    pixel, objects = scores(truth, pred)
    assert (pixel["tp"], pixel["fp"], pixel["fn"]) == (100, 9, 16)  # pixels count everything
    assert objects == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 1, "fp": 0, "fn": 0}
    _, objects = scores(truth, pred, EvaluateArgs(min_area=0))
    assert (objects["tp"], objects["fp"], objects["fn"]) == (1, 1, 1)


def test_an_object_of_exactly_min_area_counts() -> None:
    truth = box(empty(), 10, 10, 4, 5)  # 20 pixels
    _, objects = scores(truth, empty())
    assert (objects["tp"], objects["fp"], objects["fn"]) == (0, 0, 1)


def test_empty_truth_and_empty_prediction() -> None:
    pixel, objects = scores(empty(), empty())
    # Undefined ratios are 0, as core.metrics has it; accuracy is defined.
    assert pixel == {"iou": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0, "accuracy": 1.0,
                     "tp": 0, "fp": 0, "fn": 0, "tn": SIDE * SIDE}  # fmt: skip
    assert objects == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 0}


def test_empty_truth_against_a_prediction_and_the_reverse() -> None:
    roofs = box(box(empty(), 5, 5, 10, 10), 30, 30, 10, 10)
    pixel, objects = scores(empty(), roofs)
    assert (pixel["fp"], pixel["precision"], objects["fp"], objects["precision"]) == (200, 0.0, 2, 0.0)
    pixel, objects = scores(roofs, empty())
    assert (pixel["fn"], pixel["recall"], objects["fn"], objects["recall"]) == (200, 0.0, 2, 0.0)


def test_nodata_pixels_do_not_count() -> None:
    truth = box(empty(), 0, 0, 10, 10)
    valid = np.ones((SIDE, SIDE), bool)
    valid[:, 32:] = False
    chip = score_chip("c.tif", truth, truth.copy(), ARGS, valid)
    assert chip.confusion.tn == SIDE * 32 - 100


def test_each_prediction_takes_the_unmatched_truth_with_the_highest_iou() -> None:
    truth = box(box(empty(), 10, 10, 10, 10), 10, 22, 10, 10)  # A at cols 10-19, B at cols 22-31
    pred = box(box(empty(), 10, 11, 10, 10), 10, 23, 10, 10)  # 1 overlaps A (0.82); 2 overlaps B (0.82)
    assert match_objects(truth, pred, ARGS).tp == 2
    # A prediction over both roofs matches the better one only, the other stays unmatched.
    wide = box(empty(), 10, 10, 10, 17)  # A fully (IoU 100/170), B 5 columns (IoU 50/220)
    counts = match_objects(truth, wide, ARGS)
    assert (counts.tp, counts.fp, counts.fn) == (1, 0, 1)


def test_objects_are_the_polygons_rasterio_shapes_makes() -> None:
    mask = box(box(box(empty(), 5, 5, 6, 6), 11, 11, 6, 6), 30, 30, 3, 3)  # two blocks touching at a corner
    labels, n = label_objects(mask)
    polygons = [g for g, v in rasterio.features.shapes(mask.astype(np.uint8), mask=mask) if v == 1]
    assert n == len(polygons) == 3
    assert sorted(np.bincount(labels.ravel())[1:].tolist()) == [9, 36, 36]
    _, n_big = label_objects(mask, min_area=20)
    assert n_big == 2


def test_best_and_worst_leave_out_chips_without_roofs_and_do_not_overlap() -> None:
    truth = box(empty(), 10, 10, 10, 10)
    chips = [
        score_chip("a.tif", truth, truth.copy(), ARGS),
        score_chip("b.tif", truth, box(empty(), 10, 15, 10, 10), ARGS),
        score_chip("c.tif", empty(), empty(), ARGS),
        score_chip("d.tif", truth, box(empty(), 10, 12, 10, 10), ARGS),
    ]
    best, worst = best_and_worst(chips, n=4)
    assert [c.name for c in best] == ["a.tif"]
    assert [c.name for c in worst] == ["b.tif"]


# --- the stage on a fake predictions folder ------------------------------------------------------


def chip_image(rng: np.random.Generator, roof: np.ndarray) -> np.ndarray:
    image = rng.normal(300, 30, (3, *roof.shape)).clip(1, 2000)
    image[:, roof] = 1500
    image[:, :2, :2] = 0  # a nodata corner
    return image.astype(np.uint16)


def fake_experiment(tmp: Path, experiment: str = "fake", *overrides: str):
    """val chips and masks, a bundle.json, train's metrics.json and predictions (masks and probabilities).

    Chip val_0 is predicted perfectly, val_1 shifted by half a roof, val_2 has no roof and none
    predicted; val_3 is left unpredicted (a warning, not an error).
    """
    settings = load_settings(
        REPO_SETTINGS,
        [
            f"data_root={tmp / 'data'}",
            f"training_args.results_folder={tmp / 'results'}",
            f"predict_args.output={tmp / 'predictions'}",
            f"experiment={experiment}",
            "load_dataset_args.channels=3",
            "model_args.input_shape=[64,64,3]",
            *overrides,
        ],
    )
    tree = DataTree.from_settings(settings)
    rng = np.random.default_rng(0)
    truths = [box(box(empty(), 5, 5, 10, 10), 30, 30, 12, 8), box(empty(), 20, 20, 10, 10), empty(), empty()]
    preds = [truths[0].copy(), box(empty(), 20, 25, 10, 10), empty()]
    for i, truth in enumerate(truths):
        name = f"val_{i}.tif"
        write_geotiff(tree.frames("val") / name, array=chip_image(rng, truth), nodata=0)
        write_geotiff(tree.split_masks("val") / name, array=truth.astype(np.uint8) * 255, nodata=None)
    out = tree.prediction_dir("forest")
    for i, pred in enumerate(preds):
        name = f"val_{i}.tif"
        write_geotiff(out / "masks" / name, array=pred.astype(np.uint8) * 255, nodata=None)
        prob = np.where(pred, 0.8, 0.1).astype(np.float32)
        write_geotiff(out / "probabilities" / name, array=prob, nodata=None)
    norm = Normalization("percentile", (1.0,) * 3, (2000.0,) * 3, (0.0,) * 3, (1.0,) * 3, 0)
    write_info(tree.bundle("forest"), BundleInfo(kind="forest", bands=3, dtype="uint16", normalization=norm,
                                                 threshold=0.4, settings=settings.model_dump(mode="json")))  # fmt: skip
    train_metrics = {"model": "forest", "split": "val", "threshold": 0.4, "fit_seconds": 12.5,
                     "pixel": {"iou": 0.9, "f1": 0.95, "precision": 0.9, "recall": 1.0, "accuracy": 0.99}}  # fmt: skip
    (tree.model_dir("forest") / "metrics.json").write_text(json.dumps(train_metrics))
    return settings, tree


def test_evaluate_writes_metrics_chips_pictures_summary_and_report(tmp_path: Path) -> None:
    settings, tree = fake_experiment(tmp_path)
    train_before = (tree.model_dir("forest") / "metrics.json").read_text()
    record = evaluate_model(settings, tree, "forest")
    out = evaluation_dir(tree, "forest", "val")
    assert out == tmp_path / "results" / "fake" / "forest" / "evaluation" / "val"
    assert (tree.model_dir("forest") / "metrics.json").read_text() == train_before  # train's record is left alone

    # val_0: 196 roof pixels right; val_1: 50 right, 50 false, 50 missed; val_2: none; nodata corners left out.
    assert json.loads((out / "metrics.json").read_text()) == record
    assert (record["model"], record["split"], record["threshold"], record["chips"]) == ("forest", "val", 0.4, 3)
    pixel = record["pixel"]
    assert (pixel["tp"], pixel["fp"], pixel["fn"], pixel["tn"]) == (246, 50, 50, 3 * (SIDE * SIDE - 4) - 346)
    assert record["object"] == {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "tp": 2, "fp": 1, "fn": 1}

    chips = pd.read_csv(out / "chips.csv")
    assert chips["chip"].tolist() == ["val_0.tif", "val_1.tif", "val_2.tif"]
    assert chips["iou"].tolist() == [1.0, pytest.approx(1 / 3), 0.0]
    assert chips[["truth_objects", "predicted_objects", "object_tp"]].values.tolist() == [
        [2, 2, 2],
        [1, 1, 0],
        [0, 0, 0],
    ]

    sweep = pd.read_csv(out / "threshold_sweep.csv")
    assert len(sweep) == 99
    row = sweep[sweep["threshold"].round(2) == 0.5].iloc[0]  # probabilities 0.8 on predicted roofs, else 0.1
    assert (row["tp"], row["fp"], row["fn"]) == (246, 50, 50)
    assert sweep[sweep["threshold"].round(2) == 0.05].iloc[0]["recall"] == 1.0
    for name in ("threshold_sweep.png", "best.png", "worst.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name

    summary = pd.read_csv(tree.results_root / "summary.csv")
    assert summary[["experiment", "model", "split", "train_seconds"]].values.tolist() == [
        ["fake", "forest", "val", 12.5]
    ]
    assert summary["object_f1"].iloc[0] == pytest.approx(2 / 3)
    md = (tree.results_root / "summary.md").read_text()
    assert "| fake | forest | val | 0.711 | 0.831 | 0.667 | — | 12.5 |" in md  # no roofs.gpkg: no polygon scores

    report = (tree.results / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 3
    assert 'src="http' not in report and "<link" not in report  # self-contained
    assert '<td class="text">forest</td>' in report


def test_rerun_skips_another_setting_needs_overwrite(tmp_path: Path) -> None:
    settings, tree = fake_experiment(tmp_path)
    first = evaluate_model(settings, tree, "forest")
    metrics = evaluation_dir(tree, "forest", "val") / "metrics.json"
    made = metrics.stat().st_mtime_ns
    assert evaluate_model(settings, tree, "forest") == first  # up to date: read back, not redone
    assert metrics.stat().st_mtime_ns == made
    other = settings.model_copy(update={"evaluate_args": EvaluateArgs(min_area=5)})
    with pytest.raises(OutputExistsError, match=r"^the evaluation was made with evaluate_args.min_area 20, now 5: "):
        evaluate_model(other, tree, "forest")
    assert evaluate_model(other, tree, "forest", overwrite=True)["min_area"] == 5


def test_main_exit_codes_and_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, tree = fake_experiment(tmp_path)
    argv = ["--settings", str(REPO_SETTINGS), "--quiet"]
    for item in (f"data_root={tree.root}", f"training_args.results_folder={tree.results_root}",
                 f"predict_args.output={tree.predictions_root}", "experiment=fake",
                 "load_dataset_args.channels=3", "model_args.input_shape=[64,64,3]"):  # fmt: skip
        argv += ["--set", item]
    assert main([*argv, "--model", "unet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unet predictions ") and "run python predict/predict.py --model unet" in err
    assert main([*argv, "--model", "forest", "--split", "test"]) == 1
    assert "test masks folder" in capsys.readouterr().err
    assert main([*argv, "--model", "forest"]) == 0
    assert (evaluation_dir(tree, "forest", "val") / "metrics.json").is_file()


def test_predictions_of_another_split_say_what_to_predict(tmp_path: Path) -> None:
    settings, tree = fake_experiment(tmp_path)
    for name in ("val_0.tif", "val_1.tif", "val_2.tif"):
        (tree.prediction_dir("forest") / "masks" / name).rename(tree.prediction_dir("forest") / "masks" / f"x{name}")
    with pytest.raises(
        DataError, match=r"no prediction in .* has a truth mask of the same name .* --input .*val_frames"
    ):
        evaluate_model(settings, tree, "forest")


def test_a_truth_mask_on_the_wrong_scale_is_an_error(tmp_path: Path) -> None:
    settings, tree = fake_experiment(tmp_path)
    write_geotiff(tree.split_masks("val") / "val_0.tif", array=np.ones((SIDE, SIDE), np.uint8), nodata=None)
    with pytest.raises(DataError, match=r"val_0.tif holds values \[1\], not only 0 and 255"):
        evaluate_model(settings, tree, "forest")


def test_without_probabilities_there_is_no_sweep(tmp_path: Path) -> None:
    settings, tree = fake_experiment(tmp_path)
    (tree.prediction_dir("forest") / "probabilities" / "val_1.tif").unlink()
    record = evaluate_model(settings, tree, "forest")
    assert "best_threshold" not in record
    assert not (evaluation_dir(tree, "forest", "val") / "threshold_sweep.csv").exists()


# --- summary and report --------------------------------------------------------------------------


def test_settings_changes_list_what_differs_from_the_defaults() -> None:
    settings = load_settings(REPO_SETTINGS, ["training_args.epochs=5", "experiment=x", "chip_args.size=128"])
    assert settings_changes(settings.model_dump(mode="json")) == {"chip_args.size": 128, "training_args.epochs": 5}
    assert settings_changes({"old_section": {"key": 1}}) == {"old_section.key": 1}


def test_summary_settings_are_the_bundles_with_the_predict_settings_of_the_scored_predictions() -> None:
    snapshot = load_settings(REPO_SETTINGS, ["chip_args.size=128", "predict_args.tta=true"]).model_dump(mode="json")
    result = ModelResult("x", "unet", Path(), None, {}, snapshot)
    assert result.changes(None) == {"chip_args.size": 128, "predict_args.tta": True}  # not evaluated: the bundle's
    # Predicted without TTA after all, and with a threshold: what evaluate recorded replaces the bundle's predict_args.
    scored = {"predict_settings": {"predict_args.threshold": 0.3}}
    assert result.changes(scored) == {"chip_args.size": 128, "predict_args.threshold": 0.3}
    assert result.changes({}) == {"chip_args.size": 128, "predict_args.tta": True}  # an evaluation from before


def test_summary_has_one_row_per_experiment_and_model(tmp_path: Path) -> None:
    settings, tree = fake_experiment(tmp_path, "a")
    evaluate_model(settings, tree, "forest")
    fake_experiment(tmp_path, "b", "chip_args.size=64")  # b: trained, not evaluated
    frame = summary_frame(tmp_path / "results")
    assert frame[["experiment", "model", "scored_by"]].values.tolist() == [["a", "forest", "evaluate"],
                                                                           ["b", "forest", "train"]]  # fmt: skip
    assert frame["pixel_iou"].tolist()[1] == 0.9  # train's validation IoU when evaluate has not run
    assert "chip_args.size=64" in frame["settings"].iloc[1]
    assert "chip_args.size" not in frame["settings"].iloc[0]


def test_report_of_an_experiment_without_models(tmp_path: Path) -> None:
    settings = load_settings(REPO_SETTINGS, [f"training_args.results_folder={tmp_path}", "experiment=e",
                                             f"data_root={tmp_path / 'data'}"])  # fmt: skip
    tree = DataTree.from_settings(settings)
    assert model_results(tree.results) == []
    html = write_report(settings, tree).read_text()
    assert "No model trained yet" in html and "No chip index yet" in html
