"""chips.csv: the chip index that chip writes and mask and split extend.

One row per chip: ``id, file, source, row_off, col_off, width, height, left, bottom, right,
top, crs, nodata_share``; mask adds ``roof_share``; split adds ``split`` and ``split_file``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from core.errors import DataError, InputMissingError
from core.files import atomic_path
from core.raster import kind_of, open_raster, require_kind
from core.tree import DataTree, require

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


#: The stages that write chips.csv (chip) and add columns to it (mask, split), in order.
INDEX_STAGES = ("chip", "mask", "split")


def read_index(path: Path, needs: tuple[str, ...] = (), stage: str = "chip") -> pd.DataFrame:
    """Read chips.csv; missing file or missing columns say which stage to run: ``stage`` of
    :data:`INDEX_STAGES`, the one that adds the columns ``needs`` names (for a missing file, every stage up
    to it)."""
    fix = f"run python {stage}/{stage}.py first"
    if not path.is_file():
        chain = INDEX_STAGES[: INDEX_STAGES.index(stage) + 1]
        raise InputMissingError(
            f"chip index {path} not found: run {', then '.join(f'python {s}/{s}.py' for s in chain)}"
        )
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


def chip_kind(paths: list[Path], channels: int | None) -> tuple[int, str, float | None]:
    """Band count, dtype and nodata value shared by the chips; errors when they differ or disagree with
    ``channels`` (:attr:`core.settings.Settings.bands`; None: any count).

    Chips that declare no nodata (an unpadded chip of imagery without one) agree with any value,
    so the value is that of every chip that declares one, whichever chip comes first.
    """
    nodatas: set[float] = set()
    kind: tuple[int, str] | None = None
    for path in paths:
        with open_raster(path) as src:
            kind = kind or kind_of(src)
            require_kind(src, kind, Path(paths[0]), "the train and val chips must be alike: rechip the imagery")
            if src.nodata is not None:
                value = float(src.nodata)
                nodatas.add(math.nan if math.isnan(value) else value)  # one NaN object: NaN != NaN
    if kind is None:
        raise ValueError("chip_kind needs at least one chip")
    (bands, dtype), example = kind, Path(paths[0])
    if channels is not None and bands != channels:
        raise DataError(
            f"the chips have {bands} bands ({example.name}) but the settings say {channels} "
            f"(load_dataset_args.channels or model_args.input_shape[2]): set load_dataset_args.channels to {bands}, "
            "or to null with model_args.input_shape [rows, cols] to take the chips' count"
        )
    if len(nodatas) > 1:
        raise DataError(
            f"the chips declare different nodata values {sorted(nodatas)}: rechip with one chip_args.pad_value"
        )
    return bands, dtype, nodatas.pop() if nodatas else None


def missing_masks(names: list[str], masks: Path) -> list[str]:
    """The chip file names without a mask of the same name in ``masks``: the one pairing rule."""
    return [n for n in names if not (masks / n).is_file()]


def split_pairs(tree: DataTree, split: str) -> list[tuple[Path, Path]]:
    """(chip, mask) pairs of a split, paired by name; a missing folder, chip or mask says to run split."""
    fix = "run python split/split.py first"
    frames = require(tree.frames(split), f"{split} chips folder", fix)
    masks = require(tree.split_masks(split), f"{split} masks folder", fix)
    chips = tree.list_rasters(frames)
    if not chips:
        raise InputMissingError(f"no {split} chips in {frames}: {fix}")
    missing = missing_masks([c.name for c in chips], masks)
    if missing:
        raise InputMissingError(
            f"{len(missing)} {split} chips have no mask in {masks} (e.g. {missing[0]}): rerun python split/split.py"
        )
    return [(c, masks / c.name) for c in chips]


def chip_ids(tree: DataTree) -> dict[str, int]:
    """Chip id of every chip file of the data tree, keyed by its path relative to the tree
    (``chips/chip_000012.tif``, ``val_frames/val_3.tif``); empty without a readable chips.csv."""
    try:
        index = read_index(tree.chips_csv)
    except (InputMissingError, DataError):
        return {}
    ids = {f"{tree.chips.name}/{f}": int(i) for i, f in zip(index["id"], index["file"], strict=True)}
    if "split_file" in index.columns:
        for i, split, name in zip(index["id"], index["split"], index["split_file"], strict=True):
            if split and name:
                ids[f"{tree.frames(split).relative_to(tree.root).as_posix()}/{name}"] = int(i)
    return ids


def grid_of(src) -> dict[str, object]:
    """A raster's grid as plain values: CRS (WKT), transform (6 numbers), width, height."""
    return {
        "crs": src.crs.to_wkt() if src.crs else "",
        "transform": [round(float(v), 9) for v in tuple(src.transform)[:6]],
        "width": int(src.width),
        "height": int(src.height),
    }
