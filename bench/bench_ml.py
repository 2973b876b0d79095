"""Benchmark flatten against the naive pandas way, and the classical models' throughput.

    python bench/bench_ml.py [--chips 16] [--train-pixels 100000] [--workdir DIR]

On 256 x 256 x 8 uint16 chips cut from the sample scene (with its metal-roof masks):

1. flatten throughput (values/s: pixels x bands written, long layout) of flatten/flatten.py
   to CSV and to Parquet, against the naive way on the same chips (every chip into one
   pandas DataFrame, then ``to_csv``) — each run as its own process, timed, with peak
   resident memory from /usr/bin/time;
2. peak memory of the same runs on 4x the chips: flatten's stays flat, the naive way's grows;
3. forest and regression (default settings) training throughput (pixels/s of ``fit`` on
   sampled training pixels) and prediction throughput (pixels/s of Predictor.predict on whole
   chips: normalization, features, model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.features import rasterize

from core.raster import valid_pixels, write_raster

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
CHIP = 256


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run a command; (wall seconds, peak RSS in MB of its largest process) from /usr/bin/time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        started = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", out.name, *cmd], check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        rss_kb = float(out.read().strip().splitlines()[-1])
    return wall, rss_kb / 1024


def make_chips(root: Path, count: int) -> int:
    """Write ``count`` chips and masks (the scene's, rotated when repeated); return their valid values (pixels x bands)."""
    from sample.scene import generate_scene

    scene = generate_scene(seed=0, tiles=2, tile_size=512)
    metal = scene.roofs[scene.roofs["roof_type"] == "metal"]
    mask = rasterize(metal.geometry, out_shape=scene.image.shape[1:], transform=scene.transform, default_value=255)
    per_side = scene.image.shape[1] // CHIP
    cuts = [(r * CHIP, c * CHIP) for r in range(per_side) for c in range(per_side)]
    values = 0
    for k in range(count):
        r, c = cuts[k % len(cuts)]
        turn = k // len(cuts)
        image = np.ascontiguousarray(np.rot90(scene.image[:, r : r + CHIP, c : c + CHIP], turn, axes=(1, 2)))
        m = np.ascontiguousarray(np.rot90(mask[r : r + CHIP, c : c + CHIP], turn).astype(np.uint8))
        transform = scene.transform * Affine.translation(c, r)
        values += int(valid_pixels(image, 0).sum()) * image.shape[0]
        write_raster(root / "train_frames" / f"train_{k}.tif", image, crs=scene.crs, transform=transform, nodata=0)
        write_raster(root / "train_masks" / f"train_{k}.tif", m, crs=scene.crs, transform=transform)
    return values


def naive(root: Path, out: Path) -> None:
    """The naive flatten: every chip into one pandas DataFrame, then to_csv (run as a child process)."""
    import pandas as pd
    from pyproj import Transformer

    from core.raster import read_raster, valid_pixels

    frames = []
    for chip in sorted((root / "train_frames").glob("*.tif")):
        data, profile = read_raster(chip)
        mask, _ = read_raster(root / "train_masks" / chip.name)
        rows, cols = np.nonzero(valid_pixels(data, profile["nodata"]))
        x, y = profile["transform"] @ (cols + 0.5, rows + 0.5)
        lon, lat = Transformer.from_crs(profile["crs"], "EPSG:4326", always_xy=True).transform(x, y)
        for b in range(data.shape[0]):
            frames.append(
                pd.DataFrame(
                    {"latitude": lat, "longitude": lon, "row": rows, "col": cols, "band": b + 1,
                     "value": data[b, rows, cols], "label": (mask[0, rows, cols] > 0).astype(int), "chip": chip.name}
                )
            )  # fmt: skip
    pd.concat(frames, ignore_index=True).to_csv(out, index=False)


def flatten_runs(work: Path, chips: int) -> dict[str, tuple[float, float]]:
    """Wall seconds and peak MB of each flatten method on ``chips`` chips."""
    root = work / f"c{chips}"
    res: dict[str, tuple[float, float]] = {"values": (float(make_chips(root, chips)), 0.0)}
    for fmt in ("csv", "parquet"):
        for workers in (1, 2):
            cmd = [PY, str(REPO / "flatten/flatten.py"), "--quiet", "--overwrite", "--set", f"data_root={root}",
                   "--set", f"flatten_args.format={fmt}", "--set", f"parallel.workers={workers}"]  # fmt: skip
            res[f"flatten {fmt} {workers}w"] = timed(cmd)
    res["naive pandas csv"] = timed([PY, __file__, "--naive", str(root), str(root / "naive.csv")])
    res["bytes csv"] = ((root / "flat" / "pixels.csv").stat().st_size / 2**20, 0.0)
    res["bytes parquet"] = ((root / "flat" / "pixels.parquet").stat().st_size / 2**20, 0.0)
    shutil.rmtree(root)
    return res


def model_runs(work: Path, chips: int, train_pixels: int) -> dict[str, tuple[float, float]]:
    """(pixels/s of fit, pixels/s of predict) for forest and regression with default settings."""
    from core.bundle import BundleInfo, Normalization
    from core.raster import band_statistics, read_raster
    from core.settings import load_settings
    from ml.bundle import ClassicalPredictor
    from ml.features import FeatureSpec
    from ml.models import build_model
    from ml.train import sample_chips

    root = work / "models"
    make_chips(root, chips)
    settings = load_settings(REPO / "settings.json")
    frames = sorted((root / "train_frames").glob("*.tif"))
    pairs = [(f, root / "train_masks" / f.name) for f in frames]
    norm = Normalization.from_stats(band_statistics(frames), "percentile", 0)
    spec = FeatureSpec(8, settings.ml_args.indices, tuple(settings.ml_args.texture_windows))
    started = time.perf_counter()
    sample = sample_chips(pairs, norm, spec, train_pixels, 0)
    sample_s = time.perf_counter() - started
    stack = np.stack([read_raster(f)[0] for f in frames])
    res: dict[str, tuple[float, float]] = {"sampling": (sample.labels.size / sample_s, spec.count)}
    for kind in ("forest", "regression"):
        model = build_model(kind, settings.ml_args)
        started = time.perf_counter()
        model.fit(sample.features, sample.labels)
        fit_s = time.perf_counter() - started
        info = BundleInfo(kind=kind, bands=8, dtype="uint16", normalization=norm, threshold=0.5,
                          features=spec.to_dict())  # fmt: skip
        predictor = ClassicalPredictor(info, model)
        started = time.perf_counter()
        predictor.predict(stack)
        predict_s = time.perf_counter() - started
        res[kind] = (sample.labels.size / fit_s, stack[:, 0].size / predict_s)
    shutil.rmtree(root)
    return res


def main() -> int:
    if sys.argv[1:2] == ["--naive"]:
        naive(Path(sys.argv[2]), Path(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chips", type=int, default=16, help="chips of the 1x run (4x runs 4 times as many)")
    parser.add_argument("--train-pixels", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_ml_", dir=args.workdir))
    try:
        one = flatten_runs(work, args.chips)
        four = flatten_runs(work, 4 * args.chips)
        models = model_runs(work, args.chips, args.train_pixels)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    values = one["values"][0]
    print(f"\n== flatten, long layout: {args.chips} chips of {CHIP}x{CHIP}x8 uint16 ({values / 1e6:.1f} M values)"
          f" and 4x that")  # fmt: skip
    print(f"{'method':<22}{'s 1x':>8}{'Mvalues/s':>11}{'peak MB 1x':>12}{'s 4x':>8}{'peak MB 4x':>12}{'RSS 4x/1x':>11}")
    for key in one:
        if key.startswith("bytes") or key == "values":
            continue
        (s1, m1), (s4, m4) = one[key], four[key]
        print(f"{key:<22}{s1:>8.2f}{values / s1 / 1e6:>11.2f}{m1:>12.0f}{s4:>8.2f}{m4:>12.0f}{m4 / m1:>11.2f}")
    naive_s = one["naive pandas csv"][0]
    for key in ("flatten csv 1w", "flatten csv 2w", "flatten parquet 1w", "flatten parquet 2w"):
        print(f"{key} vs naive pandas csv: {naive_s / one[key][0]:.2f}x faster (1x); "
              f"{four['naive pandas csv'][0] / four[key][0]:.2f}x (4x)")  # fmt: skip
    print(f"file size 1x: csv {one['bytes csv'][0]:.0f} MB, parquet {one['bytes parquet'][0]:.1f} MB")
    print(f"\n== models (default settings; {int(models['sampling'][1])} features; fit on {args.train_pixels} pixels,"
          f" predict {args.chips} whole chips)")  # fmt: skip
    print(f"sampling + features for training: {models['sampling'][0]:,.0f} pixels/s")
    for kind in ("forest", "regression"):
        fit, pred = models[kind]
        print(f"{kind:<11} train {fit:>10,.0f} pixels/s   predict {pred:>10,.0f} pixels/s")
    print(json.dumps({"flatten_1x": one, "flatten_4x": four, "models": models}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
