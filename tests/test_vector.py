"""core.vector: find, read, filter, repair and index label polygons."""

from __future__ import annotations

import logging

import geopandas as gpd
import pytest
import shapely

from core.errors import LabelError
from core.vector import LabelIndex, filter_labels, find_label_file, read_labels, repair_geometries


def gdf(geoms, crs="EPSG:32644", **attrs) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(dict(attrs), geometry=list(geoms), crs=crs)


# --- find -----------------------------------------------------------------------------------


def test_find_the_only_label_file(tmp_path, make_labels):
    path = make_labels(tmp_path / "roofs.shp", [shapely.box(0, 0, 1, 1)])
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.geojson").write_text("{}")
    assert find_label_file(tmp_path) == path  # .shx, .dbf, .prj, .cpg beside it are not label files


def test_find_by_name(tmp_path, make_labels):
    a = make_labels(tmp_path / "a.geojson", [shapely.box(0, 0, 1, 1)])
    b = make_labels(tmp_path / "b.gpkg", [shapely.box(0, 0, 1, 1)])
    assert find_label_file(tmp_path, "b.gpkg") == b
    assert find_label_file(tmp_path / "elsewhere", str(a)) == a  # absolute names are taken as they are
    with pytest.raises(LabelError, match=r"c\.shp not found: check mask_args.label_file"):
        find_label_file(tmp_path, "c.shp")


def test_find_errors(tmp_path, make_labels):
    with pytest.raises(LabelError, match=r"labels folder .* not found"):
        find_label_file(tmp_path / "labels")
    (tmp_path / "labels").mkdir()
    with pytest.raises(LabelError, match="no label file in"):
        find_label_file(tmp_path / "labels")
    make_labels(tmp_path / "labels" / "a.geojson", [shapely.box(0, 0, 1, 1)])
    make_labels(tmp_path / "labels" / "b.json", [shapely.box(0, 0, 1, 1)])
    with pytest.raises(LabelError, match=r"several label files .*\(a\.geojson, b\.json\): set mask_args.label_file"):
        find_label_file(tmp_path / "labels")


# --- read -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".geojson", ".json", ".shp", ".gpkg"])
@pytest.mark.parametrize("crs", ["EPSG:32644", "EPSG:4326"])
def test_read_every_format(suffix, crs, tmp_path, make_labels):
    geoms = [shapely.box(0, 0, 1, 1), shapely.box(2, 2, 3, 4)]
    path = make_labels(tmp_path / f"roofs{suffix}", geoms, crs=crs, roof_type=["metal", "brick"])
    labels = read_labels(path)
    assert labels.crs == crs
    assert list(labels["roof_type"]) == ["metal", "brick"]
    assert [g.equals(e) for g, e in zip(labels.geometry, geoms, strict=True)] == [True, True]


