"""What the real-data benchmarks (real_rio.py, real_banepa.py) share: their common options, checked,
and running a stage's main the way pipeline.py does."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


def options(doc: str, data: Path) -> argparse.ArgumentParser:
    """A parser with the options both take (--data, --models, --workdir, --set, --reuse); a benchmark adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--data", type=Path, default=data)
    parser.add_argument("--models", nargs="+", default=["unet", "forest", "regression"])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra settings overrides")
    parser.add_argument(
        "--reuse", action="store_true", help="keep WORKDIR's data and trained bundles: only predict and score again"
    )
    return parser


def parse(parser: argparse.ArgumentParser, name: str) -> tuple[argparse.Namespace, Path]:
    """The options and the working folder (--workdir, else a new temporary one). Exits 1 when --data holds
    no buildings.geojson, 2 when --reuse comes without the --workdir of an earlier run."""
    args = parser.parse_args()
    if not (args.data / "buildings.geojson").is_file():
        print(f"{name}: {args.data} has no buildings.geojson", file=sys.stderr)
        raise SystemExit(1)
    if args.reuse and not args.workdir:
        print(f"{name}: --reuse needs the --workdir of an earlier run", file=sys.stderr)
        raise SystemExit(2)
    return args, args.workdir or Path(tempfile.mkdtemp(prefix=f"{name}_"))


def run(main: Callable[[list[str]], int], argv: list[str]) -> None:
    """Run a stage's main(argv); a failure stops the benchmark."""
    code = main(argv)
    if code != 0:
        raise SystemExit(f"{main.__module__} failed with exit {code}")
