"""Split chips and masks into training, validation and test sets: python split/split.py

Reads data/chips.csv (with the roof shares mask added) and fills train_frames/ train_masks/
val_frames/ val_masks/ (and test_* when split_args.fractions.test > 0) with train_0.tif,
train_1.tif, ... as the original pipeline named them: hard links where the file system
allows, copies otherwise. Strategies (split_args.strategy): random; spatial (blocks of
split_args.block x block neighbouring chips go to one split, so neighbours do not leak
between training and validation; of 64 random deals of the blocks, the one whose splits, after
the overlap rule below, are closest to the overall roof share and lose the fewest chips to it);
stratified (chips with and without roofs spread evenly across splits). split_args.keep_empty
keeps that share of roof-free chips. Val and test chips that share pixels with a training chip
(chip_args.stride below the chip size) are left out. Records each chip's split and file name in
chips.csv.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from core import cli
from core.errors import DataError, InputMissingError
from core.files import atomic_path
from core.index import missing_masks, read_index, write_index
from core.settings import Settings, SplitArgs
from core.tree import SPLITS, DataTree
from workflow.contract import begin

log = logging.getLogger(__name__)


def allocate(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Whole counts per split summing to ``n``, closest to the fractions (largest remainder)."""
    exact = {k: f * n for k, f in fractions.items()}
    counts = {k: int(np.floor(v)) for k, v in exact.items()}
    rest = n - sum(counts.values())
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], list(exact).index(k)))[:rest]:
        counts[k] += 1
    return counts


def ensure_each(counts: dict[str, int], fractions: dict[str, float]) -> dict[str, int]:
    """Give every split with a non-zero fraction at least one chip, taken from the largest."""
    wanted = [k for k, f in fractions.items() if f > 0]
    total = sum(counts.values())
    if total < len(wanted):
        advice = "make more chips (smaller chip_args.size or stride)"
        if fractions.get("test", 0) > 0:  # train and val cannot be 0; test can
            advice += " or set split_args.fractions.test to 0"
        raise DataError(f"{total} chips cannot fill {len(wanted)} splits ({', '.join(wanted)}): {advice}")
    counts = dict(counts)
    for k in wanted:
        if counts[k] == 0:
            donor = max(counts, key=lambda d: counts[d])
            counts[donor] -= 1
            counts[k] = 1
    return counts


def _fractions(args: SplitArgs) -> dict[str, float]:
    return {"train": args.fractions.train, "val": args.fractions.val, "test": args.fractions.test}


def _deal(ids: np.ndarray, counts: dict[str, int]) -> dict[int, str]:
    out: dict[int, str] = {}
    start = 0
    for split in SPLITS:
        for i in ids[start : start + counts.get(split, 0)]:
            out[int(i)] = split
        start += counts.get(split, 0)
    return out


def _step(offsets: np.ndarray, fallback: int) -> int:
    """The chip stride along one axis: the smallest gap between distinct offsets."""
    gaps = np.diff(np.unique(offsets))
    return int(gaps.min()) if gaps.size else fallback


