"""The flat pixel table: its columns, and reading it in chunks.

flatten writes it; summarize and the classical models read it. Two layouts:

- ``long``: one row per pixel and band: ``latitude, longitude, row, col, band, value, label, chip``,
  the rows of one pixel consecutive with bands 1..N in order;
- ``wide``: one row per pixel: ``latitude, longitude, row, col, band_1 ... band_N, label, chip``.

``latitude``/``longitude`` are the pixel centre in EPSG:4326, ``row``/``col`` the pixel in its
chip, ``label`` 0 (background) or 1 (roof), ``chip`` the chip's file name. Two formats: CSV
(``pixels.csv``) and Parquet (``pixels.parquet``).

Made from masks with a class band (mask_args.classes), ``label`` is the class id: 0
background, 1..K the classes; the sidecar ``pixels.classes.json`` (:func:`classes_path`)
names them (``classes``, ids 1..K in order), with the table it belongs to and the pixels of
each class. :func:`table_classes` reads it; without one a table has one class.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import DataError, InputMissingError
from core.files import atomic_path
from core.raster import ClassBandStats, exact_dtype

COORDINATES = ("latitude", "longitude", "row", "col")
LONG_COLUMNS = (*COORDINATES, "band", "value", "label", "chip")
FORMATS = ("csv", "parquet")
_BAND = re.compile(r"^band_(\d+)$")


def band_column(band: int) -> str:
    """Column of band number ``band`` (1-based) in the wide layout."""
    return f"band_{band}"


def wide_columns(bands: int) -> tuple[str, ...]:
    """Columns of the wide layout for ``bands`` bands."""
    return (*COORDINATES, *(band_column(b) for b in range(1, bands + 1)), "label", "chip")


def table_name(fmt: str) -> str:
    """File name of the flat table in ``data/flat/`` for a format."""
    return f"pixels.{fmt}"


def find_table(folder: Path, preferred: str = "csv") -> Path:
    """``pixels.<preferred>`` in ``folder``, else the other format's file; error when neither exists."""
    for fmt in (preferred, *(f for f in FORMATS if f != preferred)):
        path = folder / table_name(fmt)
        if path.is_file():
            return path
    raise InputMissingError(f"no flat table (pixels.csv or pixels.parquet) in {folder}: run python flatten/flatten.py")


def _format(path: Path) -> str:
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown table format {path.suffix!r}: use a .csv or .parquet file")
    return fmt


def iter_chunks(path: Path, chunk_rows: int, columns: Sequence[str] | None = None) -> Iterator[pd.DataFrame]:
    """The table ``chunk_rows`` rows at a time (only ``columns`` when given)."""
    fmt = _format(path)
    cols = list(columns) if columns is not None else None
    try:
        if fmt == "csv":
            reader = pd.read_csv(path, usecols=cols, chunksize=chunk_rows, dtype={"chip": str})
            with reader:
                yield from reader
        else:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=cols):
                yield batch.to_pandas()
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"flat table {path} is empty (no header): rerun python flatten/flatten.py") from exc
    except (pd.errors.ParserError, pa.ArrowException, UnicodeDecodeError, OSError) as exc:
        raise DataError(
            f"flat table {path} is unreadable ({exc}): rerun python flatten/flatten.py --overwrite"
        ) from exc


def _header(path: Path) -> list[str]:
    if _format(path) == "parquet":
        try:
            return list(pq.ParquetFile(path).schema_arrow.names)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"flat table {path} is not a readable Parquet file ({exc})") from exc
    try:
        return list(pd.read_csv(path, nrows=0).columns)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"flat table {path} is empty (no header): rerun python flatten/flatten.py") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(
            f"flat table {path} is unreadable ({exc}): rerun python flatten/flatten.py --overwrite"
        ) from exc


@dataclass(frozen=True)
class TableInfo:
    """What a flat table holds: format, layout, band count, columns."""

    path: Path
    format: str
    layout: str
    bands: int
    columns: tuple[str, ...]
    classes: tuple[str, ...] = ()  # the class names of labels 1..K (the sidecar's); empty: label 1 is roof

    @property
    def has_label(self) -> bool:
        return "label" in self.columns

    @property
    def value_columns(self) -> tuple[str, ...]:
        """Columns holding pixel values: ``value`` (long) or ``band_1`` ... (wide)."""
        return ("value",) if self.layout == "long" else tuple(band_column(b) for b in range(1, self.bands + 1))


