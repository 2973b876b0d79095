"""Run the pipeline's stages in order: python pipeline.py [check] [--demo] [--from S] [--to S] [--only S ...]

Each stage runs exactly as `python STAGE/STAGE.py` would, with the same settings and --set
overrides. A stage whose outputs already exist is skipped (say --overwrite to redo it); the
run stops at the first stage that fails, with that stage's message. predict and evaluate run
once for every trained model (forest, regression, unet). --demo runs every stage on the
built-in sample scene and ends with the models' validation metrics and the report's path.

`python pipeline.py check` runs the pre-flight check instead: it reads every input the
selected stages need and lists what is wrong and how to fix it; exit 1 if anything is fatal.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from core import cli
from core.bundle import BUNDLE_JSON
from core.check import CheckError, Finding, run_checks
from core.report import MODEL_ORDER, evaluation_dir, metrics_table
from core.settings import Settings
from core.tree import DataTree

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class Run:
    """One call of a stage's main(argv): its label in the table, its extra arguments, whether it is done."""

    label: str
    args: tuple[str, ...]
    done: Callable[[], bool]


@dataclass(frozen=True)
class Stage:
    """One stage: its name, the module whose main(argv) runs it, and how to tell it is done.

    A ``per_model`` stage runs once for every trained model, with ``--model MODEL``; its
    ``done`` takes the tree, the model and the settings.
    """

    name: str
    module: str
    done: Callable[..., bool]
    args: tuple[str, ...] = ()
    per_model: bool = False

    def runs(self, tree: DataTree, settings: Settings | None = None) -> list[Run]:
        """What running this stage means now (per-model stages: one run per model trained so far)."""
        if not self.per_model:
            return [Run(self.name, self.args, functools.partial(self.done, tree))]
        return [
            Run(f"{self.name} {m}", (*self.args, "--model", m), functools.partial(self.done, tree, m, settings))
            for m in trained_models(tree)
        ]

    def pending(self, tree: DataTree, settings: Settings) -> bool:
        """Whether some run of this stage is not done (or, per model, no model is trained yet)."""
        runs = self.runs(tree, settings)
        return not runs or not all(r.done() for r in runs)


def trained_models(tree: DataTree) -> list[str]:
    """Models with a bundle in results/EXPERIMENT/, in pipeline order."""
    return [m for m in MODEL_ORDER if (tree.bundle(m) / BUNDLE_JSON).is_file()]


def _index_has(column: str) -> Callable[[DataTree], bool]:
    """Done-check of stages that record their work as a column of chips.csv."""

    def done(tree: DataTree) -> bool:
        if not tree.chips_csv.is_file():
            return False
        with tree.chips_csv.open(encoding="utf-8") as f:
            return column in f.readline().strip().split(",")

    return done


def _trained(model: str) -> Callable[[DataTree], bool]:
    return lambda t: (t.bundle(model) / BUNDLE_JSON).exists()


#: The stages, in order.
STAGES: tuple[Stage, ...] = (
    Stage("download", "download.download", lambda t: t.raw.is_dir() and any(t.raw.glob("*.tif"))),
    Stage("sample", "sample.sample", lambda t: (t.labels / "roofs.geojson").exists()),
    Stage("mosaic", "mosaic.mosaic", lambda t: t.mosaic.exists()),
    Stage("chip", "chip.chip", _index_has("nodata_share")),
    Stage("mask", "mask.mask", _index_has("roof_share")),
    Stage("split", "split.split", _index_has("split")),
    Stage("flatten", "flatten.flatten", lambda t: t.flat.is_dir() and any(t.flat.glob("pixels.*"))),
    Stage("summarize", "summarize.summarize", lambda t: (t.summary / "stats.json").exists()),
    Stage("train-forest", "train.train", _trained("forest"), ("--model", "forest")),
    Stage("train-regression", "train.train", _trained("regression"), ("--model", "regression")),
    Stage("train-unet", "train.train", _trained("unet"), ("--model", "unet")),
    Stage("predict", "predict.predict", lambda t, m, s: (t.prediction_dir(m) / "roofs.gpkg").exists(), per_model=True),
    Stage(
        "evaluate",
        "evaluate.evaluate",
        lambda t, m, s: (evaluation_dir(t, m, s.evaluate_args.split) / "metrics.json").exists(),
        per_model=True,
    ),
)

#: What --demo runs, in order.
DEMO = tuple(s.name for s in STAGES if s.name != "download")

#: Settings --demo adds: a tenth of the training pixels is plenty for summarize's histograms
#: (the whole table is 1.7 GB of CSV for the sample scene).
DEMO_SETTINGS = ("flatten_args.sample_fraction=0.1",)


