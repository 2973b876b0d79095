"""GeoTIFF reading and writing, windows, padding and streaming band statistics.

Every raster the pipeline writes goes through :func:`create_raster`: a temporary file in the
destination folder, renamed over the destination only when writing finished, so a crash
never leaves a half-written output that a rerun would take for finished. Outputs are tiled
and compressed GeoTIFFs that keep CRS, transform, nodata and dtype.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from core.errors import DataError, RasterError
from core.files import atomic_path

# GDAL's block cache defaults to 5% of RAM; the stages read each block about once, so a
# large cache only grows memory (1 GB when chipping a large mosaic). A user's own setting wins.
os.environ.setdefault("GDAL_CACHEMAX", "128")

#: Compression codecs offered in settings. ZSTD level 1 with a predictor writes about
#: 2.4x faster than DEFLATE at its default level and gives smaller files on 11-bit imagery.
COMPRESSIONS = ("zstd", "deflate", "lzw", "none")

#: Percentiles reported by :func:`band_statistics` unless others are asked for.
DEFAULT_PERCENTILES = (1.0, 2.0, 50.0, 98.0, 99.0)

_TILE = 256


def gtiff_profile(
    *,
    width: int,
    height: int,
    count: int,
    dtype: str | np.dtype,
    crs: Any,
    transform: Any,
    nodata: float | None = None,
    compression: str = "zstd",
    threads: bool = False,
) -> dict[str, Any]:
    """Creation options for a tiled, compressed GeoTIFF (BigTIFF when it would not fit).

    ``threads`` compresses on every core: worth it for large outputs, not for small chips.
    """
    if compression not in COMPRESSIONS:
        raise RasterError(f"unknown compression {compression!r}: choose one of {', '.join(COMPRESSIONS)}")
    dtype = np.dtype(dtype)
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": int(width),
        "height": int(height),
        "count": int(count),
        "dtype": dtype.name,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": _TILE,
        "blockysize": _TILE,
        "BIGTIFF": "IF_SAFER",
    }
    if compression != "none":
        profile["compress"] = compression
        # Horizontal differencing: 2 for integers, 3 (floating point) for floats.
        profile["predictor"] = 3 if dtype.kind == "f" else 2
        if compression == "zstd":
            profile["zstd_level"] = 1
        if threads:
            profile["num_threads"] = "all_cpus"
    return profile


@contextlib.contextmanager
def create_raster(path: str | os.PathLike[str], profile: dict[str, Any]) -> Iterator[rasterio.io.DatasetWriter]:
    """Open a raster for writing that appears at ``path`` only once it is complete.

    Yields an open rasterio dataset; write to it by windows for rasters larger than memory.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            dst = rasterio.open(tmp, "w", **profile)
        except (RasterioIOError, rasterio.errors.RasterioError) as exc:
            raise RasterError(f"cannot create {path}: {exc}") from exc
        with dst:
            yield dst


def write_raster(
    path: str | os.PathLike[str],
    array: np.ndarray,
    *,
    crs: Any,
    transform: Any,
    nodata: float | None = None,
    compression: str = "zstd",
    descriptions: Sequence[str] | None = None,
    tags: dict[str, str] | None = None,
) -> Path:
    """Write a (bands, rows, cols) or (rows, cols) array as a GeoTIFF, atomically (band names and dataset
    tags optional)."""
    data = array[np.newaxis] if array.ndim == 2 else array
    if data.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D array, got shape {array.shape}")
    profile = gtiff_profile(
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
        compression=compression,
    )
    with create_raster(path, profile) as dst:
        dst.write(data)
        for band, name in enumerate(descriptions or (), start=1):
            dst.set_band_description(band, name)
        if tags:
            dst.update_tags(**tags)
    return Path(path)


