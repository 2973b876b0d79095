"""sample: the built-in demo scene generator (tiles, labels, quicklook, command line)."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from pyproj import Transformer
from rasterio.features import rasterize

from sample.sample import main
from sample.scene import (
    CENTRE_LONLAT,
    LABELS_NAME,
    Scene,
    generate_scene,
    tile_paths,
    write_scene,
)

TILES, TILE_SIZE = 2, 256  # small scene: enough for every property but the default's roof share


def _write(scene: Scene, root: Path) -> list[Path]:
    return write_scene(scene, root / "raw", root / "labels", root / "quicklook.png")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Scene, Path]:
    """The small scene of seed 0, written once for the tests that only read it."""
    root = tmp_path_factory.mktemp("small")
    scene = generate_scene(0, TILES, TILE_SIZE)
    _write(scene, root)
    return scene, root


def _read_mosaic(raw: Path, tiles: int) -> tuple[np.ndarray, rasterio.Affine]:
    """Put the tiles back together by their transforms (checks they are adjacent)."""
    with rasterio.open(raw / "tile_0_0.tif") as src:
        size, transform, bands = src.width, src.transform, src.count
    mosaic = np.zeros((bands, tiles * size, tiles * size), dtype=np.uint16)
    for path in tile_paths(raw, tiles):
        with rasterio.open(path) as src:
            col, row = ~transform @ (src.transform.c, src.transform.f)
            assert (col, row) == (round(col), round(row))
            mosaic[:, round(row) : round(row) + size, round(col) : round(col) + size] = src.read()
    return mosaic, transform


def _metal_pixels(labels: Path, transform: rasterio.Affine, shape: tuple[int, int]) -> np.ndarray:
    roofs = gpd.read_file(labels).to_crs(32644)
    metal = roofs[roofs["roof_type"] == "metal"]
    return rasterize(metal.geometry, out_shape=shape, transform=transform, fill=0, dtype="uint8").astype(bool)


def test_same_seed_gives_identical_bytes(small, tmp_path):
    _, first = small
    again = _write(generate_scene(0, TILES, TILE_SIZE), tmp_path)
    tiles = again[:-1]  # the quicklook is a picture, not data
    assert [p.name for p in tiles] == ["tile_0_0.tif", "tile_0_1.tif", "tile_1_0.tif", "tile_1_1.tif", LABELS_NAME]
    for path in tiles:
        original = first / path.relative_to(tmp_path)
        assert path.read_bytes() == original.read_bytes(), path.name


def test_different_seed_gives_different_files(small, tmp_path):
    _, first = small
    other = _write(generate_scene(1, TILES, TILE_SIZE), tmp_path)
    for path in other[:-1]:
        assert path.read_bytes() != (first / path.relative_to(tmp_path)).read_bytes(), path.name


def test_tiles_are_11_bit_utm_with_one_nodata_corner(small):
    _, root = small
    corners = []
    for path in tile_paths(root / "raw", TILES):
        with rasterio.open(path) as src:
            assert (src.count, src.width, src.height) == (8, TILE_SIZE, TILE_SIZE)
            assert src.dtypes == ("uint16",) * 8
            assert src.crs == rasterio.crs.CRS.from_epsg(32644)
            assert src.res == (0.5, 0.5)
            assert src.nodata == 0
            data = src.read()
        assert data.max() <= 2047
        empty = (data == 0).all(axis=0)
        # Nodata is 0 in every band at once; no real pixel is 0 in any band.
        assert np.array_equal((data == 0).any(axis=0), empty)
        corners.append(int(empty.sum()))
    assert sum(n > 0 for n in corners) == 1
    assert 0 < max(corners) < TILE_SIZE * TILE_SIZE // 8


def test_nodata_corner_sits_in_a_scene_corner(small):
    scene, _ = small
    size = TILES * TILE_SIZE
    empty = scene.image[0] == 0
    assert sum(bool(empty[r, c]) for r in (0, size - 1) for c in (0, size - 1)) == 1


def test_scene_is_centred_on_the_town_and_tiles_adjoin(small):
    _, root = small
    mosaic, transform = _read_mosaic(root / "raw", TILES)
    east, north = Transformer.from_crs(4326, 32644, always_xy=True).transform(*CENTRE_LONLAT)
    half = TILES * TILE_SIZE * 0.5 / 2
    assert (transform.c + half, transform.f - half) == (round(east), round(north))
    assert mosaic.shape == (8, TILES * TILE_SIZE, TILES * TILE_SIZE)
    assert (mosaic.max(axis=0) > 0).sum() == (mosaic.min(axis=0) > 0).sum()


def test_labels_are_wgs84_with_three_roof_types_and_unique_ids(small):
    _, root = small
    roofs = gpd.read_file(root / "labels" / LABELS_NAME)
    assert roofs.crs == "EPSG:4326"
    assert set(roofs["roof_type"]) == {"metal", "concrete", "brick"}
    assert sorted(roofs["id"]) == list(range(1, len(roofs) + 1))
    assert roofs.geometry.geom_type.eq("Polygon").all()


def test_every_roof_lies_inside_the_imagery_and_outside_nodata(small):
    scene, root = small
    roofs = gpd.read_file(root / "labels" / LABELS_NAME).to_crs(32644)
    left, top, side = scene.transform.c, scene.transform.f, TILES * TILE_SIZE * 0.5
    bounds = shapely.box(left, top - side, left + side, top)
    assert shapely.contains(bounds, roofs.geometry.values).all()
    footprint = rasterize(roofs.geometry, out_shape=scene.image.shape[1:], transform=scene.transform).astype(bool)
    assert footprint.sum() > 0
    assert not (footprint & (scene.image[0] == 0)).any()


def test_labels_rasterize_back_to_the_same_pixels(small):
    scene, root = small
    roofs = gpd.read_file(root / "labels" / LABELS_NAME).to_crs(32644)
    shape = scene.image.shape[1:]
    back = rasterize(zip(roofs.geometry, roofs["id"], strict=True), out_shape=shape, transform=scene.transform)
    made = rasterize(
        zip(scene.roofs.geometry, scene.roofs["id"], strict=True), out_shape=shape, transform=scene.transform
    )
    assert np.array_equal(back, made)


def test_roofs_do_not_overlap_and_only_roofs_of_a_row_touch(small):
    scene, _ = small
    geoms = scene.roofs.geometry.values
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    a, b = a[a != b], b[a != b]
    assert (shapely.area(shapely.intersection(geoms[a], geoms[b])) < 1e-6).all()  # they share walls at most
    rows = scene.roofs["row"].to_numpy()
    assert len(a) and (rows[a] > 0).all() and (rows[a] == rows[b]).all()
    layout = scene.roofs["layout"].to_numpy()
    assert set(layout[rows > 0]) == {"row"} and set(layout[rows == 0]) == {"detached"}
    assert (scene.roofs.loc[rows > 0, "roof_type"] == "metal").all()


def test_default_scene_metal_share_is_3_to_6_percent(tmp_path):
    scene = generate_scene()
    paths = _write(scene, tmp_path)
    mosaic, transform = _read_mosaic(tmp_path / "raw", 2)
    assert mosaic.shape == (8, 2048, 2048)
    valid = mosaic[0] != 0
    metal = _metal_pixels(paths[-2], transform, valid.shape)
    share = np.count_nonzero(metal & valid) / np.count_nonzero(valid)
    assert 0.03 <= share <= 0.06
    assert share == pytest.approx(scene.metal_share, abs=1e-9)


def test_generate_scene_rejects_bad_sizes():
    with pytest.raises(ValueError, match="tiles"):
        generate_scene(0, 0, 256)
    with pytest.raises(ValueError, match="tile_size"):
        generate_scene(0, 1, 63)


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--set", f"data_root={tmp_path}", "--tiles", "2", "--tile-size", "128", "-q", *extra]


def test_main_writes_the_outputs(tmp_path):
    assert main(_argv(tmp_path)) == 0
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [
        "tile_0_0.tif",
        "tile_0_1.tif",
        "tile_1_0.tif",
        "tile_1_1.tif",
    ]
    assert len(gpd.read_file(tmp_path / "labels" / LABELS_NAME)) > 0
    assert (tmp_path / "quicklook.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporary files left


def test_main_refuses_to_overwrite_then_overwrites(tmp_path, capsys):
    assert main(_argv(tmp_path)) == 0
    before = (tmp_path / "labels" / LABELS_NAME).read_bytes()
    capsys.readouterr()
    assert main(_argv(tmp_path, "--seed", "3")) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "labels" / LABELS_NAME).read_bytes() == before
    assert main(_argv(tmp_path, "--seed", "3", "--overwrite")) == 0
    assert (tmp_path / "labels" / LABELS_NAME).read_bytes() != before


def test_overwrite_with_fewer_tiles_removes_stale_ones(tmp_path):
    assert main(_argv(tmp_path)) == 0
    assert main(["--set", f"data_root={tmp_path}", "--tiles", "1", "--tile-size", "128", "-q", "--overwrite"]) == 0
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["tile_0_0.tif"]


@pytest.mark.parametrize(
    "bad",
    [["--tiles", "0"], ["--tiles", "-1"], ["--tile-size", "63"], ["--tiles", "two"]],
)
def test_bad_sizes_are_usage_errors(tmp_path, capsys, bad):
    assert main(["--set", f"data_root={tmp_path}", *bad]) == 2
    assert bad[0] in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_smallest_scene_runs(tmp_path):
    argv = ["--set", f"data_root={tmp_path}", "--tiles", "1", "--tile-size", "64", "-q"]
    assert main(argv) == 0
    with rasterio.open(tmp_path / "raw" / "tile_0_0.tif") as src:
        assert (src.width, src.height, src.count) == (64, 64, 8)
