"""core.raster: atomic GeoTIFF writes, reads, bad files, windows, padding, band statistics."""

from __future__ import annotations

import os

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.windows import Window

from core import files, raster
from core.errors import DataError, RasterError

CRS_UTM = CRS.from_epsg(32644)
TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 2960000.0)
PERCENTILES = (1.0, 2.0, 50.0, 98.0, 99.0)


def random_array(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.normal(500.0, 200.0, size=shape).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dt)


# --- write and read -------------------------------------------------------------------------


@pytest.mark.parametrize("compression", raster.COMPRESSIONS)
@pytest.mark.parametrize(("dtype", "nodata"), [("uint8", 0), ("uint16", 0), ("int16", -32768), ("float32", -9999.0)])
def test_round_trip(tmp_path, dtype, nodata, compression):
    array = random_array(dtype, (3, 37, 29))
    path = tmp_path / "out.tif"
    assert (
        raster.write_raster(path, array, crs=CRS_UTM, transform=TRANSFORM, nodata=nodata, compression=compression)
        == path
    )
    data, profile = raster.read_raster(path)
    assert data.dtype == np.dtype(dtype)
    assert data.shape == (3, 37, 29)
    np.testing.assert_array_equal(data, array)
    assert profile["crs"] == CRS_UTM
    assert profile["transform"] == TRANSFORM
    assert profile["nodata"] == nodata
    assert profile["dtype"] == dtype
    assert profile["count"] == 3
    assert (profile["width"], profile["height"]) == (29, 37)
    if compression == "none":
        assert "compress" not in profile
    else:
        assert profile["compress"].lower() == compression
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif"]


def test_two_dimensional_array_is_one_band(tmp_path):
    array = random_array("uint8", (20, 30))
    path = raster.write_raster(tmp_path / "mask.tif", array, crs=CRS_UTM, transform=TRANSFORM)
    data, profile = raster.read_raster(path)
    assert data.shape == (1, 20, 30)
    assert profile["count"] == 1
    assert profile["nodata"] is None
    np.testing.assert_array_equal(data[0], array)


@pytest.mark.parametrize("shape", [(5,), (1, 2, 3, 4)])
def test_write_rejects_other_dimensions(tmp_path, shape):
    with pytest.raises(ValueError, match="2-D or 3-D"):
        raster.write_raster(tmp_path / "x.tif", np.zeros(shape, "uint8"), crs=CRS_UTM, transform=TRANSFORM)
    assert list(tmp_path.iterdir()) == []


def test_read_window(make_geotiff, tmp_path):
    path = make_geotiff(tmp_path, rows=40, cols=30)
    full, _ = raster.read_raster(path)
    window = Window(col_off=5, row_off=10, width=7, height=9)
    data, profile = raster.read_raster(path, window=window)
    np.testing.assert_array_equal(data, full[:, 10:19, 5:12])
    assert (profile["width"], profile["height"]) == (7, 9)
    assert profile["transform"] == TRANSFORM @ Affine.translation(5, 10)


def test_reads_plain_rasterio_file(make_geotiff, tmp_path):
    path = make_geotiff(tmp_path, bands=2, rows=16, cols=12, dtype="int16", nodata=-1, seed=3)
    with rasterio.open(path) as src:
        expected = src.read()
    data, profile = raster.read_raster(path)
    np.testing.assert_array_equal(data, expected)
    assert profile["nodata"] == -1
    assert profile["crs"] == CRS_UTM
    assert profile["transform"] == TRANSFORM


def test_failed_write_leaves_nothing(tmp_path):
    profile = raster.gtiff_profile(width=64, height=64, count=1, dtype="uint16", crs=CRS_UTM, transform=TRANSFORM)
    path = tmp_path / "out.tif"
    with pytest.raises(RuntimeError, match="crash"), raster.create_raster(path, profile) as dst:
        dst.write(np.ones((1, 32, 64), "uint16"), window=Window(0, 0, 64, 32))
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_existing_output(tmp_path):
    path = tmp_path / "out.tif"
    array = random_array("uint16", (2, 16, 16))
    raster.write_raster(path, array, crs=CRS_UTM, transform=TRANSFORM, nodata=0)
    before = path.read_bytes()
    profile = raster.gtiff_profile(width=8, height=8, count=1, dtype="uint8", crs=CRS_UTM, transform=TRANSFORM)
    with pytest.raises(RuntimeError, match="crash"), raster.create_raster(path, profile) as dst:
        dst.write(np.zeros((1, 8, 8), "uint8"))
        raise RuntimeError("crash")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif"]


