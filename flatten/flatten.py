"""Flatten chips and masks into one pixel table: python flatten/flatten.py

Reads the chips in flatten_args.frames (default train_frames/) and the masks of the same
names in flatten_args.masks, and writes data/flat/pixels.csv (or pixels.parquet with
flatten_args.format parquet). Columns: latitude, longitude (EPSG:4326, pixel centre), row,
col (pixel in the chip), band, value, label (0 background, 1 roof), chip (file name): one row
per pixel and band (flatten_args.layout long, the default), or one row per pixel with columns
band_1 ... band_N (wide). Nodata pixels (every band nodata) and pixels of unknown class are
left out. Masks with a class band (mask_args.classes) make label the class id (0 background,
1..K) and write data/flat/pixels.classes.json beside the table: the class names (ids 1..K in
order) and the pixels of each class; the masks must all name the same classes.
flatten_args.sample_fraction keeps that share of pixels; flatten_args.balance N keeps every
roof pixel and N times as many background pixels. Each chip becomes a part file in worker
processes (parallel.workers), so memory does not grow with the number of chips; the parts are
joined into the table, which appears only when complete. A stopped run resumes from its parts.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.crs import CRS as RasterioCRS

from core import cli  # first: it makes `import flatten` find the package

if __name__ == "__main__":
    cli.unshadow_package(__file__)

from core.errors import DataError, InputMissingError
from core.files import atomic_path
from core.index import missing_masks
from core.parallel import map_tasks
from core.raster import common_classes, common_kind, open_raster, read_labelled_pair, usable_pixels
from core.settings import FlattenArgs, ParallelArgs, Settings
from core.tree import DataTree, refuse_overwrite
from flatten.table import (
    LONG_COLUMNS,
    band_column,
    classes_path,
    remove_classes,
    table_classes,
    table_name,
    wide_columns,
    write_classes,
)
from workflow.contract import begin

log = logging.getLogger(__name__)

#: Parquet codec of the table: fast, and about as small as gzip on these columns.
PARQUET_COMPRESSION = "zstd"


@dataclass(frozen=True)
class FlattenTask:
    """One chip to flatten into a part file (picklable: paths and numbers only)."""

    number: int
    bands: int
    frame: str
    mask: str
    out: str
    layout: str
    format: str
    roof_keep: float
    background_keep: float
    seed: int


@functools.lru_cache(maxsize=8)
def _to_lonlat(crs_wkt: str) -> Transformer:
    return Transformer.from_crs(CRS.from_wkt(crs_wkt), CRS.from_epsg(4326), always_xy=True)


def _read_image_valid_labels_georef(
    frame: Path, mask: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Affine, RasterioCRS | None]:
    """Chip pixels, its pixels to use (valid and of known class), the labels (0 background, 1 roof or the
    class ids), transform and CRS."""
    data, labels, known, profile, _ = read_labelled_pair(frame, mask)
    return data, usable_pixels(data, profile["nodata"], known), labels, profile["transform"], profile["crs"]


def select_pixels(
    valid: np.ndarray, roof: np.ndarray, roof_keep: float, background_keep: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean (rows, cols) of the pixels to keep: valid ones, each class kept with its probability."""
    keep = valid.copy()
    if roof_keep < 1.0 or background_keep < 1.0:
        draw = rng.random(valid.shape)
        keep &= np.where(roof, draw < roof_keep, draw < background_keep)
    return keep


def chip_table(
    frame: Path,
    mask: Path,
    *,
    layout: str = "long",
    roof_keep: float = 1.0,
    background_keep: float = 1.0,
    rng: np.random.Generator | None = None,
) -> pa.Table:
    """One chip's rows of the flat table (see flatten.table for the columns), pixels in row-major order."""
    data, valid, labels, transform, crs = _read_image_valid_labels_georef(frame, mask)
    if crs is None:
        raise DataError(f"{frame} has no CRS, so latitude and longitude are unknown: chip georeferenced imagery")
    keep = select_pixels(valid, labels > 0, roof_keep, background_keep, rng or np.random.default_rng(0))
    rows, cols = np.nonzero(keep)
    # Pixel centres in the chip's CRS, then EPSG:4326.
    x, y = transform @ (cols + 0.5, rows + 0.5)
    lon, lat = _to_lonlat(crs.to_wkt()).transform(np.asarray(x, np.float64), np.asarray(y, np.float64))
    values = data[:, rows, cols]
    bands, n = values.shape
    label = labels[rows, cols].astype(np.uint8)
    coords = {
        "latitude": np.asarray(lat, np.float64),
        "longitude": np.asarray(lon, np.float64),
        "row": rows.astype(np.int32),
        "col": cols.astype(np.int32),
    }
    if layout == "long":
        columns = {k: np.repeat(v, bands) for k, v in coords.items()}
        columns["band"] = np.tile(np.arange(1, bands + 1, dtype=np.int16), n)
        columns["value"] = values.T.ravel()
        columns["label"] = np.repeat(label, bands)
        names = LONG_COLUMNS
    else:
        columns = dict(coords)
        for b in range(bands):
            columns[band_column(b + 1)] = values[b]
        columns["label"] = label
        names = wide_columns(bands)
    length = len(columns["label"])
    arrays = [pa.array(columns[c]) for c in names if c != "chip"]
    arrays.append(pa.repeat(pa.scalar(Path(frame).name), length) if length else pa.array([], pa.string()))
    return pa.Table.from_arrays(arrays, names=list(names))


