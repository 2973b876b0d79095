"""split: exact counts, strategies, links, chips.csv, reruns and bad input."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import interrupted
from rasterio.transform import Affine

from chip.chip import main as chip_main
from core.errors import DataError, InputMissingError
from core.index import CHIP_COLUMNS, read_index
from core.settings import SplitArgs, SplitFractions
from mask.mask import main as mask_main
from mosaic.mosaic import main as mosaic_main
from split import split as split_module
from split.split import allocate, assign_splits, drop_overlaps, main, split_chips, touching_pairs

SIZE = 8  # chip size of the fabricated chips


@pytest.fixture
def make_chips(data_tree, make_geotiff):
    """``make_chips(roof_shares, cols=None)``: chips, masks and chips.csv as chip and mask leave them.

    Chip i sits at grid position (i // cols, i % cols); its pixels hold i, its mask is 255
    where it has roofs.
    """

    def make(shares: list[float], cols: int | None = None) -> pd.DataFrame:
        cols = cols or len(shares)
        rows = []
        for i, share in enumerate(shares):
            name = data_tree.chip_name(i)
            make_geotiff(data_tree.chips, name, array=np.full((1, SIZE, SIZE), i + 1, np.uint16))
            make_geotiff(data_tree.masks, name, array=np.full((1, SIZE, SIZE), 255 if share else 0, np.uint8))
            r, c = divmod(i, cols)
            left, top = 500000.0 + c * SIZE / 2, 2960000.0 - r * SIZE / 2
            rows.append([i, name, "mosaic/mosaic.tif", r * SIZE, c * SIZE, SIZE, SIZE])
            rows[-1] += [left, top - SIZE / 2, left + SIZE / 2, top, "EPSG:32644", 0.0, share]
        frame = pd.DataFrame(rows, columns=[*CHIP_COLUMNS, "roof_share"])
        frame.to_csv(data_tree.chips_csv, index=False)
        return frame

    return make


def fractions(train: float, val: float, test: float = 0.0) -> SplitFractions:
    return SplitFractions(train=train, val=val, test=test)


def folder_names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def linked(a, b) -> bool:
    return os.stat(a).st_ino == os.stat(b).st_ino or a.read_bytes() == b.read_bytes()


# --- counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "split_fractions", "expected"),
    [
        (10, (0.8, 0.2, 0.0), {"train": 8, "val": 2}),
        (7, (0.8, 0.2, 0.0), {"train": 6, "val": 1}),  # 5.6 / 1.4: largest remainder
        (10, (0.6, 0.2, 0.2), {"train": 6, "val": 2, "test": 2}),
        (9, (0.5, 0.3, 0.2), {"train": 4, "val": 3, "test": 2}),  # 4.5 / 2.7 / 1.8
        (3, (0.7, 0.2, 0.1), {"train": 1, "val": 1, "test": 1}),  # every split gets one
    ],
)
def test_random_counts_names_and_links(n, split_fractions, expected, data_tree, make_chips):
    make_chips([0.1] * n)
    args = SplitArgs(strategy="random", fractions=fractions(*split_fractions))
    index = split_chips(data_tree, args)
    assert index["split"].value_counts().to_dict() == expected
    for split, count in expected.items():
        names = [f"{split}_{k}.tif" for k in range(count)]
        assert folder_names(data_tree.frames(split)) == sorted(names)
        assert folder_names(data_tree.split_masks(split)) == sorted(names)
    for split in {"train", "val", "test"} - set(expected):
        assert not data_tree.frames(split).exists()
    saved = read_index(data_tree.chips_csv, needs=("roof_share", "split", "split_file"))
    assert list(saved.columns) == [*CHIP_COLUMNS, "roof_share", "split", "split_file"]
    pd.testing.assert_frame_equal(saved, index, check_dtype=False)
    for row in saved.itertuples():
        assert row.split_file.startswith(f"{row.split}_")
        assert linked(data_tree.chips / row.file, data_tree.frames(row.split) / row.split_file)
        assert linked(data_tree.masks / row.file, data_tree.split_masks(row.split) / row.split_file)


def test_allocate_is_largest_remainder():
    assert allocate(7, {"train": 0.8, "val": 0.2, "test": 0.0}) == {"train": 6, "val": 1, "test": 0}
    assert allocate(9, {"train": 0.5, "val": 0.3, "test": 0.2}) == {"train": 4, "val": 3, "test": 2}
    assert allocate(100, {"train": 0.7, "val": 0.2, "test": 0.1}) == {"train": 70, "val": 20, "test": 10}


def test_same_seed_same_split(data_tree, make_chips):
    make_chips([0.1] * 20)
    args = SplitArgs(strategy="random")
    index = read_index(data_tree.chips_csv, needs=("roof_share",))
    first = assign_splits(index, args)
    assert assign_splits(index, args).equals(first)
    assert not assign_splits(index, SplitArgs(strategy="random", seed=1)).equals(first)


def test_copies_when_links_are_impossible(data_tree, make_chips, monkeypatch):
    def no_link(src, dst):
        raise OSError("cross-device link")

    make_chips([0.1] * 5)
    monkeypatch.setattr(split_module.os, "link", no_link)
    index = split_chips(data_tree, SplitArgs(strategy="random"))
    for row in index.itertuples():
        copy = data_tree.frames(row.split) / row.split_file
        assert os.stat(copy).st_ino != os.stat(data_tree.chips / row.file).st_ino
        assert copy.read_bytes() == (data_tree.chips / row.file).read_bytes()
    assert not [p for p in data_tree.frames("train").iterdir() if p.name.startswith(".")]


# --- strategies -----------------------------------------------------------------------------


@pytest.mark.parametrize(("block", "seed"), [(2, 0), (2, 1), (3, 0), (1, 0)])
def test_spatial_blocks_stay_together(block, seed, data_tree, make_chips):
    make_chips([0.1] * 36, cols=6)
    index = split_chips(data_tree, SplitArgs(strategy="spatial", block=block, seed=seed))
    grid_row, grid_col = index["row_off"] // SIZE, index["col_off"] // SIZE
    # Every block is in one split: no two neighbours within a block are in different splits.
    assert (index.groupby([grid_row // block, grid_col // block])["split"].nunique() == 1).all()
    split_at = {(r, c): s for r, c, s in zip(grid_row, grid_col, index["split"], strict=True)}
    for (r, c), s in split_at.items():
        for nb in ((r + 1, c), (r, c + 1)):
            if nb in split_at and (r // block, c // block) == (nb[0] // block, nb[1] // block):
                assert split_at[nb] == s
    counts = index["split"].value_counts()
    assert set(counts.index) == {"train", "val"}
    assert counts["train"] > counts["val"]


def test_spatial_counts_follow_fractions(data_tree, make_chips):
    # 9 blocks of 4 chips, 0.8 / 0.2: 7 blocks (28 chips, closest to 28.8) and 2 blocks.
    make_chips([0.1] * 36, cols=6)
    index = split_chips(data_tree, SplitArgs(strategy="spatial", block=2))
    assert index["split"].value_counts().to_dict() == {"train": 28, "val": 8}


def test_spatial_with_test_split(data_tree, make_chips):
    make_chips([0.1] * 36, cols=6)
    args = SplitArgs(strategy="spatial", block=2, fractions=fractions(0.6, 0.2, 0.2))
    index = split_chips(data_tree, args)
    counts = index["split"].value_counts().to_dict()
    assert set(counts) == {"train", "val", "test"}
    assert all(v % 4 == 0 for v in counts.values())
    assert len(list(data_tree.frames("test").iterdir())) == counts["test"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_spatial_balances_roofs_after_the_overlap_rule(seed):
    # 4 x 4 chips of 8 px at a stride of 4 (each overlaps its neighbours), blocks of 2 x 2: four blocks, one for
    # val. Of a val block only its outer corner chip shares no pixel with training chips. The corner chips of
    # three blocks are roof-free, the fourth's (grid 3, 3) has roofs: the split is judged by what the overlap
    # rule leaves, so val is that chip, not a roof-free corner whose block looked balanced before the rule.
    rows = []
    for r in range(4):
        for c in range(4):
            share = 0.0 if (r, c) in {(0, 0), (0, 3), (3, 0)} else 0.1
            rows.append({"source": "a.tif", "row_off": 4 * r, "col_off": 4 * c, "height": 8, "width": 8,
                         "roof_share": share})  # fmt: skip
    index = pd.DataFrame(rows)
    splits = drop_overlaps(index, assign_splits(index, SplitArgs(strategy="spatial", block=2, seed=seed)))
    assert list(splits.index[splits == "val"]) == [15]
    assert list(splits.index[splits == ""]) == [10, 11, 14]
    assert (splits == "train").sum() == 12


def test_touching_pairs_are_chips_of_one_source_that_share_pixels():
    rows = [("a.tif", 0, 0), ("a.tif", 0, 4), ("a.tif", 0, 8), ("b.tif", 0, 4), ("a.tif", 7, 11)]
    index = pd.DataFrame([{"source": s, "row_off": r, "col_off": c, "height": 8, "width": 8} for s, r, c in rows])
    first, second = touching_pairs(index.set_index(pd.Index([10, 11, 12, 13, 14])))
    # a chip 8 px to the side shares no pixel; one of another source never does; (7, 11) touches (0, 4) and (0, 8)
    assert sorted(zip(first.tolist(), second.tolist(), strict=True)) == [
        (0, 1), (1, 0), (1, 2), (1, 4), (2, 1), (2, 4), (4, 1), (4, 2)
    ]  # fmt: skip


def test_stratified_puts_roofs_in_every_split(data_tree, make_chips):
    shares = [0.2 if i % 4 == 0 else 0.0 for i in range(20)]  # 5 chips with roofs, 15 without
    make_chips(shares)
    index = split_chips(data_tree, SplitArgs(strategy="stratified"))
    roofs = index["roof_share"] > 0
    assert index[roofs]["split"].value_counts().to_dict() == {"train": 4, "val": 1}
    assert index[~roofs]["split"].value_counts().to_dict() == {"train": 12, "val": 3}


def test_keep_empty(data_tree, make_chips):
    shares = [0.3, 0.0, 0.0, 0.2, 0.0, 0.1, 0.0, 0.0, 0.4, 0.0]  # 4 with roofs, 6 without
    make_chips(shares)
    index = split_chips(data_tree, SplitArgs(strategy="random", keep_empty=0.0))
    assert (index.loc[index["roof_share"] == 0, "split"] == "").all()
    assert (index.loc[index["roof_share"] > 0, "split"] != "").all()
    assert len(folder_names(data_tree.frames("train"))) + len(folder_names(data_tree.frames("val"))) == 4
    saved = read_index(data_tree.chips_csv, needs=("split",))
    assert saved.loc[saved["roof_share"] == 0, "split"].fillna("").eq("").all()
    index = split_chips(data_tree, SplitArgs(strategy="random", keep_empty=0.5))
    assert int(((index["roof_share"] == 0) & (index["split"] != "")).sum()) == 3
    assert len(folder_names(data_tree.frames("train"))) + len(folder_names(data_tree.frames("val"))) == 7


def test_roof_free_val_is_named_with_advice_that_fits_overlapping_chips(data_tree, make_chips, caplog):
    make_chips([0.3] + [0.0] * 9)  # one chip with roofs, always in train
    with caplog.at_level(logging.WARNING, logger="split.split"):
        index = split_chips(data_tree, SplitArgs(strategy="random"))
    assert index.loc[0, "split"] == "train" and (index["split"] == "val").sum() == 2
    assert [r.getMessage() for r in caplog.records] == [
        "split: the val split has no roof pixel, so its metrics and the tuned threshold mean little: change "
        "split_args.seed or split_args.block, or use strategy stratified where chips do not overlap "
        "(chip_args.stride at least the chip size)"
    ]


# --- rerun ----------------------------------------------------------------------------------


def test_rerun_skips_another_setting_needs_overwrite_and_leaves_no_stale_files(
    data_tree, make_chips, stage_argv, capsys
):
    make_chips([0.1] * 10)
    with_test = ["--set", 'split_args.fractions={"train": 0.6, "val": 0.2, "test": 0.2}']
    assert main([*stage_argv, *with_test, "--set", "split_args.strategy=random"]) == 0
    assert len(folder_names(data_tree.frames("test"))) == 2
    before = {p: p.read_bytes() for p in sorted(data_tree.root.rglob("*")) if p.is_file()}
    assert main([*stage_argv, *with_test, "--set", "split_args.strategy=random"]) == 0  # same settings: skipped
    assert {p: p.read_bytes() for p in sorted(data_tree.root.rglob("*")) if p.is_file()} == before
    capsys.readouterr()
    assert main(stage_argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the split folders (train_frames/, val_frames/ ...) were made with ")
    assert "split_args.fractions.test 0.2, now 0.0" in err and 'split_args.strategy "random", now "spatial"' in err
    assert {p: p.read_bytes() for p in sorted(data_tree.root.rglob("*")) if p.is_file()} == before
    (data_tree.frames("train") / "train_99.tif").write_bytes(b"stale")
    assert main([*stage_argv, "--set", "split_args.strategy=random", "--overwrite"]) == 0
    assert folder_names(data_tree.frames("train")) == sorted(f"train_{k}.tif" for k in range(8))
    assert folder_names(data_tree.frames("val")) == ["val_0.tif", "val_1.tif"]
    assert folder_names(data_tree.frames("test")) == folder_names(data_tree.split_masks("test")) == []
    assert set(read_index(data_tree.chips_csv, needs=("split",))["split"]) == {"train", "val"}


def test_killed_halfway_reruns(data_tree, make_chips, stage_argv):
    make_chips([0.1] * 10)
    assert main(stage_argv) == 0
    clean = {p.relative_to(data_tree.root): p.read_bytes() for p in sorted(data_tree.root.rglob("*")) if p.is_file()}
    # Killed while linking: the record says running, chips.csv (written last) has no split yet,
    # some links are there.
    interrupted(data_tree.root / "split.record.json")
    index = read_index(data_tree.chips_csv, needs=("split",))
    index.drop(columns=["split", "split_file"]).to_csv(data_tree.chips_csv, index=False, float_format="%.10g")
    for p in list(data_tree.frames("val").iterdir()) + list(data_tree.split_masks("train").iterdir())[:3]:
        p.unlink()
    assert main(stage_argv) == 0
    again = {p.relative_to(data_tree.root): p.read_bytes() for p in sorted(data_tree.root.rglob("*")) if p.is_file()}
    record = again.pop(Path("split.record.json"))
    assert again == {k: v for k, v in clean.items() if k != Path("split.record.json")}
    assert json.loads(record)["state"] == "complete"


# --- bad input ------------------------------------------------------------------------------


def test_train_without_roofs(data_tree, make_chips, stage_argv, capsys):
    make_chips([0.0] * 10)
    before = data_tree.chips_csv.read_bytes()
    assert main(stage_argv) == 1
    assert "the train split would have no roof pixels" in capsys.readouterr().err
    assert data_tree.chips_csv.read_bytes() == before
    assert not data_tree.frames("train").exists() and not data_tree.frames("val").exists()


@pytest.mark.parametrize(
    ("strategy", "message"),
    [("random", "1 chips cannot fill 2 splits"), ("spatial", "1 spatial block(s) cannot fill 2 splits")],
)
def test_fewer_chips_than_splits(strategy, message, data_tree, make_chips):
    make_chips([0.5])
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        split_chips(data_tree, SplitArgs(strategy=strategy))
    assert not data_tree.frames("train").exists()


def test_one_spatial_block(data_tree, make_chips, stage_argv, capsys):
    make_chips([0.5] * 4, cols=2)  # 2 x 2 chips: one block of 2 x 2
    assert main(stage_argv) == 1
    assert "1 spatial block(s) cannot fill 2 splits: lower split_args.block" in capsys.readouterr().err


def test_missing_masks(data_tree, make_chips, stage_argv, capsys):
    make_chips([0.1] * 5)
    (data_tree.masks / "chip_000003.tif").unlink()
    (data_tree.masks / "chip_000004.tif").unlink()
    assert main(stage_argv) == 1
    err = capsys.readouterr().err
    assert f"2 chips have no mask in {data_tree.masks} (e.g. chip_000003.tif)" in err
    assert "mask/mask.py" in err
    assert not data_tree.frames("train").exists()
    with pytest.raises(InputMissingError):
        split_chips(data_tree, SplitArgs())


def test_chip_folder_without_any_mask(data_tree, make_chips, stage_argv, capsys):
    make_chips([0.1] * 5)
    for p in data_tree.masks.iterdir():
        p.unlink()
    assert main(stage_argv) == 1
    assert "5 chips have no mask" in capsys.readouterr().err


def test_index_without_roof_share(data_tree, make_chips, stage_argv, capsys):
    make_chips([0.1] * 5).drop(columns="roof_share").to_csv(data_tree.chips_csv, index=False)
    assert main(stage_argv) == 1
    err = capsys.readouterr().err
    assert "lacks columns ['roof_share']" in err and "mask/mask.py" in err


def test_no_index(stage_argv, data_tree, capsys):
    assert main(stage_argv) == 1
    err = capsys.readouterr().err
    # chips.csv is chip's: chip comes first, then mask (which adds the roof shares split reads)
    assert f"chip index {data_tree.chips_csv} not found: run python chip/chip.py, then python mask/mask.py\n" in err


# --- the data stages in a row ----------------------------------------------------------------


def test_mosaic_chip_mask_split(data_tree, make_geotiff, make_labels, pixel_box, stage_argv):
    make_geotiff(data_tree.raw, "a.tif", rows=64, cols=64, seed=1)
    make_geotiff(
        data_tree.raw, "b.tif", rows=64, cols=64, seed=2, transform=Affine(0.5, 0, 500032.0, 0, -0.5, 2960000.0)
    )
    roofs = [pixel_box(c, r, c + 6, r + 6) for r in range(4, 64, 16) for c in range(4, 128, 16)]  # one per chip
    make_labels(data_tree.labels / "roofs.geojson", roofs, roof_type=["metal"] * len(roofs))
    argv = [*stage_argv, "--set", "chip_args.size=16"]
    for stage in (mosaic_main, chip_main, mask_main, main):
        assert stage(argv) == 0
    index = read_index(data_tree.chips_csv, needs=("roof_share", "split", "split_file"))
    assert len(index) == 32
    assert (index["roof_share"] == 36 / 256).all()
    assert index["split"].value_counts().to_dict() == {"train": 24, "val": 8}  # 8 blocks of 2 x 2: 6 and 2
    for row in index.itertuples():
        assert linked(data_tree.masks / row.file, data_tree.split_masks(row.split) / row.split_file)
