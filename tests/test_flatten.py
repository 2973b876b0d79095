"""flatten: exact rows of long and wide tables, coordinates, nodata, csv = parquet, sampling, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import rasterio
from pyproj import Transformer

from core.errors import DataError, InputMissingError, OutputExistsError
from core.settings import FlattenArgs, ParallelArgs
from flatten.flatten import flatten_chips, main
from flatten.table import LONG_COLUMNS, inspect_table, iter_pixels, wide_columns

ONE_WORKER = ParallelArgs(workers=1)

# A 3 x 4 chip of 2 bands. Pixel (0, 1) is nodata in every band (left out); pixel (1, 2) is 0
# in band 1 only (kept: a pixel is nodata only when all its bands are).
BAND1 = np.array([[10, 0, 12, 13], [14, 15, 0, 17], [18, 19, 20, 21]], np.uint16)
BAND2 = np.array([[110, 0, 112, 113], [114, 115, 116, 117], [118, 119, 120, 121]], np.uint16)
MASK = np.array([[0, 0, 255, 255], [0, 0, 0, 0], [0, 255, 0, 0]], np.uint8)


@pytest.fixture
def tiny(data_tree, make_geotiff):
    """One tiny chip and its mask in train_frames/ and train_masks/."""
    make_geotiff(data_tree.frames("train"), "train_0.tif", array=np.stack([BAND1, BAND2]), nodata=0)
    make_geotiff(data_tree.split_masks("train"), "train_0.tif", array=MASK, nodata=None)
    return data_tree


def flatten(tree, **kwargs):
    args = FlattenArgs(**kwargs)
    return flatten_chips(tree.frames("train"), tree.split_masks("train"), tree, args, ONE_WORKER)


def read(path):
    return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)


def expected_pixels(chip) -> pd.DataFrame:
    """The table's pixels in row-major order, coordinates from pyproj at pixel centres."""
    with rasterio.open(chip) as src:
        transform = src.transform
    to4326 = Transformer.from_crs("EPSG:32644", "EPSG:4326", always_xy=True)
    rows = []
    for r in range(3):
        for c in range(4):
            if BAND1[r, c] == 0 and BAND2[r, c] == 0:
                continue
            x, y = transform @ (c + 0.5, r + 0.5)
            lon, lat = to4326.transform(x, y)
            rows.append({"latitude": lat, "longitude": lon, "row": r, "col": c, "b1": BAND1[r, c],
                         "b2": BAND2[r, c], "label": int(MASK[r, c] > 0)})  # fmt: skip
    return pd.DataFrame(rows)


def test_long_table_holds_exactly_the_expected_rows(tiny):
    path = flatten(tiny)
    assert path == tiny.flat / "pixels.csv"
    table = read(path)
    assert list(table.columns) == list(LONG_COLUMNS)
    pixels = expected_pixels(tiny.frames("train") / "train_0.tif")
    assert len(pixels) == 11  # 12 pixels, one nodata
    assert len(table) == 22  # one row per pixel and band
    expected = pd.DataFrame(
        {
            "latitude": np.repeat(pixels["latitude"], 2).to_numpy(),
            "longitude": np.repeat(pixels["longitude"], 2).to_numpy(),
            "row": np.repeat(pixels["row"], 2).to_numpy(),
            "col": np.repeat(pixels["col"], 2).to_numpy(),
            "band": np.tile([1, 2], 11),
            "value": np.column_stack([pixels["b1"], pixels["b2"]]).ravel(),
            "label": np.repeat(pixels["label"], 2).to_numpy(),
            "chip": ["train_0.tif"] * 22,
        }
    )
    pd.testing.assert_frame_equal(table, expected, check_dtype=False, check_exact=True)
    # Near Gorakhpur: the coordinates are degrees, not metres.
    assert table["latitude"].between(26, 27.5).all() and table["longitude"].between(80, 84).all()
    assert sorted(p.name for p in tiny.flat.iterdir()) == ["pixels.csv"]  # no parts or temporary files left


def test_wide_table_holds_exactly_the_expected_rows(tiny):
    table = read(flatten(tiny, layout="wide"))
    assert list(table.columns) == list(wide_columns(2))
    pixels = expected_pixels(tiny.frames("train") / "train_0.tif").rename(columns={"b1": "band_1", "b2": "band_2"})
    pixels["chip"] = "train_0.tif"
    pd.testing.assert_frame_equal(table, pixels[list(wide_columns(2))], check_dtype=False, check_exact=True)


@pytest.mark.parametrize("layout", ["long", "wide"])
def test_csv_and_parquet_give_equal_frames(tiny, layout):
    csv = read(flatten(tiny, layout=layout, format="csv"))
    parquet = read(flatten(tiny, layout=layout, format="parquet"))
    assert parquet["value" if layout == "long" else "band_1"].dtype == np.uint16  # parquet keeps the chip's type
    pd.testing.assert_frame_equal(csv, parquet, check_dtype=False, check_exact=True)


