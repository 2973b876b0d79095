"""mask: exact pixel counts, filters, repairs, CRS handling, chips.csv, resume and bad input."""

from __future__ import annotations

import logging

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from conftest import interrupted
from pyproj import Transformer
from rasterio.features import rasterize
from rasterio.transform import Affine

from chip.chip import chip_sources
from chip.chip import main as chip_main
from core.errors import LabelError
from core.index import read_index
from core.settings import ChipArgs, LabelFilter, MaskArgs, ParallelArgs, load_settings
from core.tree import DataTree
from mask.mask import main, mask_chips

ONE_WORKER = ParallelArgs(workers=1)

# Pixel rectangles (col0, row0, col1, row1) on the 64 x 96 px scene, chips of 32 px:
#   chip 0: rows 0-32 cols 0-32   chip 1: rows 0-32 cols 32-64   chip 2: rows 0-32 cols 64-96
#   chip 3: rows 32-64 cols 0-32  chip 4: rows 32-64 cols 32-64  chip 5: rows 32-64 cols 64-96
# The scene is nodata (0 in every band) in rows 32-64, cols 80-96: the right half of chip 5.
INSIDE = (4, 6, 10, 11)  # 30 px in chip 0
ACROSS_EDGE = (28, 2, 36, 5)  # 12 px in chip 0, 12 px in chip 1
ACROSS_CORNER = (60, 28, 70, 36)  # 16 px in chip 1, 24 in chip 2, 16 in chip 4, 24 in chip 5
OVER_NODATA = (72, 40, 88, 48)  # 64 px in chip 5's valid half, 64 over nodata
OUTSIDE = (200, 200, 210, 210)  # beyond the image
ROOFS = [INSIDE, ACROSS_EDGE, ACROSS_CORNER, OVER_NODATA, OUTSIDE]
COUNTS = [42, 28, 24, 0, 16, 88]
SHARES = [42 / 1024, 28 / 1024, 24 / 1024, 0.0, 16 / 1024, 88 / 512]


def scene_array() -> np.ndarray:
    array = np.random.default_rng(7).integers(1, 2048, size=(3, 64, 96), dtype=np.uint16)
    array[:, 32:, 80:] = 0
    return array


@pytest.fixture
def chips(data_tree, make_geotiff):
    """The scene above, chipped into data/chips with chips.csv."""
    mosaic = make_geotiff(data_tree.mosaic_dir, "mosaic.tif", array=scene_array())
    chip_sources([mosaic], data_tree, ChipArgs(size=32), ONE_WORKER)
    return data_tree


def boxes(pixel_box, rects):
    return [pixel_box(*r) for r in rects]


def read(path):
    with rasterio.open(path) as src:
        return src.read(1), src.profile


def mask_counts(tree) -> list[int]:
    index = read_index(tree.chips_csv)
    return [int((read(tree.masks / f)[0] == 255).sum()) for f in index["file"]]


def snapshot(tree):
    files = {p.name: p.read_bytes() for p in sorted(tree.masks.iterdir())} if tree.masks.exists() else {}
    return files | {"chips.csv": tree.chips_csv.read_bytes()}


# --- exact counts ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".geojson", ".shp", ".gpkg"])
def test_exact_counts(suffix, chips, make_labels, pixel_box):
    make_labels(chips.labels / f"roofs{suffix}", boxes(pixel_box, ROOFS), roof_type=["metal"] * len(ROOFS))
    index = mask_chips(chips, MaskArgs(), ONE_WORKER)
    assert mask_counts(chips) == COUNTS
    assert list(index["roof_share"]) == SHARES
    assert list(read_index(chips.chips_csv, needs=("roof_share",))["roof_share"]) == SHARES