def block_keys(index: pd.DataFrame, block: int) -> pd.Series:
    """Spatial block of each chip: (source, grid row // block, grid column // block).

    Grid positions come from the offsets and the stride, so chips skipped for nodata do not
    shift their neighbours into another block.
    """
    keys = pd.Series(index=index.index, dtype=object)
    for source, group in index.groupby("source", sort=False):
        row_step = _step(group["row_off"].to_numpy(), int(group["height"].iloc[0]))
        col_step = _step(group["col_off"].to_numpy(), int(group["width"].iloc[0]))
        for idx, r in group.iterrows():
            keys[idx] = (source, int(r.row_off) // row_step // block, int(r.col_off) // col_step // block)
    return keys


def assign_splits(index: pd.DataFrame, args: SplitArgs) -> pd.Series:
    """The split of every chip ("" for roof-free chips left out by keep_empty)."""
    rng = np.random.default_rng(args.seed)
    fractions = _fractions(args)
    empty = index.index[index["roof_share"] <= 0].to_numpy()
    n_keep = round(args.keep_empty * len(empty))
    dropped = set(rng.choice(empty, size=len(empty) - n_keep, replace=False).tolist()) if len(empty) else set()
    kept = index[~index.index.isin(dropped)]
    result: dict[int, str] = dict.fromkeys(dropped, "")

    if args.strategy == "random":
        ids = rng.permutation(kept.index.to_numpy())
        result |= _deal(ids, ensure_each(allocate(len(ids), fractions), fractions))
    elif args.strategy == "stratified":
        strata = []
        for has_roof in (True, False):
            ids = rng.permutation(kept.index[(kept["roof_share"] > 0) == has_roof].to_numpy())
            strata.append((ids, allocate(len(ids), fractions)))
        ensure_each(allocate(len(kept), fractions), fractions)  # enough chips for every split?
        for k in (k for k, f in fractions.items() if f > 0):
            if sum(counts[k] for _, counts in strata) == 0:
                # Tiny sets: move one chip from the largest split of the larger stratum.
                _, counts = max(strata, key=lambda s: max(s[1].values()))
                donor = max(counts, key=lambda d: counts[d])
                counts[donor] -= 1
                counts[k] += 1
        for ids, counts in strata:
            result |= _deal(ids, counts)
    else:  # spatial
        keys = block_keys(kept, args.block)
        blocks = list(dict.fromkeys(keys.tolist()))
        wanted = [k for k, f in fractions.items() if f > 0]
        if len(blocks) < len(wanted):
            raise DataError(
                f"{len(blocks)} spatial block(s) cannot fill {len(wanted)} splits: lower split_args.block "
                "or use split_args.strategy random"
            )
        sizes = keys.value_counts()
        # Several random block orders; keep the one whose splits, once the chips that share pixels with
        # training chips are left out of val and test (drop_overlaps), are closest to the overall roof share
        # and lose the fewest chips to that rule: validation is neither, by chance, a set of roof-free blocks
        # nor the roof-free rim the rule leaves of its blocks. (Chips that do not overlap lose none.)
        pairs = touching_pairs(kept)
        best, best_cost = None, (np.inf, np.inf)
        for _ in range(SPATIAL_TRIES):
            chosen = _deal_blocks(blocks, rng.permutation(len(blocks)), sizes, wanted, fractions, len(kept))
            dealt = pd.Series({int(i): chosen[k] for i, k in keys.items()})
            cost = _imbalance(kept, dealt, _without_overlaps(kept, dealt, pairs), wanted)
            if best is None or cost < best_cost:
                best, best_cost = dealt, cost
        result |= best.to_dict()
    return pd.Series(result).reindex(index.index)


#: Random block orders the spatial strategy compares.
SPATIAL_TRIES = 64


def _deal_blocks(
    blocks: list, order: np.ndarray, sizes: pd.Series, wanted: list[str], fractions: dict[str, float], n: int
) -> dict:
    """Give blocks, in ``order``, to the split furthest below its target chip count."""
    target = {k: fractions[k] * n for k in wanted}
    have = dict.fromkeys(wanted, 0)
    chosen: dict[object, str] = {}
    for j, b in enumerate(order):
        block = blocks[b]
        empty_splits = [k for k in wanted if have[k] == 0]
        if len(empty_splits) >= len(order) - j:  # the last blocks go to splits that have none yet
            split = empty_splits[0]
        else:
            split = max(wanted, key=lambda k: (target[k] - have[k]) / max(target[k], 1e-9))
        chosen[block] = split
        have[split] += int(sizes[block])
    return chosen


def _imbalance(index: pd.DataFrame, dealt: pd.Series, kept: pd.Series, wanted: list[str]) -> tuple[int, float]:
    """How bad a deal is: the number of ``wanted`` splits the overlap rule leaves empty, then how far each split's
    roof share (of the chips it keeps) is from the overall one, relative, plus the share of its chips it loses."""
    overall = index["roof_share"].mean()
    empty, cost = 0, 0.0
    for split in wanted:
        part = index.loc[kept.index[kept == split], "roof_share"]
        if part.empty:
            empty += 1
            continue
        cost += abs(part.mean() - overall) / max(overall, 1e-12)
        cost += 1.0 - len(part) / int((dealt == split).sum())
    return empty, cost


#: Chips compared at once when looking for chips that share pixels (rows of a chunk x chips of the source).
_PAIR_CHUNK = 1024


def touching_pairs(index: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair (a, b) of distinct chips of one source that share pixels (chips overlap when
    chip_args.stride is smaller than the size), as positions in ``index``."""
    firsts, seconds = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for _, group in index.groupby("source", sort=False):
        where = index.index.get_indexer(group.index)
        rows, cols = group["row_off"].to_numpy(), group["col_off"].to_numpy()
        heights, widths = group["height"].to_numpy(), group["width"].to_numpy()
        for start in range(0, len(group), _PAIR_CHUNK):
            part = slice(start, start + _PAIR_CHUNK)
            touch = (np.abs(rows[part, None] - rows[None, :]) < heights[None, :]) & (
                np.abs(cols[part, None] - cols[None, :]) < widths[None, :]
            )
            a, b = np.nonzero(touch)
            a += start
            other = a != b
            firsts.append(where[a[other]])
            seconds.append(where[b[other]])
    return np.concatenate(firsts), np.concatenate(seconds)


def _without_overlaps(
    index: pd.DataFrame, splits: pd.Series, pairs: tuple[np.ndarray, np.ndarray] | None = None
) -> pd.Series:
    """``splits`` (of ``index``'s chips) with every val and test chip that shares pixels with a training chip
    left out (""); ``pairs``: :func:`touching_pairs` of ``index``, when the caller has them."""
    a, b = touching_pairs(index) if pairs is None else pairs
    of = splits.reindex(index.index).fillna("").to_numpy()
    out = splits.copy()
    hit = np.isin(of[a], ("val", "test")) & (of[b] == "train")
    out.loc[index.index[np.unique(a[hit])]] = ""
    return out


def drop_overlaps(index: pd.DataFrame, splits: pd.Series) -> pd.Series:
    """Leave out of val and test every chip that shares pixels with a training chip: their scores would
    count pixels the model trained on."""
    kept = _without_overlaps(index, splits)
    for split in ("val", "test"):
        shared = int(((splits == split) & (kept != split)).sum())
        if shared:
            log.warning(
                "split: %d %s chips share pixels with training chips (chip_args.stride is smaller than the size) "
                "and are left out of %s; %d remain",
                shared, split, split, int((kept == split).sum()),
            )  # fmt: skip
    if not (kept == "val").any():
        raise DataError(
            "every val chip shares pixels with a training chip (chip_args.stride is smaller than the size): use "
            "split_args.strategy spatial with a larger split_args.block, or chips without overlap"
        )
    return kept


def place(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst`` (copy when linking is not possible), replacing ``dst``."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def check_masks(tree: DataTree) -> pd.DataFrame:
    """The index with roof shares; every chip must have its mask."""
    index = read_index(tree.chips_csv, needs=("roof_share",), stage="mask")
    missing = missing_masks(list(index["file"]), tree.masks)
    if missing:
        raise InputMissingError(
            f"{len(missing)} chips have no mask in {tree.masks} (e.g. {missing[0]}): run python mask/mask.py"
        )
    return index.drop(columns=[c for c in ("split", "split_file") if c in index.columns])


def split_chips(tree: DataTree, args: SplitArgs, index: pd.DataFrame | None = None) -> pd.DataFrame:
    """Assign splits, fill the split folders (emptied first), record the split in chips.csv; return the index.

    ``index`` is what :func:`check_masks` returned, when the caller has it already.
    """
    index = check_masks(tree) if index is None else index
    splits = drop_overlaps(index, assign_splits(index, args))
    train_roof = index.loc[splits == "train", "roof_share"].sum()
    if train_roof <= 0:
        raise DataError(
            "the train split would have no roof pixels: change split_args.seed or strategy, raise keep_empty, "
            "or check the masks (python mask/mask.py)"
        )
    for s in ("val", "test"):
        part = splits == s
        if part.any() and index.loc[part, "roof_share"].sum() <= 0:
            log.warning(
                "split: the %s split has no roof pixel, so its metrics and the tuned threshold mean little: "
                "change split_args.seed or split_args.block, or use strategy stratified where chips do not overlap "
                "(chip_args.stride at least the chip size)",
                s,
            )
    used = [s for s in SPLITS if (splits == s).any()]
    for s in SPLITS:  # clear every split folder, so no stale chip of an earlier split remains
        for folder in (tree.frames(s), tree.split_masks(s)):
            if folder.is_dir():
                for old in folder.glob(f"{s}_*{tree.extension}"):
                    old.unlink()
    index["split"] = splits.fillna("").astype(str)
    index["split_file"] = ""
    for s in used:
        tree.frames(s).mkdir(parents=True, exist_ok=True)
        tree.split_masks(s).mkdir(parents=True, exist_ok=True)
        rows = index.index[index["split"] == s]
        for k, i in enumerate(cli.progress(rows, desc=s, unit="chip")):
            name = tree.split_name(s, k)
            place(tree.chips / index.at[i, "file"], tree.frames(s) / name)
            place(tree.masks / index.at[i, "file"], tree.split_masks(s) / name)
            index.at[i, "split_file"] = name
    write_index(index, tree.chips_csv)
    for s in used:
        part = index[index["split"] == s]
        log.info(
            "split: %-5s %4d chips, %3d with roofs, roof share %.2f%%",
            s,
            len(part),
            int((part["roof_share"] > 0).sum()),
            100 * part["roof_share"].mean(),
        )
    if (index["split"] == "").any():
        log.info("split: %d roof-free chips left out (split_args.keep_empty)", int((index["split"] == "").sum()))
    return index


def split_stage(settings: Settings, tree: DataTree, *, overwrite: bool = False) -> pd.DataFrame:
    """The split stage under the stage contract: its folders only ever hold the current chips and masks."""
    run = begin("split", settings, tree, overwrite=overwrite)
    if run.skip:
        run.say_skip()
        return read_index(tree.chips_csv, needs=("split",))
    index = check_masks(tree)
    run.start()
    index = split_chips(tree, settings.split_args, index)
    run.finish(**{s: int((index["split"] == s).sum()) for s in SPLITS})
    return index


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)

    def body(args: argparse.Namespace, settings: Settings, tree: DataTree) -> None:
        split_stage(settings, tree, overwrite=args.overwrite)

    return cli.run(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