def open_raster(path: str | os.PathLike[str], *, threads: bool = False) -> rasterio.io.DatasetReader:
    """Open a raster for reading; an unreadable file raises :class:`RasterError` naming it.

    Use as a context manager: ``with open_raster(p) as src: ...``. ``threads`` lets GDAL
    decompress blocks on every core (worth it for large reads, not for one small chip).
    """
    path = Path(path)
    if not path.exists():
        raise RasterError(f"{path} does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise RasterError(f"{path} is empty (0 bytes): delete it and rerun the stage or download that made it")
    try:
        with warnings.catch_warnings():  # (a raster without georeferencing: the stages that need it say so in one line)
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            return rasterio.open(path, **({"NUM_THREADS": "ALL_CPUS"} if threads else {}))
    except rasterio.errors.RasterioError as exc:
        raise RasterError(f"{path} is not a readable raster ({exc}): it may be truncated or corrupt") from exc


def require_georeference(src: rasterio.io.DatasetReaderBase) -> None:
    """A raster the pipeline places on the map must have a CRS and a geotransform; say how to give them."""
    fix = "set them with gdal_edit.py -a_srs EPSG:XXXX -a_ullr ... FILE (or rio edit-info --crs --transform)"
    if src.transform == rasterio.Affine.identity() and not src.gcps[0]:
        raise RasterError(f"{src.name} has no georeferencing (no geotransform): it cannot be placed on the map; {fix}")
    if src.crs is None:
        raise RasterError(f"{src.name} has no CRS: its coordinates cannot be matched with the labels; {fix}")


def kind_of(src: rasterio.io.DatasetReaderBase) -> tuple[int, str]:
    """A raster's band count and dtype: what every raster of one run must share."""
    return src.count, np.dtype(src.dtypes[0]).name


def require_kind(src: rasterio.io.DatasetReaderBase, kind: tuple[int, str], reference: Path, fix: str) -> None:
    """Refuse a raster whose band count or dtype differs from ``kind`` (that of ``reference``)."""
    if kind_of(src) != kind:
        count, dtype = kind_of(src)
        raise DataError(
            f"{Path(src.name).name} has {count} bands of {dtype}, {Path(reference).name} {kind[0]} bands of "
            f"{kind[1]}: {fix}"
        )


def common_kind(paths: Sequence[str | os.PathLike[str]], fix: str) -> tuple[int, str]:
    """The band count and dtype every raster in ``paths`` shares (the first that differs is an error)."""
    kind: tuple[int, str] | None = None
    for path in paths:
        with open_raster(path) as src:
            kind = kind or kind_of(src)
            require_kind(src, kind, Path(paths[0]), fix)
    if kind is None:
        raise ValueError("common_kind needs at least one raster")
    return kind


#: Mask values on disk: 0 background, 255 roof (DESIGN contract 2), 128 unknown in the footprint
#: (core/targets.py); further bands (boundary, contact) 0/255; the class band (a class map's masks,
#: named "class", last) 0 background, 1..32 class ids, 128 unknown. One rule for every reader.
MASK_VALUES = frozenset((0, 255))
FOOTPRINT_VALUES = frozenset((0, 128, 255))
UNKNOWN = 128
#: The name of the class band and the tag holding the class names (ids 1, 2 ... in order).
CLASS_BAND, CLASSES_TAG = "class", "ROOF_CLASSES"
#: The band name of the roof masks predict writes (0 no roof, 255 roof: no nodata value, 0 is an answer).
ROOF_BAND = "roof"
CLASS_VALUES = frozenset((*range(33), UNKNOWN))


def class_colormap(classes: int) -> dict[int, tuple[int, int, int, int]]:
    """The colour table of a class raster: class k in its colour of :func:`class_colors` (the plots' colours);
    0, background, black: it is the rasters' nodata (GeoTIFF colour tables hold no transparency), so QGIS
    draws it transparent."""
    table = {0: (0, 0, 0, 255)}
    for k, colour in enumerate(class_colors(classes)[1:], start=1):
        table[k] = (int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16), 255)
    return table


def write_class_style(raster: str | os.PathLike[str], names: Sequence[str]) -> Path:
    """RASTER.qml beside a class raster: the QGIS style (a paletted renderer: each class in its colour, with
    its name) that QGIS applies by itself when the raster is added, as a layer's default style."""
    from xml.sax.saxutils import quoteattr

    colours = class_colors(len(names))[1:]
    entries = "\n".join(
        f'        <paletteEntry value="{k}" color="{c}" alpha="255" label={quoteattr(n)}/>'
        for k, (n, c) in enumerate(zip(names, colours, strict=True), start=1)
    )
    path = Path(raster).with_suffix(".qml")
    text = f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.28" styleCategories="Symbology">
  <pipe>
    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>
  </pipe>
</qgis>
"""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def check_mask(data: np.ndarray, path: str | os.PathLike[str], names: Sequence[str] = ()) -> None:
    """Refuse a mask that is not uint8 with a 0/128/255 footprint band (0/255 further bands; a band named
    ``class`` in ``names``: class ids and 128), naming the file."""
    if data.dtype != np.uint8:
        bands = data.shape[0] if data.ndim == 3 else 1
        raise DataError(f"mask {path} has {bands} band(s) of {data.dtype}: masks are uint8 0/255")
    bands = data if data.ndim == 3 else data[np.newaxis]
    for band, allowed in enumerate(bands):
        is_class = band < len(names) and names[band] == CLASS_BAND
        # Table lookups release the GIL (loader threads check masks side by side); np.unique only for the message.
        table = np.zeros(256, bool)
        table[list(CLASS_VALUES if is_class else FOOTPRINT_VALUES if band == 0 else MASK_VALUES)] = True
        if not table[allowed].all():
            values = np.unique(allowed)
            what = (
                "class ids 0..32 and 128 (unknown)"
                if is_class
                else f"0 and 255{' (and 128, unknown)' if band == 0 else ''}"
            )
            raise DataError(
                f"mask {path} holds values {values[:6].tolist()}{f' in band {band + 1}' if band else ''}, not only "
                f"{what}: write truth masks with python mask/mask.py (0 = background, 255 = roof) and predictions "
                "with python predict/predict.py"
            )


def read_mask_bands(path: str | os.PathLike[str]) -> tuple[np.ndarray, tuple[str, ...], tuple[str, ...], dict]:
    """Every band of a mask (checked), the bands' names, the class names (empty: one class) and the profile."""
    with open_raster(path) as src:
        data, profile = _read_all(src, path)
        names = tuple(d or "" for d in src.descriptions)
        classes = _tag_classes(src)
    check_mask(data, path, names)
    return data, names, classes, profile