def test_masks_match_their_chips(chips, make_labels, pixel_box):
    make_labels(chips.labels / "roofs.geojson", boxes(pixel_box, ROOFS))
    mask_chips(chips, MaskArgs(), ONE_WORKER)
    index = read_index(chips.chips_csv)
    assert sorted(p.name for p in chips.masks.iterdir()) == list(index["file"])
    for name in index["file"]:
        mask, profile = read(chips.masks / name)
        with rasterio.open(chips.chips / name) as chip:
            assert profile["transform"] == chip.transform
            assert profile["crs"] == chip.crs
            assert (profile["height"], profile["width"]) == (chip.height, chip.width)
            valid = (chip.read() != 0).any(axis=0)
        assert profile["count"] == 3  # footprint, boundary, contact: mask_args.targets
        assert profile["dtype"] == "uint8"
        assert set(np.unique(mask)) <= {0, 255}
        assert not mask[~valid].any()  # 0 wherever the chip is nodata
    mask, _ = read(chips.masks / "chip_000005.tif")
    assert set(np.unique(mask)) == {0, 255}
    # The polygon over the nodata edge: burned in the valid half only.
    assert (mask[8:16, 8:16] == 255).all()
    assert not mask[8:16, 16:24].any()


def test_labels_in_another_crs(chips, make_labels, pixel_box):
    # The rectangles' corners in EPSG:4326. Reprojecting them back to the chips' UTM zone
    # gives the same corners (to far below a millimetre) joined by straight edges, and every
    # pixel centre is 0.25 m from an edge: the counts are those of the UTM rectangles, exactly.
    to_wgs84 = Transformer.from_crs("EPSG:32644", "EPSG:4326", always_xy=True)
    wgs84 = [
        shapely.transform(b, lambda xy: np.column_stack(to_wgs84.transform(*xy.T))) for b in boxes(pixel_box, ROOFS)
    ]
    path = make_labels(chips.labels / "roofs.geojson", wgs84, crs="EPSG:4326", roof_type=["metal"] * 5)
    mask_chips(chips, MaskArgs(), ONE_WORKER)
    assert mask_counts(chips) == COUNTS
    # And each mask is what rasterizing the reprojected polygons on the chip's grid gives.
    utm = gpd.read_file(path).to_crs("EPSG:32644").geometry
    for name in read_index(chips.chips_csv)["file"]:
        mask, profile = read(chips.masks / name)
        with rasterio.open(chips.chips / name) as chip:
            valid = (chip.read() != 0).any(axis=0)
        expected = rasterize(
            [(g, 255) for g in utm], out_shape=mask.shape, transform=profile["transform"], dtype="uint8"
        )
        expected[~valid] = 0
        np.testing.assert_array_equal(mask, expected)


def test_all_touched(chips, make_labels, pixel_box):
    # Pixel centres 5.5..8.5 and 7.5..9.5 are inside: 4 x 3; the polygon touches 6 x 5 pixels.
    make_labels(chips.labels / "roofs.gpkg", [pixel_box(4.6, 6.6, 9.4, 10.4)])
    mask_chips(chips, MaskArgs(), ONE_WORKER)
    assert mask_counts(chips)[0] == 12
    mask_chips(chips, MaskArgs(all_touched=True), ONE_WORKER)
    assert mask_counts(chips)[0] == 30


def test_multipolygon_and_hole(chips, make_labels, pixel_box):
    multi = shapely.MultiPolygon([pixel_box(2, 2, 6, 6), pixel_box(10, 10, 13, 12)])  # 16 + 6
    holed = shapely.Polygon(
        pixel_box(40, 4, 50, 14).exterior.coords, holes=[pixel_box(43, 7, 46, 9).exterior.coords]
    )  # 100 - 6
    make_labels(chips.labels / "roofs.gpkg", [multi, holed], roof_type=["metal", "metal"])
    mask_chips(chips, MaskArgs(), ONE_WORKER)
    assert mask_counts(chips) == [22, 94, 0, 0, 0, 0]
    mask, _ = read(chips.masks / "chip_000001.tif")
    assert not mask[7:9, 11:14].any()  # the hole


