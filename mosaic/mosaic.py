"""Merge a folder of tiles into one GeoTIFF: python mosaic/mosaic.py [--input DIR --output FILE]

Default: data/raw/*.tif -> data/mosaic/mosaic.tif. Tiles must share CRS, resolution, band
count and dtype; otherwise the error names the odd tiles and what differs (or set
mosaic_args.reproject: true to warp them onto the first tile's grid, nearest neighbour).
Where tiles overlap, mosaic_args.overlap decides: "first" (the first tile in name order
wins), "last", or "max" (the larger value, band by band). Gaps are nodata (predicted roof masks,
whose 0 is "no roof", excepted: their mosaic declares no nodata, as they). The mosaic is
written block by block, so memory does not grow with its size. Works on any folder of
rasters, e.g. predicted masks.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.coords import disjoint_bounds
from rasterio.vrt import WarpedVRT
from rasterio.warp import Resampling, transform_bounds
from rasterio.windows import Window

from core import cli
from core.errors import DataError, InputMissingError, RasterError
from core.raster import (
    ROOF_BAND,
    create_raster,
    gtiff_profile,
    iter_windows,
    open_raster,
    require_georeference,
    valid_pixels,
)
from core.settings import MosaicArgs, Settings
from core.tree import DataTree, refuse_overwrite
from workflow.contract import begin

log = logging.getLogger(__name__)

_BLOCK = 1024  # output rows/cols written at a time: 1024 x 1024 x 8 uint16 = 16 MB


@dataclass(frozen=True)
class TileInfo:
    """What must agree between tiles."""

    path: Path
    crs: str
    res: tuple[float, float]
    count: int
    dtype: str
    nodata: float | None
    bounds: tuple[float, float, float, float]
    roof_mask: bool = False  # a roof mask predict wrote (band "roof"): its 0 is "no roof", not a gap


def inspect_tiles(paths: list[Path]) -> list[TileInfo]:
    """Open every tile (an unreadable one is named) and describe it."""
    infos = []
    for path in cli.progress(paths, desc="inspect", unit="tile"):
        with open_raster(path) as src:
            require_georeference(src)
            infos.append(
                TileInfo(
                    path=path,
                    crs=src.crs.to_string() if src.crs else "",
                    res=(float(src.res[0]), float(src.res[1])),
                    count=src.count,
                    dtype=src.dtypes[0],
                    nodata=src.nodata,
                    bounds=tuple(src.bounds),
                    roof_mask=src.count == 1 and src.descriptions[0] == ROOF_BAND,
                )
            )
    return infos


def mismatches(infos: list[TileInfo]) -> list[str]:
    """One line per tile that differs from the first in CRS, resolution or pixel grid (band count and
    dtype are checked before: reprojecting cannot fix them)."""
    ref = infos[0]
    lines = []
    for info in infos[1:]:
        diff = []
        if info.crs != ref.crs:
            diff.append(f"CRS {info.crs or 'none'} vs {ref.crs or 'none'}")
        if not np.allclose(info.res, ref.res, rtol=1e-6, atol=0):
            diff.append(f"resolution {info.res[0]:.9g}x{info.res[1]:.9g} vs {ref.res[0]:.9g}x{ref.res[1]:.9g}")
        elif info.crs == ref.crs and not on_grid(info, ref):
            diff.append("pixel grid offset by a fraction of a pixel")
        if diff:
            lines.append(f"{info.path.name}: {', '.join(diff)}")
    return lines


def on_grid(info: TileInfo, ref: TileInfo, tolerance: float = 0.01) -> bool:
    """Whether a tile's corner falls on a whole pixel of the reference tile's grid."""
    cols = (info.bounds[0] - ref.bounds[0]) / ref.res[0]
    rows = (ref.bounds[3] - info.bounds[3]) / ref.res[1]
    return abs(cols - round(cols)) < tolerance and abs(rows - round(rows)) < tolerance


def mosaicable(paths: list[Path], args: MosaicArgs) -> list[TileInfo]:
    """The tiles described (:func:`inspect_tiles`), once they are known to make one mosaic: one band count and
    dtype, and one grid unless ``args.reproject``; else a :class:`DataError` naming the odd tiles. Run before the
    old mosaic is removed."""
    infos = inspect_tiles(paths)
    kinds = [
        f"{i.path.name}: {i.count} bands of {i.dtype}"
        for i in infos
        if (i.count, i.dtype) != (infos[0].count, infos[0].dtype)
    ]
    if kinds:  # checked first: reprojecting cannot fix it
        raise DataError(
            f"tiles differ in band count or dtype from {infos[0].path.name} ({infos[0].count} bands of "
            f"{infos[0].dtype}): "
            + "; ".join(kinds)
            + ": move the odd tiles out of the folder, or mosaic them separately"
        )
    odd = mismatches(infos)
    if odd and not args.reproject:
        raise DataError(
            f"tiles differ from {infos[0].path.name}: "
            + "; ".join(odd)
            + ": set mosaic_args.reproject to true to warp them onto its grid, or mosaic them separately"
        )
    return infos


def output_grid(infos: list[TileInfo]) -> tuple[Affine, int, int]:
    """Transform and size of the mosaic: the union of the tiles on the first tile's pixel grid."""
    ref = infos[0]
    xres, yres = ref.res
    # Union of bounds, in the first tile's CRS (tiles to be reprojected are converted).
    boxes = [
        i.bounds if i.crs == ref.crs else transform_bounds(i.crs, ref.crs, *i.bounds, densify_pts=21) for i in infos
    ]
    left = min(b[0] for b in boxes)
    bottom = min(b[1] for b in boxes)
    right = max(b[2] for b in boxes)
    top = max(b[3] for b in boxes)
    # Snap to the first tile's grid so its pixels (and those of tiles on the same grid) are not shifted.
    x0, y0 = ref.bounds[0], ref.bounds[3]
    left = x0 - math.ceil(round((x0 - left) / xres, 6)) * xres
    top = y0 + math.ceil(round((top - y0) / yres, 6)) * yres
    width = math.ceil(round((right - left) / xres, 6))
    height = math.ceil(round((top - bottom) / yres, 6))
    return Affine(xres, 0.0, left, 0.0, -yres, top), width, height


