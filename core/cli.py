"""The argument parser and main() wrapper every stage script shares.

A stage script ends with::

    def main(argv: list[str] | None = None) -> int:
        parser = cli.make_parser(__doc__)
        parser.add_argument(...)            # the stage's own options
        return cli.run(parser, argv, body)  # body(args, settings, tree) -> None

``run`` parses arguments, loads and validates settings (``--settings``, ``--set``), prints
them with ``--print-settings``, sets up logging, builds the :class:`DataTree`, calls
``body`` and maps the outcome to an exit code: 0 success, 1 :class:`PipelineError` (one line
on stderr, a traceback only with ``--verbose``), 2 bad usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from core.errors import PipelineError
from core.settings import DEFAULT_SETTINGS_PATH, Settings, dump_settings, load_settings
from core.tree import DataTree

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Set by :func:`run` from --quiet; progress bars are also off when stderr is not a terminal.
_quiet = False

Body = Callable[[argparse.Namespace, Settings, DataTree], Any]


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake said in one line like every other error (argparse prints its usage first)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def make_parser(doc: str | None, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser with the options every stage shares; the stage adds its own."""
    summary, _, details = (doc or "").strip().partition("\n")
    parser = _Parser(
        prog=prog,
        description=summary,
        epilog=details.strip() or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = parser.add_argument_group("common options")
    common.add_argument(
        "--settings",
        type=Path,
        default=DEFAULT_SETTINGS_PATH,
        metavar="PATH",
        help="settings file (default: settings.json at the repository root)",
    )
    common.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one setting, e.g. --set training_args.epochs=3 (repeatable; values are JSON or text)",
    )
    common.add_argument(
        "--overwrite",
        action="store_true",
        help="redo the stage's outputs from scratch (without it an up-to-date stage is skipped, an interrupted one "
        "resumes, and one whose settings or inputs changed refuses, saying what changed)",
    )
    common.add_argument("--print-settings", action="store_true", help="print the resolved settings as JSON and exit")
    noise = common.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="debug messages, and tracebacks on errors")
    noise.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars")
    return parser


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Messages go to stderr as 'level: message'; --quiet also turns progress bars off."""
    global _quiet
    _quiet = quiet
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries' own chatter stays at warnings unless debugging.
    for name in ("rasterio", "fiona", "pyogrio", "matplotlib", "PIL", "botocore", "urllib3"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm progress bar on stderr; off with --quiet or when stderr is not a terminal."""
    kwargs.setdefault("disable", True if _quiet else None)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, file=sys.stderr, **kwargs)


def run(parser: argparse.ArgumentParser, argv: list[str] | None, body: Body) -> int:
    """Parse, load settings, call ``body(args, settings, tree)``; return the exit code."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help is 0, usage errors are 2
        return int(exc.code or 0)
    setup_logging(args.verbose, args.quiet)
    restore = _handle_sigterm()
    try:
        settings = load_settings(args.settings, args.overrides)
        if args.print_settings:
            sys.stdout.write(dump_settings(settings))
            return 0
        tree = DataTree.from_settings(settings)
        body(args, settings, tree)
    except PipelineError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (NotADirectoryError, FileExistsError, IsADirectoryError, PermissionError) as exc:
        # An output path blocked by a file, or not writable: the settings' paths or the file system.
        if args.verbose:
            traceback.print_exc()
        where = exc.filename or "a path"
        print(
            f"error: cannot use {where} ({exc.strerror or exc}): check data_root, the folders in the "
            "settings and their permissions; a file may sit where a folder should be (run with --verbose for the "
            "traceback)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or a library failure: one line, the traceback on request
        if args.verbose:
            traceback.print_exc()
        text = " ".join(str(exc).split())
        print(
            f"error: unexpected {type(exc).__name__}: {text[:500]} (run with --verbose for the traceback)",
            file=sys.stderr,
        )
        return 1
    except Terminated:
        print("terminated: rerun the same command to resume", file=sys.stderr)
        return 143
    finally:
        restore()
    return 0


class Terminated(BaseException):
    """SIGTERM arrived (a job scheduler, a timeout, kill PID): the run stops like after Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _handle_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread; return a function that undoes it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, previous)


def unshadow_package(script: str) -> None:
    """Let a stage script import its own package: ``python evaluate/evaluate.py`` puts evaluate/ first on
    sys.path, where ``import evaluate`` finds the script instead of the package. Drops that entry, as
    ``python -P`` would; call it under ``if __name__ == "__main__"`` before importing the package."""
    if sys.path and Path(sys.path[0]).resolve() == Path(script).resolve().parent:
        del sys.path[0]
