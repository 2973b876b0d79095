"""core.index.chip_kind: the band count, dtype and nodata value a set of chips shares."""

from __future__ import annotations

import math

import pytest
from conftest import write_geotiff

from core.errors import DataError, InputMissingError
from core.index import chip_kind


def test_undeclared_nodata_agrees_with_any_value(tmp_path) -> None:
    # An unpadded chip of imagery without nodata declares none; a padded edge chip declares 0.
    # The value is the declared one whichever chip comes first (it was the first chip's).
    first = write_geotiff(tmp_path / "a.tif", nodata=None)
    padded = write_geotiff(tmp_path / "b.tif", nodata=0)
    assert chip_kind([first, padded], 3) == (3, "uint16", 0.0)
    assert chip_kind([padded, first], 3) == (3, "uint16", 0.0)
    assert chip_kind([first], 3) == (3, "uint16", None)


def test_nan_nodata_is_one_value(tmp_path) -> None:
    chips = [write_geotiff(tmp_path / f"{i}.tif", dtype="float32", nodata=math.nan) for i in range(3)]
    bands, dtype, nodata = chip_kind(chips, 3)
    assert (bands, dtype) == (3, "float32") and math.isnan(nodata)


def test_conflicting_nodata_values(tmp_path) -> None:
    chips = [write_geotiff(tmp_path / "a.tif", nodata=0), write_geotiff(tmp_path / "b.tif", nodata=65535)]
    with pytest.raises(DataError, match=r"^the chips declare different nodata values \[0\.0, 65535\.0\]: rechip"):
        chip_kind(chips, 3)


def test_band_count_or_type_differs(tmp_path) -> None:
    chips = [write_geotiff(tmp_path / "a.tif"), write_geotiff(tmp_path / "b.tif", bands=4)]
    with pytest.raises(DataError) as err:
        chip_kind(chips, 3)
    assert str(err.value) == (
        "b.tif has 4 bands of uint16, a.tif 3 bands of uint16: the train and val chips must be alike: rechip the imagery"
    )
    other = [write_geotiff(tmp_path / "c.tif"), write_geotiff(tmp_path / "d.tif", dtype="uint8")]
    with pytest.raises(DataError, match=r"^d.tif has 3 bands of uint8, c.tif 3 bands of uint16: "):
        chip_kind(other, 3)


def test_channels_setting_must_match(tmp_path) -> None:
    chips = [write_geotiff(tmp_path / "x1.tif"), write_geotiff(tmp_path / "x2.tif")]
    with pytest.raises(
        DataError,
        match=r"^the chips have 3 bands \(x1\.tif\) but the settings say 8 \(load_dataset_args\.channels or "
        r"model_args\.input_shape\[2\]\): set load_dataset_args\.channels to 3, or to null",
    ):
        chip_kind(chips, 8)
    assert chip_kind(chips, None)[0] == 3  # no band count in the settings: the chips'


def test_split_pairs_pairs_by_name_and_says_what_to_run(tmp_path) -> None:
    from core.errors import InputMissingError
    from core.index import split_pairs
    from core.settings import load_settings
    from core.tree import DataTree

    tree = DataTree.from_settings(load_settings(overrides=[f"data_root={tmp_path}"]))
    with pytest.raises(InputMissingError, match=r"^train chips folder .* not found: run python split/split.py first$"):
        split_pairs(tree, "train")
    frames, masks = tree.frames("train"), tree.split_masks("train")
    frames.mkdir()
    (frames / "notes.txt").write_text("not a chip")
    masks.mkdir()
    (masks / "notes.txt").write_text("not a mask")
    with pytest.raises(InputMissingError, match=r"^no train chips in .*train_frames: run python split/split.py first$"):
        split_pairs(tree, "train")
    for name in ("train_0.tif", "train_1.tif", "train_2.tif"):
        write_geotiff(frames / name)
    write_geotiff(masks / "train_1.tif", bands=1, nodata=None)
    with pytest.raises(
        InputMissingError, match=r"^2 train chips have no mask in .*train_masks \(e\.g\. train_0\.tif\): rerun"
    ):
        split_pairs(tree, "train")
    for name in ("train_0.tif", "train_2.tif"):
        write_geotiff(masks / name, bands=1, nodata=None)
    assert split_pairs(tree, "train") == [
        (frames / n, masks / n) for n in ("train_0.tif", "train_1.tif", "train_2.tif")
    ]


def test_a_missing_index_names_every_stage_up_to_the_one_the_reader_needs(tmp_path):
    from core.index import read_index

    expected = {
        "chip": "run python chip/chip.py",
        "mask": "run python chip/chip.py, then python mask/mask.py",
        "split": "run python chip/chip.py, then python mask/mask.py, then python split/split.py",
    }  # (evaluate's said chip then split, and split then asked for mask)
    for stage, run in expected.items():
        with pytest.raises(InputMissingError) as caught:
            read_index(tmp_path / "chips.csv", stage=stage)
        assert str(caught.value) == f"chip index {tmp_path / 'chips.csv'} not found: {run}"
