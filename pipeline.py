"""Run the pipeline's stages in order: python pipeline.py [check] [--demo] [--from S] [--to S] [--only S ...]

Each stage runs exactly as `python STAGE/STAGE.py` would, with the same settings and --set
overrides. A stage whose outputs were made with the current settings from the current inputs
is skipped (say --overwrite to redo it); one that is outdated (a setting it depends on was
edited, or an earlier stage ran again) runs again. The run stops at the first stage that
fails, with that stage's message. predict and evaluate run
once for every trained model (forest, regression, unet), or for the kind of predict_args.bundle. Without --demo the imagery comes from
download (which asks for the bucket in a terminal) or is the tiles already in data/raw/.
--demo runs every stage but download on the built-in sample scene (--from, --to and --only
choose among them) and ends with the models' validation metrics and the report's path.

`python pipeline.py check` runs the pre-flight check instead: it reads every input the
selected stages need and lists what is wrong and how to fix it; exit 1 if anything is fatal.
"""

from __future__ import annotations

import argparse
import sys

from core import cli
from core.settings import DEFAULT_SETTINGS_PATH, Settings, load_settings
from core.tree import DataTree
from workflow import runner


def invocation(args: argparse.Namespace, overrides: list[str]) -> runner.Invocation:
    """How the user ran this: the commands the check prints carry the same settings and stages (``overrides``:
    what each stage is given, the demo's settings among them)."""
    settings = ["--settings", str(args.settings)] if args.settings != DEFAULT_SETTINGS_PATH else []
    sets = [x for item in args.overrides for x in ("--set", item)]
    selection = [*(["--from", args.start] if args.start else []), *(["--to", args.stop] if args.stop else [])]
    selection += ["--only", *args.only] if args.only else []
    return runner.Invocation(
        stage_options=(*settings, *(x for item in overrides for x in ("--set", item))),
        pipeline_options=(*settings, *(["--demo"] if args.demo else []), *sets),
        selection=(*selection, *(["--overwrite"] if args.overwrite else [])),
    )


def main(argv: list[str] | None = None) -> int:
    names = [s.name for s in runner.STAGES]
    parser = cli.make_parser(__doc__)
    parser.add_argument(
        "command", nargs="?", choices=("run", "check"), default="run", help="run the stages (default), or check inputs"
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="run the stages on the built-in sample scene (every stage but download; --from, --to and --only "
        "choose among them)",
    )
    parser.add_argument(
        "--from", dest="start", choices=names, metavar="STAGE", help=f"first stage ({', '.join(names)})"
    )
    parser.add_argument("--to", dest="stop", choices=names, metavar="STAGE", help="last stage")
    parser.add_argument("--only", nargs="+", choices=names, metavar="STAGE", help="run just these stages")
    outcome: dict[str, int] = {}

    def body(args: argparse.Namespace, settings: Settings, tree: DataTree) -> None:
        if args.only and (args.start or args.stop):
            parser.error("--only cannot be combined with --from or --to")
        if args.start and args.stop and names.index(args.start) > names.index(args.stop):
            parser.error(f"--from {args.start} comes after --to {args.stop} in the pipeline: nothing would run")
        overrides = [*(runner.DEMO_SETTINGS if args.demo else ()), *args.overrides]
        if args.demo:  # the states of the stages are read under the settings they run with
            settings = load_settings(args.settings, overrides)
        stages = runner.choose(settings, demo=args.demo, start=args.start, stop=args.stop, only=args.only)
        if not stages:  # (--demo --only download: the demo makes its imagery with sample)
            parser.error(
                "--demo runs on the sample scene, not on downloaded imagery: the stages chosen (download) "
                "leave nothing to run"
            )
        if args.command == "check":
            runner.check(stages, settings, tree, overwrite=args.overwrite, how=invocation(args, overrides))
            return
        outcome["code"] = runner.run(
            stages, settings, tree, settings_path=args.settings, overrides=overrides, overwrite=args.overwrite,
            verbose=args.verbose, quiet=args.quiet,
        )  # fmt: skip

    try:
        code = cli.run(parser, argv, body)
    except SystemExit as exc:  # parser.error() for option combinations argparse cannot check
        return int(exc.code or 0)
    return code or outcome.get("code", 0)


if __name__ == "__main__":
    sys.exit(main())
