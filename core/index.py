"""chips.csv: the chip index that chip writes and mask and split extend.

One row per chip: ``id, file, source, row_off, col_off, width, height, left, bottom, right,
top, crs, nodata_share``; mask adds ``roof_share``; split adds ``split`` and ``split_file``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from core.errors import DataError, InputMissingError
from core.raster import atomic_path

#: Columns chip writes, in order.
CHIP_COLUMNS = (
    "id",
    "file",
    "source",
    "row_off",
    "col_off",
    "width",
    "height",
    "left",
    "bottom",
    "right",
    "top",
    "crs",
    "nodata_share",
)


def read_index(path: Path, needs: tuple[str, ...] = (), fix: str = "run python chip/chip.py first") -> pd.DataFrame:
    """Read chips.csv; missing file or missing columns say which stage to run."""
    if not path.is_file():
        raise InputMissingError(f"chip index {path} not found: {fix}")
    try:
        frame = pd.read_csv(path, dtype={"file": str, "source": str, "crs": str, "split": str, "split_file": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"chip index {path} is unreadable ({exc}): rerun python chip/chip.py --overwrite") from exc
    for column in ("split", "split_file"):  # chips left out by split are "" (pandas reads NaN)
        if column in frame.columns:
            frame[column] = frame[column].fillna("")
    missing = [c for c in (*CHIP_COLUMNS, *needs) if c not in frame.columns]
    if missing:
        raise DataError(f"chip index {path} lacks columns {missing}: {fix}")
    if frame.empty:
        raise DataError(f"chip index {path} lists no chips: rerun python chip/chip.py")
    return frame


def write_index(frame: pd.DataFrame, path: Path) -> Path:
    """Write chips.csv atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.10g")
    return path