def test_bowtie_repaired_with_warning(chips, make_labels, caplog):
    # A self-intersecting ring: two triangles meeting at a point. Edges of slope 2 never pass
    # through a pixel centre, so the count of centres inside is unambiguous.
    t = Affine(0.5, 0, 500000.0, 0, -0.5, 2960000.0)
    corners = [(2, 2), (10, 18), (10, 2), (2, 18)]  # (col, row)
    bowtie = shapely.Polygon([t @ c for c in corners])
    assert not bowtie.is_valid
    make_labels(chips.labels / "roofs.gpkg", [bowtie], roof_type=["metal"])
    with caplog.at_level(logging.WARNING):
        mask_chips(chips, MaskArgs(), ONE_WORKER)
    assert any("repaired 1 invalid" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    repaired = shapely.make_valid(bowtie)
    centres = [t @ (c + 0.5, r + 0.5) for r in range(32) for c in range(32)]
    expected = int(shapely.contains_xy(repaired, np.array(centres)[:, 0], np.array(centres)[:, 1]).sum())
    assert expected == 64  # each triangle (4 px wide, 16 px high) holds 32 pixel centres
    assert mask_counts(chips)[0] == expected


# --- which polygons ---------------------------------------------------------------------------


def test_filter_keeps_only_metal(chips, make_labels, pixel_box):
    rects = [INSIDE, (5, 40, 15, 50), (40, 40, 44, 44)]  # chip 0; chip 3; chip 4
    make_labels(chips.labels / "roofs.geojson", boxes(pixel_box, rects), roof_type=["metal", "concrete", "brick"])
    mask_chips(chips, MaskArgs(), ONE_WORKER)
    assert mask_counts(chips) == [30, 0, 0, 0, 0, 0]
    args = MaskArgs(filter=LabelFilter(values=["metal", "brick"]))
    mask_chips(chips, args, ONE_WORKER)
    assert mask_counts(chips) == [30, 0, 0, 0, 16, 0]


def test_filter_matching_nothing_lists_values(chips, make_labels, pixel_box, stage_argv, capsys):
    make_labels(chips.labels / "roofs.geojson", boxes(pixel_box, [INSIDE, INSIDE]), roof_type=["concrete", "brick"])
    assert main(stage_argv) == 1
    err = capsys.readouterr().err
    assert "roof_type in ['metal']" in err
    assert "values present: ['brick', 'concrete']" in err
    assert "mask_args.filter.values" in err
    assert not chips.masks.exists()


def test_without_roof_type_every_polygon_is_burned(chips, make_labels, pixel_box):
    make_labels(chips.labels / "roofs.geojson", boxes(pixel_box, [INSIDE, ACROSS_EDGE]), kind=["a", "b"])
    mask_chips(chips, MaskArgs(), ONE_WORKER)
    assert mask_counts(chips) == [42, 12, 0, 0, 0, 0]


def test_filter_null_burns_every_polygon(chips, make_labels, pixel_box, stage_argv):
    make_labels(chips.labels / "roofs.geojson", boxes(pixel_box, [INSIDE, ACROSS_EDGE]), roof_type=["metal", "tin"])
    assert main([*stage_argv, "--set", "mask_args.filter=null"]) == 0
    assert mask_counts(chips) == [42, 12, 0, 0, 0, 0]


def test_chips_in_two_crs(data_tree, make_geotiff, make_labels, stage_argv):
    # Two raw tiles in neighbouring UTM zones, labels in EPSG:4326 over both.
    make_geotiff(data_tree.raw, "a.tif", rows=32, cols=32, seed=1)
    to_43 = Transformer.from_crs("EPSG:32644", "EPSG:32643", always_xy=True)
    x, y = to_43.transform(500100.0, 2960000.0)
    make_geotiff(data_tree.raw, "b.tif", rows=32, cols=32, crs="EPSG:32643", transform=Affine(0.5, 0, x, 0, -0.5, y))
    argv = [*stage_argv, "--set", "chip_args.source=raw", "--set", "chip_args.size=32"]
    assert chip_main(argv) == 0
    to_wgs84 = {crs: Transformer.from_crs(crs, "EPSG:4326", always_xy=True) for crs in ("EPSG:32644", "EPSG:32643")}
    roof_a = shapely.box(
        *to_wgs84["EPSG:32644"].transform(500002.0, 2959990.0), *to_wgs84["EPSG:32644"].transform(500006.0, 2959994.0)
    )
    roof_b = shapely.box(
        *to_wgs84["EPSG:32643"].transform(x + 2, y - 10), *to_wgs84["EPSG:32643"].transform(x + 8, y - 6)
    )
    path = make_labels(data_tree.labels / "roofs.geojson", [roof_a, roof_b], crs="EPSG:4326")
    assert main(argv) == 0
    index = read_index(data_tree.chips_csv, needs=("roof_share",))
    assert list(index["crs"]) == ["EPSG:32644", "EPSG:32643"]
    labels = gpd.read_file(path)
    for name, crs in zip(index["file"], index["crs"], strict=True):
        mask, profile = read(data_tree.masks / name)
        assert profile["crs"] == crs
        expected = rasterize(
            [(g, 255) for g in labels.to_crs(crs).geometry], out_shape=mask.shape, transform=profile["transform"]
        )
        np.testing.assert_array_equal(mask, expected)
    # About 8 x 8 and 12 x 8 pixels (the box corners were converted, not the pixel edges).
    assert [int((read(data_tree.masks / f)[0] > 0).sum()) for f in index["file"]] == pytest.approx([64, 96], abs=8)


# --- rerun, resume, workers -----------------------------------------------------------------


def test_rerun_skips_and_a_label_edit_needs_overwrite(chips, make_labels, pixel_box, stage_argv, capsys):
    make_labels(chips.labels / "roofs.geojson", boxes(pixel_box, ROOFS))
    assert main(stage_argv) == 0
    before = snapshot(chips)
    capsys.readouterr()
    assert main(stage_argv) == 0  # same settings, same labels: nothing to do
    assert snapshot(chips) == before
    make_labels(chips.labels / "roofs.geojson", boxes(pixel_box, [INSIDE]))
    assert main(stage_argv) == 1
    err = capsys.readouterr().err  # (after the warning that the labels have no roof_type: every polygon a roof)
    assert err.splitlines()[-1] == (
        "error: masks/ were made from labels/roofs.geojson as it was before it changed: add --overwrite to redo "
        "them (python pipeline.py reruns outdated stages)"
    )
    assert snapshot(chips) == before
    assert main([*stage_argv, "--overwrite"]) == 0
    assert mask_counts(chips) == [30, 0, 0, 0, 0, 0]


def test_another_filter_is_refused_and_names_it(chips, make_labels, pixel_box, stage_argv, capsys):
    make_labels(chips.labels / "roofs.geojson", boxes(pixel_box, ROOFS))
    assert main(stage_argv) == 0
    capsys.readouterr()
    assert main([*stage_argv, "--set", 'mask_args.filter={"attribute": "roof_type", "values": ["tin"]}']) == 1
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith('error: masks/ were made with mask_args.filter.values ["metal"], now ["tin"]: add --overwrite')
    )