def test_read_errors(tmp_path, make_labels):
    with pytest.raises(LabelError, match="not found"):
        read_labels(tmp_path / "none.geojson")
    (tmp_path / "zero.geojson").write_bytes(b"")
    with pytest.raises(LabelError, match=r"zero\.geojson is empty \(0 bytes\)"):
        read_labels(tmp_path / "zero.geojson")
    (tmp_path / "none.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(LabelError, match=r"none\.geojson has no features"):
        read_labels(tmp_path / "none.geojson")
    (tmp_path / "junk.gpkg").write_bytes(b"\x00" * 100)
    with pytest.raises(LabelError, match=r"junk\.gpkg cannot be read"):
        read_labels(tmp_path / "junk.gpkg")
    path = make_labels(tmp_path / "nocrs.shp", [shapely.box(0, 0, 1, 1)])
    path.with_suffix(".prj").unlink()
    with pytest.raises(LabelError, match=r"nocrs\.shp has no CRS"):
        read_labels(path)


# --- filter ---------------------------------------------------------------------------------


def test_filter():
    labels = gdf([shapely.box(i, 0, i + 1, 1) for i in range(4)], roof_type=["metal", "brick", "metal", None])
    kept = filter_labels(labels, "roof_type", ["metal"])
    assert list(kept.index) == [0, 2]
    assert list(filter_labels(labels, "roof_type", ["metal", "brick"]).index) == [0, 1, 2]
    with pytest.raises(LabelError, match=r"values present: \['brick', 'metal'\]: set mask_args.filter.values"):
        filter_labels(labels, "roof_type", ["tin"], source="roofs.gpkg")


def test_filter_compares_as_text():
    labels = gdf([shapely.box(0, 0, 1, 1), shapely.box(1, 0, 2, 1)], cls=[1, 2])
    assert list(filter_labels(labels, "cls", ["2"]).index) == [1]


def test_filter_without_the_attribute_keeps_all(caplog):
    labels = gdf([shapely.box(0, 0, 1, 1)], kind=["x"])
    with caplog.at_level(logging.WARNING):
        assert filter_labels(labels, "roof_type", ["metal"], source="roofs.gpkg") is labels
    assert caplog.messages == [
        "roofs.gpkg has no attribute 'roof_type' (it has kind): every polygon is a roof (mask_args.filter null says "
        "so without this warning)"
    ]


def test_a_filter_attribute_one_typo_away_from_the_labels_is_refused():
    labels = gdf([shapely.box(0, 0, 1, 1)], roof_type=["metal"])
    with pytest.raises(LabelError) as err:
        filter_labels(labels, "roof_typ", ["metal"], source="roofs.geojson")
    assert str(err.value) == (
        "roofs.geojson has no attribute 'roof_typ'; did you mean 'roof_type'? Set mask_args.filter.attribute to it "
        "(or mask_args.filter null to make every polygon a roof)"
    )


# --- repair ---------------------------------------------------------------------------------


def test_valid_polygons_are_kept_as_they_are(caplog):
    multi = shapely.MultiPolygon([shapely.box(0, 0, 1, 1), shapely.box(2, 2, 3, 3)])
    holed = shapely.Polygon(shapely.box(0, 0, 4, 4).exterior.coords, holes=[shapely.box(1, 1, 2, 2).exterior.coords])
    labels = gdf([multi, holed], roof_type=["metal", "metal"])
    with caplog.at_level(logging.WARNING):
        out = repair_geometries(labels)
    assert caplog.records == []
    assert out.geometry.iloc[0].equals(multi) and out.geometry.iloc[1].equals(holed)
    assert out.crs == labels.crs
    assert list(out["roof_type"]) == ["metal", "metal"]


def test_repair_counts_in_a_warning(caplog):
    bowtie = shapely.Polygon([(0, 0), (2, 2), (2, 0), (0, 2)])
    spike = shapely.Polygon([(0, 0), (2, 0), (2, 2), (1, 2), (1, 3), (1, 2), (0, 2)])  # a zero-width spike
    line = shapely.LineString([(0, 0), (1, 1)])
    labels = gdf([bowtie, shapely.box(5, 5, 6, 6), spike, line, shapely.Polygon(), None], n=list(range(6)))
    with caplog.at_level(logging.WARNING):
        out = repair_geometries(labels, source="roofs.gpkg")
    assert [r.getMessage() for r in caplog.records] == [
        "roofs.gpkg: repaired 2 invalid geometries, dropped 3 empty or non-polygon ones"
    ]
    assert list(out["n"]) == [0, 1, 2]
    assert out.geometry.is_valid.all()
    assert out.geometry.iloc[0].geom_type == "MultiPolygon"
    assert out.geometry.iloc[0].area == pytest.approx(2.0)  # two triangles of 1
    assert out.geometry.iloc[2].area == pytest.approx(4.0)  # the spike is gone, the square stays
    assert out.geometry.iloc[2].geom_type == "Polygon"
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # only what happened is said (it said "repaired 0 invalid geometries")
        repair_geometries(gdf([shapely.box(5, 5, 6, 6), line], n=[0, 1]), source="roofs.gpkg")
    assert [r.getMessage() for r in caplog.records] == ["roofs.gpkg: dropped 1 empty or non-polygon ones"]


def test_repair_keeps_polygon_parts_of_collections():
    mixed = shapely.GeometryCollection([shapely.box(0, 0, 1, 1), shapely.LineString([(3, 3), (4, 4)])])
    out = repair_geometries(gdf([mixed]))
    assert out.geometry.iloc[0].equals(shapely.box(0, 0, 1, 1))


# --- index ----------------------------------------------------------------------------------


def test_label_index():
    geoms = [shapely.box(10, 10, 11, 11), shapely.box(0, 0, 1, 1), shapely.box(5, 5, 7, 7), shapely.box(0.5, 0, 2, 1)]
    index = LabelIndex(geoms)
    assert len(index) == 4
    assert index.bounds == (0.0, 0.0, 11.0, 11.0)
    assert [g.bounds for g in index.query((0, 0, 1.5, 1.5))] == [geoms[1].bounds, geoms[3].bounds]  # input order
    assert index.query((6, 6, 20, 20)) == [geoms[0], geoms[2]]
    assert index.query((20, 20, 30, 30)) == []
    assert index.query((1, 1, 2, 2)) == [geoms[1], geoms[3]]  # touching counts as intersecting
