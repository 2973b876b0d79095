"""Band statistics and histograms of the flat table: python summarize/summarize.py

Reads data/flat/pixels.csv or pixels.parquet (either layout, summarize_args.chunk_rows rows
at a time; --input names another table), or with summarize_args.source chips the chips and
masks flatten_args.frames and flatten_args.masks name, and writes data/summary/:

- stats.json: per band, for all pixels and per class (roof, background): count, min, max,
  mean, std and percentiles 1, 2, 50, 98, 99, plus how well the band separates the classes
  (1 - overlap of their histograms: 0 = same distribution, 1 = no overlap);
- histogram_band_N.png: the values of band N, with the 2nd-98th percentile range training
  normalizes to;
- roof_vs_background.png: per band, roof and background distributions overlaid.

With classes (masks made with mask_args.classes, a flat table with pixels.classes.json),
per class instead of roof and background: stats.json holds each band's statistics per class
(background and each class by name, under "classes") and a "separation" table: for every
band and every pair of classes, Cohen's d (difference of the means over the pooled standard
deviation, signed: second class minus first) and the overlap of their histograms (1 = the
same distribution, 0 = disjoint); classes_per_band.png overlays the classes' distributions
per band (one colour per class) and class_separation.png shows the table.

8- and 16-bit values give exact statistics (equal to numpy's); other values exact moments
and percentiles within 1/65,536 of their range. Memory does not grow with the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from core import cli
from core.errors import InputMissingError
from core.files import atomic_path
from core.index import missing_masks
from core.raster import (
    CLASSES,
    DEFAULT_PERCENTILES,
    BandStats,
    ClassBandStats,
    class_band_statistics,
    class_colors,
)
from core.settings import Settings
from core.tree import DataTree, refuse_overwrite
from flatten.table import find_table, table_statistics
from workflow.contract import begin

log = logging.getLogger(__name__)

STATS_JSON = "stats.json"
OVERLAY_PNG = "roof_vs_background.png"
CLASSES_PNG = "classes_per_band.png"
SEPARATION_PNG = "class_separation.png"
COLORS = {"all": "0.35", "roof": "#d95f02", "background": "#1b9e77"}


def separation(roof: np.ndarray, background: np.ndarray) -> float | None:
    """1 - overlap of two histograms as shares: 0 same distribution, 1 disjoint (None if one is empty)."""
    if roof.sum() == 0 or background.sum() == 0:
        return None
    return float(1.0 - np.minimum(roof / roof.sum(), background / background.sum()).sum())


def overlap(a: np.ndarray, b: np.ndarray) -> float | None:
    """Overlap of two histograms as shares: 1 the same distribution, 0 disjoint (None if one is empty)."""
    if a.sum() == 0 or b.sum() == 0:
        return None
    return float(np.minimum(a / a.sum(), b / b.sum()).sum())


def cohen_d(a: BandStats, b: BandStats) -> float | None:
    """(mean b - mean a) / pooled standard deviation (each class's sample variance, weighted by n - 1);
    None when a class is empty, both hold one pixel, or both are constant."""
    if not a.count or not b.count or a.count + b.count <= 2:
        return None
    pooled = np.sqrt((a.count * a.std**2 + b.count * b.std**2) / (a.count + b.count - 2))
    if pooled == 0:
        return None
    return float((b.mean - a.mean) / pooled)


def separation_table(stats: ClassBandStats, bins: int) -> list[dict[str, Any]]:
    """For every band and every pair of classes (ids i < j): Cohen's d (j against i) and the histograms' overlap."""
    names = stats.class_labels
    results = stats.class_result(())
    rows = []
    for b in range(stats.bands):
        _, hists = stats.class_histograms(b, bins)
        for i, j in combinations(range(len(names)), 2):
            rows.append(
                {
                    "band": b + 1,
                    "classes": [names[i], names[j]],
                    "cohen_d": cohen_d(results[i][b], results[j][b]),
                    "overlap": overlap(hists[i], hists[j]),
                }
            )
    return rows


def class_record(stats: ClassBandStats, bins: int, source: str, **extra: Any) -> dict[str, Any]:
    """The stats.json layout with classes: per band, all pixels and each class; the separation table."""
    results = stats.result(DEFAULT_PERCENTILES)
    by_class = stats.class_result(DEFAULT_PERCENTILES)
    names = stats.class_labels
    bands = []
    for b in range(stats.bands):
        entry: dict[str, Any] = {"band": b + 1, "all": _without_band(results["all"][b])}
        entry["classes"] = {name: _without_band(by_class[k][b]) for k, name in enumerate(names)}
        bands.append(entry)
    pixels = {
        "all": results["all"][0].count,
        "roof": results["roof"][0].count,
        "classes": {name: by_class[k][0].count for k, name in enumerate(names)},
    }
    return {
        "source": source,
        **extra,
        "percentiles": list(DEFAULT_PERCENTILES),
        "classes": list(names),
        "pixels": pixels,
        "bands": bands,
        "separation": separation_table(stats, bins),
    }


def _without_band(result: BandStats) -> dict[str, Any]:
    return {k: v for k, v in result.to_dict().items() if k != "band"}


def summary_record(stats: ClassBandStats, bins: int, source: str, labelled: bool, **extra: Any) -> dict[str, Any]:
    """The stats.json layout: per band, each class's statistics and the band's separation (with classes:
    :func:`class_record`)."""
    if labelled and stats.classes:
        return class_record(stats, bins, source, **extra)
    results = stats.result(DEFAULT_PERCENTILES)
    bands = []
    for b in range(stats.bands):
        entry: dict[str, Any] = {"band": b + 1}
        for c in CLASSES if labelled else ("all",):
            entry[c] = {k: v for k, v in results[c][b].to_dict().items() if k != "band"}
        if labelled:
            _, hists = stats.histograms(b, bins)
            entry["separation"] = separation(hists["roof"], hists["background"])
        bands.append(entry)
    pixels = {c: results[c][0].count for c in (CLASSES if labelled else ("all",))}
    return {"source": source, **extra, "percentiles": list(DEFAULT_PERCENTILES), "pixels": pixels, "bands": bands}


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def plot_band(stats: ClassBandStats, band: int, bins: int, path: Path) -> Path:
    """Histogram of one band's values with its 2nd-98th percentile range marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, hists = stats.histograms(band, bins)
    result = stats.values["all"][band].result(band + 1, (2.0, 98.0))
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    ax.stairs(hists["all"], edges, fill=True, color="0.55")
    if result.count:
        for key, style, name in (("p2", "--", "2nd"), ("p98", ":", "98th")):
            ax.axvline(result.percentiles[key], color="black", ls=style, lw=1, label=f"{name} percentile")
    ax.set_title(
        f"Band {band + 1}: {result.count:,} valid pixels, mean {result.mean or 0:.1f}, std {result.std or 0:.1f}"
    )
    ax.set_xlabel(f"band {band + 1} pixel value (raw, as in the chips)")
    ax.set_ylabel("pixels per bin")
    ax.legend(loc="upper right", fontsize=8, title="normalization range", title_fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return path


def plot_overlays(stats: ClassBandStats, bins: int, path: Path) -> Path:
    """One panel per band: roof and background value distributions as shares of each class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, stats.bands)
    rows = -(-stats.bands // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False, layout="constrained")
    for b, ax in enumerate(axes.flat):
        if b >= stats.bands:
            ax.set_visible(False)
            continue
        edges, hists = stats.histograms(b, bins)
        for c in ("background", "roof"):
            total = hists[c].sum()
            share = hists[c] / total if total else hists[c].astype(float)
            ax.stairs(100 * share, edges, fill=True, alpha=0.45, color=COLORS[c], label=f"{c} ({total:,} px)")
        sep = separation(hists["roof"], hists["background"])
        ax.set_title(f"Band {b + 1}: separation {sep:.2f}" if sep is not None else f"Band {b + 1}")
        ax.set_xlabel("pixel value")
        ax.set_ylabel("% of the class's pixels")
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("Roof vs background per band (separation = 1 - overlap of the two distributions; 1 is best)")
    _save(fig, path)
    plt.close(fig)
    return path


def plot_classes(stats: ClassBandStats, bins: int, path: Path) -> Path:
    """One panel per band: each class's value distribution as shares of the class, one colour per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, colors = stats.class_labels, class_colors(len(stats.classes))
    counts = [r[0].count for r in stats.class_result(())]
    cols = min(4, stats.bands)
    rows = -(-stats.bands // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows + 0.5), squeeze=False, layout="constrained")
    for b, ax in enumerate(axes.flat):
        if b >= stats.bands:
            ax.set_visible(False)
            continue
        edges, hists = stats.class_histograms(b, bins)
        for k, hist in enumerate(hists):
            total = hist.sum()
            share = hist / total if total else hist.astype(float)
            ax.stairs(100 * share, edges, fill=True, alpha=0.35, color=colors[k])
            ax.stairs(100 * share, edges, color=colors[k], lw=1)
        ax.set_title(f"Band {b + 1}")
        ax.set_xlabel("pixel value")
        ax.set_ylabel("% of the class's pixels")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.6) for c in colors]
    labels = [f"{name} ({n:,} px)" for name, n in zip(names, counts, strict=True)]
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(names), 5), fontsize=8)
    fig.suptitle("Classes per band: each class's values as a share of its pixels")
    _save(fig, path)
    plt.close(fig)
    return path