def test_killed_halfway_resumes(chips, make_labels, pixel_box, stage_argv):
    make_labels(chips.labels / "roofs.geojson", boxes(pixel_box, ROOFS))
    assert main(stage_argv) == 0
    clean = snapshot(chips)
    # Killed halfway: the record says running, chips.csv (written last) has no roof_share yet,
    # some masks are missing.
    interrupted(chips.root / "mask.record.json")
    index = read_index(chips.chips_csv)
    index.drop(columns="roof_share").to_csv(chips.chips_csv, index=False, float_format="%.10g")
    for name in ("chip_000002.tif", "chip_000005.tif"):
        (chips.masks / name).unlink()
    assert main(stage_argv) == 0
    assert snapshot(chips) == clean


def test_worker_count_gives_identical_files(tmp_path, make_geotiff, make_labels, pixel_box):
    # The whole chip + mask run, in two data trees: one worker, then two worker processes.
    outputs = []
    for workers in (1, 2):
        root = tmp_path / f"w{workers}"
        tree = DataTree.from_settings(load_settings(overrides=[f"data_root={root}"]))
        mosaic = make_geotiff(tree.mosaic_dir, "mosaic.tif", array=scene_array())
        chip_sources([mosaic], tree, ChipArgs(size=32), ParallelArgs(workers=workers))
        make_labels(tree.labels / "roofs.geojson", boxes(pixel_box, ROOFS))
        mask_chips(tree, MaskArgs(), ParallelArgs(workers=workers))
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        outputs.append(files)
    assert len([f for f in outputs[0] if f.startswith("masks/")]) == 6
    assert outputs[0] == outputs[1]


# --- bad input ------------------------------------------------------------------------------


