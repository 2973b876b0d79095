"""Metal roofs as objects on real drone imagery: Banepa, train on most chips, predict held-out rows.

    python bench/real_banepa.py [--data ../shared/data/banepa-metal-roofs] [--models unet forest regression]
                                [--holdout-rows 220247 220248] [--workdir DIR] [--reuse] [--set KEY=VALUE ...]
                                [--only STEP ...] [--seeds N ...] [--average-seeds]

The 48 chips (512 x 512 RGB, about 0.13 m, JPEG inside .tif with .aux.xml georeferencing) tile
an area 6 chips wide and 8 high; the chips of the held-out tile rows (default the two southern
rows, OAM-*-220247-19 and OAM-*-220248-19: 12 chips, a quarter of the area) never reach
training. The rest go through chip (256 px, from the raw tiles) -> mask -> split -> train; each
model's bundle then predicts the held-out chips whole through predict.py. Metal roofs are
roof:material tin or metal; buildings without roof:material are unknown (mask_args.ignore:
128 in the masks, out of the loss and of every score here); concrete, clay ... are background.

Printed per model and step, on the held-out chips: pixel IoU, precision, recall and SpaceNet
polygon F1 (one-to-one at IoU >= 0.5, polygons under --min-m2 ignored on both sides, predicted
polygons lying mostly on unknown buildings dropped). The U-Net steps:

  footprint      trained on the footprint alone; one polygon per connected group of roof pixels
  + bnd/contact  trained on footprint, boundary and contact bands; connected groups
  + watershed    the same model; one polygon per roof by the seeded watershed, every object kept
                 (predict_args.object_filter=0)
  + obj filter   the same, the objects the bundle's object filter rejects dropped (predict's default)
  + TTA          the same, with the 8 flips and quarter turns averaged (predict_args.tta)

  classes        trained on classes (mask_args.classes): metal (tin, metal) and other_roof (concrete,
                 concerte, clay_tiles), the same bands; metal is the class raster's class 1 and the
                 roofs of class metal; "material" is the share of true roofs of known material found
                 (matched at IoU >= 0.5 by a roof of any class) whose predicted class is theirs.
                 roofs are split where the class changes (predict_args.split_classes);
                 "classes unsplit": one class per object of the watershed, as before that split existed;
                 "classes majority": each roof the class most of its pixels have (predict_args.roof_class);
                 "classes raw": without the class offsets tuned on validation (predict_args.calibrated_classes)

With --seeds, every model trains once per seed (training_args.seed, load_dataset_args.seed and
ml_args.seed) into WORKDIR/seed-N from the same
chips, and a last table gives each step's pixel IoU and polygon F1 as mean ± standard deviation over the
seeds, with every seed's figure. With --average-seeds as well (consecutive seeds), the U-Nets of the seeds
become the members of one bundle, averaged and tuned on validation by the step training_args.members
ends with, and its steps are scored too (WORKDIR/seeds-averaged): a seed ensemble's figures without
training it again.

The classical models: connected groups, watershed and object filter (trained on metal alone), and
classes (with the object filter). Then the metal pixel IoU of each class model against its
one-class twin with the same predict settings (target: at least as high),
and its material accuracy (target 0.85). Writes WORKDIR/banepa_overlay.png (the held-out chips
with true roofs and the best step's polygons).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import geopandas as gpd
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import rasterio
import shapely
from _real import SEEDS, options, parse, print_spread, run, trainings
from rasterio.features import rasterize

from chip.chip import main as chip_main
from core.metrics import Confusion, MatchCounts
from core.polygons import PolygonErrors, match_polygons, polygon_errors
from core.raster import read_raster, rgb_preview
from core.vector import at_least_m2, clip_to
from evaluate.evaluate import off_unknown
from mask.mask import main as mask_main
from predict.predict import main as predict_main
from split.split import main as split_main
from train.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "banepa-metal-roofs"
METAL = ("tin", "metal")
ATTRIBUTE = "roof:material"
#: The class map of the class steps: metal roofs, other roofs (concerte: 22 misspelt tags in the set).
CLASSES = {"metal": ["tin", "metal"], "other_roof": ["concrete", "concerte", "clay_tiles"]}
#: The mask bands of each experiment's data tree.
EXPERIMENTS = {"footprint": '["footprint"]', "channels": '["footprint","boundary","contact"]',
               "classes": '["footprint","boundary","contact"]'}  # fmt: skip


def score(folder: Path, holdout: list[Path], metal, unknown, min_m2: float, classified=None) -> dict:
    """Pixel and polygon scores of one prediction folder on the held-out chips. With ``classified`` (the
    buildings of known material, their class id in class_id) the prediction is a class model's: its metal
    roofs are class 1 (the class raster, the roofs of class metal), and the material of every true roof
    found (matched one to one at IoU >= 0.5 by a predicted roof of any class) is scored."""
    total, polys, errors = Confusion(), MatchCounts(), PolygonErrors()
    right = matches = 0
    roofs = gpd.read_file(folder / "roofs.gpkg")
    every = roofs
    if classified is not None:
        roofs = roofs[roofs["class_id"] == 1]
    for tif in holdout:
        image, profile = read_raster(tif)
        shape, transform = image.shape[1:], profile["transform"]
        truth = rasterize(metal.geometry, out_shape=shape, transform=transform) > 0
        grey = rasterize(unknown.geometry, out_shape=shape, transform=transform) > 0 if len(unknown) else None
        known = ~grey | truth if grey is not None else np.ones(shape, bool)
        if classified is None:
            pred, _ = read_raster(folder / "masks" / tif.name)
            total.add(truth, pred[0] > 0, known)
        else:
            pred, _ = read_raster(folder / "classes" / tif.name)
            total.add(truth, pred[0] == 1, known)
        tile = shapely.box(*rasterio.transform.array_bounds(*shape, transform))
        true_polys = at_least_m2(clip_to(metal, tile), min_m2)
        found = roofs[roofs["source"] == tif.name].set_crs(metal.crs, allow_override=True)
        found = at_least_m2(found, min_m2)
        found = off_unknown(found, clip_to(unknown, tile) if len(unknown) else unknown)
        counts, matched = match_polygons(list(true_polys.geometry), list(found.geometry))
        polys.merge(counts)
        errors.merge(polygon_errors(list(true_polys.geometry), list(found.geometry), matched))
        if classified is not None:
            known_roofs = at_least_m2(clip_to(classified, tile), min_m2)
            mine = at_least_m2(every[every["source"] == tif.name].set_crs(metal.crs, allow_override=True), min_m2)
            _, matched = match_polygons(list(known_roofs.geometry), list(mine.geometry))
            t_ids, p_ids = known_roofs["class_id"].to_numpy(), mine["class_id"].to_numpy()
            right += sum(int(t_ids[t] == p_ids[p]) for t, p, _ in matched)
            matches += len(matched)
    material = {"material": right / matches if matches else float("nan"), "found": matches}
    return {**total.scores(), "poly": polys.scores(), "errors": errors, **(material if classified is not None else {})}


def main() -> int:
    parser = options(__doc__, DEFAULT_DATA)
    parser.add_argument("--holdout-rows", nargs="+", default=["220247", "220248"])
    parser.add_argument("--min-m2", type=float, default=4.0, help="polygons under this ground area are ignored")
    parser.add_argument("--average-seeds", action="store_true", help="with --seeds N N+1 ...: also average the "
                        "U-Nets of the seeds into one bundle as training_args.members would (its members are those "
                        "trainings) and score it, in WORKDIR/seeds-averaged")  # fmt: skip
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (their labels, e.g. "
                        "'unet + watershed' 'unet classes')")  # fmt: skip
    args, work = parse(parser, "real_banepa")
    if args.average_seeds and (not args.seeds or len(args.seeds) < 2 or args.seeds != list(
            range(args.seeds[0], args.seeds[0] + len(args.seeds)))):  # fmt: skip
        print("real_banepa: --average-seeds needs --seeds of two or more consecutive seeds (N N+1 ...: a member's "
              "seed is the first plus its place)", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    holdout_dir = work / "holdout"
    wanted = set(args.only or ())
    if not args.reuse:
        shutil.rmtree(holdout_dir, ignore_errors=True)
        holdout_dir.mkdir(parents=True)
        for experiment in EXPERIMENTS:  # a data tree each: the masks differ
            data = work / experiment
            shutil.rmtree(data, ignore_errors=True)
            for folder in (data / "raw", data / "labels"):
                folder.mkdir(parents=True)
            shutil.copy(args.data / "buildings.geojson", data / "labels")
            for tif in sorted((args.data / "images").glob("*.tif")):
                target = holdout_dir if tif.stem.split("-")[2] in args.holdout_rows else data / "raw"
                for f in (tif, tif.with_name(tif.name + ".aux.xml")):
                    shutil.copy(f, target / f.name)
    holdout = sorted(holdout_dir.glob("*.tif"))

    base = [
        "--quiet", "--overwrite",
        "--set", "chip_args.source=raw",
        "--set", "load_dataset_args.channels=3",
        "--set", "model_args.input_shape=[256,256,3]",
        "--set", f'mask_args.filter={{"attribute": "{ATTRIBUTE}", "values": ["tin", "metal"]}}',
        "--set", f'mask_args.ignore={{"attribute": "{ATTRIBUTE}", "values": [null]}}',
        "--set", f"evaluate_args.min_area_m2={args.min_m2}",
        "--set", "predict_args.min_area=0",
    ]  # fmt: skip
    for item in args.extra:
        base += ["--set", item]

    metal, unknown, classified = materials(gpd.read_file(args.data / "buildings.geojson"))

    # (label, experiment, model, predict overrides)
    steps = []
    if "unet" in args.models:
        steps += [
            ("unet footprint", "footprint", "unet", ["predict_args.instances=false"]),
            ("unet + bnd/contact", "channels", "unet", ["predict_args.instances=false"]),
            ("unet + watershed", "channels", "unet", ["predict_args.object_filter=0"]),
            ("unet + obj filter", "channels", "unet", []),
            ("unet + TTA", "channels", "unet", ["predict_args.tta=true"]),
            ("unet classes", "classes", "unet", []),
            ("unet classes unsplit", "classes", "unet", ["predict_args.split_classes=false"]),
            ("unet classes majority", "classes", "unet", ["predict_args.roof_class=majority"]),
            ("unet classes raw", "classes", "unet", ["predict_args.calibrated_classes=false"]),
        ]
    for model in ("forest", "regression"):
        if model in args.models:
            steps += [
                (f"{model} cc", "footprint", model, ["predict_args.instances=false"]),
                (f"{model} watershed", "footprint", model, ["predict_args.object_filter=0"]),
                (f"{model} obj filter", "footprint", model, []),
                (f"{model} classes", "classes", model, []),
                (f"{model} classes raw", "classes", model, ["predict_args.calibrated_classes=false"]),
            ]
    steps = [step for step in steps if not wanted or step[0] in wanted]
    prepared: set[str] = set()
    runs = []
    truth = (metal, unknown, classified)
    for name, folder, seed in trainings(args, work):
        rows = train_and_score(steps, [*base, *seed], work, folder, args, prepared, holdout, holdout_dir, truth)
        report(rows, name, folder, args, holdout, truth)
        runs.append((name, {label: {"pixel IoU": s["iou"], "poly F1": s["poly"]["f1"]} for label, s, *_ in rows}))
    print_spread(runs)
    if args.average_seeds:
        folder = work / "seeds-averaged"
        unet_steps = [step for step in steps if step[2] == "unet"]
        for experiment in dict.fromkeys(step[1] for step in unet_steps):
            average_seeds(args, base, work, folder, experiment)
        rows = train_and_score(unet_steps, base, work, folder, argparse.Namespace(**{**vars(args), "reuse": True}),
                               prepared, holdout, holdout_dir, truth)  # fmt: skip
        report(rows, f"the U-Nets of seeds {', '.join(map(str, args.seeds))} averaged", folder, args, holdout, truth)
    return 0


def average_seeds(args, base: list[str], work: Path, folder: Path, experiment: str) -> None:
    """The bundle training_args.members would make of the --seeds trainings of ``experiment``'s U-Net (their
    seeds are a member's, seed + k): their folders linked as members into ``folder``/results, then averaged and
    tuned on val by train's own last step (unet/train.py _average_members)."""
    from core.settings import load_settings
    from core.tree import DataTree
    from unet.train import _average_members

    argv = [*experiment_argv(base, work, folder, experiment), "--set", f"training_args.members={len(args.seeds)}",
            *[a for key in SEEDS for a in ("--set", f"{key}={args.seeds[0]}")]]  # fmt: skip
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    settings = load_settings(REPO / "settings.json", overrides)
    tree = DataTree.from_settings(settings)
    members = tree.model_dir("unet") / "members"
    shutil.rmtree(tree.model_dir("unet"), ignore_errors=True)
    members.mkdir(parents=True)
    folders = []
    for seed in args.seeds:
        (members / f"seed-{seed}").symlink_to(work / f"seed-{seed}" / "results" / experiment / "unet")
        folders.append(members / f"seed-{seed}")
    _average_members(settings, tree, folders)


