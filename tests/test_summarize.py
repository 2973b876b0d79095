"""summarize: statistics equal numpy's, from a table (any layout/format) or straight from chips; plots; bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core.errors import DataError, InputMissingError
from core.raster import class_band_statistics
from core.settings import FlattenArgs, ParallelArgs, load_settings
from flatten.flatten import flatten_chips
from flatten.table import table_statistics
from summarize.summarize import main, summarize

PCTS = (1.0, 2.0, 50.0, 98.0, 99.0)


@pytest.fixture
def chips(data_tree, make_geotiff):
    """Three 20 x 24 chips of 3 uint16 bands with nodata pixels and roofs; returns (tree, values, labels).

    ``values`` (n, 3) and ``labels`` (n,) are every valid pixel, what the statistics must match.
    """
    rng = np.random.default_rng(7)
    values, labels = [], []
    for i in range(3):
        image = rng.integers(1, 2000, (3, 20, 24), dtype=np.uint16)
        image[:, :2, :5] = 0  # nodata corner
        image[1, 10, 10] = 0  # 0 in one band only: a valid pixel
        mask = np.zeros((20, 24), np.uint8)
        mask[4 : 9 + i, 6:15] = 255
        mask[:2, :5] = 0
        make_geotiff(data_tree.frames("train"), f"train_{i}.tif", array=image, nodata=0)
        make_geotiff(data_tree.split_masks("train"), f"train_{i}.tif", array=mask, nodata=None)
        valid = (image != 0).any(axis=0)
        values.append(image[:, valid].T)
        labels.append(mask[valid] > 0)
    return data_tree, np.concatenate(values), np.concatenate(labels)


def numpy_stats(values: np.ndarray) -> dict:
    return {
        "count": values.size,
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean(dtype=np.float64)),
        "std": float(values.std(dtype=np.float64)),
        "percentiles": {f"p{p:g}": float(np.percentile(values, p)) for p in PCTS},
    }


def assert_equal_to_numpy(entry: dict, values: np.ndarray) -> None:
    want = numpy_stats(values)
    assert entry["count"] == want["count"]
    assert entry["min"] == want["min"] and entry["max"] == want["max"]
    assert entry["mean"] == pytest.approx(want["mean"], rel=1e-12)
    assert entry["std"] == pytest.approx(want["std"], rel=1e-12)
    assert entry["percentiles"] == want["percentiles"]  # exact: 16-bit values are counted one by one


def flat(tree, **kwargs):
    args = FlattenArgs(**kwargs)
    return flatten_chips(tree.frames("train"), tree.split_masks("train"), tree, args, ParallelArgs(workers=1))


def settings_for(settings_file, tmp_path, *overrides):
    return load_settings(settings_file, [f"data_root={tmp_path / 'data'}", *overrides])


@pytest.mark.parametrize(
    ("layout", "fmt"), [("long", "csv"), ("wide", "parquet"), ("wide", "csv"), ("long", "parquet")]
)
def test_statistics_equal_numpy(chips, settings_file, tmp_path, layout, fmt):
    tree, values, labels = chips
    flat(tree, layout=layout, format=fmt)
    settings = settings_for(settings_file, tmp_path, f"flatten_args.format={fmt}", "summarize_args.chunk_rows=1000")
    record = summarize(tree, settings)
    assert record == json.loads((tree.summary / "stats.json").read_text())
    assert record["pixels"] == {"all": len(labels), "roof": int(labels.sum()), "background": int((~labels).sum())}
    for b, entry in enumerate(record["bands"]):
        assert entry["band"] == b + 1
        assert_equal_to_numpy(entry["all"], values[:, b])
        assert_equal_to_numpy(entry["roof"], values[labels, b])
        assert_equal_to_numpy(entry["background"], values[~labels, b])
        assert 0.0 <= entry["separation"] <= 1.0
    names = sorted(p.name for p in tree.summary.iterdir())
    assert names == ["histogram_band_1.png", "histogram_band_2.png", "histogram_band_3.png", "roof_vs_background.png",
                     "stats.json"]  # fmt: skip


def test_chips_give_the_same_statistics_as_the_table(chips):
    tree, _, _ = chips
    frames = tree.list_rasters(tree.frames("train"))
    from_chips = class_band_statistics(frames, [tree.split_masks("train") / f.name for f in frames], block=8)
    from_table, _ = table_statistics(flat(tree, layout="long"), chunk_rows=1000)
    assert from_chips.result() == from_table.result()
    for b in range(3):
        edges, hists = from_chips.histograms(b, 16)
        edges2, hists2 = from_table.histograms(b, 16)
        np.testing.assert_array_equal(edges, edges2)
        assert all((hists[c] == hists2[c]).all() for c in hists)
        assert hists["all"].sum() == hists["roof"].sum() + hists["background"].sum()


def test_source_chips_writes_the_same_record(chips, settings_file, tmp_path):
    tree, values, labels = chips
    record = summarize(tree, settings_for(settings_file, tmp_path, "summarize_args.source=chips"))
    assert record["kind"] == "chips"
    assert_equal_to_numpy(record["bands"][2]["roof"], values[labels, 2])


def test_float_values_have_exact_moments_and_close_percentiles(data_tree, settings_file, tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(0.3, 0.1, (5000, 2))
    table = pd.DataFrame(
        {
            "latitude": 0.0,
            "longitude": 0.0,
            "row": 0,
            "col": 0,
            "band_1": values[:, 0],
            "band_2": values[:, 1],
            "label": (values[:, 0] > 0.35).astype(int),
            "chip": "x.tif",
        }
    )
    data_tree.flat.mkdir(parents=True)
    table.to_csv(data_tree.flat / "pixels.csv", index=False)
    record = summarize(data_tree, settings_for(settings_file, tmp_path))
    entry = record["bands"][1]["all"]
    assert entry["mean"] == pytest.approx(values[:, 1].mean(), rel=1e-12)
    assert entry["std"] == pytest.approx(values[:, 1].std(), rel=1e-12)
    bin_width = (values[:, 1].max() - values[:, 1].min()) / 65536
    for p in PCTS:
        assert abs(entry["percentiles"][f"p{p:g}"] - np.percentile(values[:, 1], p)) <= bin_width
    assert record["bands"][0]["separation"] > record["bands"][1]["separation"]  # band 1 defines the label


def test_table_without_label_gives_overall_statistics(data_tree, settings_file, tmp_path):
    data_tree.flat.mkdir(parents=True)
    pd.DataFrame({"band": [1, 2, 1, 2], "value": [5, 6, 7, 8]}).to_csv(data_tree.flat / "pixels.csv", index=False)
    record = summarize(data_tree, settings_for(settings_file, tmp_path))
    assert record["pixels"] == {"all": 2}
    assert set(record["bands"][0]) == {"band", "all"}
    assert record["bands"][1]["all"]["mean"] == 7.0
    assert not (data_tree.summary / "roof_vs_background.png").exists()


# --- bad input ----------------------------------------------------------------------------------


def test_missing_table(data_tree, settings_file, tmp_path):
    with pytest.raises(InputMissingError, match=r"flatten/flatten\.py"):
        summarize(data_tree, settings_for(settings_file, tmp_path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("latitude,longitude,row,col,band,value,label,chip\n", "no rows"),
        ("latitude,longitude,label\n1,2,0\n", "neither band/value"),
    ],
)
def test_bad_tables(data_tree, settings_file, tmp_path, text, message):
    data_tree.flat.mkdir(parents=True)
    (data_tree.flat / "pixels.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        summarize(data_tree, settings_for(settings_file, tmp_path))


def test_main(chips, stage_argv, capsys):
    tree, _, _ = chips
    assert main(stage_argv) == 1
    assert "no flat table" in capsys.readouterr().err
    flat(tree, format="parquet")
    assert main(stage_argv) == 0  # finds pixels.parquet though flatten_args.format is csv
    made = (tree.summary / "stats.json").stat().st_mtime_ns
    assert main(stage_argv) == 0  # up to date: skipped
    assert (tree.summary / "stats.json").stat().st_mtime_ns == made
    assert main([*stage_argv, "--set", "summarize_args.bins=16"]) == 1
    assert "summary/ was made with summarize_args.bins 128, now 16: add --overwrite" in capsys.readouterr().err
    # A missing table given or found fails before --overwrite removes anything, and leaves no unfinished run.
    kept = sorted(p.name for p in tree.summary.iterdir())
    missing = tree.root / "nowhere.parquet"
    assert main([*stage_argv, "--overwrite", "--input", str(missing)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --input {missing} not found: give the flat table (pixels.csv or .parquet)"
    )
    (tree.flat / "pixels.parquet").rename(tree.root / "away.parquet")
    assert main([*stage_argv, "--overwrite"]) == 1
    assert capsys.readouterr().err == (
        "error: summarize reads flat/, which is not there (none made here, or removed since): run python "
        "flatten/flatten.py first\n"
    )
    assert sorted(p.name for p in tree.summary.iterdir()) == kept
    (tree.root / "away.parquet").rename(tree.flat / "pixels.parquet")
    assert main(stage_argv) == 0  # the last run's record stands: up to date, skipped
    assert (tree.summary / "stats.json").stat().st_mtime_ns == made
