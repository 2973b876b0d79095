"""core.tree: DataTree paths, file names, require() and refuse_overwrite()."""

from __future__ import annotations

import pytest

from core.errors import InputMissingError, OutputExistsError
from core.settings import load_settings
from core.tree import REPO_ROOT, DataTree, refuse_overwrite, require


@pytest.fixture
def tree(settings_file, tmp_path) -> DataTree:
    settings = load_settings(
        settings_file,
        [
            "experiment=e1",
            "path_args.train_frames=tf",
            "path_args.val_masks=vm",
            "path_args.test_frames=sf",
            f"training_args.results_folder={tmp_path / 'res'}",
        ],
    )
    return DataTree.from_settings(settings)


def test_absolute_data_root(tree, tmp_path):
    assert tree.root == (tmp_path / "data").resolve()
    assert tree.raw == tree.root / "raw"
    assert tree.labels == tree.root / "labels"
    assert tree.mosaic == tree.root / "mosaic" / "mosaic.tif"
    assert tree.chips == tree.root / "chips"
    assert tree.masks == tree.root / "masks"
    assert tree.chips_csv == tree.root / "chips.csv"
    assert tree.flat == tree.root / "flat"
    assert tree.summary == tree.root / "summary"


def test_relative_data_root(settings_file, tmp_path):
    settings = load_settings(settings_file, ["data_root=some/where"])
    assert DataTree.from_settings(settings).root == (REPO_ROOT / "some" / "where").resolve()
    assert DataTree.from_settings(settings, base=tmp_path).root == (tmp_path / "some" / "where").resolve()


def test_repo_settings_tree():
    tree = DataTree.from_settings(load_settings())
    assert tree.root == REPO_ROOT / "data"
    assert tree.results_root == REPO_ROOT / "results"
    assert tree.predictions_root == REPO_ROOT / "predictions"


def test_split_folders_follow_path_args(tree):
    assert tree.frames("train") == tree.root / "tf"
    assert tree.split_masks("train") == tree.root / "train_masks"
    assert tree.frames("val") == tree.root / "val_frames"
    assert tree.split_masks("val") == tree.root / "vm"
    assert tree.frames("test") == tree.root / "sf"
    assert tree.split_masks("test") == tree.root / "test_masks"


def test_file_names(tree):
    assert tree.chip_name(3) == "chip_000003.tif"
    assert tree.chip_name(123456) == "chip_123456.tif"
    assert tree.split_name("train", 0) == "train_0.tif"
    assert tree.split_name("val", 12) == "val_12.tif"


def test_extension_follows_settings(settings_file):
    tree = DataTree.from_settings(load_settings(settings_file, ["extension_args.extension=.tiff"]))
    assert tree.chip_name(0) == "chip_000000.tiff"


@pytest.mark.parametrize("split", ["training", "validation", "", "Train"])
def test_unknown_split(tree, split):
    with pytest.raises(ValueError, match="unknown split"):
        tree.frames(split)
    with pytest.raises(ValueError, match="unknown split"):
        tree.split_masks(split)
    with pytest.raises(ValueError, match="unknown split"):
        tree.split_name(split, 0)


def test_results_and_predictions(tree, tmp_path):
    assert tree.results == (tmp_path / "res" / "e1").resolve()
    assert tree.predictions == REPO_ROOT / "predictions" / "e1"


def test_list_rasters(tree, tmp_path):
    folder = tmp_path / "rasters"
    folder.mkdir()
    for name in ["b.tif", "a.TIF", "c.tiff", ".a.tmp.tif", "notes.txt", "d.tif.aux.xml"]:
        (folder / name).touch()
    assert [p.name for p in tree.list_rasters(folder)] == ["a.TIF", "b.tif", "c.tiff"]


def test_rasters_at_a_folder_a_file_an_empty_folder_and_nothing(tree, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("b.tif", "a.TIFF", ".a.tif.tmp.tif", "notes.txt"):
        (folder / name).write_bytes(b"")
    kw = {"empty": "no GeoTIFF here", "missing": "nothing there"}
    assert [p.name for p in tree.rasters_at(folder, **kw)] == ["a.TIFF", "b.tif"]
    assert tree.rasters_at(folder / "notes.txt", **kw) == [folder / "notes.txt"]  # one file: the caller checks its kind
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputMissingError, match=r"^no GeoTIFF here$"):
        tree.rasters_at(tmp_path / "empty", **kw)
    with pytest.raises(InputMissingError, match=r"^nothing there$"):
        tree.rasters_at(tmp_path / "absent.tif", **kw)


def test_require_existing(tmp_path):
    (tmp_path / "chips").mkdir()
    (tmp_path / "chips" / "chip_000000.tif").touch()
    assert require(tmp_path / "chips", "chips folder", "run chip/chip.py first") == tmp_path / "chips"
    assert require(tmp_path / "chips" / "chip_000000.tif", "chip", "run chip") == tmp_path / "chips" / "chip_000000.tif"


def test_require_missing(tmp_path):
    path = tmp_path / "chips"
    with pytest.raises(InputMissingError) as info:
        require(path, "chips folder", "run chip/chip.py first")
    assert str(info.value) == f"chips folder {path} not found: run chip/chip.py first"
    assert isinstance(info.value, FileNotFoundError)


def test_require_empty_folder(tmp_path):
    path = tmp_path / "chips"
    path.mkdir()
    with pytest.raises(InputMissingError) as info:
        require(path, "chips folder", "run chip/chip.py first")
    assert str(info.value) == f"chips folder {path} is empty: run chip/chip.py first"


def test_refuse_overwrite(tmp_path):
    done = tmp_path / "mosaic.tif"
    done.touch()
    missing = tmp_path / "other.tif"
    refuse_overwrite([missing], overwrite=False, stage="mosaic")
    with pytest.raises(OutputExistsError) as info:
        refuse_overwrite([missing, done], overwrite=False, stage="mosaic")
    assert "--overwrite" in str(info.value)
    assert str(done) in str(info.value)
    assert str(missing) not in str(info.value)
    refuse_overwrite([missing, done], overwrite=True, stage="mosaic")


def test_refuse_overwrite_shows_three(tmp_path):
    paths = [tmp_path / f"chip_{i}.tif" for i in range(5)]
    for p in paths:
        p.touch()
    with pytest.raises(OutputExistsError) as info:
        refuse_overwrite(paths, overwrite=False, stage="chip")
    message = str(info.value)
    assert str(paths[2]) in message
    assert str(paths[3]) not in message
    assert "..." in message