@contextlib.contextmanager
def open_on_grid(info: TileInfo, ref: TileInfo, reproject: bool) -> Iterator[rasterio.io.DatasetReaderBase]:
    """Open a tile; warp it onto the reference CRS and resolution when it differs."""
    with open_raster(info.path, threads=True) as src:
        if not reproject or (
            info.crs == ref.crs and np.allclose(info.res, ref.res, rtol=1e-6, atol=0) and on_grid(info, ref)
        ):
            yield src
            return
        left, bottom, right, top = transform_bounds(src.crs, ref.crs, *src.bounds, densify_pts=21)
        xres, yres = ref.res
        x0, y0 = ref.bounds[0], ref.bounds[3]
        left = x0 + math.floor((left - x0) / xres) * xres
        top = y0 - math.floor((y0 - top) / yres) * yres
        width = math.ceil((right - left) / xres)
        height = math.ceil((top - bottom) / yres)
        transform = Affine(xres, 0.0, left, 0.0, -yres, top)
        nodata = src.nodata if src.nodata is not None else 0
        with WarpedVRT(
            src,
            crs=ref.crs,
            transform=transform,
            width=width,
            height=height,
            resampling=Resampling.nearest,
            nodata=nodata,
        ) as vrt:
            yield vrt


def merge_block(out: np.ndarray, filled: np.ndarray, part: np.ndarray, valid: np.ndarray, rule: str) -> None:
    """Combine one tile's pixels into an output block in place, by the overlap rule."""
    if rule == "first":
        take = valid & ~filled
        out[:, take] = part[:, take]
    elif rule == "last":
        out[:, valid] = part[:, valid]
    else:  # max
        both = valid & filled
        out[:, both] = np.maximum(out[:, both], part[:, both])
        only = valid & ~filled
        out[:, only] = part[:, only]
    filled |= valid


