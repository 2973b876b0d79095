"""training_args.members: a seed ensemble, several networks trained from their own seeds and averaged in one bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from core.bundle import load_predictor, read_info  # noqa: E402
from core.raster import read_raster  # noqa: E402
from core.settings import load_settings  # noqa: E402
from core.tree import DataTree  # noqa: E402
from tests.test_unet import TINY, kill_once_backed_up, tiny_overrides, tiny_tree  # noqa: E402
from train.train import main as train_main  # noqa: E402
from unet import bundle as unet_bundle  # noqa: E402
from unet.snapshots import best_member, size  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def argv_of(settings_file: Path, overrides: list[str]) -> list[str]:
    argv = ["--settings", str(settings_file), "--quiet", "--model", "unet"]
    for item in overrides:
        argv += ["--set", item]
    return argv


@pytest.fixture(scope="module")
def seed_ensemble(tmp_path_factory: pytest.TempPathFactory):
    """Two tiny networks trained through train.py (training_args.members 2, seeds 5 and 6)."""
    tmp = tmp_path_factory.mktemp("members")
    settings_file = REPO / "settings.json"  # every path it names is overridden
    tiny_tree(tmp / "data")
    overrides = [*tiny_overrides(tmp), "training_args.epochs=3", "training_args.patience=20",
                 "training_args.members=2", "training_args.seed=5", "load_dataset_args.seed=7"]  # fmt: skip
    assert train_main(argv_of(settings_file, overrides)) == 0
    settings = load_settings(settings_file, overrides)
    return settings, DataTree.from_settings(settings), settings_file, overrides, tmp


@pytest.mark.slow
def test_the_bundle_averages_the_members_the_best_first_and_predict_reads_it(seed_ensemble) -> None:
    _, tree, _, _, tmp = seed_ensemble
    out = tree.model_dir("unet")
    folders = [out / "members" / "seed-5", out / "members" / "seed-6"]
    for folder in folders:  # each member is a training of its own: bundle, metrics, curves, overlays
        for name in ("bundle/model.keras", "bundle/bundle.json", "metrics.json", "history.csv", "curves.png",
                     "overlays.png", "checkpoint.weights.h5"):  # fmt: skip
            assert (folder / name).is_file(), folder / name
        assert not (folder / "backup").exists()
    own = [read_info(f / "bundle") for f in folders]
    assert [i.settings["training_args"]["seed"] for i in own] == [5, 6]
    assert [i.settings["load_dataset_args"]["seed"] for i in own] == [7, 8]
    assert all(i.object_filter == {} and i.threshold_tta is None for i in own)  # the average gets those
    a, b = (unet_bundle.load_model(f / "bundle") for f in folders)
    assert not np.array_equal(a.get_weights()[0], b.get_weights()[0])  # other initial weights

    records = [json.loads((f / "metrics.json").read_text()) for f in folders]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(m["seed"], m["folder"], m["val_iou"], m["threshold"], m["epochs"], m["train_seconds"])
            for m in metrics["members"]] == [
        (5, "members/seed-5", records[0]["pixel"]["iou"], records[0]["threshold"], 3, records[0]["train_seconds"]),
        (6, "members/seed-6", records[1]["pixel"]["iou"], records[1]["threshold"], 3, records[1]["train_seconds"]),
    ]  # fmt: skip
    assert metrics["train_seconds"] >= records[0]["train_seconds"] + records[1]["train_seconds"]
    assert metrics["epochs"] == 6 and "object_filter" in metrics and "threshold_tta" in metrics
    info = read_info(out / "bundle")
    assert info.features["ensemble"] == 2
    assert info.settings["training_args"]["seed"] == 5 and info.settings["training_args"]["members"] == 2
    assert info.threshold_tta == metrics["threshold_tta"]  # tuned on the average, as the object steps
    assert info.threshold == metrics["threshold"]

    model = unet_bundle.load_model(out / "bundle")
    assert size(model) == 2
    best = 0 if records[0]["pixel"]["iou"] >= records[1]["pixel"]["iou"] else 1
    for w, v in zip(best_member(model).get_weights(), (a, b)[best].get_weights(), strict=True):
        np.testing.assert_array_equal(w, v)  # training continued from the bundle goes on from the best member
    chip, _ = read_raster(sorted((tmp / "data" / "val_frames").glob("*.tif"))[0])
    prob = load_predictor(out / "bundle").predict(chip[np.newaxis])
    each = [load_predictor(f / "bundle").predict(chip[np.newaxis]) for f in folders]
    np.testing.assert_allclose(prob, np.mean(each, axis=0), rtol=1e-5, atol=1e-6)
    assert (out / "curves.png").is_file() and (out / "overlays.png").is_file()


def test_a_from_bundle_that_is_no_bundle_or_for_a_classical_model_is_refused_before_the_run_begins(
    tmp_path: Path, settings_file: Path, capsys
) -> None:
    overrides = tiny_overrides(tmp_path)
    assert train_main([*argv_of(settings_file, overrides), "--from-bundle", str(tmp_path / "nob")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: --from-bundle {tmp_path / 'nob'}: no bundle there (no bundle.json): give a U-Net's bundle folder, "
        "results/EXPERIMENT/unet/bundle"
    )
    forest = [*argv_of(settings_file, overrides), "--model", "forest", "--from-bundle", str(tmp_path)]
    assert train_main(forest) == 1
    assert capsys.readouterr().err.strip() == (
        "error: --from-bundle continues a U-Net's training; the forest trains anew: leave it out"
    )
    assert not (tmp_path / "results").exists()  # no record of a run that never began


@pytest.mark.slow
def test_a_rerun_skips_and_one_network_again_removes_the_members(seed_ensemble, capsys) -> None:
    _, tree, settings_file, overrides, _ = seed_ensemble
    out = tree.model_dir("unet")
    made = (out / "bundle" / "model.keras").stat().st_mtime_ns
    assert train_main(argv_of(settings_file, overrides)) == 0
    assert (out / "bundle" / "model.keras").stat().st_mtime_ns == made  # up to date: skipped
    capsys.readouterr()
    record = (out / "train.record.json").read_text()
    assert train_main([*argv_of(settings_file, overrides), "--from-bundle", str(out / "bundle")]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: training_args.members 2 trains new networks from their seeds, --from-bundle continues one: train "
        "without --from-bundle, or set training_args.members 1"
    )
    assert (out / "train.record.json").read_text() == record  # refused before the run began: still complete

    best = best_member(unet_bundle.load_model(out / "bundle")).get_weights()
    one = [*overrides, "training_args.members=1", "training_args.epochs=1"]
    assert train_main(argv_of(settings_file, one)) == 1  # another setting: refused without --overwrite
    assert "training_args.members 2, now 1" in capsys.readouterr().err
    go_on = [*one, "training_args.pretrained=true"]  # the best member goes on alone
    assert train_main([*argv_of(settings_file, go_on), "--overwrite"]) == 0
    assert not (out / "members").exists()  # not left beside a bundle of one network
    continued = unet_bundle.load_model(out / "bundle")
    assert size(continued) == 1 and continued.get_weights()[0].shape == best[0].shape
    assert not np.array_equal(continued.get_weights()[0], best[0])  # trained one more epoch
    assert train_main([*argv_of(settings_file, one), "--overwrite"]) == 0  # a fresh network
    assert size(unet_bundle.load_model(out / "bundle")) == 1
    assert "members" not in json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["training_args.ensemble=2"],
            "training_args: members 2 and ensemble 2 both make the bundle an average of networks: set one of them to 1",
        ),
        (
            ["training_args.pretrained=true"],
            "training_args: members 2 trains new networks from their seeds, "
            "pretrained true continues one: set pretrained false, or members 1",
        ),
        (["training_args.members=17"], "training_args.members: Input should be less than or equal to 16 (got 17)"),
    ],
)
def test_members_with_what_cannot_go_with_it_is_one_line(extra, message, tmp_path, settings_file, capsys) -> None:
    tiny_tree(tmp_path / "data")
    argv = argv_of(settings_file, [*tiny_overrides(tmp_path), "training_args.members=2", *extra])
    assert train_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(message), err


def test_members_from_a_bundle_is_one_line(tmp_path, settings_file) -> None:
    from core.errors import DataError
    from unet.train import train_unet

    tiny_tree(tmp_path / "data")
    settings = load_settings(settings_file, [*tiny_overrides(tmp_path), "training_args.members=3"])
    with pytest.raises(DataError) as caught:
        train_unet(settings, DataTree.from_settings(settings), from_bundle=tmp_path / "elsewhere")
    assert str(caught.value) == (
        "training_args.members 3 trains new networks from their seeds, --from-bundle continues one: train without "
        "--from-bundle, or set training_args.members 1"
    )
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_killed_in_the_second_member_resumes_it_and_keeps_the_first(tmp_path: Path, settings_file: Path) -> None:
    tiny_tree(tmp_path / "data")
    argv = [sys.executable, "train/train.py", "--settings", str(settings_file), "--model", "unet"]
    for item in (*TINY, "training_args.epochs=5", "training_args.patience=20", "training_args.members=2",
                 f"data_root={tmp_path / 'data'}", f"training_args.results_folder={tmp_path / 'results'}",
                 "experiment=resume"):  # fmt: skip
        argv += ["--set", item]
    out = tmp_path / "results" / "resume" / "unet"
    first, second = out / "members" / "seed-0", out / "members" / "seed-1"
    state = second / "backup" / "state.json"
    kill_once_backed_up(argv, state)  # a preempted node, in the second member's training
    done = json.loads(state.read_text())["epochs"]
    assert 2 <= done < 5 and not (out / "bundle").exists() and not (second / "bundle").exists()
    kept = (first / "bundle" / "model.keras").stat().st_mtime_ns
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"train: member 1 of 2 was trained before the run was interrupted: {first}" in again.stderr
    assert f"train: resuming from the end of epoch {done} of 5 (backup in {second / 'backup'})" in again.stderr
    assert (first / "bundle" / "model.keras").stat().st_mtime_ns == kept  # not trained again
    history = (second / "history.csv").read_text().strip().splitlines()
    assert [int(line.split(",")[0]) for line in history[1:]] == list(range(5))  # one history, every epoch once
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["epochs"] for m in metrics["members"]] == [5, 5] and metrics["epochs"] == 10
    assert size(unet_bundle.load_model(out / "bundle")) == 2
