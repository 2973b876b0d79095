"""One object per roof: seeded watershed separates touching roofs, block by block, whatever the raster size."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import shapely
from conftest import write_geotiff

from core.instances import default_seed_threshold, label_instances, raster_instances


def touching_roofs(rows: int = 40, cols: int = 60) -> np.ndarray:
    """Probabilities: two roofs of 10 x 12 px sharing an edge (0.6 along it), a faint roof (0.55)."""
    prob = np.full((rows, cols), 0.05, np.float32)
    prob[5:15, 5:17] = 0.95
    prob[5:15, 17:29] = 0.9
    prob[5:15, 16:18] = 0.6  # the valley where the two roofs touch
    prob[25:29, 40:44] = 0.55  # a faint roof: above the threshold, no seed
    return prob


def test_touching_roofs_are_two_objects_and_a_faint_roof_is_kept():
    labels, n = label_instances(touching_roofs(), 0.5, default_seed_threshold(0.5))
    assert n == 3
    assert (
        default_seed_threshold(0.5) == 0.75
        and default_seed_threshold(0.5, channels=True) == 0.875
        and default_seed_threshold(0.4, 0.9) == 0.9
    )
    left, right, faint = labels[10, 8], labels[10, 25], labels[27, 42]
    assert len({left, right, faint}) == 3 and 0 not in (left, right, faint)
    assert (labels > 0).sum() == ((touching_roofs() >= 0.5).sum())  # every roof pixel, none more
    assert (labels == left).sum() + (labels == right).sum() == 10 * 24
    assert (labels == faint).sum() == 16


def test_no_roof_is_no_object():
    labels, n = label_instances(np.zeros((8, 8), np.float32), 0.5, 0.75)
    assert n == 0 and not labels.any()


@pytest.mark.parametrize(("block", "margin"), [(4096, 0), (32, 16), (24, 20)])
def test_blocks_give_the_same_roofs_as_one_pass(tmp_path, block, margin):
    rng = np.random.default_rng(3)
    prob = np.full((130, 170), 0.05, np.float32)
    truth = []
    for r in range(4, 110, 19):
        for c in range(3, 160, 23):
            h, w = rng.integers(6, 15, 2)
            prob[r : r + h, c : c + w] = rng.uniform(0.8, 0.99)
            truth.append(int(h * w))
    path = write_geotiff(tmp_path / "p.tif", array=prob, nodata=None)
    found = raster_instances(path, 0.5, 0.75, block=block, margin=margin)
    assert sorted(round(g.area / 0.25) for g, _ in found) == sorted(truth)  # 0.5 m pixels
    assert all(0.8 <= p <= 0.99 for _, p in found)
    union = shapely.union_all([g for g, _ in found])
    assert round(union.area / 0.25) == sum(truth)  # no roof twice


def test_predict_writes_instances_matching_the_polygons(scene, tmp_path, capsys):
    import geopandas as gpd

    from chip.chip import main as chip_main
    from mask.mask import main as mask_main
    from mosaic.mosaic import main as mosaic_main
    from predict.predict import main as predict_main
    from split.split import main as split_main
    from train.train import main as train_main

    argv = scene()
    for main in (mosaic_main, chip_main, mask_main, split_main):
        assert main(argv) == 0
    model = ["--model", "regression"]
    assert train_main([*argv, *model]) == 0
    assert predict_main([*argv, *model, "--set", "predict_args.save_probabilities=false"]) == 0
    out = tmp_path / "predictions" / "contract" / "regression"
    roofs = gpd.read_file(out / "roofs.gpkg")
    assert list(roofs.columns) == ["id", "source", "mean_probability", "area_m2", "geometry"]
    assert roofs["id"].tolist() == list(range(1, len(roofs) + 1))
    assert not (out / "probabilities").exists() and not list((out / "masks").glob(".*"))
    first = roofs.iloc[0]
    with rasterio.open(out / "instances" / first["source"]) as src:
        ids = src.read(1)
        assert src.dtypes[0] == "uint32" and src.transform == rasterio.open(out / "masks" / first["source"]).transform
    assert round((ids == first["id"]).sum() * 0.25, 6) == pytest.approx(first["area_m2"], rel=0.01)
    grid = gpd.read_file(out / "grid.gpkg")
    assert grid["roofs"].sum() == len(roofs) and grid["roof_area_m2"].sum() == pytest.approx(roofs["area_m2"].sum())
    assert (out / "grid.csv").read_text().splitlines()[0] == "cell,row,col,roofs,roof_area_m2"


def test_roofs_per_grid_cell_count_centroids_and_sum_ground_areas():
    import geopandas as gpd

    from core.vector import roof_grid

    roofs = gpd.GeoDataFrame(
        {"area_m2": [4.0, 9.0, 16.0]},
        geometry=[
            shapely.box(500001, 2959981, 500003, 2959983),
            shapely.box(500004, 2959984, 500007, 2959987),
            shapely.box(500012, 2959981, 500016, 2959985),
        ],
        crs="EPSG:32644",
    )
    grid = roof_grid(roofs, [(500000, 2959980, 500020, 2960000)], 10.0)
    assert grid[["row", "col", "roofs", "roof_area_m2"]].values.tolist() == [
        [0, 0, 0, 0.0], [0, 1, 0, 0.0], [1, 0, 2, 13.0], [1, 1, 1, 16.0],
    ]  # fmt: skip
    assert grid.crs == roofs.crs and grid.geometry.iloc[0].area == pytest.approx(100.0)
    mercator = roof_grid(roofs.to_crs("EPSG:3857"), [tuple(roofs.to_crs("EPSG:3857").total_bounds)], 100.0)
    assert mercator["roofs"].sum() == 3 and mercator.to_crs("EPSG:32644").area.iloc[0] == pytest.approx(1e4, rel=0.01)


def test_a_grid_of_too_many_cells_is_refused_naming_a_size_that_fits():
    from core.errors import DataError
    from core.vector import MAX_GRID_CELLS, grid_layout

    district = [(500000, 2950000, 530000, 2960000)]  # 30 x 10 km
    with pytest.raises(DataError) as caught:
        grid_layout(district, "EPSG:32644", 0.1)  # meant as 0.1 km
    assert str(caught.value) == (
        "predict_args.grid_size 0.1 m makes 30,000,000,000 cells over the 300.0 km2 predicted, more than 1,000,000: "
        "it is in metres; set it to 18 or more"
    )
    _, corner, cols, cells = grid_layout(district, "EPSG:32644", 18)  # the size it names fits; one under does not
    assert len(cells) <= MAX_GRID_CELLS and corner == (500000, 2960000) and cols == 1667
    with pytest.raises(DataError):
        grid_layout(district, "EPSG:32644", 17)


def test_grid_cells_lie_over_the_rasters_only():
    import geopandas as gpd

    from core.vector import roof_grid

    # Two towns of 1 km 150 km apart: 200 cells of 100 m, not the 2.25 million of the box around both.
    towns = [(500000, 2959000, 501000, 2960000), (650000, 2959000, 651000, 2960000)]
    roofs = gpd.GeoDataFrame({"area_m2": [4.0, 9.0]}, geometry=[shapely.box(500001, 2959901, 500003, 2959903),
                             shapely.box(650950, 2959001, 650953, 2959004)], crs="EPSG:32644")  # fmt: skip
    grid = roof_grid(roofs, towns, 100.0)
    assert len(grid) == 200 and grid.crs == roofs.crs
    assert grid["cell"].is_monotonic_increasing and grid["cell"].is_unique
    assert grid[grid["roofs"] > 0][["row", "col", "roofs", "roof_area_m2"]].values.tolist() == [
        [0, 0, 1, 4.0], [9, 1509, 1, 9.0],
    ]  # fmt: skip
    assert grid.union_all().area == pytest.approx(2e6)


class _Fake:
    """A predictor whose probabilities are the first band scaled, or a fixed ramp when ``ramp``."""

    info = SimpleNamespace(targets=["footprint"], classes=[])  # a one-class bundle's

    def __init__(self, ramp: bool = False) -> None:
        self.ramp = ramp

    def prepare(self, chips):
        return chips.astype(np.float32)

    def forward(self, prepared):
        if self.ramp:  # ignores the image: not equivariant at all
            n, _, h, w = prepared.shape
            return np.broadcast_to(np.linspace(0, 1, w, dtype=np.float32), (n, h, w)).copy()
        return prepared[:, 0] / 100.0


def test_tta_averages_the_eight_views_turned_back():
    from predict.predict import tta_forward

    chips = np.random.default_rng(0).uniform(0, 100, (2, 3, 16, 16)).astype(np.float32)
    # A per-pixel model sees the same pixel in every view: TTA changes nothing.
    np.testing.assert_allclose(tta_forward(_Fake(), chips)[:, 0], chips[:, 0] / 100.0, rtol=1e-6)
    # A model that ignores the image gives the average of its output over the 8 views: symmetric.
    out = tta_forward(_Fake(ramp=True), chips)[:, 0]
    np.testing.assert_allclose(out, np.rot90(out, 1, axes=(1, 2)), atol=1e-6)
    np.testing.assert_allclose(out, out[..., ::-1], atol=1e-6)
    assert out.mean() == pytest.approx(0.5)


def test_an_object_is_split_where_its_class_changes_and_a_speck_takes_its_neighbours_class():
    """One watershed object: a metal half (class 0), a concrete half (class 1) and a 2 x 2 speck of class 1
    inside the metal half. Split at every change: three parts. From 5 pixels: the speck joins the metal half
    around it (the nearest large part), although most of the object is concrete."""
    from core.instances import split_by_class

    labels = np.zeros((12, 24), np.int32)
    labels[1:11, 1:23] = 1
    kinds = np.zeros(labels.shape, np.int16)
    kinds[1:11, 11:23] = 1  # 120 px of class 1, 100 px of class 0 (4 of them the speck's)
    kinds[4:6, 4:6] = 1
    split, n = split_by_class(labels, kinds)
    assert n == 3 and sorted(np.bincount(split.ravel())[1:].tolist()) == [4, 96, 120]
    split, n = split_by_class(labels, kinds, min_part=5)
    assert n == 2 and split[1, 1] == 1 and split[1, 20] == 2  # numbered in raster order
    assert (split == 1).sum() == 100 and (split == 2).sum() == 120 and split[4, 4] == 1
    # Two touching roofs: a speck at the edge of roof 2 joins the nearest large part of roof 2, not roof 1's.
    two = np.zeros((12, 40), np.int32)
    two[1:11, 0:10], two[1:11, 10:40] = 1, 2
    kinds = np.zeros(two.shape, np.int16)
    kinds[1:11, 10:22] = 1  # roof 2: 120 px of class 1 beside roof 1, then 180 of class 0
    kinds[4:6, 10:12] = 0  # a class-0 speck in it, touching roof 1 (all class 0)
    split, n = split_by_class(two, kinds, min_part=5)
    assert n == 3 and np.bincount(split.ravel())[1:].tolist() == [100, 120, 180] and split[4, 10] == split[1, 15]
    # An object with no large part: each speck takes the class most of the object's pixels have.
    small = np.zeros((4, 6), np.int32)
    small[1:3, 1:5] = 7
    mixed = np.zeros(small.shape, np.int16)
    mixed[1:3, 4] = 1  # 2 px of class 1 beside 6 px of class 0
    split, n = split_by_class(small, mixed, min_part=10)
    assert n == 1 and (split == 1).sum() == 8
    assert split_by_class(np.zeros((3, 3), np.int32), np.zeros((3, 3), np.int16))[1] == 0


def test_raster_instances_split_by_the_class_bands_and_keep_small_parts_whole(tmp_path):
    """A probability raster with one class band pair after the footprint: two touching roofs, one metal and
    one concrete, with no valley between them, are one object unsplit and two split; a 1 m2 speck of the
    other class (4 px of 0.5 m) stays part of its roof (MIN_PART_M2 is 8 m2)."""
    from core.instances import MIN_PART_M2

    bands = np.zeros((3, 30, 40), np.float32)
    bands[0] = 0.05
    bands[0, 5:15, 5:29] = 0.95  # one flat blob: the watershed has one seed region
    bands[1] = 0.9  # P(metal | roof) ...
    bands[1, 5:15, 17:29] = 0.2  # ... low on the right half: concrete
    bands[1, 8:10, 8:10] = 0.1  # a speck of 'concrete' inside the metal half
    bands[2] = 1.0 - bands[1]
    path = write_geotiff(tmp_path / "p.tif", array=bands, nodata=None)
    whole = raster_instances(path, 0.5, 0.75)
    assert [round(g.area / 0.25) for g, _ in whole] == [240]
    split = raster_instances(path, 0.5, 0.75, split_classes=2)
    assert sorted(round(g.area / 0.25) for g, _ in split) == [120, 120] and MIN_PART_M2 > 1.0
    assert all(g.is_valid and not g.interiors for g, _ in split)  # the speck is no hole in the metal roof


def test_tta_uses_the_threshold_tuned_on_averaged_probabilities_unless_one_is_set():
    from core.bundle import BundleInfo, Normalization
    from core.settings import PredictArgs
    from predict.predict import decision_threshold

    norm = Normalization("percentile", (0.0,) * 3, (1.0,) * 3, (0.0,) * 3, (1.0,) * 3, None)
    info = BundleInfo(kind="unet", bands=3, dtype="uint8", normalization=norm, threshold=0.05, threshold_tta=0.38)
    args = PredictArgs()
    assert decision_threshold(info, args) == 0.05
    assert decision_threshold(info, args.model_copy(update={"tta": True})) == 0.38
    assert decision_threshold(info, args.model_copy(update={"tta": True, "threshold": 0.5})) == 0.5
    older = BundleInfo(kind="forest", bands=3, dtype="uint8", normalization=norm, threshold=0.6)  # no TTA threshold
    assert decision_threshold(older, args.model_copy(update={"tta": True})) == 0.6