def build_mosaic(
    paths: list[Path],
    output: Path,
    args: MosaicArgs,
    *,
    overwrite: bool = False,
    block: int = _BLOCK,
    infos: list[TileInfo] | None = None,
) -> Path:
    """Merge tiles into ``output``, block by block.

    Args:
        paths: the tiles, in the order the overlap rule uses.
        output: the mosaic GeoTIFF to write (atomically).
        args: ``mosaic_args``.
        overwrite: replace an existing output.
        block: output block size in pixels; memory use follows it, not the mosaic's size.
        infos: the tiles' :func:`mosaicable` descriptions, when the caller checked them already.

    Tiles that declare no nodata value: gaps are 0, declared nodata (chip pads and skips by it), except for
    predict's roof masks (band ``roof``), whose 0 is an answer: their mosaic declares none, as they do.
    """
    refuse_overwrite([output], overwrite, "mosaic")
    if not paths:
        raise InputMissingError(f"no tiles to mosaic into {output}: give at least one GeoTIFF")
    infos = infos or mosaicable(paths, args)
    ref = infos[0]
    transform, width, height = output_grid(infos)
    nodata = next((i.nodata for i in infos if i.nodata is not None), None)
    fill = 0 if nodata is None else nodata
    if nodata is None and all(i.roof_mask for i in infos):  # (declared nodata, QGIS drew all but the roofs clear)
        log.info("mosaic: predicted roof masks: gaps are 0 (no roof), and the mosaic declares no nodata, as they")
    elif nodata is None:
        nodata = 0
        log.info("mosaic: tiles have no nodata value; gaps are filled with 0 and marked as nodata")
    profile = gtiff_profile(
        width=width,
        height=height,
        count=ref.count,
        dtype=ref.dtype,
        crs=rasterio.crs.CRS.from_user_input(ref.crs),
        transform=transform,
        nodata=nodata,
        compression=args.compression,
        threads=True,
    )
    order = infos[::-1] if args.overlap == "last" else infos
    rule = "first" if args.overlap == "last" else args.overlap  # "last" is "first" over the reversed list
    blocks = list(iter_windows(width, height, block))
    with contextlib.ExitStack() as stack, create_raster(output, profile) as dst:
        datasets = [stack.enter_context(open_on_grid(i, ref, args.reproject)) for i in order]
        for win in cli.progress(blocks, desc="mosaic", unit="block"):
            bounds = rasterio.windows.bounds(win, transform)
            out = np.full((ref.count, int(win.height), int(win.width)), fill, dtype=ref.dtype)
            filled = np.zeros(out.shape[1:], dtype=bool)
            for info, ds in zip(order, datasets, strict=True):
                if disjoint_bounds(bounds, ds.bounds):
                    continue
                # Same pixel grid: the block's corner falls on a whole pixel of the tile.
                col, row = ~ds.transform @ (bounds[0], bounds[3])
                r0, c0 = round(row), round(col)
                rs, re = max(0, r0), min(ds.height, r0 + out.shape[1])
                cs, ce = max(0, c0), min(ds.width, c0 + out.shape[2])
                if rs >= re or cs >= ce:
                    continue
                try:
                    part = ds.read(window=Window(cs, rs, ce - cs, re - rs))
                except rasterio.errors.RasterioError as exc:
                    raise RasterError(f"{info.path} could not be read ({exc}): it may be truncated or corrupt") from exc
                valid = valid_pixels(part, ds.nodata)
                dr, dc = rs - r0, cs - c0
                view = np.s_[dr : dr + part.shape[1], dc : dc + part.shape[2]]
                merge_block(out[(slice(None), *view)], filled[view], part, valid, rule)
            dst.write(out, window=win)
    log.info("mosaic: %d tiles -> %s (%d x %d px, %d bands)", len(paths), output, width, height, ref.count)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    parser.add_argument(
        "--input", type=Path, metavar="DIR", help="folder of tiles (default: data/ + mosaic_args.input)"
    )
    parser.add_argument("--output", type=Path, metavar="FILE", help="mosaic to write (default: data/mosaic/mosaic.tif)")

    def body(args: argparse.Namespace, settings: Settings, tree: DataTree) -> None:
        folder = args.input or tree.root / settings.mosaic_args.input
        if not folder.is_dir():
            raise InputMissingError(f"tile folder {folder} not found: run python sample/sample.py or download first")
        tiles = tree.list_rasters(folder)
        if not tiles:
            raise InputMissingError(f"no GeoTIFF tiles in {folder}: run python sample/sample.py or download first")
        if args.output is not None and args.output.resolve() != tree.mosaic.resolve():
            # Any other output (merging predicted masks, say) is not the pipeline's mosaic stage.
            build_mosaic(tiles, args.output, settings.mosaic_args, overwrite=args.overwrite)
            return
        run = begin("mosaic", settings, tree, overwrite=args.overwrite, given={"input": args.input})
        if run.skip:
            run.say_skip()
            return
        infos = mosaicable(tiles, settings.mosaic_args)  # tiles that make no mosaic: before the old one is removed
        run.start()
        build_mosaic(tiles, tree.mosaic, settings.mosaic_args, overwrite=True, infos=infos)
        run.finish(tiles=len(tiles))

    return cli.run(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