def _write_part(table: pa.Table, path: Path, fmt: str) -> None:
    with atomic_path(path) as tmp:
        if fmt == "csv":
            pacsv.write_csv(table, tmp, pacsv.WriteOptions(include_header=False, quoting_style="none"))
        else:
            pq.write_table(table, tmp, compression=PARQUET_COMPRESSION)


def flatten_chip(task: FlattenTask) -> tuple[int, int, list[int]]:
    """Write one chip's part file (unless a stopped run left it); return (pixels, roof pixels, pixels of
    each label 0, 1 ...)."""
    out = Path(task.out)
    counts = out.with_suffix(".json")
    if out.is_file() and counts.is_file():
        done = json.loads(counts.read_text(encoding="utf-8"))
        if "labels" in done:
            return done["pixels"], done["roof"], done["labels"]
    rng = np.random.default_rng([task.seed, task.number])
    table = chip_table(
        Path(task.frame),
        Path(task.mask),
        layout=task.layout,
        roof_keep=task.roof_keep,
        background_keep=task.background_keep,
        rng=rng,
    )
    per_pixel = task.bands if task.layout == "long" else 1
    pixels = table.num_rows // per_pixel
    labels = table["label"].to_numpy()
    roof = int(np.count_nonzero(labels)) // per_pixel
    by_label = [int(n) // per_pixel for n in np.bincount(labels)] if labels.size else []
    _write_part(table, out, task.format)
    with atomic_path(counts) as tmp:
        tmp.write_text(json.dumps({"pixels": pixels, "roof": roof, "labels": by_label}), encoding="utf-8")
    return pixels, roof, by_label


def count_classes(pair: tuple[str, str]) -> tuple[int, int]:
    """(roof, background) valid pixels of one chip and its mask (roof: of any class)."""
    _, valid, labels, _, _ = _read_image_valid_labels_georef(Path(pair[0]), Path(pair[1]))
    n_roof = int(np.count_nonzero(valid & (labels > 0)))
    return n_roof, int(np.count_nonzero(valid)) - n_roof


def keep_probabilities(
    args: FlattenArgs, pairs: list[tuple[Path, Path]], parallel: ParallelArgs
) -> tuple[float, float]:
    """Probabilities of keeping a roof and a background pixel, from sample_fraction and balance."""
    if args.balance is None:
        return args.sample_fraction, args.sample_fraction
    counts = map_tasks(
        count_classes, [(str(f), str(m)) for f, m in pairs], parallel, desc="count", unit="chip", progress=cli.progress
    )
    roof, background = (sum(c[i] for c in counts) for i in (0, 1))
    if roof == 0:
        raise DataError(
            f"flatten_args.balance needs roof pixels, but the {len(pairs)} masks hold none: "
            "set flatten_args.balance to null, or check the masks"
        )
    ratio = min(1.0, args.balance * roof / background) if background else 1.0
    return args.sample_fraction, args.sample_fraction * ratio


def pair_chips(frames: Path, masks: Path, tree: DataTree) -> list[tuple[Path, Path]]:
    """(chip, mask) pairs: every chip in ``frames`` and the mask of the same name in ``masks``."""
    if not frames.is_dir() or not tree.list_rasters(frames):
        raise InputMissingError(f"no chips in {frames}: run python split/split.py, or set flatten_args.frames")
    chips = tree.list_rasters(frames)
    missing = missing_masks([c.name for c in chips], masks)
    if missing:
        raise InputMissingError(
            f"{len(missing)} of {len(chips)} chips in {frames} have no mask in {masks} (e.g. {missing[0]}): "
            "run python split/split.py, or set flatten_args.masks"
        )
    common_kind(chips, f"one table needs chips of one kind: rechip the imagery ({frames})")
    return [(c, masks / c.name) for c in chips]


def _header_line(layout: str, bands: int) -> bytes:
    names = LONG_COLUMNS if layout == "long" else wide_columns(bands)
    return (",".join(names) + "\n").encode()


def _append(src: BinaryIO, dst: BinaryIO) -> None:
    """Append a whole file: in the kernel where it can (copy_file_range), else through a buffer."""
    size = os.fstat(src.fileno()).st_size
    start = os.lseek(dst.fileno(), 0, os.SEEK_CUR)
    try:
        while size > 0:
            copied = os.copy_file_range(src.fileno(), dst.fileno(), size)
            if copied == 0:
                raise OSError("copy_file_range copied nothing")
            size -= copied
    except (AttributeError, OSError):
        dst.seek(start)
        dst.truncate()
        src.seek(0)
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()


def join_parts(parts: list[Path], output: Path, fmt: str, header: bytes) -> None:
    """Join part files into ``output`` atomically: CSV byte by byte under one header, Parquet by tables."""
    with atomic_path(output) as tmp:
        if fmt == "csv":
            with tmp.open("wb") as dst:
                dst.write(header)
                dst.flush()
                for part in parts:
                    with part.open("rb") as src:
                        _append(src, dst)
            return
        writer = None
        try:
            for part in parts:
                table = pq.read_table(part)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression=PARQUET_COMPRESSION)
                if table.num_rows:
                    writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()


