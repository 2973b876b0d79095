"""Shared fixtures: tiny GeoTIFFs and settings files built at test time.

Rasters are written with plain rasterio, not ``core.raster``, so that the tests of
``core.raster`` do not depend on the code they test.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from rasterio.transform import Affine

from core import cli
from core.settings import load_settings
from core.tree import DataTree

# A test run started in the background of a non-interactive shell (`make test &`) inherits Ctrl-C ignored, and so
# would every stage the tests start (an ignored signal stays ignored across exec): the tests of Ctrl-C need it
# delivered, as a terminal delivers it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

#: Default georeference of test rasters: UTM 44N near Gorakhpur, 0.5 m pixels.
TEST_CRS = "EPSG:32644"
TEST_TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 2960000.0)

#: The original pipeline's settings.json; it must validate unchanged.
ORIGINAL_SETTINGS: dict[str, Any] = {
    "path_args": {
        "train_frames": "train_frames",
        "train_masks": "train_masks",
        "val_frames": "val_frames",
        "val_masks": "val_masks",
    },
    "checkpoint_args": {"checkpoint_path": "results_4.h5"},
    "extension_args": {"extension": ".tif"},
    "load_dataset_args": {
        "custom": 1,
        "batch_size": 4,
        "target_size": [640, 640],
        "rescale": 255,
        "shear_range": 0.2,
        "zoom_range": 0.2,
        "horizontal_flip": True,
        "class_mode": "input",
        "mask_color": "grayscale",
        "channels": 3,
        "data_format": "channels_last",
    },
    "model_args": {
        "input_shape": [640, 640, 3],
        "num_classes": 1,
        "num_layers": 4,
        "filters": 64,
        "upconv_filters": 96,
        "kernel_size": [3, 3],
        "activation": "relu",
        "strides": [1, 1],
        "padding": "same",
        "kernel_initializer": "he_normal",
        "bachnorm_momentum": 0.01,
        "pool_size": [2, 2],
        "pool_strides": [2, 2],
        "pool_padding": "valid",
    },
    "training_args": {
        "epochs": 50,
        "pretrained": False,
        "results_folder": "results",
        "steps_per_epoch": 723,
        "validation_steps": 241,
        "verbose": 1,
    },
    "output_args": {"kernel_size": [1, 1], "strides": [1, 1], "activation": "sigmoid", "padding": "valid"},
}

REPO_SETTINGS = Path(__file__).resolve().parent.parent / "settings.json"


def _random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f":
        return rng.uniform(-100.0, 3000.0, size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def write_geotiff(
    path: Path,
    *,
    array: np.ndarray | None = None,
    bands: int = 3,
    rows: int = 64,
    cols: int = 48,
    dtype: str = "uint16",
    crs: str | None = TEST_CRS,
    transform: Affine | None = None,
    nodata: float | None = 0,
    seed: int = 0,
) -> Path:
    """Write a GeoTIFF with plain rasterio; ``array`` (bands, rows, cols) or (rows, cols) wins over the sizes."""
    if array is None:
        array = _random_array(np.random.default_rng(seed), (bands, rows, cols), np.dtype(dtype))
    elif array.ndim == 2:
        array = array[np.newaxis]
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff",
        "count": array.shape[0],
        "height": array.shape[1],
        "width": array.shape[2],
        "dtype": array.dtype.name,
        "crs": crs,
        "transform": TEST_TRANSFORM if transform is None else transform,
        "nodata": nodata,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
    return path


@pytest.fixture
def make_geotiff() -> Callable[..., Path]:
    """``make_geotiff(tmp_path, name="img.tif", *, array=None, bands=3, rows=64, cols=48, ...) -> Path``.

    Random values (seeded) unless ``array`` is given; projected CRS and a non-identity
    transform by default.
    """

    def make(folder: Path, name: str = "img.tif", **kwargs: Any) -> Path:
        return write_geotiff(Path(folder) / name, **kwargs)

    return make


#: OGR driver of each label file suffix.
LABEL_DRIVERS = {".geojson": "GeoJSON", ".json": "GeoJSON", ".shp": "ESRI Shapefile", ".gpkg": "GPKG"}


def write_labels(path: Path, geoms: list[Any], crs: str | None = TEST_CRS, **attrs: list[Any]) -> Path:
    """Write polygons (and attribute columns, one value per polygon) as GeoJSON, Shapefile or GeoPackage."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gdf = gpd.GeoDataFrame(dict(attrs), geometry=list(geoms), crs=crs)
    gdf.to_file(path, driver=LABEL_DRIVERS[path.suffix.lower()], engine="pyogrio")
    return path


def cells(r0: int, r1: int, c0: int, c1: int, side: int = 32) -> shapely.Polygon:
    """The polygon covering rows r0..r1-1 and columns c0..c1-1 of a chip of ``side`` 1 m pixels whose
    transform is ``from_origin(0, side, 1, 1)``."""
    return shapely.box(c0, side - r1, c1, side - r0)


def material_labels(tmp_path: Path, materials: list) -> Path:
    """labels/roofs.geojson (EPSG:32644): one 4 x 3 px roof per value of ``materials`` in roof:material
    (None: untagged), side by side along the top of a 32 px chip; returns the folder."""
    folder = tmp_path / "labels"
    folder.mkdir()
    polys = [cells(0, 4, 4 * i, 4 * i + 3) for i in range(len(materials))]
    write_labels(folder / "roofs.geojson", polys, crs="EPSG:32644", **{"roof:material": materials})
    return folder


