"""Benchmark the U-Net's data path and prediction against bare Keras, side by side.

    python bench/bench_unet.py [--chips 48] [--predict-side 8192] [--big 10000] [--skip-big]

With the default model settings (settings.json) on 256 x 256 x 8 uint16 chips from the
sample scene:

1. training images/s: model.fit through the data generator (read, normalize, augment, pad)
   vs model.fit on the same chips preloaded as numpy arrays (target: overhead <= 15%);
   and with XLA (jit_compile=True) vs without, to pick the CPU default; interleaved
   repeats, best of each;
2. prediction pixels/s: predict.py end to end (read, normalize, predict, blend, write) on a
   8192 x 8192 raster (the sample scene repeated) vs bare model.predict on the same windows
   preloaded (target: overhead <= 25%), with a model trained a little so that its masks and
   polygons look like real ones;
3. peak memory of predict.py on a BIG x BIG x 8 raster (target <= 3 GB), in a subprocess
   measured by /usr/bin/time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from affine import Affine

from core.bundle import BundleInfo, Normalization, load_predictor
from core.raster import band_statistics, create_raster, gtiff_profile, read_raster, write_raster
from core.settings import CPU_PREDICT_BATCH, CPU_TRAIN_BATCH, load_settings
from predict.predict import plan_windows, predict_all
from sample.scene import generate_scene
from unet import bundle as unet_bundle
from unet.datagen import ChipSequence, read_targets
from unet.losses import TargetLoss
from unet.model import build_model, pad_multiple

REPO = Path(__file__).resolve().parent.parent


def fit_rate(model: keras.Model, data, n: int, epochs: int = 3, **kwargs) -> float:
    """Images per second of one model.fit call of ``epochs`` epochs; ``n`` images per epoch."""
    started = time.perf_counter()
    model.fit(data, epochs=epochs, verbose=0, **kwargs)
    return n * epochs / (time.perf_counter() - started)


def tiled_scene(image: np.ndarray, side: int) -> np.ndarray:
    """A side x side raster of the scene repeated, mirrored every other time (no seams)."""
    reps = -(-side // image.shape[1])
    rows = [np.concatenate([image if (i + j) % 2 == 0 else image[:, :, ::-1] for j in range(reps)], axis=2)
            for i in range(reps)]  # fmt: skip
    return np.ascontiguousarray(np.concatenate(rows, axis=1)[:, :side, :side])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chips", type=int, default=48)
    parser.add_argument("--big", type=int, default=10000)
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--predict-side", type=int, default=8192, help="side of the raster timed for throughput")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (best kept)")
    parser.add_argument("--train-epochs", type=int, default=15, help="epochs that train the model predict.py then uses")
    args = parser.parse_args()
    settings = load_settings()
    work = Path(tempfile.mkdtemp(prefix="bench_unet_"))
    try:
        scene = generate_scene(seed=1, tiles=2, tile_size=1024)
        truth = scene.roofs[scene.roofs.roof_type == "metal"]
        from rasterio.features import rasterize

        mask = rasterize(
            truth.geometry, out_shape=scene.image.shape[1:], transform=scene.transform, default_value=255, dtype="uint8"
        )
        frames, masks = [], []
        for i in range(args.chips):
            r, c = divmod(i, 8)
            sl = np.s_[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256]
            t = scene.transform * Affine.translation(c * 256, r * 256)
            frames.append(
                write_raster(
                    work / "f" / f"c{i}.tif", scene.image[(slice(None), *sl)], crs=scene.crs, transform=t, nodata=0
                )
            )
            masks.append(write_raster(work / "m" / f"c{i}.tif", mask[sl], crs=scene.crs, transform=t))
        norm = Normalization.from_stats(band_statistics(frames), "percentile", 0)
        m, o, data_args = settings.model_args, settings.output_args, settings.load_dataset_args
        multiple = pad_multiple(m)
        if data_args.batch_size is None:  # null: the CPU's batch, as training chooses it without a GPU
            data_args = data_args.model_copy(update={"batch_size": CPU_TRAIN_BATCH})
        bs = data_args.batch_size

        print(f"== training throughput, {args.chips} chips 256x256x8, batch {bs}, filters {m.filters}")
        seq = ChipSequence(frames, masks, norm, data_args, multiple, augment_data=True)
        x = np.stack([norm.apply(read_raster(f)[0]) for f in frames])
        y = np.stack([read_targets(p) for p in masks])  # footprint and the known channel, as the generator gives
        models = {}
        for source, jit in (("numpy", False), ("numpy", True), ("generator", False), ("generator", True)):
            keras.utils.set_random_seed(0)
            models[(source, jit)] = build_model(8, m, o)
            models[(source, jit)].compile(optimizer="adam", loss=TargetLoss("bce_dice", [1.0]), jit_compile=jit)

        def epoch(key: tuple[str, bool]) -> float:
            if key[0] == "numpy":
                return fit_rate(models[key], x, y=y, batch_size=bs, n=len(x))
            return fit_rate(models[key], seq, n=len(seq) * seq.batch_size)

        for key in models:  # warm-up: tracing and compilation
            epoch(key)
        # Interleaved repeats, best of each: the machine is shared and its speed drifts.
        rates = {key: 0.0 for key in models}
        for _ in range(args.repeats):
            for key in models:
                rates[key] = max(rates[key], epoch(key))
        model = models[("generator", False)]
        del models[("numpy", True)], models[("generator", True)]
        print(f"preloaded numpy, XLA off : {rates[('numpy', False)]:6.1f} images/s")
        print(
            f"preloaded numpy, XLA on  : {rates[('numpy', True)]:6.1f} images/s  "
            f"(XLA/no-XLA = {rates[('numpy', True)] / rates[('numpy', False)]:.2f})"
        )
        print(f"data generator, XLA off  : {rates[('generator', False)]:6.1f} images/s")
        print(
            f"data generator, XLA on   : {rates[('generator', True)]:6.1f} images/s  "
            f"(XLA/no-XLA = {rates[('generator', True)] / rates[('generator', False)]:.2f})"
        )
        overhead = rates[("numpy", False)] / rates[("generator", False)] - 1
        print(f"generator overhead       : {100 * overhead:5.1f}%  (target <= 15%)")

        # Predict with a network that has learnt something: an untrained one predicts speckle
        # whose hundreds of thousands of polygons would make the timing about polygonizing.
        model.fit(seq, epochs=args.train_epochs, verbose=0)

        side = args.predict_side
        print(f"\n== prediction throughput, {side}x{side}x8 raster")
        mosaic = work / "mosaic.tif"
        image = tiled_scene(scene.image, side)
        write_raster(mosaic, image, crs=scene.crs, transform=scene.transform, nodata=0)
        info = BundleInfo(
            kind="unet",
            bands=8,
            dtype="uint16",
            normalization=norm,
            threshold=0.5,
            pad_multiple=multiple,
            settings=settings.model_dump(mode="json"),
        )
        unet_bundle.save(work / "bundle", model, info)
        pargs = settings.predict_args.model_copy(
            update={
                "save_probabilities": True,
                "min_area": 0.0,
                "batch_size": settings.predict_args.batch_size or CPU_PREDICT_BATCH,
            }
        )
        # The bare baseline predicts the very windows predict.py plans (overlap included), preloaded.
        rows, cols, wh, ww, _ = plan_windows(side, side, pargs)
        tiles = np.stack([norm.apply(image[:, r : r + wh, c : c + ww]) for r in rows for c in cols])
        del image
        # No warm-up: predict.py's time includes its tracing, so the baseline's includes its own.
        started = time.perf_counter()
        model.predict(tiles, batch_size=pargs.batch_size, verbose=0)
        bare = side * side / (time.perf_counter() - started)
        del tiles
        started = time.perf_counter()
        load_predictor(work / "bundle")
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        results = predict_all(work / "bundle", [mosaic], work / "pred", pargs, overwrite=True)
        e2e = side * side / (time.perf_counter() - started)
        roof = sum(r.roof_pixels for r in results) / sum(r.valid_pixels for r in results)
        print(f"bare model.predict, the same {len(rows) * len(cols)} windows preloaded : {bare / 1e6:6.2f} Mpixel/s")
        print(
            f"predict.py end to end (window {pargs.window}, overlap {pargs.overlap}, probabilities and polygons "
            f"written, {roof:.1%} roof): {e2e / 1e6:6.2f} Mpixel/s, of which {load_s:.1f} s loading the bundle"
        )
        print(f"predict.py overhead: {100 * (bare / e2e - 1):5.1f}%  (target <= 25%)")

        if not args.skip_big:
            side = args.big
            print(f"\n== peak memory, predict.py on a {side}x{side}x8 uint16 raster")
            big = work / "big.tif"
            profile = gtiff_profile(
                width=side, height=side, count=8, dtype="uint16", crs=scene.crs, transform=scene.transform, nodata=0
            )
            with create_raster(big, profile) as dst:
                for r in range(0, side, 2048):
                    for c in range(0, side, 2048):
                        h, w = min(2048, side - r), min(2048, side - c)
                        dst.write(scene.image[:, :h, :w], window=((r, r + h), (c, c + w)))
            code = (
                "import sys; from pathlib import Path; from core.settings import PredictArgs; "
                "from predict.predict import plan_windows, predict_all; "
                f"predict_all(Path({str(work / 'bundle')!r}), [Path({str(big)!r})], Path({str(work / 'bigpred')!r}), "
                "PredictArgs(save_probabilities=True, min_area=0.0), overwrite=True)"
            )
            out = work / "time.txt"
            started = time.perf_counter()
            proc = subprocess.run(
                ["/usr/bin/time", "-f", "%M", "-o", str(out), sys.executable, "-c", code],
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            wall = time.perf_counter() - started
            rss = float(out.read_text().strip().splitlines()[-1]) / 1024
            print(
                f"wall {wall:.0f} s, {side * side / wall / 1e6:.2f} Mpixel/s, peak RSS {rss:.0f} MB (target <= 3072 MB)"
                + ("" if proc.returncode == 0 else f"  [exit {proc.returncode}: {proc.stderr.strip()[-200:]}]")
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
