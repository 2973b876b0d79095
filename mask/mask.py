"""Burn polygon labels into one mask per chip: python mask/mask.py

Reads the label file in data/labels/ (Shapefile, GeoJSON or GeoPackage, any CRS; or
mask_args.label_file), keeps the polygons mask_args.filter selects (default roof_type in
[metal], when the file has that attribute), repairs invalid ones, reprojects them to the
chips' CRS and writes data/masks/chip_NNNNNN.tif: same name and grid as the chip, uint8,
0 = background, 255 = metal roof, 0 wherever the chip is nodata; with mask_args.classes a
last band, class, holds each roof's class id (1, 2 ... as the map names them; 128 unknown). Adds roof_share to
data/chips.csv. A spatial index picks each chip's polygons, so work grows with chips plus
polygons, not their product. Fails, giving both CRSs and both bounds, when no polygon
overlaps any chip (the classic silent CRS mismatch).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import shapely

from core import cli
from core.errors import LabelError, OutputExistsError
from core.index import CHIP_COLUMNS, read_index, write_index
from core.parallel import map_tasks
from core.raster import CLASS_BAND, CLASSES_TAG, open_raster, read_raster, valid_pixels, write_raster
from core.settings import MaskArgs, ParallelArgs, Settings
from core.targets import ROOF, UNKNOWN, band_widths, make_targets, pixel_size_m
from core.tree import DataTree
from core.vector import LabelIndex, load_labels
from workflow.contract import begin

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskTask:
    """One mask to burn: the chip, the output, the chip's roofs and unknown polygons as WKB, the bands."""

    chip: str
    out: str
    shapes: tuple[bytes, ...]
    all_touched: bool
    compression: str
    reuse: bool
    unknown: tuple[bytes, ...] = ()
    targets: tuple[str, ...] = ("footprint",)
    widths: tuple[int, int] = (1, 2)
    classes: tuple[int, ...] | None = None  # each roof's class id, with a class map
    class_names: tuple[str, ...] = ()


def burn_mask(task: MaskTask) -> float:
    """Write one mask on its chip's grid; return the roof share of the chip's valid pixels of known class."""
    data, profile = read_raster(task.chip)  # a truncated chip is an error naming it
    transform, crs, shape = profile["transform"], profile["crs"], data.shape[1:]
    valid = valid_pixels(data, profile["nodata"])
    if task.reuse and Path(task.out).is_file():
        with open_raster(task.out) as done:
            footprint = done.read(1)
    else:
        bands = make_targets(
            shapely.from_wkb(list(task.shapes)) if task.shapes else [],
            shapely.from_wkb(list(task.unknown)) if task.unknown else [],
            shape,
            transform,
            targets=task.targets,
            widths=task.widths,
            all_touched=task.all_touched,
            valid=valid,
            classes=task.classes,
        )
        names = (*task.targets, CLASS_BAND) if task.classes is not None else task.targets
        tags = {CLASSES_TAG: ",".join(task.class_names)} if task.classes is not None else None
        write_raster(task.out, bands, crs=crs, transform=transform, nodata=None, compression=task.compression,
                     descriptions=names, tags=tags)  # fmt: skip
        footprint = bands[0]
    known = valid & (footprint != UNKNOWN)
    n_known = int(known.sum())
    return float((footprint[known] == ROOF).sum() / n_known) if n_known else 0.0


def plan_masks(tree: DataTree, args: MaskArgs, *, compression: str = "zstd", reuse: bool = False) -> tuple:
    """Read the index and labels and give every chip its polygons; return (index, tasks, labels, label file).

    Fails before anything is written when no polygon overlaps any chip.
    """
    index = read_index(tree.chips_csv)
    gdf, unknown, label_path = load_labels(tree.labels, args)
    tasks: list[MaskTask] = []
    hits = 0
    for crs, group in index.groupby("crs", sort=False):
        roofs = gdf.to_crs(crs) if gdf.crs != crs else gdf
        lookup = LabelIndex(roofs.geometry.to_numpy())
        others = unknown.to_crs(crs) if len(unknown) and unknown.crs != crs else unknown
        unknown_lookup = LabelIndex(others.geometry.to_numpy()) if len(others) else None
        widths = group_widths(group, crs, args)
        ids = roofs["class_id"].to_numpy() if args.classes else None
        for row in group.itertuples():
            box = (row.left, row.bottom, row.right, row.top)
            found = lookup.positions(box)
            shapes = list(lookup.geometries[found])
            hits += bool(shapes)
            grey = unknown_lookup.query(box) if unknown_lookup is not None else []
            tasks.append(
                MaskTask(
                    chip=str(tree.chips / row.file),
                    out=str(tree.masks / row.file),
                    shapes=tuple(shapely.to_wkb(shapes)) if shapes else (),
                    all_touched=args.all_touched,
                    compression=compression,
                    reuse=reuse,
                    unknown=tuple(shapely.to_wkb(grey)) if grey else (),
                    targets=tuple(args.targets),
                    widths=widths,
                    classes=tuple(int(k) for k in ids[found]) if ids is not None else None,
                    class_names=args.class_names,
                )
            )
    if hits == 0:
        raise LabelError(no_overlap_message(label_path, gdf, index))
    return index, tasks, gdf, label_path