def test_pixels_of_long_table_pivot_back(tiny):
    path = flatten(tiny, format="parquet")
    info = inspect_table(path)
    assert (info.layout, info.bands, info.has_label) == ("long", 2, True)
    values, labels = next(iter_pixels(info, chunk_rows=1000))
    pixels = expected_pixels(tiny.frames("train") / "train_0.tif")
    np.testing.assert_array_equal(values, pixels[["b1", "b2"]].to_numpy())
    np.testing.assert_array_equal(labels, pixels["label"].to_numpy())


@pytest.fixture
def squares(data_tree, make_geotiff):
    """Four 32 x 32 chips, each with a 10 x 10 roof: 400 roof and 3,696 background pixels."""
    rng = np.random.default_rng(1)
    for i in range(4):
        mask = np.zeros((32, 32), np.uint8)
        mask[5 + i : 15 + i, 8:18] = 255
        image = rng.integers(1, 1000, (3, 32, 32), dtype=np.uint16)
        make_geotiff(data_tree.frames("train"), f"train_{i}.tif", array=image, nodata=0)
        make_geotiff(data_tree.split_masks("train"), f"train_{i}.tif", array=mask, nodata=None)
    return data_tree


def test_balance_keeps_every_roof_pixel_and_n_times_background(squares):
    table = read(flatten(squares, layout="wide", format="parquet", balance=2.0))
    assert int(table["label"].sum()) == 400
    background = int((table["label"] == 0).sum())
    assert 800 - 90 < background < 800 + 90  # binomial draw around 2 x 400 (sd ~ 26)


def test_sample_fraction_is_deterministic_and_independent_of_workers(squares):
    args = FlattenArgs(layout="wide", format="parquet", sample_fraction=0.25, seed=3)
    frames, masks = squares.frames("train"), squares.split_masks("train")
    one = read(flatten_chips(frames, masks, squares, args, ONE_WORKER))
    two = read(flatten_chips(frames, masks, squares, args, ParallelArgs(workers=2), overwrite=True))
    pd.testing.assert_frame_equal(one, two)
    assert 4096 * 0.25 - 120 < len(one) < 4096 * 0.25 + 120


def test_resumes_from_parts_then_refuses_to_overwrite(tiny, monkeypatch):
    from flatten import flatten as module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(module, "join_parts", crash)
        with pytest.raises(KeyboardInterrupt):
            flatten(tiny)
    assert not (tiny.flat / "pixels.csv").exists()
    with monkeypatch.context() as patch:  # the rerun reuses the finished part: no chip is read again
        patch.setattr(module, "chip_table", crash)
        first = read(flatten(tiny))
    assert len(first) == 22
    with pytest.raises(OutputExistsError, match="--overwrite"):
        flatten(tiny)


# --- bad input ----------------------------------------------------------------------------------


def test_no_chips(data_tree):
    with pytest.raises(InputMissingError, match=r"no chips in .*split/split.py"):
        flatten(data_tree)


def test_chip_without_mask(tiny, make_geotiff):
    make_geotiff(tiny.frames("train"), "train_1.tif", array=np.stack([BAND1, BAND2]), nodata=0)
    with pytest.raises(InputMissingError, match=r"have no mask .*train_1.tif"):
        flatten(tiny)


def test_chip_without_crs(data_tree, make_geotiff):
    make_geotiff(data_tree.frames("train"), "train_0.tif", array=np.stack([BAND1, BAND2]), crs=None)
    make_geotiff(data_tree.split_masks("train"), "train_0.tif", array=MASK, crs=None)
    with pytest.raises(DataError, match="no CRS"):
        flatten(data_tree)


def test_all_nodata_keeps_nothing(data_tree, make_geotiff):
    make_geotiff(data_tree.frames("train"), "train_0.tif", array=np.zeros((2, 3, 4), np.uint16), nodata=0)
    make_geotiff(data_tree.split_masks("train"), "train_0.tif", array=MASK)
    with pytest.raises(DataError, match="no pixel"):
        flatten(data_tree)
    assert not (data_tree.flat / "pixels.csv").exists()


def test_balance_without_roofs(tiny, make_geotiff):
    make_geotiff(tiny.split_masks("train"), "train_0.tif", array=np.zeros_like(MASK))
    with pytest.raises(DataError, match="balance needs roof pixels"):
        flatten(tiny, balance=1.0)


def test_main_runs_and_reports_errors(tiny, stage_argv, capsys):
    assert main([*stage_argv, "--set", "flatten_args.format=parquet"]) == 0
    assert (tiny.flat / "pixels.parquet").is_file()
    made = (tiny.flat / "pixels.parquet").stat().st_mtime_ns
    assert main([*stage_argv, "--set", "flatten_args.format=parquet"]) == 0  # up to date: skipped
    assert (tiny.flat / "pixels.parquet").stat().st_mtime_ns == made
    capsys.readouterr()
    assert main([*stage_argv, "--set", "flatten_args.format=parquet", "--set", "flatten_args.seed=3"]) == 1
    assert "flat/ was made with flatten_args.seed 0, now 3: add --overwrite" in capsys.readouterr().err
    assert main([*stage_argv, "--set", "flatten_args.frames=nowhere", "--overwrite"]) == 1
    assert "no chips in" in capsys.readouterr().err
    assert (tiny.flat / "pixels.parquet").stat().st_mtime_ns == made  # a failed --overwrite keeps the table