def pixel_box(
    col0: float, row0: float, col1: float, row1: float, transform: Affine = TEST_TRANSFORM
) -> shapely.Polygon:
    """The rectangle from pixel corner (col0, row0) to (col1, row1) in map coordinates.

    With whole-pixel corners every pixel centre lies 0.5 px from its edges, so rasterizing it
    (centre rule) burns exactly (col1 - col0) * (row1 - row0) pixels.
    """
    x0, y0 = transform @ (col0, row0)
    x1, y1 = transform @ (col1, row1)
    return shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


@pytest.fixture
def make_labels() -> Callable[..., Path]:
    """``make_labels(path, geoms, crs="EPSG:32644", **attrs) -> Path``: a label file, driver from the suffix."""
    return write_labels


@pytest.fixture(name="pixel_box")
def pixel_box_fixture() -> Callable[..., shapely.Polygon]:
    """``pixel_box(col0, row0, col1, row1, transform=TEST_TRANSFORM)``: a pixel-aligned rectangle."""
    return pixel_box


@pytest.fixture
def original_settings() -> dict[str, Any]:
    """A fresh copy of the original pipeline's settings, to edit in a test."""
    return json.loads(json.dumps(ORIGINAL_SETTINGS))


@pytest.fixture
def write_settings(tmp_path: Path) -> Callable[..., Path]:
    """``write_settings(data, name="settings.json") -> Path``: dump raw settings into tmp_path."""

    def write(data: Any, name: str = "settings.json") -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(data, indent=2), encoding="utf-8")
        return path

    return write


@pytest.fixture
def settings_file(tmp_path: Path) -> Path:
    """A copy of the repository's settings.json whose data_root is ``tmp_path / "data"``."""
    data = json.loads(REPO_SETTINGS.read_text(encoding="utf-8"))
    data["data_root"] = str(tmp_path / "data")
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


@pytest.fixture
def data_tree(settings_file: Path) -> DataTree:
    """The DataTree of ``settings_file``: its data_root is ``tmp_path / "data"``."""
    return DataTree.from_settings(load_settings(settings_file))


@pytest.fixture
def stage_argv(settings_file: Path, tmp_path: Path) -> list[str]:
    """Arguments every stage's ``main`` gets in tests: the test settings, data_root in tmp_path, one worker."""
    return [
        "--settings",
        str(settings_file),
        "--set",
        f"data_root={tmp_path / 'data'}",
        "--set",
        "parallel.workers=1",
        "--quiet",
    ]


def interrupted(record: Path) -> None:
    """Make a stage's record look like a run killed halfway: what a kill -9 leaves is "running"."""
    data = json.loads(record.read_text(encoding="utf-8"))
    data["state"] = "running"
    data.pop("finished", None)
    record.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture(autouse=True)
def _legacy_keys_unexplained(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test is a new process for the once-per-process legacy-key message."""
    import core.settings

    monkeypatch.setattr(core.settings, "_explained", set())


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo what ``cli.run`` does to global logging, so one test's handlers never reach the next."""
    root = logging.getLogger()
    handlers, quiet = root.handlers[:], cli._quiet
    levels = {
        lg: lg.level for lg in [root, *logging.Logger.manager.loggerDict.values()] if isinstance(lg, logging.Logger)
    }
    yield
    root.handlers[:] = handlers
    for logger, level in levels.items():
        logger.setLevel(level)
    cli._quiet = quiet


# --- a small scene every stage runs on in seconds ----------------------------------------------

SCENE_SIDE = 256  # the scene fixture is SCENE_SIDE x SCENE_SIDE px, 3 bands
#: A small scene and a fast model: a whole chip..evaluate run takes seconds.
SCENE = [
    "chip_args.size=64",
    "split_args.block=1",
    "load_dataset_args.channels=3",
    "model_args.input_shape=[64,64,3]",
    "ml_args.texture_windows=[]",
    "ml_args.max_train_pixels=3000",
    "parallel.workers=1",
    "experiment=contract",
]


def roof_rects(n: int = 24) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(5)
    rects = []
    for _ in range(n):
        r, c = rng.integers(2, SCENE_SIDE - 20, 2)
        h, w = rng.integers(8, 16, 2)
        rects.append((int(c), int(r), int(c + w), int(r + h)))
    return rects


@pytest.fixture
def scene(tmp_path: Path, settings_file: Path) -> Callable[..., list[str]]:
    """raw/tile.tif (bright striped roofs on dark ground) and labels/roofs.geojson (metal and concrete);
    returns ``argv(*sets)``: the common arguments of every stage."""
    rng = np.random.default_rng(0)
    image = rng.normal(400, 60, (3, SCENE_SIDE, SCENE_SIDE))
    rects = roof_rects()
    for col0, row0, col1, row1 in rects:
        image[:, row0:row1, col0:col1] = 1400 + 100 * (np.arange(col1 - col0) % 2)
    write_geotiff(tmp_path / "data" / "raw" / "tile.tif", array=np.clip(image, 1, 4000).astype(np.uint16), nodata=0)
    kinds = ["metal" if i % 3 else "concrete" for i in range(len(rects))]
    write_labels(tmp_path / "data" / "labels" / "roofs.geojson", [pixel_box(*r) for r in rects], roof_type=kinds)

    def argv(*sets: str) -> list[str]:
        out = ["--settings", str(settings_file), "--quiet"]
        for item in (
            f"data_root={tmp_path / 'data'}",
            f"training_args.results_folder={tmp_path / 'results'}",
            f"predict_args.output={tmp_path / 'predictions'}",
            *SCENE,
            *sets,
        ):
            out += ["--set", item]
        return out

    return argv