def flatten_chips(
    frames: Path,
    masks: Path,
    tree: DataTree,
    args: FlattenArgs,
    parallel: ParallelArgs,
    *,
    overwrite: bool = False,
    pairs: list[tuple[Path, Path]] | None = None,
) -> Path:
    """Flatten every chip in ``frames`` with its mask into ``tree.flat``; return the table's path.

    ``pairs`` is what :func:`pair_chips` returned, when the caller has it already.
    """
    output = tree.flat / table_name(args.format)
    refuse_overwrite([output], overwrite, "flatten")
    pairs = pairs if pairs is not None else pair_chips(frames, masks, tree)
    with open_raster(pairs[0][0]) as src:
        bands = src.count
    classes = common_classes([m for _, m in pairs])
    roof_keep, background_keep = keep_probabilities(args, pairs, parallel)
    # Parts of a stopped run are reused only when made from the same inputs and settings.
    key = hashlib.sha256(
        json.dumps([str(frames), str(masks), args.model_dump() | {"bands": bands}]).encode()
    ).hexdigest()
    parts_dir = tree.flat / f".parts-{key[:12]}"
    tree.flat.mkdir(parents=True, exist_ok=True)
    for stale in tree.flat.glob(".parts-*"):
        if stale != parts_dir or overwrite:
            shutil.rmtree(stale)
    parts_dir.mkdir(exist_ok=True)
    tasks = [
        FlattenTask(
            number=i,
            bands=bands,
            frame=str(frame),
            mask=str(mask),
            out=str(parts_dir / f"part_{i:06d}.{args.format}"),
            layout=args.layout,
            format=args.format,
            roof_keep=roof_keep,
            background_keep=background_keep,
            seed=args.seed,
        )
        for i, (frame, mask) in enumerate(pairs)
    ]
    counts = map_tasks(flatten_chip, tasks, parallel, desc="flatten", unit="chip", progress=cli.progress)
    pixels, roof = sum(c[0] for c in counts), sum(c[1] for c in counts)
    by_label = np.zeros(max([len(classes) + 1, *(len(c[2]) for c in counts)]), np.int64)
    for c in counts:
        by_label[: len(c[2])] += np.asarray(c[2], np.int64)
    if pixels == 0:
        shutil.rmtree(parts_dir)
        raise DataError(
            f"no pixel of the {len(pairs)} chips in {frames} was kept: raise flatten_args.sample_fraction, "
            "or check that the chips are not all nodata"
        )
    # The sidecar first: a table never appears without the names of its classes.
    if classes:
        write_classes(output, classes, by_label.tolist())
    else:
        remove_classes(output)
    join_parts([Path(t.out) for t in tasks], output, args.format, _header_line(args.layout, bands))
    shutil.rmtree(parts_dir)
    per_class = ", ".join(f"{n} {name}" for name, n in zip(classes, by_label[1:].tolist(), strict=False))
    log.info(
        "flatten: %d pixels (%d roof%s, %.2f%%) x %d bands from %d chips, %s layout -> %s (%.1f MB)%s",
        pixels,
        roof,
        f": {per_class}" if classes else "",
        100 * roof / pixels,
        bands,
        len(pairs),
        args.layout,
        output,
        output.stat().st_size / 2**20,
        f"; classes in {classes_path(output).name}" if classes else "",
    )
    return output


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)

    def body(args: argparse.Namespace, settings: Settings, tree: DataTree) -> None:
        flat = settings.flatten_args
        frames, masks = tree.root / flat.frames, tree.root / flat.masks
        run = begin("flatten", settings, tree, overwrite=args.overwrite)
        if run.skip:
            run.say_skip()
            return
        pairs = pair_chips(frames, masks, tree)
        run.start()
        # A resumed run keeps the parts of the chips it finished; a fresh one starts them over.
        output = flatten_chips(frames, masks, tree, flat, settings.parallel, overwrite=not run.resume, pairs=pairs)
        classes = table_classes(output)
        run.finish(table=output.name, **({"classes": list(classes)} if classes else {}))

    return cli.run(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