def inspect_table(path: Path, chunk_rows: int = 100_000) -> TableInfo:
    """Format, layout and band count of a flat table; errors for a table with no rows or no band values."""
    path = Path(path)
    if not path.is_file():
        raise InputMissingError(f"flat table {path} not found: run python flatten/flatten.py")
    columns = _header(path)
    wide = sorted(int(m.group(1)) for c in columns if (m := _BAND.match(c)))
    if {"band", "value"} <= set(columns):
        first = next(iter_chunks(path, chunk_rows, ["band"]), None)
        if first is None or first.empty:
            raise DataError(f"flat table {path} holds no rows: rerun python flatten/flatten.py (check sample_fraction)")
        return TableInfo(path, _format(path), "long", int(first["band"].max()), tuple(columns), table_classes(path))
    if wide:
        if wide != list(range(1, len(wide) + 1)):
            raise DataError(f"flat table {path}: band columns {wide} are not band_1 ... band_N")
        first = next(iter_chunks(path, chunk_rows, [band_column(1)]), None)
        if first is None or first.empty:
            raise DataError(f"flat table {path} holds no rows: rerun python flatten/flatten.py (check sample_fraction)")
        return TableInfo(path, _format(path), "wide", len(wide), tuple(columns), table_classes(path))
    raise DataError(
        f"flat table {path} has neither band/value columns (long layout) nor band_1 ... band_N (wide): "
        f"it has {', '.join(columns)}"
    )


