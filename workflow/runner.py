"""The runner: the pipeline's stages in order, each skipped, redone or resumed by its record.

``python pipeline.py`` (the command line) chooses the stages with :func:`choose` and hands
them to :func:`run`, which calls each stage's ``main(argv)`` exactly as ``python STAGE/STAGE.py``
would, or to :func:`check`, the pre-flight check of what they will read. A stage declared in
:mod:`workflow.stages` is done, outdated or to do by its record (:func:`workflow.contract.status`);
download and sample, which fill ``raw/`` and ``labels/``, by whether those hold files.
"""

from __future__ import annotations

import functools
import logging
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from chip.chip import main as chip_main
from core import cli
from core.bundle import BUNDLE_JSON
from core.errors import CheckError, DataError
from core.settings import Settings, legacy_in_use
from core.tree import DataTree
from download.download import main as download_main
from evaluate.evaluate import main as evaluate_main
from evaluate.report import metrics_table
from flatten.flatten import main as flatten_main
from mask.mask import main as mask_main
from mosaic.mosaic import main as mosaic_main
from predict.predict import main as predict_main
from sample.sample import main as sample_main
from split.split import main as split_main
from summarize.summarize import main as summarize_main
from train.train import main as train_main
from workflow.check import Finding, run_checks
from workflow.contract import outdated, status, vanished_upstream, vanished_words
from workflow.stages import MODELS, outside_kind, spec_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """One call of a stage's main(argv): its label in the table, its extra arguments, and its state now."""

    label: str
    args: tuple[str, ...]
    state: Callable[[], str]
    model: str | None = None