def test_labels_outside_the_imagery(chips, make_labels, stage_argv, capsys):
    # A box at 10°E 10°N: far from the chips, as a label file with the wrong CRS would be.
    make_labels(chips.labels / "roofs.geojson", [shapely.box(10.0, 10.0, 10.001, 10.001)], crs="EPSG:4326")
    before = chips.chips_csv.read_bytes()
    assert main(stage_argv) == 1
    err = capsys.readouterr().err
    assert "EPSG:4326" in err and "EPSG:32644" in err
    assert err.count("bounds") == 2
    assert "roofs.geojson" in err
    assert chips.chips_csv.read_bytes() == before
    assert not chips.masks.exists()


def test_failed_overwrite_keeps_previous_masks(chips, make_labels, pixel_box, stage_argv):
    make_labels(chips.labels / "roofs.geojson", boxes(pixel_box, ROOFS))
    assert main(stage_argv) == 0
    before = snapshot(chips)
    make_labels(chips.labels / "roofs.geojson", [shapely.box(10.0, 10.0, 10.001, 10.001)], crs="EPSG:4326")
    assert main([*stage_argv, "--overwrite"]) == 1
    assert snapshot(chips) == before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty (0 bytes)"),
        (b'{"type": "FeatureCollection", "features": []}', "has no features"),
        (b"this is not GeoJSON {", "cannot be read"),
    ],
)
def test_empty_or_unreadable_label_file(content, message, chips, stage_argv, capsys):
    chips.labels.mkdir(parents=True)
    (chips.labels / "roofs.geojson").write_bytes(content)
    assert main(stage_argv) == 1
    err = capsys.readouterr().err
    assert message in err
    assert str(chips.labels / "roofs.geojson") in err
    assert not chips.masks.exists()
    assert "roof_share" not in read_index(chips.chips_csv).columns


def test_label_file_without_crs(chips, make_labels, pixel_box):
    path = make_labels(chips.labels / "roofs.shp", [pixel_box(*INSIDE)])
    path.with_suffix(".prj").unlink()
    with pytest.raises(LabelError, match="has no CRS"):
        mask_chips(chips, MaskArgs(), ONE_WORKER)


def test_several_label_files(chips, make_labels, pixel_box, stage_argv, capsys):
    make_labels(chips.labels / "a.geojson", [pixel_box(*INSIDE)])
    make_labels(chips.labels / "b.gpkg", [pixel_box(*ACROSS_EDGE)])
    assert main(stage_argv) == 1
    err = capsys.readouterr().err
    assert "several label files" in err and "a.geojson, b.gpkg" in err and "mask_args.label_file" in err
    assert main([*stage_argv, "--set", "mask_args.label_file=b.gpkg"]) == 0
    assert mask_counts(chips) == [12, 12, 0, 0, 0, 0]


def test_no_label_file(chips, stage_argv, capsys):
    assert main(stage_argv) == 1
    assert f"labels folder {chips.labels} not found" in capsys.readouterr().err
    chips.labels.mkdir()
    assert main(stage_argv) == 1
    assert f"no label file in {chips.labels}" in capsys.readouterr().err
    assert main([*stage_argv, "--set", "mask_args.label_file=nope.gpkg"]) == 1
    assert "nope.gpkg not found" in capsys.readouterr().err


def test_no_chip_index(data_tree, make_labels, pixel_box, stage_argv, capsys):
    make_labels(data_tree.labels / "roofs.geojson", [pixel_box(*INSIDE)])
    assert main(stage_argv) == 1
    err = capsys.readouterr().err
    assert "chips.csv not found" in err and "chip/chip.py" in err


def test_missing_chip_is_named(chips, make_labels, pixel_box, stage_argv, capsys):
    make_labels(chips.labels / "roofs.geojson", boxes(pixel_box, ROOFS))
    (chips.chips / "chip_000003.tif").unlink()
    assert main(stage_argv) == 1
    assert "chip_000003.tif does not exist" in capsys.readouterr().err
    assert "roof_share" not in read_index(chips.chips_csv).columns


def test_truncated_chip_is_named(chips, make_labels, pixel_box, stage_argv, capsys):
    make_labels(chips.labels / "roofs.geojson", boxes(pixel_box, ROOFS))
    chip = chips.chips / "chip_000003.tif"
    data = chip.read_bytes()
    chip.write_bytes(data[: len(data) // 2])  # the header survives, the pixels do not
    assert main(stage_argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: {chip} ")
    assert errors[0].endswith("it may be truncated or corrupt")
    assert "roof_share" not in read_index(chips.chips_csv).columns