def _tag_classes(src: Any) -> tuple[str, ...]:
    return tuple(c for c in src.tags().get(CLASSES_TAG, "").split(",") if c)


def mask_classes(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The class names of a mask written with a class map, or of a class raster predict wrote (ids 1, 2 ...);
    empty for a one-class mask."""
    with open_raster(path) as src:
        return _tag_classes(src)


def read_truth(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A mask's footprint as booleans (roof = True), where its class is known (not 128), and its profile."""
    data, _, _, profile = read_mask_bands(path)
    return data[0] == 255, data[0] != UNKNOWN, profile


def read_mask(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """A mask's footprint as booleans (roof = True), and its profile; other values than :func:`check_mask`'s
    are an error. Unknown pixels read as background: use :func:`read_truth` where they must not count."""
    roof, _, profile = read_truth(path)
    return roof, profile


def read_pair(
    frame: str | os.PathLike[str], mask: str | os.PathLike[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """A chip (bands, rows, cols), its footprint as booleans, where the class is known, and the chip's
    profile; the two must share a grid."""
    chw, profile = read_raster(frame)
    roof, known, mask_profile = read_truth(mask)
    if roof.shape != chw.shape[1:] or not same_transform(profile["transform"], mask_profile["transform"]):
        raise DataError(
            f"mask {mask} ({roof.shape[1]}x{roof.shape[0]} px) does not lie on the grid of its chip {frame} "
            f"({chw.shape[2]}x{chw.shape[1]} px): rerun python mask/mask.py and python split/split.py"
        )
    return chw, roof, known, profile


def same_transform(a: Any, b: Any) -> bool:
    """Two geotransforms place pixels at the same spots (to a millionth of a pixel)."""
    scale = max(abs(a.a), abs(a.e), 1e-12)
    return all(abs(x - y) <= 1e-6 * scale for x, y in zip(tuple(a)[:6], tuple(b)[:6], strict=True))


def read_raster(path: str | os.PathLike[str], window: Window | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Read all bands (or one window) as a (bands, rows, cols) array, with the profile.

    The returned profile's ``transform``, ``width`` and ``height`` describe what was read.
    """
    with open_raster(path) as src:
        return _read_all(src, path, window)


def _read_all(src: Any, path: Any, window: Window | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        data = src.read(window=window)
    except rasterio.errors.RasterioError as exc:
        raise RasterError(f"{path} could not be read ({exc}): it may be truncated or corrupt") from exc
    profile = dict(src.profile)
    if window is not None:
        profile.update(transform=src.window_transform(window), width=int(window.width), height=int(window.height))
    return data, profile


def window_starts(length: int, size: int, step: int, *, overhang: bool = False) -> list[int]:
    """Starts of windows of ``size`` pixels every ``step`` pixels along an axis of ``length``.

    The one window arithmetic of the pipeline. ``overhang`` (chips): the last window covers the
    last pixel and may run past the end (it is padded); a step larger than the size leaves
    gaps, and no window starts past the last pixel. Without it (prediction windows, blocks that
    must stay inside the raster): the last window ends exactly at the end, overlapping its
    neighbour more than ``size - step``; a length under ``size`` is one window at 0.
    """
    if length <= 0 or size <= 0 or step <= 0:
        raise ValueError(f"length, size and step must be positive, got {length}, {size}, {step}")
    if overhang:
        count = 1 if length <= size else math.ceil((length - size) / step) + 1
        # With step > size the formula above can place the last window wholly outside.
        return [i * step for i in range(min(count, math.ceil(length / step)))]
    if length <= size:
        return [0]
    return [*range(0, length - size, step), length - size]


def iter_windows(width: int, height: int, block: int, rows: int | None = None) -> Iterator[Window]:
    """Windows of at most ``block`` columns x ``rows`` rows (default ``block``) that tile a raster
    exactly, row by row."""
    rows = block if rows is None else rows
    if block <= 0 or rows <= 0:
        raise ValueError(f"block must be positive, got {block} x {rows}")
    for row in range(0, height, rows):
        for col in range(0, width, block):
            yield Window(col, row, min(block, width - col), min(rows, height - row))


def pad_to_multiple(array: np.ndarray, multiple: int, mode: str = "reflect") -> tuple[np.ndarray, tuple[int, int]]:
    """Pad the first two axes (rows, cols) at the bottom/right up to a multiple of ``multiple``.

    Returns the padded array and the original (rows, cols), for :func:`crop_to`. Geometry is
    never resampled: the network sees the original pixels plus a reflected border.
    """
    rows, cols = array.shape[:2]
    pad_rows = (-rows) % multiple
    pad_cols = (-cols) % multiple
    if pad_rows == 0 and pad_cols == 0:
        return array, (rows, cols)
    widths = [(0, pad_rows), (0, pad_cols)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths, mode=mode), (rows, cols)


def crop_to(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Undo :func:`pad_to_multiple`: keep the top-left ``shape`` of the first two axes."""
    return array[: shape[0], : shape[1]]


@dataclass
class BandStats:
    """Statistics of one band over valid (non-nodata) pixels; std is the population std."""

    band: int
    count: int
    min: float | None
    max: float | None
    mean: float | None
    std: float | None
    percentiles: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


class _IntegerAccumulator:
    """Exact streaming statistics for integer bands from a histogram of values."""

    def __init__(self, dtype: np.dtype) -> None:
        info = np.iinfo(dtype)
        self.offset = int(info.min)
        self.counts = np.zeros(int(info.max) - int(info.min) + 1, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        if values.size:
            shifted = values.astype(np.int64) - self.offset
            self.counts += np.bincount(shifted, minlength=self.counts.size)

    def result(self, band: int, percentiles: Sequence[float]) -> BandStats:
        n = int(self.counts.sum())
        if n == 0:
            return BandStats(band, 0, None, None, None, None, {_pkey(p): None for p in percentiles})
        nonzero = np.flatnonzero(self.counts)
        values = (nonzero + self.offset).astype(np.float64)
        counts = self.counts[nonzero].astype(np.float64)
        mean = float((values * counts).sum() / n)
        var = float((counts * (values - mean) ** 2).sum() / n)
        cum = np.cumsum(self.counts[nonzero])

        def order_stat(k: int) -> float:
            # Value of the k-th smallest pixel (0-based).
            return float(values[np.searchsorted(cum, k, side="right")])

        pcts: dict[str, float | None] = {}
        for p in percentiles:
            lo, hi, t = _virtual_index(n, p)
            pcts[_pkey(p)] = _lerp(order_stat(lo), order_stat(hi), t)
        return BandStats(band, n, float(values[0]), float(values[-1]), mean, float(np.sqrt(var)), pcts)


class _FloatAccumulator:
    """Streaming statistics for float bands: exact moments (Chan's merge), histogram percentiles."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.lo = np.inf
        self.hi = -np.inf

    def add(self, values: np.ndarray) -> None:
        if not values.size:
            return
        v = values.astype(np.float64)
        n_b, mean_b = v.size, float(v.mean())
        m2_b = float(((v - mean_b) ** 2).sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * self.n * n_b / n
        self.n = n
        self.lo = min(self.lo, float(v.min()))
        self.hi = max(self.hi, float(v.max()))


_FLOAT_BINS = 65536


def _virtual_index(n: int, p: float) -> tuple[int, int, float]:
    """Order statistics (0-based) around percentile ``p`` of ``n`` values and the weight between them.

    The arithmetic is numpy's default ("linear") method, step for step, so that results are equal.
    """
    pos = (n - 1) * (p / 100.0)
    lo = int(np.floor(pos))
    return lo, min(lo + 1, n - 1), pos - lo


def _lerp(a: float, b: float, t: float) -> float:
    """numpy's interpolation between order statistics (``numpy.lib._function_base_impl._lerp``)."""
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


def _pkey(p: float) -> str:
    return f"p{p:g}"


def _valid(values: np.ndarray, nodata: float | None) -> np.ndarray:
    values = values.ravel()
    if nodata is None:
        return values[~np.isnan(values)] if values.dtype.kind == "f" else values
    if np.isnan(nodata):
        return values[~np.isnan(values)]
    keep = values != nodata
    if values.dtype.kind == "f":
        keep &= ~np.isnan(values)
    return values[keep]


def band_statistics(
    paths: Iterable[str | os.PathLike[str]],
    *,
    nodata: float | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    block: int = 1024,
) -> list[BandStats]:
    """Per-band statistics over one or more rasters, read window by window.

    Memory does not grow with the rasters: 8- and 16-bit integer bands are summarised by a
    histogram of their values (exact min, max, mean, std and percentiles, equal to numpy's on
    the full array); float and 32-bit integer bands by streaming moments (exact) and a
    65,536-bin histogram between their min and max (percentiles within one bin width).

    Args:
        paths: rasters with the same band count and dtype.
        nodata: value to exclude; default each raster's own nodata value.
        percentiles: percentiles to report, in 0..100.
        block: window size in pixels.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("band_statistics needs at least one raster")
    with open_raster(paths[0]) as src:
        kind = kind_of(src)
    count, dtype = kind[0], np.dtype(kind[1])
    # One counter per possible value: 64 K at most; a 32-bit type would need 32 GiB.
    integer = dtype.kind in "iu" and dtype.itemsize <= 2
    accs: list[Any] = [_IntegerAccumulator(dtype) if integer else _FloatAccumulator() for _ in range(count)]

    def windows() -> Iterator[tuple[np.ndarray, float | None]]:
        for path in paths:
            with open_raster(path) as src:
                require_kind(src, kind, paths[0], "statistics need rasters of one kind")
                nd = src.nodata if nodata is None else nodata
                for win in iter_windows(src.width, src.height, block):
                    yield src.read(window=win), nd

    for data, nd in windows():
        for b in range(count):
            accs[b].add(_valid(data[b], nd))
    if integer:
        return [acc.result(b + 1, percentiles) for b, acc in enumerate(accs)]

    # Floats: a second pass fills fixed-range histograms for the percentiles.
    hists = [np.zeros(_FLOAT_BINS, dtype=np.int64) for _ in range(count)]
    for data, nd in windows():
        for b, acc in enumerate(accs):
            if acc.n and acc.hi > acc.lo:
                hists[b] += np.histogram(_valid(data[b], nd), bins=_FLOAT_BINS, range=(acc.lo, acc.hi))[0]
    results = []
    for b, acc in enumerate(accs):
        if acc.n == 0:
            results.append(BandStats(b + 1, 0, None, None, None, None, {_pkey(p): None for p in percentiles}))
            continue
        pcts: dict[str, float | None] = {}
        if acc.hi == acc.lo:
            pcts = {_pkey(p): acc.lo for p in percentiles}
        else:
            cum = np.cumsum(hists[b])
            width = (acc.hi - acc.lo) / _FLOAT_BINS
            for p in percentiles:
                # Interpolate as numpy does between the two order statistics, each taken as the
                # centre of its bin: sparse data leaves them many bins apart.
                lo, hi, t = _virtual_index(acc.n, p)
                below, above = (acc.lo + (int(np.searchsorted(cum, k, side="right")) + 0.5) * width for k in (lo, hi))
                pcts[_pkey(p)] = _lerp(below, above, t)
        std = float(np.sqrt(acc.m2 / acc.n))
        results.append(BandStats(b + 1, acc.n, acc.lo, acc.hi, acc.mean, std, pcts))
    return results


def rgb_bands(count: int) -> tuple[int, int, int]:
    """0-based (red, green, blue) band indices for a preview: WorldView-3 order for 8 bands, else 1-2-3."""
    if count >= 8:
        return (4, 2, 1)  # coastal, blue, green, yellow, red, red edge, NIR1, NIR2
    if count >= 3:
        return (0, 1, 2)
    return (0, 0, 0)


def rgb_preview(
    chw: np.ndarray,
    nodata: float | None = None,
    low: Sequence[float] | None = None,
    high: Sequence[float] | None = None,
) -> np.ndarray:
    """A (rows, cols, 3) uint8 natural-colour picture of raw pixels.

    Each band is stretched between ``low`` and ``high`` (indexed by band, e.g. the training
    percentiles, so chips are shown alike), or by default between its own percentiles 2 and 98.
    """
    picks = list(rgb_bands(chw.shape[0]))
    valid = valid_pixels(chw, nodata)
    out = np.zeros((*chw.shape[1:], 3), np.uint8)
    for i, b in enumerate(picks):
        band = chw[b].astype(np.float32)
        if low is not None and high is not None:
            lo, hi = float(low[b]), float(high[b])
        elif valid.any():
            lo, hi = np.percentile(band[valid], (2, 98))
        else:
            continue
        scaled = np.clip((band - lo) / max(float(hi - lo), 1e-6), 0, 1)
        out[..., i] = (scaled * 255).astype(np.uint8)
    out[~valid] = 0
    return out


# --- per-class statistics: summarize's tables and chips share these ----------------------------

#: Pixel classes of :class:`ClassBandStats`: every valid pixel, roof (mask > 0), background.
CLASSES = ("all", "roof", "background")

#: Integer dtypes with one counter per possible value (exact statistics), smallest first.
_SMALL_INTS = tuple(np.dtype(t) for t in ("uint8", "int8", "uint16", "int16"))


def valid_pixels(chw: np.ndarray, nodata: float | None) -> np.ndarray:
    """Boolean (rows, cols): pixels that are not nodata in every band (NaN counts as nodata).

    The pixel-level rule mask.py and :class:`core.bundle.Normalization` use: a pixel is
    nodata only when all its bands are.
    """
    if chw.dtype.kind == "f":
        missing = np.isnan(chw) if nodata is None or np.isnan(nodata) else (chw == nodata) | np.isnan(chw)
    elif nodata is None:
        return np.ones(chw.shape[1:], bool)
    else:
        missing = chw == nodata
    return ~missing.all(axis=0)


def usable_pixels(chw: np.ndarray, nodata: float | None, known: np.ndarray) -> np.ndarray:
    """Boolean (rows, cols): the pixels that count in training, threshold search, scores and the flat table:
    not nodata (:func:`valid_pixels`) and of known class (``known``: the mask is not the ignore value,
    see :func:`read_truth`)."""
    return valid_pixels(chw, nodata) & known


def exact_dtype(lo: float, hi: float) -> np.dtype | None:
    """The smallest 8- or 16-bit integer dtype that holds every integer in [lo, hi], else None."""
    for dtype in _SMALL_INTS:
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    return None


def _histogram_percentiles(
    hist: np.ndarray, lo: float, hi: float, n: int, percentiles: Sequence[float]
) -> dict[str, float | None]:
    """Percentiles of ``n`` values binned in ``hist`` over [lo, hi], as :func:`band_statistics` takes them."""
    cum = np.cumsum(hist)
    width = (hi - lo) / hist.size
    out: dict[str, float | None] = {}
    for p in percentiles:
        k_lo, k_hi, t = _virtual_index(n, p)
        below, above = (lo + (int(np.searchsorted(cum, k, side="right")) + 0.5) * width for k in (k_lo, k_hi))
        out[_pkey(p)] = _lerp(below, above, t)
    return out


class ValueStats:
    """Streaming statistics and histogram of one band's values.

    8- and 16-bit integers keep a counter per possible value (exact, equal to numpy, as
    :func:`band_statistics`); other values keep exact moments and a 65,536-bin histogram over
    ``[lo, hi]``, which must be known in advance (percentiles within one bin width).
    """

    def __init__(self, dtype: np.dtype | str, lo: float | None = None, hi: float | None = None) -> None:
        dtype = np.dtype(dtype)
        self.integer = dtype.kind in "iu" and dtype.itemsize <= 2
        self._acc: _IntegerAccumulator | _FloatAccumulator
        if self.integer:
            self._acc = _IntegerAccumulator(dtype)
            return
        if lo is None or hi is None:
            raise ValueError("ValueStats of non-integer values needs their range [lo, hi] in advance")
        self._acc = _FloatAccumulator()
        self.lo, self.hi = float(lo), float(hi)
        self._hist = np.zeros(_FLOAT_BINS, np.int64)

    def add(self, values: np.ndarray) -> None:
        """Add values (any shape; callers leave nodata out)."""
        values = np.asarray(values).ravel()
        self._acc.add(values)
        if not self.integer and values.size and self.hi > self.lo:
            self._hist += np.histogram(values, bins=_FLOAT_BINS, range=(self.lo, self.hi))[0]

    @property
    def count(self) -> int:
        return int(self._acc.counts.sum()) if self.integer else self._acc.n

    def result(self, band: int, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> BandStats:
        """The statistics of band number ``band`` (1-based, as a label)."""
        if self.integer:
            return self._acc.result(band, percentiles)
        acc = self._acc
        if acc.n == 0:
            return BandStats(band, 0, None, None, None, None, {_pkey(p): None for p in percentiles})
        if acc.hi == acc.lo:
            pcts: dict[str, float | None] = {_pkey(p): acc.lo for p in percentiles}
        else:
            pcts = _histogram_percentiles(self._hist, self.lo, self.hi, acc.n, percentiles)
        return BandStats(band, acc.n, acc.lo, acc.hi, acc.mean, float(np.sqrt(acc.m2 / acc.n)), pcts)

    def histogram(self, edges: np.ndarray) -> np.ndarray:
        """Counts of the values in the bins ``edges`` (for plots)."""
        if self.integer:
            nonzero = np.flatnonzero(self._acc.counts)
            centres, weights = nonzero + self._acc.offset, self._acc.counts[nonzero]
        elif self.hi > self.lo:
            width = (self.hi - self.lo) / _FLOAT_BINS
            centres, weights = self.lo + (np.arange(_FLOAT_BINS) + 0.5) * width, self._hist
        else:
            centres, weights = np.array([self.lo]), np.array([self._acc.n])
        return np.histogram(centres, bins=edges, weights=weights)[0].astype(np.int64)


class ClassBandStats:
    """Per-band :class:`ValueStats` of every valid pixel and of each mask class, streamed.

    Always ``all``, ``roof`` (any roof class) and ``background``; with ``classes`` (the class
    names of ids 1..K) also each class id 0..K on its own (:meth:`class_result`,
    :meth:`class_histograms`), and :meth:`add` then takes each pixel's class id.

    Args:
        dtypes: the values' dtype, per band.
        lo, hi: per band value range, needed for non-integer bands (see :class:`ValueStats`).
        classes: the class names of ids 1, 2 ... (a class map's); empty for one class.
    """

    def __init__(
        self,
        dtypes: Sequence[np.dtype | str],
        lo: Sequence[float] | None = None,
        hi: Sequence[float] | None = None,
        classes: Sequence[str] = (),
    ) -> None:
        self.bands = len(dtypes)

        def band_stats() -> list[ValueStats]:
            return [
                ValueStats(dt, None if lo is None else lo[b], None if hi is None else hi[b])
                for b, dt in enumerate(dtypes)
            ]

        self.values = {c: band_stats() for c in CLASSES}
        self.classes = tuple(classes)
        #: With classes: per class id 0..K (0 background), each band's statistics.
        self.by_class = [band_stats() for _ in range(len(self.classes) + 1)] if self.classes else []

    @property
    def class_labels(self) -> tuple[str, ...]:
        """The names of class ids 0..K: ``background`` and the classes (empty for one class)."""
        return ("background", *self.classes) if self.classes else ()

    def add(self, band: int, values: np.ndarray, roof: np.ndarray) -> None:
        """Add values of band index ``band`` (0-based) and whether each is a roof pixel; with classes,
        ``roof`` holds each pixel's class id (0 background, 1..K; any other id is a ValueError)."""
        values = np.asarray(values).ravel()
        labels = np.asarray(roof).ravel()
        if values.dtype.kind == "f":  # a band missing in a pixel whose other bands are valid
            keep = ~np.isnan(values)
            values, labels = values[keep], labels[keep]
        roof = labels > 0 if self.classes else labels.astype(bool)
        self.values["all"][band].add(values)
        self.values["roof"][band].add(values[roof])
        self.values["background"][band].add(values[~roof])
        if not self.classes:
            return
        if labels.size and int(labels.max()) > len(self.classes):
            raise ValueError(f"class id {int(labels.max())} outside 0..{len(self.classes)} (the classes named)")
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(len(self.by_class) + 1))
        for k, stats in enumerate(self.by_class):
            stats[band].add(values[order[bounds[k] : bounds[k + 1]]])

    def result(self, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, list[BandStats]]:
        """Statistics per class (``all``, ``roof``, ``background``), one :class:`BandStats` per band."""
        return {c: [v.result(b + 1, percentiles) for b, v in enumerate(vs)] for c, vs in self.values.items()}

    def class_result(self, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> list[list[BandStats]]:
        """With classes: per class id 0..K (names :attr:`class_labels`), one :class:`BandStats` per band."""
        return [[v.result(b + 1, percentiles) for b, v in enumerate(vs)] for vs in self.by_class]

    def edges(self, band: int, bins: int) -> np.ndarray:
        """Bin edges over the band's range (integers: whole values per bin)."""
        values = self.values["all"][band]
        stats = values.result(band + 1, ())
        lo, hi = (0.0, 1.0) if stats.count == 0 else (stats.min, stats.max)
        if values.integer:
            # Whole values per bin, edges between integers: no bin holds one value more than its neighbour.
            step = max(1, int(np.ceil((hi - lo + 1) / bins)))
            return lo - 0.5 + step * np.arange(int(np.ceil((hi - lo + 1) / step)) + 1)
        lo, hi = (lo - 0.5, hi + 0.5) if hi <= lo else (lo, hi)
        return np.linspace(lo, hi, bins + 1)

    def histograms(self, band: int, bins: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Bin edges over the band's range and the counts of each class in them."""
        edges = self.edges(band, bins)
        return edges, {c: vs[band].histogram(edges) for c, vs in self.values.items()}

    def class_histograms(self, band: int, bins: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """With classes: the bin edges of :meth:`histograms` and the counts of each class id 0..K in them."""
        edges = self.edges(band, bins)
        return edges, [vs[band].histogram(edges) for vs in self.by_class]


def class_band_statistics(
    frames: Sequence[str | os.PathLike[str]],
    masks: Sequence[str | os.PathLike[str]],
    *,
    nodata: float | None = None,
    block: int = 1024,
) -> ClassBandStats:
    """Per-band statistics of chips, overall and per class of their masks (roof = footprint 255; masks with
    a class band: each class too, the masks' classes must agree).

    The same statistics summarize computes from a flat table, straight from chips and masks
    (pairs in order). Nodata pixels (every band equal to ``nodata``, default each chip's own)
    are left out, as flatten leaves them out. Read window by window: memory does not grow
    with the chips. Call :meth:`ClassBandStats.result` for the numbers.
    """
    frames, masks = [Path(p) for p in frames], [Path(p) for p in masks]
    if not frames or len(frames) != len(masks):
        raise ValueError(f"class_band_statistics needs chips and as many masks, got {len(frames)} and {len(masks)}")
    with open_raster(frames[0]) as src:
        kind = kind_of(src)
    count, dtype = kind[0], np.dtype(kind[1])
    classes = common_classes(masks)

    def windows() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for frame, mask in zip(frames, masks, strict=True):
            with open_raster(frame) as src, open_raster(mask) as msk:
                require_kind(src, kind, frames[0], "statistics need chips of one kind")
                if (msk.width, msk.height) != (src.width, src.height):
                    raise RasterError(f"mask {mask} is {msk.width}x{msk.height}, its chip {src.width}x{src.height}")
                names = tuple(d or "" for d in msk.descriptions)
                if classes and CLASS_BAND not in names:
                    raise DataError(f"mask {mask} names classes ({CLASSES_TAG}) but has no class band: rerun mask")
                nd = src.nodata if nodata is None else nodata
                for win in iter_windows(src.width, src.height, block):
                    data = src.read(window=win)
                    if classes:
                        bands = msk.read((1, names.index(CLASS_BAND) + 1), window=win)
                        check_mask(bands, mask, ("footprint", CLASS_BAND))
                        labels, ids = bands
                        keep = valid_pixels(data, nd) & (labels != UNKNOWN) & (ids != UNKNOWN)
                        _check_class_ids(ids[keep], len(classes), mask)
                        yield data[:, keep], ids[keep]
                        continue
                    labels = msk.read(1, window=win)
                    check_mask(labels, mask)
                    keep = usable_pixels(data, nd, labels != UNKNOWN)  # unknown pixels are in neither class
                    yield data[:, keep], labels[keep] == 255

    lo = hi = None
    if not (dtype.kind in "iu" and dtype.itemsize <= 2):
        # Other dtypes: a first pass finds each band's range for the fixed-range histograms.
        lo, hi = [np.inf] * count, [-np.inf] * count
        for values, _ in windows():
            if values.size:
                lo = list(np.minimum(lo, values.min(axis=1)))
                hi = list(np.maximum(hi, values.max(axis=1)))
        lo = [v if np.isfinite(v) else 0.0 for v in lo]
        hi = [v if np.isfinite(v) else 0.0 for v in hi]
    stats = ClassBandStats([dtype] * count, lo, hi, classes)
    for values, roof in windows():
        for b in range(count):
            stats.add(b, values[b], roof)
    return stats


# --- class maps: the classes of masks and chips read with their class ids ----------------------


def _describe_classes(classes: Sequence[str]) -> str:
    return ",".join(classes) if classes else "one class, no class band"


def common_classes(masks: Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    """The class names every mask names (its ``ROOF_CLASSES`` tag; empty: one class); masks that
    disagree are a DataError naming two of them."""
    first: tuple[Path, tuple[str, ...]] | None = None
    for mask in masks:
        classes = mask_classes(mask)
        if first is None:
            first = (Path(mask), classes)
        elif classes != first[1]:
            raise DataError(
                f"masks {first[0]} ({_describe_classes(first[1])}) and {mask} ({_describe_classes(classes)}) name "
                "different classes: make every mask with one class map (python mask/mask.py --overwrite, then "
                "python split/split.py --overwrite)"
            )
    return first[1] if first is not None else ()


def _check_class_ids(ids: np.ndarray, k: int, path: Any) -> None:
    """Class ids (unknown pixels left out) must be 0..k, the classes the mask names."""
    if ids.size and int(ids.max()) > k:
        raise DataError(
            f"mask {path} holds class id {int(ids.max())} but names {k} classes: rewrite it with python mask/mask.py"
        )


def read_labelled_pair(
    frame: str | os.PathLike[str], mask: str | os.PathLike[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, tuple[str, ...]]:
    """:func:`read_pair` with class ids: a chip (bands, rows, cols), each pixel's label (a class map's
    mask: its class id 0 background, 1..K; a one-class mask: 1 roof, 0 background; 128 unknown),
    where the label is known, the chip's profile and the class names (empty: one class)."""
    chw, profile = read_raster(frame)
    data, names, classes, mask_profile = read_mask_bands(mask)
    if data.shape[1:] != chw.shape[1:] or not same_transform(profile["transform"], mask_profile["transform"]):
        raise DataError(
            f"mask {mask} ({data.shape[2]}x{data.shape[1]} px) does not lie on the grid of its chip {frame} "
            f"({chw.shape[2]}x{chw.shape[1]} px): rerun python mask/mask.py and python split/split.py"
        )
    labels, known = mask_labels(data, names, classes, mask)
    return chw, labels, known, profile, classes


def mask_labels(
    data: np.ndarray, names: Sequence[str], classes: Sequence[str], path: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's label in a mask's bands (:func:`read_mask_bands`): a class map's class ids (0 background,
    1..K, 128 unknown; ids beyond the classes named are an error), or for a one-class mask 1 roof, 0
    background, 128 unknown; and where the label is known."""
    footprint = data[0]
    if CLASS_BAND in names:
        if not classes:
            raise DataError(f"mask {path} has a class band but no {CLASSES_TAG} tag naming the classes: rerun mask")
        labels = data[list(names).index(CLASS_BAND)]
        known = (footprint != UNKNOWN) & (labels != UNKNOWN)
        _check_class_ids(labels[known], len(classes), path)
        return labels, known
    return np.where(footprint == 255, 1, footprint).astype(np.uint8), footprint != UNKNOWN


#: Colours of class ids 1, 2 ... (hex RGB; repeated past the tenth) in summarize's and the models' plots;
#: background (id 0) is CLASS_BACKGROUND_COLOR, the green of summarize's roof-vs-background plots.
CLASS_COLORS = ("#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#1f78b4", "#a6761d", "#e31a1c", "#666666",
                "#17becf")  # fmt: skip
CLASS_BACKGROUND_COLOR = "#1b9e77"


def class_colors(k: int) -> list[str]:
    """One colour per class id 0..k: background first, then :data:`CLASS_COLORS` in turn."""
    return [CLASS_BACKGROUND_COLOR, *(CLASS_COLORS[i % len(CLASS_COLORS)] for i in range(k))]