#: States of a run (see :meth:`Stage.state`).
DONE, OUTDATED, TODO, UNRECORDED = "done", "outdated", "to do", "unrecorded"


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline: its name and the main(argv) that runs it.

    Stages declared in :mod:`workflow.stages` are done, outdated or to do by their records (the
    stage contract); download and sample, which fill raw/ and labels/, by ``exists``. A
    ``per_model`` stage runs once for every trained model, with ``--model MODEL``.
    """

    name: str
    main: Callable[[list[str]], int]
    contract: str | None = None
    args: tuple[str, ...] = ()
    model: str | None = None
    per_model: bool = False
    exists: Callable[[DataTree, str | None], bool] | None = None

    def runs(self, tree: DataTree, settings: Settings) -> list[Run]:
        """What running this stage means now (per-model stages: one run per model trained so far)."""
        if not self.per_model:
            return [Run(self.name, self.args, functools.partial(self.state, tree, settings, self.model), self.model)]
        return [
            Run(f"{self.name} {m}", (*self.args, "--model", m), functools.partial(self.state, tree, settings, m), m)
            for m in predicted_models(tree, settings)
        ]

    def state(self, tree: DataTree, settings: Settings, model: str | None) -> str:
        """done, outdated (made under other settings or from other inputs), unrecorded, or to do."""
        if self.contract is None:
            return DONE if self.exists is not None and self.exists(tree, model) else TODO
        st = status(self.contract, settings, tree, model, given={})  # as the pipeline runs it: no --input
        if st.done:
            return DONE
        if st.stale:
            return OUTDATED
        return UNRECORDED if st.state == "unrecorded" else TODO

    def pending(self, tree: DataTree, settings: Settings) -> bool:
        """Whether some run of this stage is not done (or, per model, no model is trained yet)."""
        runs = self.runs(tree, settings)
        return not runs or not all(r.state() in (DONE, UNRECORDED) for r in runs)


def trained_models(tree: DataTree) -> list[str]:
    """Models with a bundle in results/EXPERIMENT/, in pipeline order."""
    return [m for m in MODELS if (tree.bundle(m) / BUNDLE_JSON).is_file()]


def predicted_models(tree: DataTree, settings: Settings | None) -> list[str]:
    """The models predict and evaluate run for: the kind of the bundle predict_args.bundle names (predict files
    its predictions under that kind), else every model trained in this experiment."""
    kind = outside_kind(settings) if settings is not None else None
    return [kind] if kind is not None else trained_models(tree)


#: The stages, in order.
STAGES: tuple[Stage, ...] = (
    Stage("download", download_main, exists=lambda t, m: t.raw.is_dir() and any(t.raw.glob("*.tif"))),
    Stage("sample", sample_main, exists=lambda t, m: (t.labels / "roofs.geojson").exists()),
    Stage("mosaic", mosaic_main, "mosaic"),
    Stage("chip", chip_main, "chip"),
    Stage("mask", mask_main, "mask"),
    Stage("split", split_main, "split"),
    Stage("flatten", flatten_main, "flatten"),
    Stage("summarize", summarize_main, "summarize"),
    Stage("train-forest", train_main, "train", ("--model", "forest"), model="forest"),
    Stage("train-regression", train_main, "train", ("--model", "regression"), model="regression"),
    Stage("train-unet", train_main, "train", ("--model", "unet"), model="unet"),
    Stage("predict", predict_main, "predict", per_model=True),
    Stage("evaluate", evaluate_main, "evaluate", per_model=True),
)

#: What --demo runs, in order.
DEMO = tuple(s.name for s in STAGES if s.name != "download")

#: Settings --demo adds: a tenth of the training pixels is plenty for summarize's histograms
#: (the whole table is 1.7 GB of CSV for the sample scene); polygon scores of the roofs in rows
#: of touching roofs apart from the detached ones.
DEMO_SETTINGS = ("flatten_args.sample_fraction=0.1", "evaluate_args.group_by=layout")


def select(names: list[str], start: str | None, stop: str | None, only: list[str] | None) -> list[str]:
    """The stage names to run, in pipeline order, from --from/--to/--only (names already checked)."""
    if only:
        return [n for n in names if n in only]
    lo = names.index(start) if start else 0
    hi = names.index(stop) if stop else len(names) - 1
    return names[lo : hi + 1]


def run_stages(
    stages: list[Stage], tree: DataTree, common: list[str], overwrite: bool, settings: Settings
) -> list[tuple[str, str, float]]:
    """Run stages in order; returns (label, outcome, seconds) rows. Stops at the first failure.

    A stage whose record matches the settings and its inputs is skipped; an outdated one (a
    setting it depends on changed, or an earlier stage has run again since) runs with
    --overwrite. Each stage's state is read just before it runs, after the stages before it.
    """
    rows: list[tuple[str, str, float]] = []
    ran = False
    for stage in stages:
        runs = stage.runs(tree, settings)
        if not runs:
            log.error("%s: no trained model in %s: run the train stages first", stage.name, tree.results)
            rows.append((stage.name, "failed (no model)", 0.0))
            break
        for run in runs:
            state = run.state()
            redo = overwrite or state == OUTDATED or (state == UNRECORDED and ran)
            if state in (DONE, UNRECORDED) and not redo:
                log.info("%s: up to date, skipped (--overwrite redoes it)", run.label)
                spec = spec_of(stage.contract) if stage.contract else None
                if spec is not None and spec.skipped is not None and settings is not None:  # (predict: unread settings)
                    for line in spec.skipped(settings, tree, run.model, {}):
                        log.warning("%s", line)
                rows.append((run.label, "skipped", 0.0))
                continue
            log.info("%s: running%s", run.label, " (outdated)" if state == OUTDATED else "")
            started = time.perf_counter()
            code = stage.main([*common, *run.args, *(["--overwrite"] if redo else [])])
            elapsed = time.perf_counter() - started
            rows.append((run.label, "ok" if code == 0 else f"failed (exit {code})", elapsed))
            if code != 0:
                return rows
            ran = True
    return rows


@dataclass(frozen=True)
class Invocation:
    """How the user runs the stages, for the commands the check prints: the options a stage's own command
    takes (``--settings``, ``--set``, the demo's settings among them), and the pipeline's options and the
    command that runs the stages checked."""

    stage_options: tuple[str, ...] = ()
    pipeline_options: tuple[str, ...] = ()
    selection: tuple[str, ...] = ()

    def stage(self, command: str) -> str:
        """A stage's command (``python mask/mask.py --overwrite``) with the user's settings."""
        return " ".join([command, *map(shlex.quote, self.stage_options)])

    def pipeline(self, *selection: str) -> str:
        """The pipeline command with the user's settings: of the stages checked, or of ``selection``."""
        return shlex.join(["python", "pipeline.py", *self.pipeline_options, *(selection or self.selection)])


def record_findings(
    chosen: list[Stage], tree: DataTree, settings: Settings, how: Invocation | None = None
) -> list[Finding]:
    """What the stage records say: outdated or interrupted outputs, read from the same declarations
    the stages use. Outdated outputs of a stage before the chosen ones are fatal (the chosen
    stages would refuse them); those of a chosen stage are warnings: the run redoes them, and then
    every chosen stage done now that reads what they make (one warning per cause names those). A
    stage left out of the chosen ones that the run would leave outdated is fatal when a chosen stage
    reads it (that stage would refuse it). Commands are printed with the user's settings (``how``)."""
    how = how or Invocation()
    names = [s.name for s in STAGES]
    first = min((names.index(s.name) for s in chosen), default=0)
    findings = []
    Key = tuple[str, str | None]
    redone: dict[Key, frozenset[str]] = {}  # (stage, model) the run redoes -> the outdated stages that cause it
    left: dict[Key, tuple[str, str, frozenset[str]]] = {}  # done, not chosen, outdated once the run has run
    after: dict[frozenset[str], list[str]] = {}  # chosen stages done now that the run redoes, by cause
    for stage in STAGES:
        if stage.contract is None:
            continue
        models = predicted_models(tree, settings) if stage.per_model else [stage.model]
        for model in models:
            st = status(stage.contract, settings, tree, model, given={})
            label = f"{stage.name} {model}" if stage.per_model else stage.name
            ahead = stage in chosen
            key = (stage.contract, st.model)
            ups = [(d.stage, model if spec_of(d.stage).per_model else None) for d in st.current.get("deps", ())]
            causes = frozenset().union(*(redone[up] for up in ups if up in redone))
            blocked = {left[up] for up in ups if up in left} if ahead else set()
            if blocked:  # (it would refuse them, so it is not among those the run redoes)
                for up_label, up_stage, up_causes in sorted(blocked, key=lambda b: b[0]):
                    findings.append(
                        Finding("fatal", f"{label} reads the outputs of {up_label}, which the run would leave "
                                f"outdated (it redoes {' and '.join(sorted(up_causes, key=names.index))}, and "
                                f"{up_stage} is not among the stages chosen): choose {up_stage} too, or run "
                                f"{how.pipeline('--from', min(up_causes, key=names.index))}")
                    )  # fmt: skip
            if causes and st.done and not blocked:
                if ahead:
                    after.setdefault(causes, []).append(label)
                    redone[key] = causes
                else:
                    left[key] = (label, stage.name, causes)
            # Before the chosen stages, bad outputs are fatal: those stages would refuse to read them.
            fatal = not ahead and names.index(stage.name) < first
            up = vanished_upstream(st, settings, tree) if ahead and st.stale else None
            if up is not None and not any(s.contract == up.spec.name for s in chosen):  # it would refuse, not redo
                command = how.stage(up.spec.run_command(up.model))
                findings.append(Finding("fatal", vanished_words(label, up, command)))
            elif st.stale:
                cmd = how.stage(st.spec.run_command(st.model, overwrite=True))
                if ahead:
                    todo = "the run redoes it"  # (check runs nothing: the command is printed below the list)
                    redone[key] = frozenset({stage.name})
                elif fatal:
                    todo = f"rerun {cmd} (or {how.pipeline('--from', stage.name)})"
                else:
                    todo = f"{cmd} redoes it"
                findings.append(
                    Finding("fatal" if fatal else "warning", f"{label}: {st.spec.are} outdated: made "
                            f"{'; '.join(st.changes)}: {todo}")
                )  # fmt: skip
            elif st.state == "running" or st.removed:  # (a resumed run keeps its record: its readers stay done)
                why = "the run was interrupted" if st.state == "running" else "files were removed since it ran"
                findings.append(
                    Finding("fatal" if fatal else "warning", f"{label}: {st.spec.are} incomplete ({why}): "
                            f"{how.stage(st.spec.run_command(st.model))} resumes it")
                )  # fmt: skip
    for causes, labels in after.items():
        findings.append(
            Finding("warning", f"{', '.join(labels)}: done, but from what {' and '.join(sorted(causes, key=names.index))} "
                    f"made before: the run redoes {'them' if len(labels) > 1 else 'it'} too")
        )  # fmt: skip
    return findings


def shown(path: Path) -> str:
    """A path as the user typed it: relative to the current folder when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


def print_metrics(tree: DataTree, settings: Settings) -> None:
    """A table of every trained model's validation metrics in this experiment, and the report's path;
    models trained on data made before the latest changes are named under it."""
    lines = metrics_table(tree)
    if lines:
        print(f"\nvalidation metrics, experiment {tree.experiment} ({shown(tree.results)})")
        print("\n".join(lines))
        old = [m for m in trained_models(tree) if outdated("train", settings, tree, m)]
        unscored = [m for m in trained_models(tree) if m not in old and outdated("evaluate", settings, tree, m)]
        if old:
            print(f"outdated: {', '.join(old)} (trained before the latest changes; python pipeline.py retrains)")
        if unscored:
            print(f"outdated scores: {', '.join(unscored)} (evaluated before the latest changes; python pipeline.py "
                  "evaluates again)")  # fmt: skip
    report = tree.results / "report.html"
    if report.is_file():
        print(f"\nreport: {shown(report)}")


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


def choose(
    settings: Settings,
    *,
    demo: bool = False,
    start: str | None = None,
    stop: str | None = None,
    only: list[str] | None = None,
) -> list[Stage]:
    """The stages to run or check, in pipeline order: those --from/--to/--only select (names already
    checked), of --demo's with --demo. Without --demo or --only, sample drops out: the imagery comes from
    download (which asks for the bucket in a terminal) or is the tiles already in raw/."""
    names = [s.name for s in STAGES]
    chosen = select(names, start, stop, only)
    if demo:
        chosen = [n for n in chosen if n in DEMO]
    elif not only:  # the imagery: download's, or the tiles already in raw/; the sample scene only with --demo
        chosen = [n for n in chosen if n != "sample"]
    return [s for s in STAGES if s.name in chosen]


def imagery_findings(stages: list[Stage], settings: Settings, tree: DataTree) -> list[Finding]:
    """Where a run's imagery would come from, when download is chosen: fatal when a bucket is set but raw/ holds
    the sample scene (made by --demo, no download manifest: download would be skipped, as raw/ has tiles, and
    the stages after it would map the synthetic town as the bucket's imagery); a warning when raw/ is empty and
    no bucket is set (download asks for it in a terminal, and fails in one line without one)."""
    from download.download import MANIFEST

    if "download" not in {s.name for s in stages}:
        return []
    tiles = tree.raw.is_dir() and any(tree.raw.glob("*.tif"))
    if settings.download_args.bucket and tiles and tree.quicklook.is_file() and not (tree.raw / MANIFEST).is_file():
        return [Finding("fatal",
            f"download_args.bucket is set, but {tree.raw} holds the sample scene (made by python pipeline.py "
            f"--demo), not its imagery: set data_root to another folder for the bucket's imagery, or remove "
            f"{tree.raw}, {tree.labels} and {tree.quicklook} first"
        )]  # fmt: skip
    if not settings.download_args.bucket and not tiles:
        return [Finding("warning",
            f"{tree.raw} holds no tiles and download_args.bucket is not set: download will ask for the bucket (in a "
            "terminal; elsewhere it stops): set download_args.bucket, put your tiles in it, or run python pipeline.py "
            "--demo for the sample scene"
        )]  # fmt: skip
    return []


def check(
    stages: list[Stage], settings: Settings, tree: DataTree, overwrite: bool = False, how: Invocation | None = None
) -> None:
    """The pre-flight check of ``stages``: every input they read, their records and legacy settings,
    listed fatal first; ``how`` the user runs them (the commands printed). Raises CheckError when anything is
    fatal."""
    names = [s.name for s in stages]
    upcoming = [s.name for s in stages if overwrite or s.pending(tree, settings)]
    findings, read = run_checks(settings, tree, names, space_for=upcoming)
    findings += imagery_findings(stages, settings, tree)
    findings += record_findings(stages, tree, settings, how)
    findings += [
        Finding("warning", f"settings: {key} is the original pipeline's and ignored: {replacement}")
        for key, replacement in legacy_in_use(settings)
    ]
    print_findings(findings, read, names, tree)
    if any("the run redoes" in f.message for f in findings):
        print(f"the run: {(how or Invocation()).pipeline()}")
    fatal = sum(f.fatal for f in findings)
    if fatal:
        raise CheckError(f"pre-flight check: {fatal} fatal problem{'s' * (fatal != 1)}, listed above")


def run(
    stages: list[Stage],
    settings: Settings,
    tree: DataTree,
    *,
    settings_path: Path,
    overrides: Iterable[str] = (),
    overwrite: bool = False,
    verbose: bool = False,
    quiet: bool = False,
) -> int:
    """Run ``stages``, each with the settings file, the overrides and -q or -v; print the outcome of each
    and, when none failed, the models' validation metrics; return the exit code."""
    fatal = [f.message for f in imagery_findings(stages, settings, tree) if f.fatal]
    if fatal:
        raise DataError(fatal[0])
    common = ["--settings", str(settings_path)]
    for item in overrides:
        common += ["--set", item]
    common += ["--quiet"] * quiet + ["--verbose"] * verbose
    rows = run_stages(stages, tree, common, overwrite, settings)
    cli.setup_logging(verbose, quiet)  # stages reconfigure logging; restore ours
    width = max([11, *(len(n) for n, _, _ in rows)])
    print(f"\n{'stage':<{width}} {'outcome':<20} seconds")
    for name, result, seconds in rows:
        print(f"{name:<{width}} {result:<20} {seconds:7.1f}")
    print(f"data tree: {shown(tree.root)}")
    failed = any(r.startswith("failed") for _, r, _ in rows)
    if not failed:  # after a failure the table would show models of an earlier run as if of this one
        print_metrics(tree, settings)
    # An interrupted stage's code (130 Ctrl-C, 143 SIGTERM) passes through: a scheduler tells it from a failure.
    codes = [int(r.split("exit ")[1].rstrip(")")) for _, r, _ in rows if r.startswith("failed (exit ")]
    return codes[-1] if codes and codes[-1] in (130, 143) else 1 if failed else 0