def test_rewrite_replaces(tmp_path):
    path = tmp_path / "out.tif"
    raster.write_raster(path, np.zeros((8, 8), "uint8"), crs=CRS_UTM, transform=TRANSFORM)
    raster.write_raster(path, np.full((4, 4), 7, "uint8"), crs=CRS_UTM, transform=TRANSFORM)
    data, _ = raster.read_raster(path)
    assert data.shape == (1, 4, 4)
    assert (data == 7).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif"]


def test_output_permissions_follow_umask(tmp_path):
    mask = os.umask(0o022)
    try:
        path = raster.write_raster(tmp_path / "out.tif", np.zeros((4, 4), "uint8"), crs=CRS_UTM, transform=TRANSFORM)
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_atomic_path_for_other_writers(tmp_path):
    path = tmp_path / "index.csv"
    with files.atomic_path(path) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".")
        tmp.write_text("a\n")
        assert not path.exists()
    assert path.read_text() == "a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.csv"]
    with pytest.raises(KeyError), files.atomic_path(path) as tmp:
        tmp.write_text("b\n")
        raise KeyError("x")
    assert path.read_text() == "a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.csv"]


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (200 * 1024**2, "200.0 MiB"), (5 * 1024**5, "5120.0 TiB")],
)
def test_human_size(size: int, text: str) -> None:
    assert files.human_size(size) == text


def test_write_creates_parent_folders(tmp_path):
    path = tmp_path / "a" / "b" / "out.tif"
    raster.write_raster(path, np.zeros((4, 4), "uint8"), crs=CRS_UTM, transform=TRANSFORM)
    assert path.is_file()


def test_unknown_compression():
    with pytest.raises(RasterError, match="unknown compression 'jpeg'"):
        raster.gtiff_profile(
            width=1, height=1, count=1, dtype="uint8", crs=CRS_UTM, transform=TRANSFORM, compression="jpeg"
        )


def test_write_unknown_compression_leaves_nothing(tmp_path):
    with pytest.raises(RasterError):
        raster.write_raster(
            tmp_path / "x.tif", np.zeros((4, 4), "uint8"), crs=CRS_UTM, transform=TRANSFORM, compression="zip"
        )
    assert list(tmp_path.iterdir()) == []


# --- bad files ------------------------------------------------------------------------------


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.tif"
    path.touch()
    with pytest.raises(RasterError) as info:
        raster.open_raster(path)
    assert str(path) in str(info.value)
    assert "0 bytes" in str(info.value)


def test_truncated_file(make_geotiff, tmp_path):
    path = make_geotiff(tmp_path, "cut.tif", rows=300, cols=300)
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(RasterError) as info:
        raster.read_raster(path)
    assert str(path) in str(info.value)