def group_widths(group: pd.DataFrame, crs: str, args: MaskArgs) -> tuple[int, int]:
    """Boundary and contact widths in pixels for the chips of one CRS (mask_args, else from their pixel size)."""
    from rasterio.crs import CRS
    from rasterio.transform import from_bounds

    first = group.iloc[0]
    transform = from_bounds(first.left, first.bottom, first.right, first.top, first.width, first.height)
    known = CRS.from_user_input(crs) if isinstance(crs, str) and crs else None
    pixel_m = pixel_size_m(transform, known, (first.bottom + first.top) / 2)
    chip = int(min(group["width"].min(), group["height"].min()))
    return band_widths(args.boundary_width, args.contact_width, pixel_m, chip)


def mask_chips(
    tree: DataTree,
    args: MaskArgs,
    parallel: ParallelArgs,
    *,
    compression: str = "zstd",
    resume: bool = False,
    plan: tuple | None = None,
) -> pd.DataFrame:
    """Write a mask for every chip in chips.csv and add its roof_share; return the index.

    With ``resume`` masks already in ``tree.masks`` are kept (the stage contract decides that
    they were made with the same settings). The index written holds chip's columns and
    roof_share only: the split of an earlier run no longer applies to new masks. ``plan`` is
    what :func:`plan_masks` returned, when the caller has it already.
    """
    index, tasks, gdf, label_path = plan or plan_masks(tree, args, compression=compression, reuse=resume)
    tree.masks.mkdir(parents=True, exist_ok=True)
    shares = map_tasks(burn_mask, tasks, parallel, desc="mask", unit="chip", progress=cli.progress)
    # Tasks were grouped by CRS: match results to rows by file name.
    by_file = {Path(t.out).name: share for t, share in zip(tasks, shares, strict=True)}
    # A resumed run is the same run: the split made from it still holds. A new one drops it.
    kept = [c for c in ("split", "split_file") if resume and c in index.columns]
    index = index[[*CHIP_COLUMNS, *kept]].copy()
    index.insert(len(CHIP_COLUMNS), "roof_share", index["file"].map(by_file))
    write_index(index, tree.chips_csv)
    roofed = int((index["roof_share"] > 0).sum())
    log.info(
        "mask: %d masks from %d polygons of %s, %d chips with roofs, mean roof share %.2f%% -> %s",
        len(index),
        len(gdf),
        label_path.name,
        roofed,
        100 * index["roof_share"].mean(),
        tree.masks,
    )
    if roofed == 0:
        if (index["nodata_share"] >= 1.0).all():
            log.warning("mask: every chip is wholly nodata, so no mask has a roof pixel: check the imagery")
        else:
            log.warning("mask: no chip has a roof pixel although polygons overlap the chips: are the polygons tiny?")
    return index


def mask_stage(settings: Settings, tree: DataTree, *, overwrite: bool = False) -> pd.DataFrame:
    """The mask stage under the stage contract: skip, resume or redo; refuse to mix label definitions."""
    try:
        run = begin("mask", settings, tree, overwrite=overwrite)
    except OutputExistsError:  # a label setting that cannot work is said first, not "add --overwrite" and then that
        load_labels(tree.labels, settings.mask_args)
        raise
    if run.skip:
        run.say_skip()
        return read_index(tree.chips_csv, needs=("roof_share",))
    # Labels checked before anything is removed: a failed --overwrite keeps the old masks.
    compression = settings.chip_args.compression
    plan = plan_masks(tree, settings.mask_args, compression=compression, reuse=run.resume)
    run.start()
    index = mask_chips(
        tree, settings.mask_args, settings.parallel, compression=compression, resume=run.resume, plan=plan
    )
    run.finish(masks=len(index), chips_with_roofs=int((index["roof_share"] > 0).sum()))
    return index


def no_overlap_message(label_path: Path, gdf, index: pd.DataFrame) -> str:
    """The CRS-mismatch message: both CRSs and both bounds, and what to check."""
    lb = ", ".join(f"{v:.6g}" for v in gdf.total_bounds)
    crs = index["crs"].iloc[0]
    chips = index[index["crs"] == crs]
    cb = ", ".join(
        f"{v:.6g}" for v in (chips["left"].min(), chips["bottom"].min(), chips["right"].max(), chips["top"].max())
    )
    return (
        f"no polygon of {label_path.name} ({gdf.crs.to_string()}, bounds {lb}) overlaps any chip "
        f"({crs}, bounds {cb}): check the label file's CRS and that it covers this imagery"
    )


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)

    def body(args: argparse.Namespace, settings: Settings, tree: DataTree) -> None:
        mask_stage(settings, tree, overwrite=args.overwrite)

    return cli.run(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
