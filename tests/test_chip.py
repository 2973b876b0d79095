"""chip: grid arithmetic, padding and georeference of edge chips, chips.csv, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import rasterio
from conftest import interrupted

from chip.chip import chip_grid, chip_sources, main, resolve_inputs
from core.errors import InputMissingError, RasterError
from core.index import CHIP_COLUMNS, read_index
from core.raster import window_starts
from core.settings import ChipArgs, ParallelArgs

ONE_WORKER = ParallelArgs(workers=1)


# --- grid arithmetic ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "size", "stride", "expected"),
    [
        (96, 32, 32, [0, 32, 64]),  # size divides the length, stride = size
        (100, 32, 32, [0, 32, 64, 96]),  # does not divide: the last chip overhangs (padded)
        (96, 32, 16, [0, 16, 32, 48, 64]),  # stride < size: overlap, the last chip ends on the edge
        (100, 32, 16, [0, 16, 32, 48, 64, 80]),  # stride < size, last chip overhangs by 12
        (96, 32, 40, [0, 40, 80]),  # stride > size: gaps of 8; the last chip overhangs
        (100, 30, 50, [0, 50]),  # stride > size: no chip may start past the raster
        (64, 32, 64, [0]),  # stride > size, the next chip would start at the edge
        (32, 32, 32, [0]),  # exactly one chip
        (20, 32, 32, [0]),  # raster smaller than a chip: one padded chip
        (20, 32, 8, [0]),
        (650, 650, 650, [0]),
        (700, 650, 650, [0, 650]),
    ],
)
def test_chip_window_starts(length, size, stride, expected):
    offsets = window_starts(length, size, stride, overhang=True)
    assert offsets == expected
    assert all(0 <= o < length for o in offsets)
    if stride <= size:
        assert offsets[-1] + size >= length  # the last pixel is covered


@pytest.mark.parametrize(("length", "size", "stride"), [(0, 32, 32), (10, 0, 32), (10, 32, 0), (-1, 8, 8)])
def test_chip_window_starts_rejects_non_positive(length, size, stride):
    with pytest.raises(ValueError, match="positive"):
        window_starts(length, size, stride, overhang=True)


def test_chip_grid_row_by_row():
    assert chip_grid(width=70, height=40, size=32) == [(0, 0), (0, 32), (0, 64), (32, 0), (32, 32), (32, 64)]
    assert chip_grid(width=48, height=32, size=32, stride=16) == [(0, 0), (0, 16)]


# --- chipping a raster ----------------------------------------------------------------------


def read(path):
    with rasterio.open(path) as src:
        return src.read(), src.profile


def test_chips_pad_and_georeference(data_tree, make_geotiff):
    # 40 rows x 50 cols, size 32: chips at rows 0, 32 and cols 0, 32; edge chips overhang.
    mosaic = make_geotiff(data_tree.mosaic_dir, "mosaic.tif", rows=40, cols=50, seed=1)
    source, src_profile = read(mosaic)
    frame = chip_sources([mosaic], data_tree, ChipArgs(size=32, max_nodata=1.0), ONE_WORKER)

    assert list(frame["file"]) == [f"chip_00000{i}.tif" for i in range(4)]
    assert list(zip(frame["row_off"], frame["col_off"], strict=True)) == [(0, 0), (0, 32), (32, 0), (32, 32)]
    for row in frame.itertuples():
        data, profile = read(data_tree.chips / row.file)
        assert data.shape == (3, 32, 32)
        assert profile["dtype"] == "uint16"
        assert profile["crs"] == src_profile["crs"]
        assert profile["nodata"] == 0
        # Exactly the source pixel corner (row_off, col_off); same resolution.
        assert profile["transform"] @ (0, 0) == src_profile["transform"] @ (row.col_off, row.row_off)
        assert (profile["transform"].a, profile["transform"].e) == (0.5, -0.5)
        rows, cols = min(32, 40 - row.row_off), min(32, 50 - row.col_off)
        np.testing.assert_array_equal(
            data[:, :rows, :cols], source[:, row.row_off : row.row_off + rows, row.col_off : row.col_off + cols]
        )
        # Padding holds the pad value, which is the nodata value.
        assert (data[:, rows:, :] == 0).all()
        assert (data[:, :, cols:] == 0).all()


def test_index_columns_and_values(data_tree, make_geotiff):
    mosaic = make_geotiff(data_tree.mosaic_dir, "mosaic.tif", rows=40, cols=50)
    chip_sources([mosaic], data_tree, ChipArgs(size=32, max_nodata=1.0), ONE_WORKER)
    index = read_index(data_tree.chips_csv)
    assert list(index.columns) == list(CHIP_COLUMNS)
    assert list(index["id"]) == [0, 1, 2, 3]
    assert set(index["source"]) == {"mosaic/mosaic.tif"}
    assert set(index["crs"]) == {"EPSG:32644"}
    assert set(index["width"]) == set(index["height"]) == {32}
    x0, y0 = 500000.0, 2960000.0
    assert list(index["left"]) == [x0, x0 + 16, x0, x0 + 16]
    assert list(index["right"]) == [x0 + 16, x0 + 32, x0 + 16, x0 + 32]
    assert list(index["top"]) == [y0, y0, y0 - 16, y0 - 16]
    assert list(index["bottom"]) == [y0 - 16, y0 - 16, y0 - 32, y0 - 32]
    # Valid pixels: 32x32, 32x18, 8x32, 8x18 of 1024.
    assert list(index["nodata_share"]) == [0.0, 1 - 576 / 1024, 1 - 256 / 1024, 1 - 144 / 1024]
    assert list(index["nodata_share"]) == [0.0, 0.4375, 0.75, 0.859375]


def test_nodata_share_counts_nodata_pixels_of_the_source(data_tree, make_geotiff):
    array = np.full((2, 32, 64), 7, np.uint16)
    array[:, :8, :16] = 0  # nodata in every band: counted
    array[0, 20:, :] = 0  # nodata in one band only: still a valid pixel
    mosaic = make_geotiff(data_tree.mosaic_dir, "mosaic.tif", array=array)
    frame = chip_sources([mosaic], data_tree, ChipArgs(size=32), ONE_WORKER)
    assert list(frame["nodata_share"]) == [128 / 1024, 0.0]


def test_max_nodata_skips_chips_and_keeps_grid_numbers(data_tree, make_geotiff):
    mosaic = make_geotiff(data_tree.mosaic_dir, "mosaic.tif", rows=40, cols=50)
    frame = chip_sources([mosaic], data_tree, ChipArgs(size=32, max_nodata=0.5), ONE_WORKER)
    # Chips 2 (75% nodata) and 3 (86%) are skipped; 1 (43.75%) is kept.
    assert list(frame["id"]) == [0, 1]
    assert sorted(p.name for p in data_tree.chips.iterdir()) == ["chip_000000.tif", "chip_000001.tif"]
    for old in data_tree.chips.iterdir():
        old.unlink()
    frame = chip_sources([mosaic], data_tree, ChipArgs(size=32, max_nodata=0.0), ONE_WORKER)
    assert list(frame["id"]) == [0]
    assert sorted(p.name for p in data_tree.chips.iterdir()) == ["chip_000000.tif"]


def test_source_without_nodata_marks_only_padding(data_tree, make_geotiff):
    mosaic = make_geotiff(data_tree.mosaic_dir, "mosaic.tif", rows=32, cols=40, nodata=None)
    frame = chip_sources([mosaic], data_tree, ChipArgs(size=32, max_nodata=1.0), ONE_WORKER)
    assert list(frame["nodata_share"]) == [0.0, 1 - 8 * 32 / 1024]
    assert read(data_tree.chips / "chip_000000.tif")[1]["nodata"] is None
    data, profile = read(data_tree.chips / "chip_000001.tif")
    assert profile["nodata"] == 0
    assert (data[:, :, 8:] == 0).all()


def test_pad_value_setting(data_tree, make_geotiff):
    mosaic = make_geotiff(data_tree.mosaic_dir, "mosaic.tif", rows=32, cols=40, nodata=None)
    chip_sources([mosaic], data_tree, ChipArgs(size=32, max_nodata=1.0, pad_value=9), ONE_WORKER)
    data, profile = read(data_tree.chips / "chip_000001.tif")
    assert profile["nodata"] == 9
    assert (data[:, :, 8:] == 9).all()


def test_size_650(data_tree, make_geotiff):
    mosaic = make_geotiff(data_tree.mosaic_dir, "mosaic.tif", bands=1, rows=660, cols=700, dtype="uint8")
    source, _ = read(mosaic)
    frame = chip_sources([mosaic], data_tree, ChipArgs(size=650, max_nodata=1.0, compression="none"), ONE_WORKER)
    assert list(zip(frame["row_off"], frame["col_off"], strict=True)) == [(0, 0), (0, 650), (650, 0), (650, 650)]
    data, profile = read(data_tree.chips / "chip_000000.tif")
    assert data.shape == (1, 650, 650)
    assert (profile["width"], profile["height"]) == (650, 650)
    np.testing.assert_array_equal(data, source[:, :650, :650])
    data, _ = read(data_tree.chips / "chip_000003.tif")
    np.testing.assert_array_equal(data[:, :10, :50], source[:, 650:, 650:])


def test_stride_smaller_than_size_overlaps(data_tree, make_geotiff):
    mosaic = make_geotiff(data_tree.mosaic_dir, "mosaic.tif", rows=32, cols=64)
    frame = chip_sources([mosaic], data_tree, ChipArgs(size=32, stride=16), ONE_WORKER)
    assert list(frame["col_off"]) == [0, 16, 32]
    assert list(frame["nodata_share"]) == [0.0, 0.0, 0.0]
    first, _ = read(data_tree.chips / "chip_000000.tif")
    second, _ = read(data_tree.chips / "chip_000001.tif")
    np.testing.assert_array_equal(first[:, :, 16:], second[:, :, :16])


def test_source_raw_chips_every_tile_with_continuing_ids(settings_file, stage_argv, data_tree, make_geotiff):
    make_geotiff(data_tree.raw, "a.tif", rows=64, cols=32, seed=1)
    make_geotiff(data_tree.raw, "b.tif", rows=32, cols=64, seed=2)
    assert main([*stage_argv, "--set", "chip_args.source=raw", "--set", "chip_args.size=32"]) == 0
    index = read_index(data_tree.chips_csv)
    assert list(index["id"]) == [0, 1, 2, 3]
    assert list(index["file"]) == [f"chip_00000{i}.tif" for i in range(4)]
    assert list(index["source"]) == ["raw/a.tif", "raw/a.tif", "raw/b.tif", "raw/b.tif"]
    assert list(zip(index["row_off"], index["col_off"], strict=True)) == [(0, 0), (32, 0), (0, 0), (0, 32)]
    b, _ = read(data_tree.raw / "b.tif")
    chip, _ = read(data_tree.chips / "chip_000003.tif")
    np.testing.assert_array_equal(chip, b[:, :, 32:])


def test_main_input_folder(stage_argv, tmp_path, data_tree, make_geotiff):
    make_geotiff(tmp_path / "elsewhere", "x.tif", rows=32, cols=32)
    assert main([*stage_argv, "--input", str(tmp_path / "elsewhere"), "--set", "chip_args.size=32"]) == 0
    index = read_index(data_tree.chips_csv)
    assert list(index["source"]) == [str(tmp_path / "elsewhere" / "x.tif")]


# --- rerun, resume ------------------------------------------------------------------------


#: Chip the 70 x 90 px mosaic below into 3 x 3 chips of 32 px, edge chips kept.
SIZE_32 = ["--set", "chip_args.size=32", "--set", "chip_args.max_nodata=1.0"]


@pytest.fixture
def mosaic(data_tree, make_geotiff):
    return make_geotiff(data_tree.mosaic_dir, "mosaic.tif", rows=70, cols=90, seed=3)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_rerun_with_the_same_settings_skips(mosaic, stage_argv, data_tree, capsys):
    argv = [*stage_argv, *SIZE_32]
    assert main(argv) == 0
    before = snapshot(data_tree.root / "chips") | {"csv": data_tree.chips_csv.read_bytes()}
    mtimes = {p: p.stat().st_mtime_ns for p in data_tree.chips.iterdir()}
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().err == ""
    assert snapshot(data_tree.chips) | {"csv": data_tree.chips_csv.read_bytes()} == before
    assert {p: p.stat().st_mtime_ns for p in data_tree.chips.iterdir()} == mtimes  # nothing rewritten


def test_rerun_with_other_settings_refuses_and_names_the_change(mosaic, stage_argv, data_tree, capsys):
    argv = [*stage_argv, *SIZE_32]
    assert main(argv) == 0
    before = snapshot(data_tree.root / "chips") | {"csv": data_tree.chips_csv.read_bytes()}
    capsys.readouterr()
    assert main([*argv, "--set", "chip_args.stride=16"]) == 1
    err = capsys.readouterr().err
    assert err == "error: chips/ were made with chip_args.stride null, now 16: add --overwrite to redo them " \
        "(python pipeline.py reruns outdated stages)\n"  # fmt: skip
    assert snapshot(data_tree.chips) | {"csv": data_tree.chips_csv.read_bytes()} == before


def test_a_missing_input_is_said_before_a_changed_one(mosaic, stage_argv, data_tree, capsys):
    assert main([*stage_argv, *SIZE_32]) == 0
    capsys.readouterr()
    assert main([*stage_argv, *SIZE_32, "--input", "/nonexistent/tiles"]) == 1
    assert capsys.readouterr().err.strip() == "error: --input /nonexistent/tiles not found"


def test_outputs_without_a_record_need_overwrite(mosaic, stage_argv, data_tree, capsys):
    assert main([*stage_argv, *SIZE_32]) == 0
    (data_tree.root / "chip.record.json").unlink()  # made by an older version, or by hand
    capsys.readouterr()
    assert main([*stage_argv, *SIZE_32]) == 1
    err = capsys.readouterr().err
    assert "chip outputs already exist" in err and "no record" in err and "--overwrite" in err
    assert main([*stage_argv, *SIZE_32, "--overwrite"]) == 0
    assert json.loads((data_tree.root / "chip.record.json").read_text())["state"] == "complete"


def test_overwrite_redoes_and_removes_stale_chips(mosaic, stage_argv, data_tree):
    assert main([*stage_argv, *SIZE_32, "--set", "chip_args.size=16"]) == 0
    assert len(list(data_tree.chips.iterdir())) == 30
    assert main([*stage_argv, *SIZE_32, "--overwrite"]) == 0
    assert sorted(p.name for p in data_tree.chips.iterdir()) == [f"chip_00000{i}.tif" for i in range(9)]
    assert len(read_index(data_tree.chips_csv)) == 9
    assert read(data_tree.chips / "chip_000000.tif")[0].shape == (3, 32, 32)


def test_killed_halfway_resumes(mosaic, settings_file, stage_argv, tmp_path, data_tree):
    argv = [*stage_argv, *SIZE_32]
    assert main(argv) == 0
    clean = snapshot(data_tree.chips)
    clean_csv = data_tree.chips_csv.read_text()
    # A run killed halfway: the record says "running", the index (written last) and some chips
    # are missing; a temporary file of the chip being written is left behind.
    interrupted(data_tree.root / "chip.record.json")
    data_tree.chips_csv.unlink()
    for name in ("chip_000004.tif", "chip_000007.tif", "chip_000008.tif"):
        (data_tree.chips / name).unlink()
    leftover = data_tree.chips / ".chip_000004.0badf00d.tmp.tif"
    leftover.write_bytes(b"half a tiff")
    assert main(argv) == 0
    assert not leftover.exists()  # the resumed run removed it
    assert snapshot(data_tree.chips) == clean
    assert data_tree.chips_csv.read_text() == clean_csv


# --- bad input ------------------------------------------------------------------------------


def test_missing_mosaic(stage_argv, data_tree, capsys):
    assert main(stage_argv) == 1
    err = capsys.readouterr().err
    assert str(data_tree.mosaic) in err
    assert "mosaic/mosaic.py" in err
    assert not data_tree.chips_csv.exists()


def test_empty_input_folder(stage_argv, tmp_path, data_tree, capsys):
    (tmp_path / "empty").mkdir()
    assert main([*stage_argv, "--input", str(tmp_path / "empty")]) == 1
    assert f"no GeoTIFF in {tmp_path / 'empty'}" in capsys.readouterr().err
    with pytest.raises(InputMissingError, match="not found"):
        resolve_inputs(data_tree, ChipArgs(), tmp_path / "nothing.tif")
    with pytest.raises(InputMissingError, match="no GeoTIFF"):
        resolve_inputs(data_tree, ChipArgs(source="raw"), None)


@pytest.mark.parametrize("damage", ["zero-byte", "garbage", "truncated"])
def test_bad_source_is_named_and_nothing_written(damage, mosaic, stage_argv, data_tree, capsys):
    data = mosaic.read_bytes()
    mosaic.write_bytes({"zero-byte": b"", "garbage": b"not a tiff" * 100, "truncated": data[: len(data) // 2]}[damage])
    assert main([*stage_argv, *SIZE_32]) == 1
    # GDAL may warn about the damaged file first; the error itself is one line.
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert str(mosaic) in errors[0]
    assert not data_tree.chips_csv.exists()
    # No temporary file is left behind (chips finished before the failure may stay: a rerun resumes).
    assert not data_tree.chips.exists() or not list(data_tree.chips.glob(".*"))


def test_bad_source_with_overwrite_keeps_old_chips(mosaic, stage_argv, data_tree):
    argv = [*stage_argv, *SIZE_32]
    assert main(argv) == 0
    before = snapshot(data_tree.chips) | {"csv": data_tree.chips_csv.read_bytes()}
    mosaic.write_bytes(b"")
    assert main([*argv, "--overwrite"]) == 1
    assert snapshot(data_tree.chips) | {"csv": data_tree.chips_csv.read_bytes()} == before


def test_unreadable_source_raises_raster_error(data_tree, tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"")
    with pytest.raises(RasterError, match=r"bad\.tif"):
        chip_sources([bad], data_tree, ChipArgs(size=32), ONE_WORKER)
    assert not data_tree.chips_csv.exists()


def test_index_is_a_plain_csv(mosaic, data_tree):
    chip_sources([mosaic], data_tree, ChipArgs(size=32), ONE_WORKER)
    frame = pd.read_csv(data_tree.chips_csv)
    assert len(frame) == 6  # the bottom row (6 of 32 rows valid) is skipped
    assert frame["file"].is_unique


def test_error_in_a_worker_process(mosaic, stage_argv, data_tree, capsys):
    # The error is raised in a spawned worker and must still reach the user as one line, exit 1.
    data = mosaic.read_bytes()
    mosaic.write_bytes(data[: len(data) // 2])
    assert main([*stage_argv, *SIZE_32, "--set", "parallel.workers=2"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: {mosaic} could not be read (")
    assert errors[0].endswith("): it may be truncated or corrupt")
    assert not data_tree.chips_csv.exists()