def plot_separation(stats: ClassBandStats, table: list[dict[str, Any]], path: Path) -> Path:
    """The separation table as a grid: a row per pair of classes, a column per band, coloured by |d|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(dict.fromkeys(tuple(r["classes"]) for r in table))
    d = np.full((len(pairs), stats.bands), np.nan)
    text = [["" for _ in range(stats.bands)] for _ in pairs]
    for r in table:
        i, b = pairs.index(tuple(r["classes"])), r["band"] - 1
        if r["cohen_d"] is not None:
            d[i, b] = abs(r["cohen_d"])
        text[i][b] = (
            f"d {'-' if r['cohen_d'] is None else format(r['cohen_d'], '+.2f')}\n"
            f"overlap {'-' if r['overlap'] is None else format(r['overlap'], '.2f')}"
        )
    top = max(2.0, float(np.nanmax(d)) if np.isfinite(d).any() else 2.0)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.25 * stats.bands + 3.2), 0.55 * len(pairs) + 1.8), layout="constrained")
    image = ax.imshow(np.nan_to_num(d, nan=0.0), cmap="viridis", vmin=0.0, vmax=top, aspect="auto")
    for i in range(len(pairs)):
        for b in range(stats.bands):
            light = np.isfinite(d[i, b]) and d[i, b] > 0.6 * top
            ax.text(b, i, text[i][b], ha="center", va="center", fontsize=7, color="black" if light else "white")
    ax.set_xticks(range(stats.bands), [f"band {b + 1}" for b in range(stats.bands)])
    ax.set_yticks(range(len(pairs)), [f"{a} vs {b}" for a, b in pairs])
    fig.colorbar(image, ax=ax, label="|Cohen's d| (difference of means / pooled std)")
    ax.set_title("Band separation between classes (d > 0: the second class is brighter)", fontsize=10)
    _save(fig, path)
    plt.close(fig)
    return path


def write_stats_and_histograms(
    stats: ClassBandStats, folder: Path, bins: int, source: str, labelled: bool, **extra: Any
) -> dict[str, Any]:
    """Write stats.json and the PNGs into ``folder``; return the stats record."""
    folder.mkdir(parents=True, exist_ok=True)
    record = summary_record(stats, bins, source, labelled, **extra)
    for b in cli.progress(range(stats.bands), desc="plots", unit="band"):
        plot_band(stats, b, bins, folder / f"histogram_band_{b + 1}.png")
    if labelled and stats.classes:
        plot_classes(stats, bins, folder / CLASSES_PNG)
        plot_separation(stats, record["separation"], folder / SEPARATION_PNG)
    elif labelled:
        plot_overlays(stats, bins, folder / OVERLAY_PNG)
    with atomic_path(folder / STATS_JSON) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def summarize(
    tree: DataTree, settings: Settings, *, table: Path | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Summarize the flat table (or the chips, with summarize_args.source chips) into ``tree.summary``."""
    args = settings.summarize_args
    refuse_overwrite([tree.summary / STATS_JSON], overwrite, "summarize")
    if args.source == "chips" and table is None:
        frames, masks = tree.root / settings.flatten_args.frames, tree.root / settings.flatten_args.masks
        chips = tree.list_rasters(frames) if frames.is_dir() else []
        if not chips:
            raise InputMissingError(f"no chips in {frames}: run python split/split.py, or set flatten_args.frames")
        missing = missing_masks([c.name for c in chips], masks)
        if missing:
            raise InputMissingError(f"chip {missing[0]} has no mask in {masks}: run python split/split.py")
        stats = class_band_statistics(chips, [masks / c.name for c in chips])
        record = write_stats_and_histograms(stats, tree.summary, args.bins, str(frames), True, kind="chips")
    else:
        path = table or find_table(tree.flat, settings.flatten_args.format)
        stats, info = table_statistics(path, args.chunk_rows)
        if not info.has_label:
            log.warning("summarize: %s has no label column: statistics of all pixels only, no roof/background", path)
        record = write_stats_and_histograms(
            stats, tree.summary, args.bins, str(path), info.has_label, kind="flat", layout=info.layout
        )
    pixels = record["pixels"]
    if "classes" in record:
        per_class = ", ".join(f"{n:,} {name}" for name, n in pixels["classes"].items())
        pairs = [r for r in record["separation"] if r["cohen_d"] is not None]
        best = ", ".join(
            f"band {r['band']} {r['classes'][0]}/{r['classes'][1]} d {r['cohen_d']:+.2f}"
            for r in sorted(pairs, key=lambda r: -abs(r["cohen_d"]))[:3]
        )
        log.info(
            "summarize: %d bands, %s pixels (%s) -> %s%s",
            len(record["bands"]),
            f"{pixels['all']:,}",
            per_class,
            tree.summary,
            f"; best separated: {best}" if best else "",
        )
        return record
    seps = [(e["band"], e["separation"]) for e in record["bands"] if e.get("separation") is not None]
    best = ", ".join(f"band {b} {s:.2f}" for b, s in sorted(seps, key=lambda x: -x[1])[:3])
    log.info(
        "summarize: %d bands, %s pixels (%s roof) -> %s%s",
        len(record["bands"]),
        f"{pixels['all']:,}",
        f"{pixels.get('roof', 0):,}",
        tree.summary,
        f"; best separating: {best}" if best else "",
    )
    return record


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    parser.add_argument("--input", type=Path, metavar="PATH", help="flat table to summarize (default: data/flat/)")

    def body(args: argparse.Namespace, settings: Settings, tree: DataTree) -> None:
        if args.input is not None and not args.input.is_file():  # before anything is removed
            raise InputMissingError(f"--input {args.input} not found: give the flat table (pixels.csv or .parquet)")
        run = begin("summarize", settings, tree, overwrite=args.overwrite, given={"input": args.input})
        if run.skip:
            run.say_skip()
            return
        table = args.input
        if table is None and settings.summarize_args.source != "chips":
            table = find_table(tree.flat, settings.flatten_args.format)  # a missing table: before run.start()
        run.start()
        record = summarize(tree, settings, table=table, overwrite=True)
        run.finish(pixels=record["pixels"].get("all"))

    return cli.run(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
