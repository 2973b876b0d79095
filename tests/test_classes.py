"""Roof material classes: the class map, masks with a class band, and its bad inputs.

The class map's settings errors (two classes claiming one value, too few classes, a name that
is taken, num_classes that disagrees); the labels' (an attribute the file lacks, values no
polygon has: listed with the values present); masks of hand-placed roofs with exact class ids,
unknown pixels where a value has no class; the mask stage writing the class band and its tag.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import write_labels
from rasterio.transform import from_origin

from core.errors import DataError, LabelError, SettingsError
from core.raster import UNKNOWN, check_mask, read_classes, read_truth, write_raster
from core.settings import MaskArgs, load_settings, validate_settings
from core.targets import make_targets
from core.vector import load_labels

#: A 32 x 32 px chip of 1 m pixels: pixel (row, col) covers x in [col, col + 1], y in [31 - row, 32 - row].
T32 = from_origin(0, 32, 1, 1)


def cells(r0: int, r1: int, c0: int, c1: int, side: int = 32):
    """The polygon covering rows r0..r1-1 and columns c0..c1-1 of a chip of ``side`` 1 m pixels."""
    import shapely

    return shapely.box(c0, side - r1, c1, side - r0)


CLASS_MAP = {"metal": ["tin", "metal"], "other_roof": ["concrete", "clay_tiles"]}


def _labels(tmp_path: Path, materials: list) -> Path:
    folder = tmp_path / "labels"
    folder.mkdir()
    polys = [cells(0, 4, 4 * i, 4 * i + 3) for i in range(len(materials))]
    write_labels(folder / "roofs.geojson", polys, crs="EPSG:32644", **{"roof:material": materials})
    return folder


def _args(classes=CLASS_MAP, attribute="roof:material", **more) -> MaskArgs:
    return MaskArgs.model_validate({"classes": classes, "class_attribute": attribute, **more})


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ({"metal": ["tin"], "other_roof": ["tin", "concrete"]},
         r"value 'tin' is claimed by two classes \(metal and other_roof\): one value, one class"),
        ({"metal": ["tin"]}, r"names 1 class\(es\): name 2 to 32"),
        ({"metal": ["tin"], "background": ["concrete"]}, r"class name 'background' must start with a letter"),
        ({"metal": ["tin"], "other": []}, r"class other names no value"),
    ],
)  # fmt: skip
def test_a_bad_class_map_is_one_line_naming_the_setting(classes, message):
    with pytest.raises(SettingsError, match=r"mask_args\.classes.*" + message):
        validate_settings({"mask_args": {"classes": classes}})


def test_num_classes_must_agree_with_the_class_map(settings_file: Path):
    with pytest.raises(SettingsError, match=r"model_args.num_classes is 3 but mask_args.classes names 2 class\(es\): "
                                            r"set num_classes null to take it from the class map"):  # fmt: skip
        load_settings(settings_file, [f"mask_args.classes={_json(CLASS_MAP)}", "model_args.num_classes=3"])
    with pytest.raises(SettingsError, match=r"num_classes is 2 but mask_args.classes names 1 class\(es\) \(it is null"):
        load_settings(settings_file, ["model_args.num_classes=2"])
    settings = load_settings(settings_file, [f"mask_args.classes={_json(CLASS_MAP)}", "model_args.num_classes=2"])
    assert settings.mask_args.class_names == ("metal", "other_roof")
    assert load_settings(settings_file, ["model_args.num_classes=null"]).mask_args.class_names == ()


def _json(value) -> str:
    import json

    return json.dumps(value)


# --- labels --------------------------------------------------------------------------------------


def test_the_class_map_gives_ids_in_its_order_and_unmapped_values_are_unknown(tmp_path: Path):
    folder = _labels(tmp_path, ["tin", "concrete", None, "metal", "plastic", "clay_tiles"])
    roofs, unknown, _ = load_labels(folder, _args())
    assert roofs["class_id"].tolist() == [1, 2, 1, 2]
    assert len(unknown) == 2  # no value, and a value no class names


@pytest.mark.parametrize(
    ("classes", "attribute", "message"),
    [
        ({"metal": ["tin", "aluminium"], "other_roof": ["concrete", "slate"]}, "roof:material",
         r"^mask_args.classes names values no polygon of roofs.geojson has in roof:material \(metal: \['aluminium'\]; "
         r"other_roof: \['slate'\]\); values present: \['concrete', 'tin'\]: fix the class map$"),
        (CLASS_MAP, "material",
         r"^mask_args.class_attribute 'material' is not an attribute of roofs.geojson \(it has roof:material\)"),
    ],
)  # fmt: skip
def test_a_class_map_naming_absent_values_lists_those_present(tmp_path: Path, classes, attribute, message):
    folder = _labels(tmp_path, ["tin", "concrete", None])
    with pytest.raises(LabelError, match=message):
        load_labels(folder, _args(classes, attribute))


def test_the_class_attribute_defaults_to_the_filters(tmp_path: Path):
    folder = _labels(tmp_path, ["tin", "concrete"])
    classes = {"metal": ["tin"], "other_roof": ["concrete"]}
    args = MaskArgs.model_validate({"classes": classes, "filter": {"attribute": "roof:material", "values": ["x"]}})
    roofs, _, _ = load_labels(folder, args)  # the filter's values are not used with a class map
    assert roofs["class_id"].tolist() == [1, 2]


# --- masks ---------------------------------------------------------------------------------------


def test_the_class_band_holds_each_roofs_id_unknown_and_nodata():
    a, b, c = cells(4, 12, 2, 10), cells(4, 12, 10, 18), cells(20, 24, 20, 28)
    valid = np.ones((32, 32), bool)
    valid[:, 30:] = False
    bands = make_targets([a, b], [c], (32, 32), T32, targets=("footprint", "boundary"),
                         widths=(1, 2), valid=valid, classes=[2, 1])  # fmt: skip
    assert bands.shape == (3, 32, 32)
    klass = bands[2]
    assert (klass == 2).sum() == 64 and (klass[4:12, 2:10] == 2).all()
    assert (klass == 1).sum() == 64 and (klass[4:12, 10:18] == 1).all()
    assert (klass == UNKNOWN).sum() == 32 and (bands[0] == UNKNOWN).sum() == 32
    assert (klass == 0).sum() == 32 * 32 - 160
    assert not bands[:, :, 30:].any()


def test_a_mask_with_a_class_band_is_checked_and_read(tmp_path: Path):
    data = np.zeros((2, 4, 4), np.uint8)
    data[0, :2] = 255
    data[1, :2, :2], data[1, :2, 2:] = 1, 2
    data[0, 3, 3] = data[1, 3, 3] = UNKNOWN
    path = write_raster(tmp_path / "m.tif", data, crs="EPSG:32644", transform=from_origin(0, 4, 1, 1),
                        descriptions=("footprint", "class"), tags={"ROOF_CLASSES": "metal,other_roof"})  # fmt: skip
    ids, names = read_classes(path)
    assert names == ("metal", "other_roof")
    assert ids.tolist() == data[1].tolist()
    roof, known, _ = read_truth(path)
    assert int(roof.sum()) == 8 and int((~known).sum()) == 1
    # Class ids are not 0/255: only a band named class may hold them.
    with pytest.raises(DataError, match=r"holds values \[0, 1, 2, 128\] in band 2, not only 0 and 255"):
        check_mask(data, "m.tif", ("footprint", "contact"))
    data[1, 0, 0] = 77
    with pytest.raises(DataError, match=r"in band 2, not only class ids 0..32 and 128 \(unknown\)"):
        check_mask(data, "m.tif", ("footprint", "class"))
    # A one-class mask reads as class 1.
    one = write_raster(tmp_path / "one.tif", data[:1], crs="EPSG:32644", transform=from_origin(0, 4, 1, 1))
    ids, names = read_classes(one)
    assert names == () and int((ids == 1).sum()) == 8 and int((ids == UNKNOWN).sum()) == 1


def test_the_mask_stage_writes_the_class_band_and_names_the_classes(scene, settings_file: Path, tmp_path: Path):
    import geopandas as gpd

    from chip.chip import main as chip_main
    from core.tree import DataTree
    from mask.mask import main as mask_main
    from mosaic.mosaic import main as mosaic_main

    argv = scene()
    tree = DataTree.from_settings(load_settings(settings_file, [f"data_root={tmp_path / 'data'}"]))
    labels = gpd.read_file(tree.labels / "roofs.geojson")
    labels.loc[labels.index[:2], "roof_type"] = None  # two roofs of unknown material
    labels.to_file(tree.labels / "roofs.geojson", driver="GeoJSON")
    for main in (mosaic_main, chip_main):
        assert main(argv) == 0
    classes = _json({"metal": ["metal"], "other_roof": ["concrete"]})
    assert mask_main([*argv, "--set", f"mask_args.classes={classes}"]) == 0
    seen = set()
    for path in sorted(tree.masks.glob("*.tif")):
        with rasterio.open(path) as src:
            assert src.descriptions == ("footprint", "boundary", "contact", "class")
            assert src.tags()["ROOF_CLASSES"] == "metal,other_roof"
            data = src.read()
        roof = data[0] == 255
        assert ((data[3] > 0) & (data[3] != UNKNOWN) == roof).all()  # a class wherever a roof is
        assert ((data[3] == UNKNOWN) == (data[0] == UNKNOWN)).all()
        seen |= set(np.unique(data[3]).tolist())
    assert seen == {0, 1, 2, UNKNOWN}
    # A class map naming a value the labels lack: one line, nothing written.
    before = sorted(p.read_bytes() for p in tree.masks.glob("*.tif"))
    bad = _json({"metal": ["metal"], "other_roof": ["slate"]})
    assert mask_main([*argv, "--overwrite", "--set", f"mask_args.classes={bad}"]) == 1
    assert sorted(p.read_bytes() for p in tree.masks.glob("*.tif")) == before