def iter_pixels(info: TableInfo, chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(values (n, bands), labels (n,)) of the table's pixels, chunk by chunk.

    Long tables must hold each pixel's bands 1..N on consecutive rows, as flatten writes them;
    a chunk's incomplete last pixel is carried into the next chunk.
    """
    if not info.has_label:
        raise DataError(f"flat table {info.path} has no label column: flatten with masks (flatten_args.masks)")
    if info.layout == "wide":
        for chunk in iter_chunks(info.path, chunk_rows, [*info.value_columns, "label"]):
            yield chunk[list(info.value_columns)].to_numpy(), chunk["label"].to_numpy()
        return
    n = info.bands
    expected = np.arange(1, n + 1)
    carry: pd.DataFrame | None = None
    for chunk in iter_chunks(
        info.path, max(chunk_rows - chunk_rows % n, n), ["row", "col", "band", "value", "label", "chip"]
    ):
        if carry is not None:
            chunk = pd.concat([carry, chunk], ignore_index=True)
        whole = len(chunk) - len(chunk) % n
        carry = chunk.iloc[whole:] if whole < len(chunk) else None
        part = chunk.iloc[:whole]
        bands = part["band"].to_numpy().reshape(-1, n)
        same = all(
            (part[c].to_numpy().reshape(-1, n) == part[c].to_numpy().reshape(-1, n)[:, :1]).all()
            for c in ("row", "col", "chip", "label")
        )
        if not same or not (bands == expected).all():
            raise DataError(
                f"flat table {info.path}: rows are not grouped by pixel with bands 1..{n} in order: "
                "write it with python flatten/flatten.py, or use flatten_args.layout wide"
            )
        yield part["value"].to_numpy().reshape(-1, n), part["label"].to_numpy().reshape(-1, n)[:, 0]
    if carry is not None and len(carry):
        raise DataError(f"flat table {info.path}: the last pixel has {len(carry)} of {n} band rows")


def _band_values(chunk: pd.DataFrame, info: TableInfo) -> list[tuple[int, np.ndarray, np.ndarray | None]]:
    """(band index, values, labels or None) of each band in a chunk of the table."""
    labels = chunk["label"].to_numpy() if info.has_label else None
    if info.layout == "wide":
        return [(b, chunk[c].to_numpy(), labels) for b, c in enumerate(info.value_columns)]
    band = chunk["band"].to_numpy()
    value = chunk["value"].to_numpy()
    out = []
    for b in range(info.bands):
        sel = band == b + 1
        out.append((b, value[sel], None if labels is None else labels[sel]))
    return out


def table_statistics(path: Path, chunk_rows: int = 1_000_000) -> tuple[ClassBandStats, TableInfo]:
    """Per-band statistics of a flat table, overall and per class, read ``chunk_rows`` rows at a time.

    A first pass finds each band's range and whether its values are integers: integers that
    fit 8 or 16 bits are counted value by value (exact); others binned over that range.
    """
    info = inspect_table(path)
    columns = [*(["band"] if info.layout == "long" else []), *info.value_columns]
    columns += ["label"] if info.has_label else []
    lo, hi = np.full(info.bands, np.inf), np.full(info.bands, -np.inf)
    integer = np.ones(info.bands, bool)
    rows = 0
    for chunk in iter_chunks(path, chunk_rows, columns):
        rows += len(chunk)
        if info.layout == "long" and len(chunk) and (chunk["band"].min() < 1 or chunk["band"].max() > info.bands):
            raise DataError(f"flat table {path}: band numbers must be 1..{info.bands}, found {chunk['band'].max()}")
        for b, values, _ in _band_values(chunk, info):
            if values.size:
                lo[b], hi[b] = min(lo[b], np.nanmin(values)), max(hi[b], np.nanmax(values))
                integer[b] &= values.dtype.kind in "iu" or bool(np.all(np.mod(values[~np.isnan(values)], 1) == 0))
    if rows == 0:
        raise DataError(f"flat table {path} holds no rows: rerun python flatten/flatten.py (check sample_fraction)")
    dtypes = [
        (exact_dtype(lo[b], hi[b]) if integer[b] and np.isfinite(lo[b]) else None) or np.dtype(np.float64)
        for b in range(info.bands)
    ]
    finite_lo = [float(v) if np.isfinite(v) else 0.0 for v in lo]
    finite_hi = [float(v) if np.isfinite(v) else 0.0 for v in hi]
    k = len(info.classes)
    stats = ClassBandStats(dtypes, finite_lo, finite_hi, info.classes if info.has_label else ())
    for chunk in iter_chunks(path, chunk_rows, columns):
        for b, values, labels in _band_values(chunk, info):
            if labels is None:
                roof = np.zeros(values.shape, bool)
            elif k:
                if labels.size and (labels.min() < 0 or labels.max() > k):
                    bad = labels.max() if labels.max() > k else labels.min()
                    raise DataError(
                        f"flat table {path} holds label {bad} but {classes_path(path).name} names {k} classes "
                        f"(labels 0..{k}): rerun python flatten/flatten.py --overwrite"
                    )
                roof = labels
            else:
                roof = labels > 0
            stats.add(b, values if dtypes[b].kind == "f" else values.astype(dtypes[b]), roof)
    return stats, info


# --- the class sidecar ---------------------------------------------------------------------------


def classes_path(table: Path) -> Path:
    """The sidecar naming a table's classes: ``pixels.classes.json`` beside ``pixels.csv`` / ``.parquet``."""
    return Path(table).with_suffix(".classes.json")


def write_classes(table: Path, classes: Sequence[str], pixels: Sequence[int]) -> Path:
    """Write the sidecar of ``table`` (written before the table): class names of labels 1..K, and the
    pixels of each label 0..K."""
    names = ["background", *classes]
    counts = list(pixels) + [0] * (len(names) - len(pixels))
    record = {
        "table": Path(table).name,
        "classes": list(classes),
        "label": {str(i): name for i, name in enumerate(names)},
        "pixels": {name: int(n) for name, n in zip(names, counts, strict=True)},
    }
    path = classes_path(table)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def remove_classes(table: Path) -> None:
    """Remove the sidecar of ``table`` (a one-class table has none); a sidecar of another table stays."""
    path = classes_path(table)
    if path.is_file() and _sidecar(path).get("table") == Path(table).name:
        path.unlink()


def _sidecar(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is unreadable ({exc}): rerun python flatten/flatten.py --overwrite") from exc
    if not isinstance(record, dict) or not isinstance(record.get("classes"), list):
        raise DataError(f"{path} names no classes (a list 'classes'): rerun python flatten/flatten.py --overwrite")
    return record


def table_classes(table: Path) -> tuple[str, ...]:
    """The class names of a table's labels 1..K (its sidecar's); empty: one class (label 1 roof)."""
    path = classes_path(table)
    if not path.is_file():
        return ()
    record = _sidecar(path)
    if record.get("table") != Path(table).name:
        return ()  # the sidecar of the table's other format
    return tuple(str(c) for c in record["classes"])