def materials(buildings: gpd.GeoDataFrame) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame, gpd.GeoDataFrame]:
    """The metal roofs, the buildings of unknown material, and those of known material with their class id."""
    material = buildings[ATTRIBUTE]
    ids = np.zeros(len(buildings), np.int64)
    for k, values in enumerate(CLASSES.values(), start=1):
        ids[material.isin(values).to_numpy()] = k
    return buildings[material.isin(METAL)], buildings[material.isna()], buildings.assign(class_id=ids)[ids > 0]


def experiment_argv(base: list[str], work: Path, folder: Path, experiment: str) -> list[str]:
    """The stages' arguments for ``experiment``: ``base``, its data tree WORKDIR/EXPERIMENT, its mask bands (and
    classes), its results in ``folder``/results."""
    argv = [*base, "--set", f"data_root={work / experiment}", "--set", f"experiment={experiment}",
            "--set", f"mask_args.targets={EXPERIMENTS[experiment]}",
            "--set", f"training_args.results_folder={folder / 'results'}"]  # fmt: skip
    if experiment == "classes":
        argv += ["--set", f"mask_args.classes={json.dumps(CLASSES)}", "--set", f"mask_args.class_attribute={ATTRIBUTE}"]
    return argv


def train_and_score(steps, base, work, folder, args, prepared, holdout, holdout_dir, truth) -> list:
    """Prepare each step's data tree in WORKDIR once (``prepared``), train each (experiment, model) once into
    ``folder``/results, predict the held-out chips into ``folder``/predictions and score them against ``truth``
    (metal, unknown, classified): (label, scores, train s, predict s, prediction folder) per step."""
    metal, unknown, classified = truth
    trained: dict[tuple[str, str], float] = {}
    rows = []
    for label, experiment, model, overrides in steps:
        common = experiment_argv(base, work, folder, experiment)
        if experiment not in prepared and not args.reuse:
            for stage in (chip_main, mask_main, split_main):
                run(stage, common)
        prepared.add(experiment)
        if (experiment, model) not in trained:
            started = time.perf_counter()
            if not args.reuse:
                run(train_main, [*common, "--model", model])
            trained[(experiment, model)] = time.perf_counter() - started
        name = "".join(c if c.isalnum() else "_" for c in label)
        predict = [*common, "--model", model, "--input", str(holdout_dir),
                   "--set", f"predict_args.output={folder / 'predictions' / name}"]  # fmt: skip
        for item in overrides:
            predict += ["--set", item]
        started = time.perf_counter()
        run(predict_main, predict)
        out = folder / "predictions" / name / experiment / model
        s = score(out, holdout, metal, unknown, args.min_m2, classified if experiment == "classes" else None)
        rows.append((label, s, trained[(experiment, model)], time.perf_counter() - started, out))
    return rows


