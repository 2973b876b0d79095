"""The pre-flight check: silent on a clean tree; each problem fires on a tree built to trigger it;
exit codes of `python pipeline.py check`; train and predict run it first."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import geopandas as gpd
import numpy as np
import pytest
from affine import Affine
from conftest import REPO_SETTINGS, TEST_TRANSFORM, pixel_box, write_geotiff, write_labels

import pipeline
from core.bundle import BundleInfo, Normalization, write_info
from core.errors import CheckError
from core.settings import Settings, load_settings
from core.tree import DataTree
from workflow.check import preflight, run_checks
from workflow.runner import STAGES

SIZE = 32
EVERY_STAGE = [s.name for s in STAGES if s.name != "download"]


class Scene(NamedTuple):
    tmp: Path
    overrides: list[str]
    tree: DataTree

    def settings(self, *more: str) -> Settings:
        return load_settings(REPO_SETTINGS, [*self.overrides, *more])

    def argv(self, *more: str) -> list[str]:
        argv = ["--settings", str(REPO_SETTINGS), "--quiet"]
        for item in [*self.overrides, *more]:
            argv += ["--set", item]
        return argv


def chip(rng: np.random.Generator, roof: bool = True) -> tuple[np.ndarray, np.ndarray]:
    image = rng.integers(200, 400, (3, SIZE, SIZE)).astype(np.uint16)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    if roof:
        mask[8:16, 8:20] = 255
        image[:, mask > 0] = 1500
    return image, mask


def chip_transform(i: int) -> Affine:
    return TEST_TRANSFORM @ Affine.translation(i * SIZE, 0)


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    """A clean tree: a raw tile, labels over it (EPSG:4326), 4 chips with masks, and train/val splits of 2 each."""
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    write_geotiff(data / "raw" / "tile.tif", bands=3, rows=SIZE, cols=4 * SIZE, seed=1)
    # One roof over the first chip, in another CRS than the imagery, as real labels often are.
    roof = gpd.GeoSeries([pixel_box(8, 8, 20, 16)], crs="EPSG:32644").to_crs("EPSG:4326")
    write_labels(data / "labels" / "roofs.geojson", list(roof), crs="EPSG:4326", roof_type=["metal"])
    for i in range(4):
        image, mask = chip(rng)
        name = f"chip_{i:06d}.tif"
        write_geotiff(data / "chips" / name, array=image, transform=chip_transform(i))
        write_geotiff(data / "masks" / name, array=mask, transform=chip_transform(i), nodata=None)
        split, k = ("train", i) if i < 2 else ("val", i - 2)
        write_geotiff(data / f"{split}_frames" / f"{split}_{k}.tif", array=image, transform=chip_transform(i))
        write_geotiff(
            data / f"{split}_masks" / f"{split}_{k}.tif", array=mask, transform=chip_transform(i), nodata=None
        )
    overrides = [
        f"data_root={data}",
        f"training_args.results_folder={tmp_path / 'results'}",
        f"predict_args.output={tmp_path / 'predictions'}",
        "experiment=check",
        "load_dataset_args.channels=3",
        f"model_args.input_shape=[{SIZE},{SIZE},3]",
        f"chip_args.size={SIZE}",
    ]
    settings = load_settings(REPO_SETTINGS, overrides)
    return Scene(tmp_path, overrides, DataTree.from_settings(settings))


def findings(scene: Scene, *overrides: str, stages: list[str] = EVERY_STAGE) -> list[str]:
    settings = scene.settings(*overrides)
    found, _ = run_checks(settings, DataTree.from_settings(settings), stages)
    return [str(f) for f in found]


def test_silent_on_a_clean_tree(scene: Scene) -> None:
    settings = scene.settings()
    # (space_for: the stages that will run; none here, as for a tree made by hand: mask makes no masks anew)
    found, read = run_checks(settings, scene.tree, EVERY_STAGE, space_for=())
    assert found == []
    assert read == 1 + 4 + 4 + 8  # tile, chips, masks, split chips and masks (separate files here)


def test_hard_linked_split_files_are_read_once(scene: Scene) -> None:
    frames = scene.tree.frames("train")
    for k in range(2):
        (frames / f"train_{k}.tif").unlink()
        (frames / f"train_{k}.tif").hardlink_to(scene.tree.chips / f"chip_{k:06d}.tif")
    _, read = run_checks(scene.settings(), scene.tree, EVERY_STAGE, space_for=())
    assert read == 1 + 4 + 4 + 6


# --- each problem, on a tree made to have it ---------------------------------------------------------


def corrupt(scene: Scene) -> None:
    path = scene.tree.frames("train") / "train_1.tif"
    path.write_bytes(path.read_bytes()[:300])


def zero_bytes(scene: Scene) -> None:
    (scene.tree.split_masks("val") / "val_0.tif").write_bytes(b"")


def other_band_count(scene: Scene) -> None:
    write_geotiff(scene.tree.frames("val") / "val_1.tif", bands=4, rows=SIZE, cols=SIZE)


def mask_on_01(scene: Scene) -> None:
    _, mask = chip(np.random.default_rng(0))
    write_geotiff(scene.tree.split_masks("train") / "train_0.tif", array=mask // 255, nodata=None)


def mask_of_other_size(scene: Scene) -> None:
    write_geotiff(scene.tree.split_masks("val") / "val_1.tif", array=np.zeros((16, 16), np.uint8), nodata=None)


def mask_missing(scene: Scene) -> None:
    (scene.tree.split_masks("val") / "val_1.tif").unlink()


def labels_in_another_crs(scene: Scene) -> None:
    # UTM coordinates declared as longitude/latitude: the classic mistake.
    write_labels(scene.tree.labels / "roofs.geojson", [pixel_box(8, 8, 20, 16)], crs="EPSG:4326", roof_type=["metal"])


def labels_elsewhere(scene: Scene) -> None:
    far = pixel_box(8, 8, 20, 16, TEST_TRANSFORM @ Affine.translation(0, 100_000))
    write_labels(scene.tree.labels / "roofs.geojson", [far], roof_type=["metal"])


def labels_without_roofs(scene: Scene) -> None:
    write_labels(scene.tree.labels / "roofs.geojson", [pixel_box(8, 8, 20, 16)], roof_type=["brick"])


def no_train_roofs(scene: Scene) -> None:
    for k in range(2):
        write_geotiff(scene.tree.split_masks("train") / f"train_{k}.tif", array=np.zeros((SIZE, SIZE), np.uint8),
                      nodata=None)  # fmt: skip


def mostly_nodata(scene: Scene) -> None:
    image, _ = chip(np.random.default_rng(0))
    image[:, :, 4:] = 0
    write_geotiff(scene.tree.frames("val") / "val_0.tif", array=image)


def all_nodata(scene: Scene) -> None:
    for k in range(2):
        write_geotiff(scene.tree.frames("val") / f"val_{k}.tif", array=np.zeros((3, SIZE, SIZE), np.uint16))


def tile_in_another_crs(scene: Scene) -> None:
    write_geotiff(scene.tree.raw / "tile2.tif", bands=3, rows=SIZE, cols=SIZE, crs="EPSG:32645")


def tile_without_georeferencing(scene: Scene) -> None:
    write_geotiff(scene.tree.raw / "tile2.tif", bands=3, rows=SIZE, cols=SIZE, crs=None, transform=Affine.identity())


CASES: dict[str, tuple[Callable[[Scene], None], tuple[str, ...], str, str]] = {
    # name: (break the tree, settings, level, what the message says)
    "corrupt raster": (corrupt, (), "fatal", r"train_frames/train_1.tif .*(truncated or corrupt|not a readable)"),
    "empty raster": (zero_bytes, (), "fatal", r"val_masks/val_0.tif is empty \(0 bytes\)"),
    "band counts differ": (other_band_count, (), "fatal", r"val_1.tif in .*val_frames has 4 bands of uint16; the other 1 raster there has 3 bands"),
    "bands vs channels": ((lambda s: None), ("load_dataset_args.channels=4", "model_args.input_shape=[32,32,4]"),
                          "fatal", r"raw tiles in .*: 3 bands \(tile.tif\) but the settings say 4 .* set load_dataset_args.channels=3, or null"),
    "bands vs input_shape": ((lambda s: None), ("load_dataset_args.channels=null", "model_args.input_shape=[32,32,4]"), "fatal",
                             r"but the settings say 4 \(load_dataset_args.channels null, model_args.input_shape \[32, 32, 4\]\)"),
    "mask values": (mask_on_01, (), "fatal", r"train split: 1 masks .* hold values other than 0, 255 \(and 128, unknown\) \(train_0.tif: 0, 1\)"),
    "mask size": (mask_of_other_size, (), "fatal", r"val_1.tif is 16x16, its chip 32x32"),
    "mask missing": (mask_missing, (), "fatal", r"val split: 1 chips have no mask \(val_1.tif"),
    "labels CRS": (labels_in_another_crs, (), "fatal", r"no polygon of labels roofs.geojson \(EPSG:4326.* overlaps the imagery \(EPSG:32644"),
    "labels elsewhere": (labels_elsewhere, (), "fatal", r"no polygon of labels roofs.geojson \(EPSG:32644"),
    "labels filter": (labels_without_roofs, (), "fatal", r"no polygon in roofs.geojson has roof_type in \['metal'\]"),
    "no train roofs": (no_train_roofs, (), "fatal", r"train split: the masks in .*train_masks hold no roof pixel"),
    "mostly nodata": (mostly_nodata, (), "warning", r"val split: 1 of 2 chips are more than 50% nodata \(val_0.tif 88%\).*max_nodata, "
                      r"once the source rasters declare their nodata value \(rio edit-info --nodata 0 FILE\)$"),
    "all nodata": (all_nodata, (), "fatal", r"val split: every chip is nodata"),
    "chip size setting": ((lambda s: None), ("chip_args.size=64",), "warning", r"chips/: chips are 32x32 pixels but chip_args.size is 64"),
    "input shape setting": ((lambda s: None), ("model_args.input_shape=[64,64,3]",), "warning",
                            r"train split: chips are 32x32 pixels but model_args.input_shape is \[64, 64, 3\]"),
    "tiles on two grids": (tile_in_another_crs, (), "fatal", r"raw tiles tile2.tif .* set mosaic_args.reproject=true"),
    # (not "another CRS: set reproject", which mosaic then refuses too: mosaic's own words)
    "tile without georeferencing": (tile_without_georeferencing, (), "fatal",
                                    r"^fatal: .*raw/tile2.tif has no georeferencing \(no geotransform\): it cannot be placed on the map; set them with gdal_edit.py"),
    "no test split": ((lambda s: None), ("evaluate_args.split=test",), "fatal", r"evaluate_args.split is test but there is no test split"),
    "encoder weights missing": ((lambda s: None), ("model_args.architecture=mobilenetv2", "model_args.encoder_weights=/nowhere/enc.weights.h5"),
                                "fatal", r"^fatal: model_args.encoder_weights names /nowhere/enc.weights.h5, which is not a file: give the "
                                r"path of the encoder's weights without its top, 'imagenet' to download them, or null to start from random weights$"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_each_problem_is_found(scene: Scene, case: str) -> None:
    breaks, overrides, level, pattern = CASES[case]
    breaks(scene)
    found = findings(scene, *overrides)
    hits = [f for f in found if f.startswith(f"{level}: ")]
    assert any(re.search(pattern, f) for f in hits), found


def test_reprojecting_tiles_is_not_a_problem(scene: Scene) -> None:
    tile_in_another_crs(scene)
    assert not any("raw tiles" in f for f in findings(scene, "mosaic_args.reproject=true"))


def test_too_little_disk_space(scene: Scene, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=10**12 - 1000, free=1000))
    found = findings(scene, stages=["train-unet"])
    assert found == [
        f"fatal: too little disk space: 1000 B free on {scene.tmp}, the next stages need about 200.0 MiB: free some "
        "space, or move data_root, training_args.results_folder or predict_args.output"
    ]


def test_a_seed_ensemble_needs_the_space_of_a_training_per_member_and_its_own(scene, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=10**12 - 1000, free=1000))
    found = findings(scene, "training_args.members=3", stages=["train-unet"])
    assert found[0].startswith(f"fatal: too little disk space: 1000 B free on {scene.tmp}, the next stages need about "
                               "800.0 MiB")  # fmt: skip
    assert "need about 200.0 MiB" in findings(scene, "training_args.members=3", stages=["train-forest"])[0]


def test_little_disk_space_is_a_warning(scene: Scene, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=0, free=300 * 2**20))
    assert [f.split(":")[0] for f in findings(scene, stages=["train-unet"])] == ["warning"]


def test_a_bundle_of_other_bands_than_the_rasters_to_predict(scene: Scene) -> None:
    norm = Normalization("percentile", (0.0,) * 4, (1.0,) * 4, (0.0,) * 4, (1.0,) * 4, 0)
    write_info(scene.tree.bundle("unet"), BundleInfo(kind="unet", bands=4, dtype="uint16", normalization=norm,
                                                     threshold=0.5))  # fmt: skip
    found = findings(scene, stages=["predict"])
    assert len(found) == 1
    assert "rasters to predict val_0.tif, val_1.tif" in found[0] and "trained on 4 bands of uint16" in found[0]


def test_a_bundle_named_elsewhere_that_is_not_there_is_fatal(scene: Scene, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    found = findings(scene, f"predict_args.bundle={missing}", stages=["predict"])
    assert found == [
        f"fatal: the bundle {missing} (predict_args.bundle or --bundle) is not found: name a bundle folder train "
        "wrote (results/EXPERIMENT/MODEL/bundle), or set predict_args.bundle null to predict with this experiment's"
    ]
    missing.mkdir()
    (found,) = findings(scene, f"predict_args.bundle={missing}", stages=["predict"])
    assert f"the bundle {missing} (predict_args.bundle or --bundle) is not a model bundle (no bundle.json)" in found
    assert findings(scene, stages=["predict"]) == []  # this experiment's, not trained yet: train makes it


def test_inputs_not_made_yet_are_left_to_their_stage(tmp_path: Path) -> None:
    settings = load_settings(
        REPO_SETTINGS, [f"data_root={tmp_path / 'none'}", f"training_args.results_folder={tmp_path}"]
    )
    assert run_checks(settings, DataTree.from_settings(settings), EVERY_STAGE) == ([], 0)


# --- how stages and pipeline.py use it ------------------------------------------------------------


def test_preflight_raises_on_fatal_and_logs_warnings(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    mask_on_01(scene)
    mostly_nodata(scene)
    with pytest.raises(CheckError, match=r"^pre-flight check: train split: 1 masks .* 0/255"):
        preflight(scene.settings(), scene.tree, "train")
    no_train_roofs(scene)
    mask_missing(scene)
    with pytest.raises(CheckError, match=r"^pre-flight check found 2 problems: \(1\) .* \(2\) val split: 1 chips"):
        preflight(scene.settings(), scene.tree, "train")
    assert "val_0.tif 88%" in caplog.text  # the warning, logged


def test_pipeline_check_exit_codes(scene: Scene, capsys: pytest.CaptureFixture[str]) -> None:
    assert pipeline.main(["check", *scene.argv()]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "no problem found" and "17 rasters read" in out

    mostly_nodata(scene)
    assert pipeline.main(["check", *scene.argv()]) == 0  # warnings only
    assert "0 fatal problems, 1 warning" in capsys.readouterr().out

    mask_on_01(scene)
    assert pipeline.main(["check", *scene.argv()]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[1].startswith("  FATAL    train split: 1 masks")  # fatal first
    assert lines[2].startswith("  warning  val split: 1 of 2 chips")
    assert captured.err == "error: pre-flight check: 1 fatal problem, listed above\n"

    # --only narrows what is read: predict reads the val chips only (no bundle yet).
    assert pipeline.main(["check", *scene.argv(), "--only", "predict"]) == 0
    assert "2 rasters read" in capsys.readouterr().out


def test_train_and_predict_stop_on_a_fatal_problem(scene: Scene, capsys: pytest.CaptureFixture[str]) -> None:
    from predict.predict import main as predict_main
    from train.train import main as train_main

    mask_on_01(scene)
    assert train_main([*scene.argv(), "--model", "forest"]) == 1
    assert capsys.readouterr().err.startswith("error: pre-flight check: train split: 1 masks")
    norm = Normalization("percentile", (0.0,) * 4, (1.0,) * 4, (0.0,) * 4, (1.0,) * 4, 0)
    write_info(scene.tree.bundle("forest"), BundleInfo(kind="forest", bands=4, dtype="uint16", normalization=norm,
                                                       threshold=0.5))  # fmt: skip
    assert predict_main([*scene.argv(), "--model", "forest"]) == 1
    assert capsys.readouterr().err.startswith("error: pre-flight check: rasters to predict val_0.tif")
