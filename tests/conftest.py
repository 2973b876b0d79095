"""Shared fixtures: tiny GeoTIFFs and settings files built at test time.

Rasters are written with plain rasterio, not ``core.raster``, so that the tests of
``core.raster`` do not depend on the code they test.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from core import cli

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