def select(names: list[str], start: str | None, stop: str | None, only: list[str] | None) -> list[str]:
    """The stage names to run, in pipeline order, from --from/--to/--only (names already checked)."""
    if only:
        return [n for n in names if n in only]
    lo = names.index(start) if start else 0
    hi = names.index(stop) if stop else len(names) - 1
    return names[lo : hi + 1]


def run_stages(
    stages: list[Stage], tree: DataTree, common: list[str], overwrite: bool, settings: Settings | None = None
) -> list[tuple[str, str, float]]:
    """Run stages in order; returns (label, outcome, seconds) rows. Stops at the first failure.

    Once a stage has run, every later stage runs with --overwrite: its outputs were made
    from inputs that have just changed.
    """
    rows: list[tuple[str, str, float]] = []
    for stage in stages:
        runs = stage.runs(tree, settings)
        if not runs:
            log.error("%s: no trained model in %s: run the train stages first", stage.name, tree.results)
            rows.append((stage.name, "failed (no model)", 0.0))
            break
        ran = False
        for run in runs:
            if run.done() and not overwrite:
                log.info("%s: already done, skipped (--overwrite redoes it)", run.label)
                rows.append((run.label, "skipped", 0.0))
                continue
            log.info("%s: running", run.label)
            started = time.perf_counter()
            main = importlib.import_module(stage.module).main
            code = main([*common, *run.args, *(["--overwrite"] if overwrite else [])])
            elapsed = time.perf_counter() - started
            rows.append((run.label, "ok" if code == 0 else f"failed (exit {code})", elapsed))
            if code != 0:
                return rows
            ran = True
        overwrite = overwrite or ran
    return rows


def print_metrics(tree: DataTree) -> None:
    """A table of every trained model's validation metrics in this experiment, and the report's path."""
    lines = metrics_table(tree)
    if lines:
        print(f"\nvalidation metrics, experiment {tree.experiment} ({tree.results})")
        print("\n".join(lines))
    report = tree.results / "report.html"
    if report.is_file():
        print(f"\nreport: {report}")


def print_findings(findings: list[Finding], read: int, names: list[str], tree: DataTree) -> None:
    """The pre-flight check's list, fatal problems first."""
    print(f"pre-flight check of {names[0]} .. {names[-1]} ({tree.root}): {read} rasters read")
    for f in sorted(findings, key=lambda f: not f.fatal):
        print(f"  {'FATAL' if f.fatal else 'warning':<8} {f.message}")
    fatal = sum(f.fatal for f in findings)
    warnings = len(findings) - fatal
    if not findings:
        print("no problem found")
    else:
        print(f"{fatal} fatal problem{'s' * (fatal != 1)}, {warnings} warning{'s' * (warnings != 1)}")


def main(argv: list[str] | None = None) -> int:
    names = [s.name for s in STAGES]
    parser = cli.make_parser(__doc__)
    parser.add_argument(
        "command", nargs="?", choices=("run", "check"), default="run", help="run the stages (default), or check inputs"
    )
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
        stages = [s for s in STAGES if s.name in chosen]
        if args.command == "check":
            upcoming = [s.name for s in stages if args.overwrite or s.pending(tree, settings)]
            findings, read = run_checks(settings, tree, chosen, space_for=upcoming)
            print_findings(findings, read, chosen, tree)
            fatal = sum(f.fatal for f in findings)
            if fatal:
                raise CheckError(f"pre-flight check: {fatal} fatal problem{'s' * (fatal != 1)}, listed above")
            return
        common = ["--settings", str(args.settings)]
        for item in (*(DEMO_SETTINGS if args.demo else ()), *args.overrides):
            common += ["--set", item]
        if args.quiet:
            common.append("--quiet")
        if args.verbose:
            common.append("--verbose")
        rows = run_stages(stages, tree, common, args.overwrite, settings)
        cli.setup_logging(args.verbose, args.quiet)  # stages reconfigure logging; restore ours
        width = max([11, *(len(n) for n, _, _ in rows)])
        print(f"\n{'stage':<{width}} {'outcome':<20} seconds")
        for name, result, seconds in rows:
            print(f"{name:<{width}} {result:<20} {seconds:7.1f}")
        print(f"data tree: {tree.root}")
        print_metrics(tree)
        outcome["code"] = 0 if all(not r.startswith("failed") for _, r, _ in rows) else 1

    code = cli.run(parser, argv, body)
    return code or outcome.get("code", 0)


if __name__ == "__main__":
    sys.exit(main())