def test_not_a_raster(tmp_path):
    path = tmp_path / "text.tif"
    path.write_text("not a tiff at all\n")
    with pytest.raises(RasterError) as info:
        raster.read_raster(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "missing.tif"
    with pytest.raises(RasterError) as info:
        raster.read_raster(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, OSError)


# --- windows and padding --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "block"),
    [(64, 64, 16), (48, 64, 16), (65, 47, 16), (10, 10, 32), (1, 1, 1), (100, 7, 7), (33, 33, 32)],
)
def test_iter_windows_cover_every_pixel_once(width, height, block):
    hits = np.zeros((height, width), dtype=int)
    windows = list(raster.iter_windows(width, height, block))
    for w in windows:
        assert 1 <= w.width <= block
        assert 1 <= w.height <= block
        hits[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] += 1
    assert (hits == 1).all()
    assert len(windows) == -(-width // block) * -(-height // block)


@pytest.mark.parametrize("block", [0, -1])
def test_iter_windows_bad_block(block):
    with pytest.raises(ValueError, match="block must be positive"):
        list(raster.iter_windows(10, 10, block))


@pytest.mark.parametrize(("multiple", "padded"), [(16, 656), (32, 672)])
@pytest.mark.parametrize("shape", [(650, 650, 3), (650, 650)])
def test_pad_and_crop_round_trip(shape, multiple, padded):
    array = random_array("uint16", shape)
    out, original = raster.pad_to_multiple(array, multiple)
    assert original == (650, 650)
    assert out.shape == (padded, padded, *shape[2:])
    assert out.dtype == array.dtype
    np.testing.assert_array_equal(out[:650, :650], array)
    np.testing.assert_array_equal(raster.crop_to(out, original), array)


def test_padding_is_reflect():
    array = random_array("uint16", (650, 650, 3))
    out, _ = raster.pad_to_multiple(array, 16)
    # Reflect mirrors about the last pixel without repeating it: row 650 is row 648.
    np.testing.assert_array_equal(out[650, :650], array[648])
    np.testing.assert_array_equal(out[655, :650], array[643])
    np.testing.assert_array_equal(out[:650, 651], array[:, 647])
    assert (out[652, 653] == array[646, 645]).all()


def test_pad_already_multiple_is_unchanged():
    array = random_array("uint8", (64, 32))
    out, original = raster.pad_to_multiple(array, 32)
    assert original == (64, 32)
    assert out.shape == (64, 32)
    np.testing.assert_array_equal(out, array)


# --- band statistics ------------------------------------------------------------------------


def numpy_stats(values: np.ndarray) -> dict:
    v = values.astype(np.float64)
    return {
        "count": int(v.size),
        "min": float(v.min()),
        "max": float(v.max()),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "percentiles": {f"p{p:g}": float(np.percentile(values, p)) for p in PERCENTILES},
    }


def assert_exact(stat: raster.BandStats, expected: dict) -> None:
    assert stat.count == expected["count"]
    assert stat.min == expected["min"]
    assert stat.max == expected["max"]
    assert stat.mean == pytest.approx(expected["mean"], rel=1e-9)
    assert stat.std == pytest.approx(expected["std"], rel=1e-9)
    assert stat.percentiles == expected["percentiles"]


def assert_binned(stat: raster.BandStats, expected: dict) -> None:
    """Float bands: exact count and range, the moments to 1e-9, percentiles to a histogram bin."""
    assert (stat.count, stat.min, stat.max) == (expected["count"], expected["min"], expected["max"])
    assert stat.mean == pytest.approx(expected["mean"], rel=1e-9)
    assert stat.std == pytest.approx(expected["std"], rel=1e-9)
    bin_width = (expected["max"] - expected["min"]) / 65536
    for key, value in expected["percentiles"].items():
        assert abs(stat.percentiles[key] - value) <= bin_width, key


def with_nodata(array: np.ndarray, nodata: float, share: float, seed: int) -> np.ndarray:
    array = array.copy()
    array[np.random.default_rng(seed).random(array.shape) < share] = nodata
    return array


@pytest.mark.parametrize("block", [1024, 16, 7])
def test_statistics_uint16_two_rasters(make_geotiff, tmp_path, block):
    a = with_nodata(random_array("uint16", (3, 40, 30), seed=1) // 20, 0, 0.1, seed=2)
    b = with_nodata(random_array("uint16", (3, 25, 33), seed=3) // 20, 0, 0.3, seed=4)
    paths = [make_geotiff(tmp_path, "a.tif", array=a), make_geotiff(tmp_path, "b.tif", array=b)]
    stats = raster.band_statistics(paths, block=block)
    assert [s.band for s in stats] == [1, 2, 3]
    for i, stat in enumerate(stats):
        values = np.concatenate([a[i].ravel(), b[i].ravel()])
        assert_exact(stat, numpy_stats(values[values != 0]))


@pytest.mark.parametrize("block", [1024, 16])
def test_statistics_uint8(make_geotiff, tmp_path, block):
    a = random_array("uint8", (2, 50, 37), seed=5)
    path = make_geotiff(tmp_path, array=a, nodata=None)
    stats = raster.band_statistics([path], block=block)
    for i, stat in enumerate(stats):
        assert_exact(stat, numpy_stats(a[i].ravel()))


def test_statistics_nodata_argument_overrides_file(make_geotiff, tmp_path):
    a = random_array("uint8", (1, 30, 30), seed=6)
    path = make_geotiff(tmp_path, array=a, nodata=None)
    (stat,) = raster.band_statistics([path], nodata=7)
    values = a.ravel()
    assert_exact(stat, numpy_stats(values[values != 7]))


def test_statistics_int16_negative_values(make_geotiff, tmp_path):
    a = random_array("int16", (1, 30, 20), seed=7)
    path = make_geotiff(tmp_path, array=a, nodata=-32768)
    (stat,) = raster.band_statistics([path], block=16)
    values = a.ravel()
    assert_exact(stat, numpy_stats(values[values != -32768]))


@pytest.mark.parametrize("block", [1024, 16])
def test_statistics_float32(make_geotiff, tmp_path, block):
    a = with_nodata(random_array("float32", (2, 40, 30), seed=8), -9999.0, 0.1, seed=9)
    b = with_nodata(random_array("float32", (2, 20, 20), seed=10), -9999.0, 0.2, seed=11)
    paths = [
        make_geotiff(tmp_path, "a.tif", array=a, nodata=-9999.0),
        make_geotiff(tmp_path, "b.tif", array=b, nodata=-9999.0),
    ]
    stats = raster.band_statistics(paths, block=block)
    for i, stat in enumerate(stats):
        values = np.concatenate([a[i].ravel(), b[i].ravel()])
        assert_binned(stat, numpy_stats(values[values != -9999.0]))


def test_statistics_int32_streams(make_geotiff, tmp_path):
    # 32-bit integers take the float path (a histogram of every value would need 32 GiB).
    a = np.random.default_rng(14).integers(-(2**31), 2**31 - 1, size=(1, 30, 30), dtype="int32")
    (stat,) = raster.band_statistics([make_geotiff(tmp_path, array=a, nodata=None)], block=16)
    assert_binned(stat, numpy_stats(a.ravel()))


def test_statistics_float32_constant_band(make_geotiff, tmp_path):
    a = np.full((1, 10, 10), 2.5, "float32")
    (stat,) = raster.band_statistics([make_geotiff(tmp_path, array=a, nodata=None)])
    assert (stat.count, stat.min, stat.max, stat.mean, stat.std) == (100, 2.5, 2.5, 2.5, 0.0)
    assert stat.percentiles == {f"p{p:g}": 2.5 for p in PERCENTILES}


def test_statistics_float32_nan_is_nodata(make_geotiff, tmp_path):
    a = random_array("float32", (1, 20, 20), seed=12)
    a[0, :5] = np.nan
    (stat,) = raster.band_statistics([make_geotiff(tmp_path, array=a, nodata=np.nan)])
    assert stat.count == 300
    assert stat.min == float(a[0, 5:].min())
    assert stat.max == float(a[0, 5:].max())


@pytest.mark.parametrize(("dtype", "nodata"), [("uint16", 0), ("float32", -9999.0)])
def test_statistics_all_nodata_band(make_geotiff, tmp_path, dtype, nodata):
    a = random_array(dtype, (2, 20, 20), seed=13)
    a[a == nodata] = 1
    a[1] = nodata
    (first, second) = raster.band_statistics([make_geotiff(tmp_path, array=a, nodata=nodata)])
    assert first.count == 400
    assert second.count == 0
    assert (second.min, second.max, second.mean, second.std) == (None, None, None, None)
    assert second.percentiles == {f"p{p:g}": None for p in PERCENTILES}
    assert second.to_dict()["count"] == 0


@pytest.mark.parametrize(
    ("bands", "dtype"),
    [(2, "uint16"), (3, "uint8")],
)
def test_statistics_mixed_rasters(make_geotiff, tmp_path, bands, dtype):
    first = make_geotiff(tmp_path, "a.tif", bands=3, dtype="uint16")
    second = make_geotiff(tmp_path, "b.tif", bands=bands, dtype=dtype)
    with pytest.raises(DataError) as info:
        raster.band_statistics([first, second])
    assert str(info.value) == (
        f"b.tif has {bands} bands of {dtype}, a.tif 3 bands of uint16: statistics need rasters of one kind"
    )


def test_statistics_needs_a_raster():
    with pytest.raises(ValueError, match="at least one raster"):
        raster.band_statistics([])


def test_statistics_missing_raster(make_geotiff, tmp_path):
    first = make_geotiff(tmp_path, "a.tif")
    with pytest.raises(RasterError, match=r"missing\.tif"):
        raster.band_statistics([first, tmp_path / "missing.tif"])
