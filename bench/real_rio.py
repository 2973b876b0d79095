"""The pipeline on real imagery: SpaceNet Rio, train on some tiles, predict held-out neighbours.

    python bench/real_rio.py [--data ../shared/data/spacenet-rio] [--models unet forest regression]
                             [--holdout rio_img52 rio_img54] [--workdir DIR] [--reuse] [--set KEY=VALUE ...]
                             [--seeds N ...]

Runs chip -> mask -> split -> train on every tile but the held-out ones (3-band uint8,
EPSG:4326, 438 x 406 px; chips of 128 px without overlap, so that the split can draw validation
chips from every tile: with 256 px chips at half-chip stride it left 3 validation chips, all of
the sparse tile rio_img50, and the thresholds tuned on them suited none of the dense tiles), predicts the
held-out tiles whole (sliding windows) with each model's bundle, and scores them against
the rasterized building polygons: pixel IoU, F1, precision, recall and object F1 per model. Prints a
table and writes overlays (image, truth, prediction) to WORKDIR/rio_overlay_MODEL.png.
With --seeds, each model trains once per seed (training_args.seed, load_dataset_args.seed and
ml_args.seed) into WORKDIR/seed-N from the
same chips, and a last table gives the mean ± standard deviation over the seeds of pixel IoU, object F1
and polygon F1 by watershed.
DESIGN.md's figures to beat on this data: U-Net 0.32 pixel IoU, forest 0.22, regression 0.30.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import geopandas as gpd
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import rasterio
import shapely
from _real import options, parse, print_spread, run, trainings
from rasterio.features import rasterize

from chip.chip import main as chip_main
from core.metrics import Confusion, MatchCounts
from core.polygons import PolygonErrors, match_polygons, polygon_errors
from core.raster import read_raster, rgb_preview
from core.settings import EvaluateArgs
from core.vector import at_least_m2, clip_to
from evaluate.evaluate import match_objects
from mask.mask import main as mask_main
from predict.predict import main as predict_main
from predict.predict import polygonize
from split.split import main as split_main
from train.train import main as train_main
from unet.plots import draw_comparison

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "spacenet-rio"
#: Polygons under this ground area are ignored in the polygon scores, as evaluate's default.
MIN_M2 = 4.0


def main() -> int:
    parser = options(__doc__, DEFAULT_DATA)
    parser.add_argument("--holdout", nargs="+", default=["rio_img52", "rio_img54"])
    args, work = parse(parser, "real_rio")
    data = work / "data"
    if not args.reuse:
        shutil.rmtree(data, ignore_errors=True)
        (data / "raw").mkdir(parents=True)
        (data / "labels").mkdir(parents=True)
        (data / "holdout").mkdir(parents=True)
        for tif in sorted((args.data / "images").glob("*.tif")):
            shutil.copy(tif, data / ("holdout" if tif.stem in args.holdout else "raw") / tif.name)
        shutil.copy(args.data / "buildings.geojson", data / "labels")

    common = [
        "--quiet",
        "--overwrite",
        "--set",
        f"data_root={data}",
        "--set",
        "experiment=rio",
        "--set",
        "chip_args.source=raw",
        "--set",
        "chip_args.size=128",
        "--set",
        "chip_args.stride=128",
        "--set",
        "chip_args.max_nodata=0.85",  # (the edge chips: a tile's last 22 rows or 54 columns, the rest padding)
        "--set",
        "load_dataset_args.channels=3",
        "--set",
        "model_args.input_shape=[128,128,3]",
        "--set",
        "predict_args.min_area=0",
        "--set",
        "mask_args.filter=null",  # every polygon is a building (the labels have no roof_type)
    ]
    for item in args.extra:
        common += ["--set", item]
    if not args.reuse:
        for stage in (chip_main, mask_main, split_main):
            run(stage, common)

    buildings = gpd.read_file(args.data / "buildings.geojson")
    runs = []
    for name, folder, seed in trainings(args, work):
        rows = train_and_score([*common, *seed], folder, data / "holdout", args, buildings)
        print(
            f"\nSpaceNet Rio{', ' + name if name else ''}, held-out tiles {', '.join(args.holdout)} (trained on the others)"
        )
        print(
            f"{'model':<12}{'pixel IoU':>10}{'F1':>8}{'precision':>11}{'recall':>8}{'object F1':>11}"
            f"{'poly F1 cc':>12}{'poly F1 ws':>12}{'train s':>9}"
        )
        for model, s, obj, pcc, pws, secs, _ in rows:
            print(
                f"{model:<12}{s['iou']:>10.3f}{s['f1']:>8.3f}{s['precision']:>11.3f}{s['recall']:>8.3f}{obj:>11.3f}"
                f"{pcc:>12.3f}{pws:>12.3f}{secs:>9.0f}"
            )
        print("why the watershed's unmatched polygons are unmatched (core.polygons.polygon_errors):")
        for model, *_, errors in rows:
            print(f"  {model:<10}{errors.line()}")
        table = {
            model: {"pixel IoU": s["iou"], "object F1": obj, "poly F1 ws": pws} for model, s, obj, _, pws, _, _ in rows
        }
        runs.append((name, table))
    print(
        "object F1 as evaluate.py scores it: 4-connected objects of the masks, matched at IoU >= 0.5, under 20 px ignored"
    )
    print(
        "poly F1: SpaceNet polygon F1 against the building polygons (one-to-one at IoU >= 0.5, under 4 m2 ignored): "
        "cc = one polygon per connected group of roof pixels, ws = one per roof by the seeded watershed (predict's)"
    )
    print(
        "DESIGN.md, same data: keras-unet recipe 0.32 pixel IoU (object F1 0.04), forest 0.22 (0.00), "
        "regression 0.30 (0.01)"
    )
    print(f"overlays: {work}/{'seed-*/' if args.seeds else ''}rio_overlay_*.png")
    print_spread(runs)
    return 0


def train_and_score(common: list[str], folder: Path, holdout: Path, args, buildings: gpd.GeoDataFrame) -> list:
    """Train each model into ``folder``/results, predict the held-out tiles (in ``holdout``) into
    ``folder``/predictions, score them and draw ``folder``/rio_overlay_MODEL.png: (model, pixel scores, object F1,
    polygon F1 of the connected groups, polygon F1 of the watershed, train s, the watershed's PolygonErrors) per
    model."""
    common = [*common, "--set", f"training_args.results_folder={folder / 'results'}",
              "--set", f"predict_args.output={folder / 'predictions'}"]  # fmt: skip
    rows = []
    for model in args.models:
        started = time.perf_counter()
        if not args.reuse:
            run(train_main, [*common, "--model", model])
        train_s = time.perf_counter() - started
        run(predict_main, [*common, "--model", model, "--input", str(holdout)])
        out = folder / "predictions" / "rio" / model
        total = Confusion()
        objects = MatchCounts()
        poly_ws, poly_cc, errors = MatchCounts(), MatchCounts(), PolygonErrors()
        pictures = []
        for name in args.holdout:
            image, profile = read_raster(holdout / f"{name}.tif")
            truth = rasterize(buildings.geometry, out_shape=image.shape[1:], transform=profile["transform"]) > 0
            pred, _ = read_raster(out / "masks" / f"{name}.tif")
            c = Confusion().add(truth, pred[0] > 0)
            total.merge(c)
            objects.merge(match_objects(truth, pred[0] > 0, EvaluateArgs()))
            pictures.append((name, image, truth, pred[0] > 0, c.scores()["iou"]))
            # Polygons, as SpaceNet scores them: the watershed's roofs, and the mask's connected groups.
            tile = shapely.box(*rasterio.transform.array_bounds(*image.shape[1:], profile["transform"]))
            true_polys = at_least_m2(clip_to(buildings, tile), MIN_M2)
            roofs = gpd.read_file(out / "roofs.gpkg")
            watershed = at_least_m2(
                roofs[roofs["source"] == f"{name}.tif"].set_crs(buildings.crs, allow_override=True), MIN_M2
            )
            groups = gpd.GeoSeries(polygonize(out / "masks" / f"{name}.tif"), crs=buildings.crs)
            components = at_least_m2(gpd.GeoDataFrame(geometry=groups), MIN_M2)
            counts, matched = match_polygons(list(true_polys.geometry), list(watershed.geometry))
            poly_ws.merge(counts)
            errors.merge(polygon_errors(list(true_polys.geometry), list(watershed.geometry), matched))
            poly_cc.merge(match_polygons(list(true_polys.geometry), list(components.geometry))[0])
        rows.append(
            (model, total.scores(), objects.scores()["f1"], poly_cc.scores()["f1"], poly_ws.scores()["f1"], train_s,
             errors)
        )  # fmt: skip
        overlay(pictures, model, folder / f"rio_overlay_{model}.png")
    return rows


def overlay(pictures: list, model: str, path: Path) -> None:
    fig, axes = plt.subplots(len(pictures), 3, figsize=(13, 4.2 * len(pictures)), squeeze=False)
    for row, (name, image, truth, pred, iou) in enumerate(pictures):
        draw_comparison(axes[row], rgb_preview(image), truth, pred)
        axes[row, 0].set_title(f"{name} (held out)")
        axes[row, 1].set_title("buildings (cyan)")
        axes[row, 2].set_title(f"{model}: IoU {iou:.2f}; hit green, false magenta, missed yellow", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