def report(rows, name, folder, args, holdout, truth) -> None:
    """The table of one training's steps, and its overlays in ``folder`` (``truth``: metal, unknown, classified)."""
    metal, unknown, classified = truth
    print(
        f"\nBanepa metal roofs{', ' + name if name else ''}, held-out tile rows {', '.join(args.holdout_rows)} "
        f"({len(holdout)} chips, never trained on)"
    )
    print(f"{'step':<24}{'pixel IoU':>10}{'precision':>11}{'recall':>8}{'poly F1':>9}{'poly P':>8}{'poly R':>8}"
          f"{'matched':>9}{'material':>10}{'train s':>9}{'predict s':>11}")  # fmt: skip
    for label, s, train_s, predict_s, _ in rows:
        p = s["poly"]
        material = f"{s['material']:.3f}/{s['found']}" if "material" in s else "-"
        print(f"{label:<24}{s['iou']:>10.3f}{s['precision']:>11.3f}{s['recall']:>8.3f}{p['f1']:>9.3f}"
              f"{p['precision']:>8.3f}{p['recall']:>8.3f}{p['tp']:>4}/{p['tp'] + p['fn']:<4}{material:>10}"
              f"{train_s:>9.0f}{predict_s:>11.0f}")  # fmt: skip
    print("why the unmatched polygons are unmatched (core.polygons.polygon_errors):")
    for label, s, *_ in rows:
        print(f"  {label:<22}{s['errors'].line()}")
    by_label = {label: s for label, s, *_ in rows}
    for binary, multi in (("unet + obj filter", "unet classes"), ("forest obj filter", "forest classes"),
                          ("regression obj filter", "regression classes")):  # fmt: skip
        if binary in by_label and multi in by_label:
            a, b = by_label[binary]["iou"], by_label[multi]["iou"]
            print(f"metal pixel IoU, {multi} / {binary}: {b:.4f} / {a:.4f} = {b / a if a else float('nan'):.3f}x "
                  f"(target >= 1); material right for {by_label[multi]['material']:.3f} of "
                  f"{by_label[multi]['found']} roofs found (target >= 0.85)")  # fmt: skip
    print(f"poly F1: SpaceNet polygon F1 against the OSM metal-roof polygons (IoU >= 0.5, under {args.min_m2} m2 "
          "ignored; buildings without roof:material are unknown and kept out). Targets: pixel IoU >= 0.6, poly F1 >= 0.5")  # fmt: skip
    best = max(rows, key=lambda r: r[1]["poly"]["f1"])
    overlay(best[4], best[0], holdout, metal, unknown, folder / "banepa_overlay.png")
    print(f"overlay of the best step ({best[0]}): {folder / 'banepa_overlay.png'}")
    classed = [r for r in rows if "material" in r[1]]
    if classed:
        top = max(classed, key=lambda r: r[1]["iou"])
        overlay_classes(top[4], top[0], holdout, classified, folder / "banepa_classes.png")
        print(f"the roofs' classes of the best class step ({top[0]}): {folder / 'banepa_classes.png'}")


