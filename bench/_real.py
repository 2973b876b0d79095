"""What the real-data benchmarks (real_rio.py, real_banepa.py) share: their common options, checked,
and running a stage's main the way pipeline.py does."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

#: Settings the benchmarks set themselves: folders under WORKDIR (a seed's own with --seeds).
OWNED = ("data_root", "training_args.results_folder", "predict_args.output")
#: The seeds --seeds sets: the U-Net's weights, its chips' order and augmentation, the classical models.
SEEDS = ("training_args.seed", "load_dataset_args.seed", "ml_args.seed")


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
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        metavar="N",
        help="train once per seed (training_args.seed and load_dataset_args.seed: the U-Net's initial weights, "
        "chip order and augmentation; ml_args.seed: the classical models' pixel sample and trees), each in "
        "WORKDIR/seed-N on the same chips, and print each step's mean and spread over them: one training is one draw",
    )
    return parser


def parse(parser: argparse.ArgumentParser, name: str) -> tuple[argparse.Namespace, Path]:
    """The options and the working folder (--workdir, else a new temporary one). Exits 1 when --data holds
    no buildings.geojson; 2 when --reuse comes without the --workdir of an earlier run (or its seed-N folders),
    when --seeds names a seed twice or comes with --set of a seed it sets, or --set names a folder of OWNED."""
    args = parser.parse_args()
    if not (args.data / "buildings.geojson").is_file():
        print(f"{name}: {args.data} has no buildings.geojson", file=sys.stderr)
        raise SystemExit(1)
    if args.reuse and not args.workdir:
        print(f"{name}: --reuse needs the --workdir of an earlier run", file=sys.stderr)
        raise SystemExit(2)
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        print(f"{name}: --seeds {' '.join(map(str, args.seeds))} names a seed twice", file=sys.stderr)
        raise SystemExit(2)
    keys = [item.split("=")[0].strip() for item in args.extra]
    owned = [k for k in keys if k in OWNED]
    if owned:
        print(f"{name}: the benchmark puts {owned[0]} under WORKDIR itself; drop --set {owned[0]}=... and give "
              "--workdir", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    fixed = [k for k in keys if k in SEEDS]
    if args.seeds and fixed:
        print(f"{name}: --seeds sets {' and '.join(fixed)} itself; drop --set {fixed[0]}=...", file=sys.stderr)
        raise SystemExit(2)
    work = args.workdir or Path(tempfile.mkdtemp(prefix=f"{name}_"))
    missing = [f"seed-{s}" for s in args.seeds or () if not (work / f"seed-{s}").is_dir()]
    if args.reuse and missing:
        print(f"{name}: --reuse --seeds: {work} has no {', '.join(missing)} (made by an earlier run with these --seeds)",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    return args, work


def run(main: Callable[[list[str]], int], argv: list[str]) -> None:
    """Run a stage's main(argv); a failure stops the benchmark."""
    code = main(argv)
    if code != 0:
        raise SystemExit(f"{main.__module__} failed with exit {code}")


def trainings(args: argparse.Namespace, work: Path) -> list[tuple[str, Path, list[str]]]:
    """(name, folder, settings overrides) of each training: the one in WORKDIR, or one per --seeds seed in
    WORKDIR/seed-N with every seed of SEEDS N."""
    if not args.seeds:
        return [("", work, [])]
    return [
        (f"seed {s}", work / f"seed-{s}", [a for key in SEEDS for a in ("--set", f"{key}={s}")]) for s in args.seeds
    ]


def print_spread(runs: list[tuple[str, dict[str, dict[str, float]]]]) -> None:
    """Each step's mean and standard deviation over the trainings of ``runs`` ((name, {step: {figure: value}})),
    then every training's value. Nothing with fewer than two."""
    if len(runs) < 2:
        return
    first = runs[0][1]
    figures = list(next(iter(first.values()))) if first else []
    print(f"\nover {len(runs)} trainings ({', '.join(name for name, _ in runs)}): mean ± standard deviation [each]")
    print(f"{'step':<24}" + "".join(f"{f:>{14 + 7 * len(runs)}}" for f in figures))
    for step in first:
        cells = []
        for figure in figures:
            values = np.array([table[step][figure] for _, table in runs])
            each = " ".join(f"{v:.3f}" for v in values)
            cells.append(f"{values.mean():.3f} ± {values.std(ddof=1):.3f} [{each}]")
        print(f"{step:<24}" + "".join(f"{c:>{14 + 7 * len(runs)}}" for c in cells))
