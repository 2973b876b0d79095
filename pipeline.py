"""Run the pipeline's stages in order: python pipeline.py [--demo] [--from S] [--to S] [--only S].

Each stage runs exactly as `python STAGE/STAGE.py` would, with the same settings and --set
overrides. A stage whose outputs already exist is skipped (say --overwrite to redo it); the
run stops at the first stage that fails, with that stage's message. --demo runs every stage
on the built-in sample scene.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from core import cli
from core.settings import Settings
from core.tree import DataTree

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class Stage:
    """One stage: its name, the module whose main(argv) runs it, and how to tell it is done."""

    name: str
    module: str
    done: Callable[[DataTree], bool]
    args: tuple[str, ...] = ()


def _index_has(column: str) -> Callable[[DataTree], bool]:
    """Done-check of stages that record their work as a column of chips.csv."""

    def done(tree: DataTree) -> bool:
        if not tree.chips_csv.is_file():
            return False
        with tree.chips_csv.open(encoding="utf-8") as f:
            return column in f.readline().strip().split(",")

    return done


#: The stages that exist, in order. Later stages join this list as they land.
STAGES: tuple[Stage, ...] = (
    Stage("download", "download.download", lambda t: t.raw.is_dir() and any(t.raw.glob("*.tif"))),
    Stage("sample", "sample.sample", lambda t: (t.labels / "roofs.geojson").exists()),
    Stage("mosaic", "mosaic.mosaic", lambda t: t.mosaic.exists()),
    Stage("chip", "chip.chip", _index_has("nodata_share")),
    Stage("mask", "mask.mask", _index_has("roof_share")),
    Stage("split", "split.split", _index_has("split")),
    Stage("train-unet", "train.train", lambda t: (t.bundle("unet") / "bundle.json").exists(), ("--model", "unet")),
    Stage(
        "predict", "predict.predict", lambda t: (t.prediction_dir("unet") / "roofs.gpkg").exists(), ("--model", "unet")
    ),
)

#: What --demo runs, in order.
DEMO = ("sample", "mosaic", "chip", "mask", "split", "train-unet", "predict")


def select(names: list[str], start: str | None, stop: str | None, only: list[str] | None) -> list[str]:
    """The stage names to run, in pipeline order, from --from/--to/--only (names already checked)."""
    if only:
        return [n for n in names if n in only]
    lo = names.index(start) if start else 0
    hi = names.index(stop) if stop else len(names) - 1
    return names[lo : hi + 1]


def run_stages(stages: list[Stage], tree: DataTree, common: list[str], overwrite: bool) -> list[tuple[str, str, float]]:
    """Run stages in order; returns (name, outcome, seconds) rows. Stops at the first failure.

    Once a stage has run, every later stage runs with --overwrite: its outputs were made
    from inputs that have just changed.
    """
    rows: list[tuple[str, str, float]] = []
    for stage in stages:
        if stage.done(tree) and not overwrite:
            log.info("%s: already done, skipped (--overwrite redoes it)", stage.name)
            rows.append((stage.name, "skipped", 0.0))
            continue
        log.info("%s: running", stage.name)
        started = time.perf_counter()
        main = importlib.import_module(stage.module).main
        argv = [*common, *stage.args, *(["--overwrite"] if overwrite else [])]
        code = main(argv)
        elapsed = time.perf_counter() - started
        rows.append((stage.name, "ok" if code == 0 else f"failed (exit {code})", elapsed))
        if code != 0:
            break
        overwrite = True
    return rows


def print_metrics(tree: DataTree) -> None:
    """A table of every trained model's validation metrics in this experiment."""
    rows = []
    for path in sorted(tree.results.glob("*/metrics.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        rows.append((record["model"], record["split"], record["threshold"], record["pixel"]))
    if not rows:
        return
    print(f"\nvalidation metrics ({tree.results})")
    print(f"{'model':<12}{'split':<7}{'IoU':>7}{'F1':>7}{'precision':>11}{'recall':>8}{'threshold':>11}")
    for model, split, threshold, p in rows:
        print(
            f"{model:<12}{split:<7}{p['iou']:>7.3f}{p['f1']:>7.3f}{p['precision']:>11.3f}{p['recall']:>8.3f}"
            f"{threshold:>11.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    names = [s.name for s in STAGES]
    parser = cli.make_parser(__doc__)
    parser.add_argument("--demo", action="store_true", help="run every stage on the built-in sample scene")
    parser.add_argument(
        "--from", dest="start", choices=names, metavar="STAGE", help=f"first stage ({', '.join(names)})"
    )
    parser.add_argument("--to", dest="stop", choices=names, metavar="STAGE", help="last stage")
    parser.add_argument("--only", nargs="+", choices=names, metavar="STAGE", help="run just these stages")
    outcome: dict[str, int] = {}

    def body(args: argparse.Namespace, settings: Settings, tree: DataTree) -> None:
        chosen = list(DEMO) if args.demo else select(names, args.start, args.stop, args.only)
        if not args.demo and not args.only:
            # Imagery comes from S3 when a bucket is set, else from the sample generator.
            skip = "sample" if settings.download_args.bucket else "download"
            chosen = [n for n in chosen if n != skip]
        common = ["--settings", str(args.settings)]
        for item in args.overrides:
            common += ["--set", item]
        if args.quiet:
            common.append("--quiet")
        if args.verbose:
            common.append("--verbose")
        stages = [s for s in STAGES if s.name in chosen]
        rows = run_stages(stages, tree, common, args.overwrite)
        cli.setup_logging(args.verbose, args.quiet)  # stages reconfigure logging; restore ours
        print("\nstage       outcome              seconds")
        for name, result, seconds in rows:
            print(f"{name:<11} {result:<20} {seconds:7.1f}")
        planned = ("flatten", "summarize", "train-forest", "train-regression", "evaluate")
        not_yet = [n for n in planned if n not in names]
        if args.demo and not_yet:
            print(f"\nnot built yet, so not run: {', '.join(not_yet)}")
        print_metrics(tree)
        print(f"data tree: {tree.root}")
        outcome["code"] = 0 if all(not r.startswith("failed") for _, r, _ in rows) else 1

    code = cli.run(parser, argv, body)
    return code or outcome.get("code", 0)


if __name__ == "__main__":
    sys.exit(main())