def overlay_classes(folder: Path, label: str, holdout: list[Path], classified, path: Path, n: int = 4) -> None:
    """The first held-out chips: true roofs by material (thick: metal cyan, other white) under the predicted
    roofs in their class's colour (as in the class rasters)."""
    from core.raster import class_colors

    roofs = gpd.read_file(folder / "roofs.gpkg")
    colours = class_colors(len(CLASSES))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.8), squeeze=False)
    for ax, tif in zip(axes[0], holdout[:n], strict=False):
        image, profile = read_raster(tif)
        inv = ~profile["transform"]
        ax.imshow(rgb_preview(image))
        tile = shapely.box(*rasterio.transform.array_bounds(*image.shape[1:], profile["transform"]))
        truth = clip_to(classified, tile)
        mine = roofs[roofs["source"] == tif.name]
        layers = [(truth[truth["class_id"] == 1].geometry, "cyan", 3.0), (truth[truth["class_id"] == 2].geometry,
                  "white", 3.0)]  # fmt: skip
        layers += [(mine[mine["class_id"] == k].geometry, colours[k], 1.2) for k in range(1, len(CLASSES) + 1)]
        for geoms, colour, width in layers:
            for g in geoms:
                for part in getattr(g, "geoms", [g]):
                    xs, ys = part.exterior.xy
                    cols, rows = inv @ (np.asarray(xs), np.asarray(ys))
                    ax.plot(cols, rows, color=colour, lw=width)
        ax.set_xlim(0, image.shape[2])
        ax.set_ylim(image.shape[1], 0)
        ax.set_title(tif.stem, fontsize=9)
        ax.set_axis_off()
    names = ", ".join(f"{name} {colours[k]}" for k, name in enumerate(CLASSES, start=1))
    fig.suptitle(f"Banepa held out, {label}: true metal roofs cyan, true other roofs white (thick); predicted roofs "
                 f"by class ({names})", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def overlay(folder: Path, label: str, holdout: list[Path], metal, unknown, path: Path, n: int = 4) -> None:
    """The first held-out chips: true metal roofs (cyan), unknown buildings (grey), predicted roofs (magenta)."""
    roofs = gpd.read_file(folder / "roofs.gpkg")
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.6), squeeze=False)
    for ax, tif in zip(axes[0], holdout[:n], strict=False):
        image, profile = read_raster(tif)
        t = profile["transform"]
        ax.imshow(rgb_preview(image))
        inv = ~t

        tile = shapely.box(*rasterio.transform.array_bounds(*image.shape[1:], t))
        for geoms, colour, width in (
            (clip_to(unknown, tile).geometry, "0.6", 1.0),
            (clip_to(metal, tile).geometry, "cyan", 2.4),
            (roofs[roofs["source"] == tif.name].geometry, "magenta", 1.8),
        ):
            for g in geoms:
                for part in getattr(g, "geoms", [g]):
                    xs, ys = part.exterior.xy
                    cols, rows = inv * (np.asarray(xs), np.asarray(ys))
                    ax.plot(cols, rows, color=colour, lw=width)
        ax.set_xlim(0, image.shape[2])
        ax.set_ylim(image.shape[1], 0)
        ax.set_title(tif.stem, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"Banepa held out, {label}: true metal roofs cyan, unknown grey, predicted roofs magenta")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
