"""Cut a raster into fixed-size, georeferenced chips: python chip/chip.py

Reads data/mosaic/mosaic.tif (chip_args.source: raw chips every tile in data/raw/ instead;
--input names any raster or folder) and writes data/chips/chip_NNNNNN.tif plus the chip
index data/chips.csv. Chips keep the source resolution: nothing is resampled. Edge chips are
padded to full size with chip_args.pad_value and the padding is nodata. Chips whose nodata
share exceeds chip_args.max_nodata are skipped. A chip's number is its place in the grid of
its source, so the output is the same whatever the number of workers. A run that stopped
halfway resumes: finished chips are kept, the rest are written. A rerun with the same
settings and source skips; one with other chip_args (or a mosaic made again since) refuses
and names what changed, unless --overwrite.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rasterio.errors import RasterioError
from rasterio.windows import Window

from core import cli
from core.errors import DataError, InputMissingError, RasterError
from core.index import CHIP_COLUMNS, read_index, write_index
from core.parallel import map_tasks
from core.raster import (
    kind_of,
    open_raster,
    require_georeference,
    require_kind,
    valid_pixels,
    window_starts,
    write_raster,
)
from core.settings import ChipArgs, ParallelArgs, Settings
from core.tree import DataTree
from workflow.contract import begin

log = logging.getLogger(__name__)


def chip_grid(width: int, height: int, size: int, stride: int | None = None) -> list[tuple[int, int]]:
    """(row_off, col_off) of every chip, row by row."""
    stride = size if stride is None else stride
    rows, cols = (window_starts(n, size, stride, overhang=True) for n in (height, width))
    return [(r, c) for r in rows for c in cols]


@dataclass(frozen=True)
class ChipTask:
    """One chip to cut: small and picklable, so it can go to a worker process."""

    id: int
    source: str
    out: str
    row_off: int
    col_off: int
    size: int
    pad_value: float
    max_nodata: float
    compression: str
    reuse: bool


def read_padded(src, row_off: int, col_off: int, size: int, pad_value: float) -> tuple[np.ndarray, np.ndarray]:
    """Read a size x size window, padding outside the raster; also return the valid-pixel mask."""
    rows = max(0, min(size, src.height - row_off))
    cols = max(0, min(size, src.width - col_off))
    data = np.full((src.count, size, size), pad_value, dtype=src.dtypes[0])
    valid = np.zeros((size, size), dtype=bool)
    if rows and cols:
        try:
            part = src.read(window=Window(col_off, row_off, cols, rows))
        except RasterioError as exc:
            raise RasterError(f"{src.name} could not be read ({exc}): it may be truncated or corrupt") from exc
        data[:, :rows, :cols] = part
        valid[:rows, :cols] = valid_pixels(part, src.nodata)
    return data, valid


def make_chips(batch: tuple[ChipTask, ...]) -> list[dict | None]:
    """Cut and write chips of one source, opened once; their index rows (None: mostly nodata)."""
    with open_raster(batch[0].source) as src:
        return [cut_chip(src, task) for task in batch]


def cut_chip(src, task: ChipTask) -> dict | None:
    """Cut and write one chip from an open source; its index row, or None when it is mostly nodata."""
    data, valid = read_padded(src, task.row_off, task.col_off, task.size, task.pad_value)
    nodata_share = 1.0 - float(valid.mean())
    if nodata_share > task.max_nodata:
        return None
    window = Window(task.col_off, task.row_off, task.size, task.size)
    transform = src.window_transform(window)
    crs = src.crs
    padded = task.row_off + task.size > src.height or task.col_off + task.size > src.width
    # Sources without a nodata value still mark their padding as nodata.
    nodata = src.nodata if src.nodata is not None else (task.pad_value if padded else None)
    if not (task.reuse and Path(task.out).is_file()):
        write_raster(task.out, data, crs=crs, transform=transform, nodata=nodata, compression=task.compression)
    left, top = transform @ (0, 0)
    right, bottom = transform @ (task.size, task.size)
    return {
        "id": task.id,
        "file": Path(task.out).name,
        "source": task.source,
        "row_off": task.row_off,
        "col_off": task.col_off,
        "width": task.size,
        "height": task.size,
        "left": left,
        "bottom": min(bottom, top),
        "right": right,
        "top": max(bottom, top),
        "crs": crs.to_string() if crs else "",
        "nodata_share": nodata_share,
    }


_BATCH = 32


def _by_source(tasks: list[ChipTask]) -> list[list[ChipTask]]:
    groups: dict[str, list[ChipTask]] = {}
    for task in tasks:
        groups.setdefault(task.source, []).append(task)
    return list(groups.values())


def plan_chips(sources: list[Path], tree: DataTree, args: ChipArgs, reuse: bool) -> list[ChipTask]:
    """Every chip of every source, numbered by source order and grid position."""
    tasks: list[ChipTask] = []
    stride = args.stride or args.size
    kind: tuple[int, str] | None = None
    for source in sources:
        with open_raster(source) as src:
            require_georeference(src)
            kind = kind or kind_of(src)
            require_kind(src, kind, sources[0], "chips of one run must be alike; move the odd raster out of the input")
            pad = args.pad_value if args.pad_value is not None else (src.nodata if src.nodata is not None else 0)
            for row_off, col_off in chip_grid(src.width, src.height, args.size, stride):
                index = len(tasks)
                tasks.append(
                    ChipTask(
                        id=index,
                        source=str(source),
                        out=str(tree.chips / tree.chip_name(index)),
                        row_off=row_off,
                        col_off=col_off,
                        size=args.size,
                        pad_value=pad,
                        max_nodata=args.max_nodata,
                        compression=args.compression,
                        reuse=reuse,
                    )
                )
    return tasks


def chip_sources(
    sources: list[Path],
    tree: DataTree,
    args: ChipArgs,
    parallel: ParallelArgs,
    *,
    resume: bool = False,
    tasks: list[ChipTask] | None = None,
) -> pd.DataFrame:
    """Chip every source into ``tree.chips`` and write ``tree.chips_csv``; return the index.

    With ``resume`` chips already in ``tree.chips`` are kept (a run with the same settings
    stopped halfway: the stage contract decides that) and only the missing ones are written.
    No chip kept is an error that says why. ``tasks`` is what :func:`plan_chips` returned, when
    the caller has it already.
    """
    tasks = tasks if tasks is not None else plan_chips(sources, tree, args, reuse=resume)
    tree.chips.mkdir(parents=True, exist_ok=True)
    # Work goes out in batches of chips of one source: one open per batch, fewer round trips.
    batches = [tuple(group[i : i + _BATCH]) for group in _by_source(tasks) for i in range(0, len(group), _BATCH)]
    results = map_tasks(make_chips, batches, parallel, desc="chip", unit="batch", progress=cli.progress)
    rows = [r for batch in results for r in batch if r is not None]
    if not rows:
        raise DataError(no_chips_message(sources, args, len(tasks)))
    frame = pd.DataFrame(rows, columns=list(CHIP_COLUMNS))
    # Sources inside the data tree are recorded relative to it, so the tree can move.
    frame["source"] = [_relative(Path(p), tree.root) for p in frame["source"]]
    write_index(frame, tree.chips_csv)
    log.info(
        "chip: %d chips of %dx%d px from %d source(s) (%d skipped as more than %.0f%% nodata) -> %s",
        len(frame),
        args.size,
        args.size,
        len(sources),
        len(tasks) - len(frame),
        args.max_nodata * 100,
        tree.chips,
    )
    return frame


def _sizes(sources: list[Path]) -> list[tuple[int, int]]:
    sizes = []
    for source in sources:
        with open_raster(source) as src:
            sizes.append((src.width, src.height))
    return sizes


def too_small(sources: list[Path], args: ChipArgs) -> bool:
    """Whether every source is smaller than the valid part a chip needs (chips would be mostly padding)."""
    return all(w * h < (1 - args.max_nodata) * args.size**2 for w, h in _sizes(sources))


def no_chips_message(sources: list[Path], args: ChipArgs, planned: int) -> str:
    """Why no chip was kept: chips larger than the rasters, or rasters without valid pixels."""
    sizes = _sizes(sources)
    shown = ", ".join(f"{w}x{h}" for w, h in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
    if too_small(sources, args):
        return (
            f"no chip kept: the source raster(s) ({shown} px) are too small for chips of {args.size} px, which "
            f"would be more than {args.max_nodata:.0%} padding (chip_args.max_nodata): lower chip_args.size"
        )
    return (
        f"no chip kept: all {planned} chips of {args.size} px are more than {args.max_nodata:.0%} nodata "
        f"(chip_args.max_nodata): the source raster(s) ({shown} px) hold (almost) no valid pixel — check "
        "their nodata value and that they hold imagery"
    )


def chip_stage(
    settings: Settings, tree: DataTree, *, overwrite: bool = False, given: Path | None = None
) -> pd.DataFrame:
    """The chip stage under the stage contract: skip, resume or redo; refuse to mix settings."""
    if given is not None and not given.exists():  # before the record's "inputs changed": the path is the news
        raise InputMissingError(f"--input {given} not found")
    run = begin("chip", settings, tree, overwrite=overwrite, given={"input": given})
    if run.skip:
        run.say_skip()
        return read_index(tree.chips_csv)
    sources = resolve_inputs(tree, settings.chip_args, given)
    # Plan first: it opens every source, so an unreadable one fails before old chips are deleted;
    # so do chips too large for every source (they could only be padding).
    tasks = plan_chips(sources, tree, settings.chip_args, reuse=run.resume)
    if too_small(sources, settings.chip_args):
        raise DataError(no_chips_message(sources, settings.chip_args, 0))
    run.start()
    frame = chip_sources(sources, tree, settings.chip_args, settings.parallel, resume=run.resume, tasks=tasks)
    run.finish(chips=len(frame), size=settings.chip_args.size)
    return frame


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def resolve_inputs(tree: DataTree, args: ChipArgs, given: Path | None) -> list[Path]:
    """The rasters to chip: --input (a raster or a folder), else the mosaic or raw/."""
    if given is not None:
        return tree.rasters_at(
            given,
            empty=f"no GeoTIFF in {given}: point --input at a raster or a folder of .tif files",
            missing=f"--input {given} not found",
        )
    if args.source == "raw":
        found = tree.list_rasters(tree.raw) if tree.raw.is_dir() else []
        if not found:
            raise InputMissingError(
                f"no GeoTIFF in {tree.raw}: run python download/download.py or python sample/sample.py first"
            )
        return found
    if not tree.mosaic.is_file():
        raise InputMissingError(
            f"mosaic {tree.mosaic} not found: run python mosaic/mosaic.py first, or set chip_args.source to raw"
        )
    return [tree.mosaic]


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    parser.add_argument("--input", type=Path, metavar="PATH", help="raster or folder of rasters to chip")

    def body(args: argparse.Namespace, settings: Settings, tree: DataTree) -> None:
        chip_stage(settings, tree, overwrite=args.overwrite, given=args.input)

    return cli.run(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
