"""mosaic: overlap rules, gaps, blocks, mismatched tiles, reprojection, CLI and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from rasterio.warp import transform_bounds

from chip.chip import chip_sources
from core.errors import DataError, InputMissingError, OutputExistsError, RasterError
from core.settings import ChipArgs, MosaicArgs, ParallelArgs
from mosaic.mosaic import build_mosaic, main

X0, Y0 = 500000.0, 2960000.0


def at(row: int, col: int, res: float = 0.5) -> Affine:
    """Transform of a tile whose top-left corner is pixel (row, col) of the 0.5 m test grid."""
    return Affine(res, 0.0, X0 + col * 0.5, 0.0, -res, Y0 - row * 0.5)


def read(path):
    with rasterio.open(path) as src:
        return src.read(), src.profile


def constant(value_by_band: list[int], rows: int, cols: int, dtype: str = "uint16") -> np.ndarray:
    return np.stack([np.full((rows, cols), v, dtype) for v in value_by_band])


# --- overlap rules and gaps -----------------------------------------------------------------


@pytest.fixture
def overlapping(tmp_path, make_geotiff):
    """a: 4 x 6 px at (0, 0), bands (10, 50); b: 4 x 6 px at (2, 3), bands (20, 40), one nodata pixel."""
    b = constant([20, 40], 4, 6)
    b[:, 0, 1] = 0  # nodata in every band, inside the overlap: a shows through whatever the rule
    paths = [
        make_geotiff(tmp_path / "tiles", "a.tif", array=constant([10, 50], 4, 6), transform=at(0, 0)),
        make_geotiff(tmp_path / "tiles", "b.tif", array=b, transform=at(2, 3)),
    ]
    return paths


def expected_overlap(rule: str) -> np.ndarray:
    out = np.zeros((2, 6, 9), np.uint16)  # 6 rows (0..2+4), 9 cols (0..3+6); gaps are nodata 0
    a, b = (slice(0, 4), slice(0, 6)), (slice(2, 6), slice(3, 9))
    both = (slice(2, 4), slice(3, 6))
    out[(0, *b)], out[(1, *b)] = 20, 40
    out[(0, *a)], out[(1, *a)] = 10, 50
    if rule == "last":
        out[(0, *both)], out[(1, *both)] = 20, 40
    elif rule == "max":
        out[(0, *both)], out[(1, *both)] = 20, 50
    out[:, 2, 4] = (10, 50)  # b's nodata pixel: a's values
    return out


@pytest.mark.parametrize("rule", ["first", "last", "max"])
def test_overlap_rules(rule, overlapping, tmp_path):
    out = build_mosaic(overlapping, tmp_path / "m.tif", MosaicArgs(overlap=rule))
    data, profile = read(out)
    np.testing.assert_array_equal(data, expected_overlap(rule))
    assert profile["transform"] == at(0, 0)
    assert (profile["width"], profile["height"], profile["count"]) == (9, 6, 2)
    assert profile["crs"] == "EPSG:32644"
    assert profile["nodata"] == 0
    assert profile["dtype"] == "uint16"


def test_overlap_written_in_small_blocks(overlapping, tmp_path):
    out = build_mosaic(overlapping, tmp_path / "m.tif", MosaicArgs(overlap="last"), block=4)
    np.testing.assert_array_equal(read(out)[0], expected_overlap("last"))


def test_gaps_are_nodata(tmp_path, make_geotiff):
    paths = [
        make_geotiff(tmp_path, "a.tif", array=constant([5], 3, 4), transform=at(0, 0), nodata=9999),
        make_geotiff(tmp_path, "b.tif", array=constant([6], 3, 4), transform=at(5, 8), nodata=9999),
    ]
    data, profile = read(build_mosaic(paths, tmp_path / "out" / "m.tif", MosaicArgs()))
    assert profile["nodata"] == 9999
    assert data.shape == (1, 8, 12)
    assert (data[0, :3, :4] == 5).all()
    assert (data[0, 5:, 8:] == 6).all()
    assert int((data == 9999).sum()) == 8 * 12 - 2 * 12


def test_tiles_without_nodata_fill_gaps_with_zero(tmp_path, make_geotiff):
    paths = [
        make_geotiff(tmp_path, "a.tif", array=constant([5], 2, 2), transform=at(0, 0), nodata=None),
        make_geotiff(tmp_path, "b.tif", array=constant([6], 2, 2), transform=at(0, 4), nodata=None),
    ]
    data, profile = read(build_mosaic(paths, tmp_path / "m.tif", MosaicArgs()))
    assert profile["nodata"] == 0
    np.testing.assert_array_equal(data[0], [[5, 5, 0, 0, 6, 6], [5, 5, 0, 0, 6, 6]])


def test_small_blocks_equal_one_block(tmp_path, make_geotiff):
    # Four 30 x 40 tiles, overlapping by a few pixels, with a gap; the mosaic is 70 x 85 px.
    corners = [(0, 0), (0, 37), (28, 0), (40, 45)]
    paths = [
        make_geotiff(tmp_path / "tiles", f"t{i}.tif", rows=30, cols=40, transform=at(r, c), seed=i)
        for i, (r, c) in enumerate(corners)
    ]
    for rule in ("first", "max"):
        one, one_profile = read(build_mosaic(paths, tmp_path / f"one_{rule}.tif", MosaicArgs(overlap=rule)))
        small, small_profile = read(
            build_mosaic(paths, tmp_path / f"small_{rule}.tif", MosaicArgs(overlap=rule), block=16)
        )
        assert one.shape == (3, 70, 85)
        np.testing.assert_array_equal(small, one)
        assert small_profile == one_profile


# --- chips back into the source -------------------------------------------------------------


@pytest.mark.parametrize(("rows", "cols", "size", "stride"), [(64, 96, 32, 32), (70, 90, 32, 32), (70, 90, 32, 16)])
def test_chips_remosaic_to_the_source(rows, cols, size, stride, data_tree, make_geotiff, tmp_path):
    source = make_geotiff(data_tree.mosaic_dir, "mosaic.tif", rows=rows, cols=cols, seed=5, transform=at(3, 7))
    args = ChipArgs(size=size, stride=stride, max_nodata=1.0)
    frame = chip_sources([source], data_tree, args, ParallelArgs(workers=1))
    # Cut the padding off the edge chips, keeping their georeference.
    crops = tmp_path / "crops"
    crops.mkdir()
    for row in frame.itertuples():
        data, profile = read(data_tree.chips / row.file)
        h, w = min(size, rows - row.row_off), min(size, cols - row.col_off)
        profile.update(height=h, width=w)
        with rasterio.open(crops / row.file, "w", **profile) as dst:
            dst.write(data[:, :h, :w])
    out = build_mosaic(sorted(crops.iterdir()), tmp_path / "again.tif", MosaicArgs())
    again, again_profile = read(out)
    original, original_profile = read(source)
    np.testing.assert_array_equal(again, original)
    for key in ("width", "height", "count", "dtype", "crs", "transform", "nodata"):
        assert again_profile[key] == original_profile[key], key


# --- tiles that differ ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"crs": "EPSG:32643"}, "CRS EPSG:32643 vs EPSG:32644"),
        ({"transform": Affine(1.0, 0, X0 + 40, 0, -1.0, Y0)}, "resolution 1x1 vs 0.5x0.5"),
        ({"transform": Affine(0.5, 0, X0 + 40.25, 0, -0.5, Y0)}, "pixel grid offset by a fraction of a pixel"),
    ],
)
def test_differing_tiles_are_named(kwargs, what, tmp_path, make_geotiff):
    tiles = tmp_path / "tiles"
    make_geotiff(tiles, "a.tif", rows=8, cols=8, transform=at(0, 0))
    make_geotiff(tiles, "b.tif", rows=8, cols=8, transform=at(0, 8))
    kwargs.setdefault("transform", at(0, 80))
    make_geotiff(tiles, "c.tif", rows=8, cols=8, **kwargs)
    with pytest.raises(DataError) as err:
        build_mosaic(sorted(tiles.iterdir()), tmp_path / "m.tif", MosaicArgs())
    message = str(err.value)
    assert f"c.tif: {what}" in message
    assert "b.tif" not in message
    assert "mosaic_args.reproject" in message
    assert not (tmp_path / "m.tif").exists()


@pytest.mark.parametrize(
    ("kwargs", "what"), [({"bands": 4}, "4 bands of uint16"), ({"dtype": "uint8"}, "3 bands of uint8")]
)
def test_tiles_of_other_bands_are_named_without_advising_reprojection(kwargs, what, tmp_path, make_geotiff):
    tiles = tmp_path / "tiles"
    make_geotiff(tiles, "a.tif", rows=8, cols=8, transform=at(0, 0))
    make_geotiff(tiles, "b.tif", rows=8, cols=8, transform=at(0, 8))
    make_geotiff(tiles, "c.tif", rows=8, cols=8, transform=at(0, 80), **kwargs)
    with pytest.raises(DataError) as err:
        build_mosaic(sorted(tiles.iterdir()), tmp_path / "m.tif", MosaicArgs(reproject=True))
    assert str(err.value) == (
        f"tiles differ in band count or dtype from a.tif (3 bands of uint16): c.tif: {what}: move the odd tiles "
        "out of the folder, or mosaic them separately"
    )
    assert not (tmp_path / "m.tif").exists()


def test_mixed_crs_through_main(stage_argv, data_tree, make_geotiff, capsys):
    make_geotiff(data_tree.raw, "a.tif", rows=8, cols=8)
    make_geotiff(data_tree.raw, "b.tif", rows=8, cols=8, crs="EPSG:4326", transform=Affine(1e-5, 0, 83, 0, -1e-5, 26))
    assert main(stage_argv) == 1
    err = capsys.readouterr().err
    assert "b.tif: CRS EPSG:4326 vs EPSG:32644" in err
    assert err.count("\n") == 1
    assert not data_tree.mosaic_dir.exists() or not any(data_tree.mosaic_dir.iterdir())


def test_reproject_other_resolution_exactly(tmp_path, make_geotiff):
    a = make_geotiff(tmp_path, "a.tif", array=constant([3], 8, 8), transform=at(0, 0))
    values = np.arange(1, 13, dtype=np.uint16).reshape(1, 3, 4)
    b = make_geotiff(tmp_path, "b.tif", array=values, transform=at(2, 10, res=1.0))  # 1 m pixels
    data, profile = read(build_mosaic([a, b], tmp_path / "m.tif", MosaicArgs(reproject=True)))
    assert profile["transform"] == at(0, 0)
    assert data.shape == (1, 8, 18)
    np.testing.assert_array_equal(data[0, :, :8], 3)
    # Nearest neighbour: each 1 m pixel becomes 2 x 2 pixels of 0.5 m.
    np.testing.assert_array_equal(data[0, 2:8, 10:18], np.kron(values[0], np.ones((2, 2), np.uint16)))
    assert (data[0, :2, 8:] == 0).all()
    assert (data[0, :, 8:10] == 0).all()


def test_reproject_other_crs(tmp_path, make_geotiff):
    a = make_geotiff(tmp_path, "a.tif", array=constant([3], 40, 40), transform=at(0, 0))
    # b: 40 x 40 px of 0.5 m in UTM 43N, just east of a (about 3 degrees from its central meridian).
    left, _, _, top = transform_bounds("EPSG:32644", "EPSG:32643", X0 + 30, Y0 - 20, X0 + 50, Y0)
    b = make_geotiff(
        tmp_path,
        "b.tif",
        array=constant([7], 40, 40),
        crs="EPSG:32643",
        transform=Affine(0.5, 0, left, 0, -0.5, top),
    )
    with pytest.raises(DataError, match=r"b\.tif: CRS EPSG:32643 vs EPSG:32644"):
        build_mosaic([a, b], tmp_path / "m.tif", MosaicArgs())
    data, profile = read(build_mosaic([a, b], tmp_path / "m.tif", MosaicArgs(reproject=True)))
    assert profile["crs"] == "EPSG:32644"
    assert (profile["transform"].a, profile["transform"].e) == (0.5, -0.5)
    # b's rotated footprint reaches a little above a: the mosaic grows by whole pixels of a's grid.
    col, row = ~profile["transform"] @ (X0, Y0)
    assert (col, row) == (int(col), int(row))
    row, col = int(row), int(col)
    np.testing.assert_array_equal(data[0, row : row + 40, col : col + 40], 3)  # a untouched
    # b's 1600 pixels, warped by nearest neighbour onto a slightly rotated and scaled grid
    # (meridian convergence and scale of the two zones): the area agrees within 2%.
    sevens = np.argwhere(data[0] == 7)
    assert abs(len(sevens) - 1600) <= 32
    # ...and lies where b lies, in a's CRS.
    bl, bb, br, bt = transform_bounds("EPSG:32643", "EPSG:32644", left, top - 20, left + 20, top)
    x0, y0 = profile["transform"] @ (0, 0)
    rows, cols = sevens[:, 0], sevens[:, 1]
    assert x0 + cols.min() * 0.5 >= bl - 0.5 and x0 + (cols.max() + 1) * 0.5 <= br + 0.5
    assert y0 - rows.min() * 0.5 <= bt + 0.5 and y0 - (rows.max() + 1) * 0.5 >= bb - 0.5
    assert set(np.unique(data)) == {0, 3, 7}


# --- the script -----------------------------------------------------------------------------


def test_main_default_paths(stage_argv, data_tree, make_geotiff):
    make_geotiff(data_tree.raw, "a.tif", rows=8, cols=8, transform=at(0, 0), seed=1)
    make_geotiff(data_tree.raw, "b.tif", rows=8, cols=8, transform=at(0, 8), seed=2)
    assert main(stage_argv) == 0
    data, _ = read(data_tree.mosaic)
    assert data.shape == (3, 8, 16)
    np.testing.assert_array_equal(data[:, :, 8:], read(data_tree.raw / "b.tif")[0])
    assert sorted(p.name for p in data_tree.mosaic_dir.iterdir()) == ["mosaic.tif"]


def test_main_input_and_output(stage_argv, tmp_path, data_tree, make_geotiff):
    make_geotiff(tmp_path / "masks", "p1.tif", array=constant([255], 4, 4, "uint8"), transform=at(0, 0))
    make_geotiff(tmp_path / "masks", "p2.tif", array=constant([0], 4, 4, "uint8"), transform=at(4, 0))
    out = tmp_path / "merged" / "all.tif"
    assert main([*stage_argv, "--input", str(tmp_path / "masks"), "--output", str(out)]) == 0
    data, _ = read(out)
    assert data.shape == (1, 8, 4)
    assert (data[0, :4] == 255).all() and (data[0, 4:] == 0).all()
    assert not data_tree.mosaic.exists()


def test_merged_predicted_masks_declare_no_nodata_like_their_tiles(stage_argv, tmp_path, data_tree, make_geotiff):
    # Predict's masks (band "roof") declare none: their 0 is "no roof". Declared nodata, QGIS drew all but the
    # roofs transparent.
    for name, value, row in (("p1.tif", 255, 0), ("p2.tif", 0, 8)):
        path = make_geotiff(tmp_path / "masks", name, array=constant([value], 4, 4, "uint8"), transform=at(row, 0),
                            nodata=None)  # fmt: skip
        with rasterio.open(path, "r+") as dst:
            dst.set_band_description(1, "roof")
    out = tmp_path / "merged" / "all.tif"
    assert main([*stage_argv, "--input", str(tmp_path / "masks"), "--output", str(out)]) == 0
    data, profile = read(out)
    assert profile["nodata"] is None and data.shape == (1, 12, 4)
    assert (data[0, :4] == 255).all() and (data[0, 4:] == 0).all()  # the gap between them: 0, as the tiles' 0
    # Imagery without nodata, wherever it goes: its gaps are marked (chip pads and skips by them), as before.
    for name, row in (("a.tif", 0), ("b.tif", 8)):
        make_geotiff(tmp_path / "tiles", name, array=constant([7], 4, 4, "uint8"), transform=at(row, 0), nodata=None)
    assert main([*stage_argv, "--input", str(tmp_path / "tiles"), "--output", str(tmp_path / "area.tif")]) == 0
    assert read(tmp_path / "area.tif")[1]["nodata"] == 0


def test_rerun_needs_overwrite(stage_argv, data_tree, make_geotiff, capsys):
    tile = make_geotiff(data_tree.raw, "a.tif", rows=8, cols=8, seed=1)
    assert main(stage_argv) == 0
    first = data_tree.mosaic.read_bytes()
    make_geotiff(data_tree.raw, "a.tif", rows=8, cols=8, seed=2)
    capsys.readouterr()
    assert main(stage_argv) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and "mosaic.tif" in err
    assert data_tree.mosaic.read_bytes() == first
    assert main([*stage_argv, "--overwrite"]) == 0
    np.testing.assert_array_equal(read(data_tree.mosaic)[0], read(tile)[0])
    with pytest.raises(OutputExistsError):
        build_mosaic([tile], data_tree.mosaic, MosaicArgs())


def test_overwrite_with_tiles_that_make_no_mosaic_keeps_the_old_one(stage_argv, data_tree, make_geotiff, capsys):
    make_geotiff(data_tree.raw, "a.tif", rows=8, cols=8, seed=1)
    assert main(stage_argv) == 0
    first = data_tree.mosaic.read_bytes()
    make_geotiff(data_tree.raw, "b.tif", bands=2, rows=8, cols=8, transform=at(0, 8))
    capsys.readouterr()
    assert main([*stage_argv, "--overwrite"]) == 1
    assert capsys.readouterr().err == (
        "error: tiles differ in band count or dtype from a.tif (3 bands of uint16): b.tif: 2 bands of uint16: move "
        "the odd tiles out of the folder, or mosaic them separately\n"
    )
    # The refusal came before the run began: the old mosaic and its record are as they were.
    assert data_tree.mosaic.read_bytes() == first
    assert json.loads((data_tree.root / "mosaic.record.json").read_text())["state"] == "complete"


def test_killed_halfway_reruns(stage_argv, data_tree, make_geotiff):
    tile = make_geotiff(data_tree.raw, "a.tif", rows=8, cols=8)
    # A killed run leaves only its hidden temporary file: not a finished output.
    data_tree.mosaic_dir.mkdir(parents=True)
    (data_tree.mosaic_dir / ".mosaic.0badf00d.tmp.tif").write_bytes(b"II*\x00half")
    assert main(stage_argv) == 0
    np.testing.assert_array_equal(read(data_tree.mosaic)[0], read(tile)[0])


def test_missing_or_empty_input_folder(stage_argv, data_tree, capsys):
    assert main(stage_argv) == 1
    assert f"tile folder {data_tree.raw} not found" in capsys.readouterr().err
    data_tree.raw.mkdir(parents=True)
    (data_tree.raw / "notes.txt").write_text("no tiles here")
    assert main(stage_argv) == 1
    assert f"no GeoTIFF tiles in {data_tree.raw}" in capsys.readouterr().err
    assert not data_tree.mosaic.exists()
    with pytest.raises(InputMissingError):
        build_mosaic([], data_tree.mosaic, MosaicArgs())


@pytest.mark.parametrize("damage", ["zero-byte", "garbage", "truncated"])
def test_bad_tile_is_named_and_nothing_written(damage, stage_argv, data_tree, make_geotiff, capsys):
    make_geotiff(data_tree.raw, "a.tif", rows=16, cols=16)
    bad = make_geotiff(data_tree.raw, "b.tif", rows=16, cols=16, transform=at(0, 16))
    data = bad.read_bytes()
    bad.write_bytes({"zero-byte": b"", "garbage": b"not a tiff" * 100, "truncated": data[: len(data) // 2]}[damage])
    assert main(stage_argv) == 1
    # GDAL may warn about the damaged file first; the error itself is one line.
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert str(bad) in errors[0]
    assert not data_tree.mosaic_dir.exists() or not any(data_tree.mosaic_dir.iterdir())
    with pytest.raises(RasterError, match=r"b\.tif"):
        build_mosaic([data_tree.raw / "a.tif", bad], data_tree.mosaic, MosaicArgs())
