"""Benchmark the U-Net on a GPU: loader, training and prediction, with the GPU watched.

    python bench/bench_gpu.py [--chips 64] [--steps 20] [--side 650] [--raster 10000] [--cpu-smoke]

Needs a GPU that TensorFlow sees (requirements.txt installs tensorflow-cpu; a GPU machine needs
TensorFlow's GPU build of the same version); without one it says so in one line and exits 0.
On synthetic 650 x 650 x 8 uint16 chips (ZSTD, with footprint/boundary/contact masks) written
as GeoTIFFs, so that the real loader reads them, with the GPU defaults (mixed precision, XLA,
batch sizes left null: chosen from GPU memory by unet/device.py), it measures:

1. loader images/s: the training ChipSequence alone (augmentation on, its worker threads), no model;
2. training images/s of the demo U-Net (settings.json: filters 16, upconv_filters 24) and of the
   full-width seed network (the original settings: filters 64, upconv_filters 96, batch-norm
   momentum 0.01), through train's own configuration, loss and metrics; the second of two
   epochs is timed (the first traces and compiles);
3. prediction Mpixel/s with the demo network's bundle: the model alone on windows already read
   (bare), and predict.py's predict_all end to end on a 10000 x 10000 x 8 raster (read,
   normalize, predict, blend, write the mask, polygons; no probabilities, no watershed);

each with the GPU's utilisation (nvidia-smi sampled every 0.2 s: mean and max over the timed
part) and peak memory (tf.config.experimental.get_memory_info), the latter next to what the
batch rule expected (unet/device.py), to check the rule there.

``--cpu-smoke`` runs a tiny version on the CPU (256 x 256 chips, 2 steps, a 1024 x 1024
raster) to check the script on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from affine import Affine
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.raster import create_raster, gtiff_profile, write_raster
from core.settings import PredictArgs, Settings, load_settings

CRS = "EPSG:32644"
TRANSFORM = Affine(0.3, 0, 500000, 0, -0.3, 3000000)
GIB = 2**30

#: The two networks: the demo's (settings.json) and the original pipeline's full-width one.
NETWORKS = {
    "demo (filters 16)": [],
    "seed (filters 64)": ["model_args.filters=64", "model_args.upconv_filters=96", "model_args.bachnorm_momentum=0.01"],
    # Random weights: the speed and memory are the same as pretrained ones', and nothing is downloaded.
    "mobilenetv2 encoder": ["model_args.architecture=mobilenetv2"],
}


def synthetic(rng: np.random.Generator, side: int, bands: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth uint16 noise with bright blobs as roofs, and the 3-band 0/255 mask (footprint, boundary, contact)."""
    image = ndimage.gaussian_filter(rng.random((bands, side, side), dtype=np.float32), (0, 3, 3))
    roof = ndimage.gaussian_filter(rng.random((side, side), dtype=np.float32), 12) > 0.52
    image = (200 + 1600 * image + 900 * roof).astype(np.uint16)
    edge = roof & ~ndimage.binary_erosion(roof, iterations=3)
    return image, np.stack([roof, edge, np.zeros_like(roof)]).astype(np.uint8) * 255


def make_chips(folder: Path, n: int, side: int, bands: int) -> tuple[list[Path], list[Path]]:
    """``n`` chips and masks as the split stage leaves them (ZSTD GeoTIFFs, masks with named bands)."""
    rng = np.random.default_rng(0)
    frames, masks = [], []
    for i in range(n):
        image, mask = synthetic(rng, side, bands)
        frames.append(write_raster(folder / "frames" / f"chip_{i}.tif", image, crs=CRS, transform=TRANSFORM))
        masks.append(
            write_raster(folder / "masks" / f"chip_{i}.tif", mask, crs=CRS, transform=TRANSFORM,
                         descriptions=("footprint", "boundary", "contact"))
        )  # fmt: skip
    return frames, masks


def make_raster(path: Path, side: int, bands: int, block: int = 2000) -> Path:
    """A side x side raster of one synthetic block repeated, written block by block."""
    image, _ = synthetic(np.random.default_rng(1), min(block, side), bands)
    profile = gtiff_profile(width=side, height=side, count=bands, dtype="uint16", crs=CRS, transform=TRANSFORM,
                            threads=True)  # fmt: skip
    with create_raster(path, profile) as dst:
        for r in range(0, side, block):
            for c in range(0, side, block):
                h, w = min(block, side - r), min(block, side - c)
                dst.write(image[:, :h, :w], window=((r, r + h), (c, c + w)))
    return path


class GpuWatch:
    """nvidia-smi's utilisation of GPU 0, sampled every 0.2 s in a thread while the ``with`` block runs."""

    def __init__(self) -> None:
        self.samples: list[int] = []

    def __enter__(self) -> GpuWatch:
        self.samples = []
        self._proc = None
        if shutil.which("nvidia-smi"):
            query = ["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"]
            cmd = ["nvidia-smi", "-i", "0", *query]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._thread.join(timeout=2)

    def summary(self) -> str:
        if not self.samples:
            return "n/a"
        return f"{np.mean(self.samples):3.0f}% / {max(self.samples):3d}%"


def reset_peak() -> None:
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        tf.config.experimental.reset_memory_stats("GPU:0")


def peak_gib() -> str:
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return "n/a"
    return f"{tf.config.experimental.get_memory_info('GPU:0')['peak'] / GIB:.2f}"


@dataclass
class Trained:
    """One network's training figures, and what predicting with it needs."""

    model: Any
    norm: Any
    multiple: int
    batch: int
    rate: float  # images/s of the timed epoch
    rule_gib: float  # the batch's memory by unet/device.py's rule
    mixed: bool
    jit: bool
    util: str = "n/a"
    peak: str = "n/a"


def train_rate(settings: Settings, frames: list[Path], masks: list[Path], steps: int) -> Trained:
    """Train ``settings``' network as train does (its configuration, batch rule, loss and metrics) for
    two epochs of ``steps`` batches, the second timed and watched."""
    import keras

    from core.bundle import Normalization
    from core.raster import band_statistics
    from unet.datagen import ChipSequence
    from unet.device import chip_bytes, padded
    from unet.losses import TargetLoss
    from unet.metrics import training_metrics
    from unet.model import build_model, pad_multiple
    from unet.train import configure_tensorflow, training_batch

    jit, mixed = configure_tensorflow(settings)
    targets = ("footprint", "boundary", "contact")
    norm = Normalization.from_stats(band_statistics(frames[:8]), "percentile", None)
    multiple = pad_multiple(settings.model_args)
    batch = training_batch(settings, frames[0], multiple, mixed)
    data_args = settings.load_dataset_args.model_copy(update={"batch_size": batch})
    seq = ChipSequence(frames, masks, norm, data_args, multiple, augment_data=True, steps=steps)
    model = build_model(settings.load_dataset_args.channels, settings.model_args, settings.output_args, len(targets))
    weights = [getattr(settings.training_args.target_weights, t) for t in targets]
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=TargetLoss("bce_dice", weights),
                  metrics=training_metrics(), jit_compile=jit)  # fmt: skip
    times: list[float] = []
    watch = GpuWatch()

    class Timed(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            if epoch == 1:
                watch.__enter__()
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            times.append(time.perf_counter() - self.started)
            if epoch == 1:
                watch.__exit__()

    reset_peak()
    model.fit(seq, epochs=2, verbose=0, callbacks=[Timed()])
    rows, cols = (padded(n, multiple) for n in read_window(frames[0]).shape[1:])
    m = settings.model_args
    rule = batch * chip_bytes(rows * cols, m.filters, architecture=m.architecture, mixed=mixed) / GIB
    rate = steps * seq.batch_size / times[1]
    return Trained(model, norm, multiple, batch, rate, rule, mixed, jit, watch.summary(), peak_gib())


def loader_rate(settings: Settings, frames: list[Path], masks: list[Path], batch: int, steps: int) -> tuple[float, int]:
    """Images/s of the training loader alone: one epoch of batches read by its worker threads."""
    from core.bundle import Normalization
    from core.raster import band_statistics
    from unet.datagen import ChipSequence
    from unet.model import pad_multiple

    norm = Normalization.from_stats(band_statistics(frames[:8]), "percentile", None)
    data_args = settings.load_dataset_args.model_copy(update={"batch_size": batch})
    seq = ChipSequence(frames, masks, norm, data_args, pad_multiple(settings.model_args), augment_data=True,
                       steps=steps)  # fmt: skip
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=seq.workers) as pool:
        images = sum(len(x) for x, _ in pool.map(seq.__getitem__, range(len(seq))))
    return images / (time.perf_counter() - started), seq.workers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chips", type=int, default=64, help="chips written (default 64)")
    parser.add_argument("--steps", type=int, default=20, help="batches per timed epoch (default 20)")
    parser.add_argument("--side", type=int, default=650, help="chip side (default 650)")
    parser.add_argument("--raster", type=int, default=10000, help="side of the raster predicted (default 10000)")
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny run on the CPU, to check the script")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.chips, args.steps, args.side, args.raster = 8, 2, 256, 1024
    elif not shutil.which("nvidia-smi"):
        print("bench_gpu: no GPU on this machine (no nvidia-smi): nothing to measure; --cpu-smoke checks the script")
        return 0
    import unet  # noqa: F401  (imports TensorFlow with its start-up noise filtered)

    # isort: split
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and not args.cpu_smoke:
        print(f"bench_gpu: TensorFlow {tf.__version__} sees no GPU (tensorflow-cpu installed?): install TensorFlow's "
              "GPU build of the same version; --cpu-smoke checks the script")  # fmt: skip
        return 0
    if gpus:
        tf.config.experimental.set_memory_growth(gpus[0], True)  # peak memory: what was used, not reserved
    from core.bundle import BundleInfo, load_predictor
    from predict.predict import plan_windows, predict_all, with_batch
    from unet import bundle as unet_bundle
    from unet.model import float32_copy

    bands = 8
    smoke = ["load_dataset_args.batch_size=2"] if args.cpu_smoke else []  # a CPU step on 8 chips takes long
    base = [f"load_dataset_args.channels={bands}", f"model_args.input_shape=[{args.side},{args.side},{bands}]",
            "training_args.verbose=0", *smoke]  # fmt: skip
    device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else "CPU only"
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    try:
        started = time.perf_counter()
        frames, masks = make_chips(work, args.chips, args.side, bands)
        print(f"{device}; {args.chips} chips {args.side}x{args.side}x{bands} uint16 written in "
              f"{time.perf_counter() - started:.0f} s")  # fmt: skip

        results = {name: train_rate(load_settings(overrides=[*base, *more]), frames, masks, args.steps)
                   for name, more in NETWORKS.items()}  # fmt: skip
        demo_settings = load_settings(overrides=base)
        demo = results["demo (filters 16)"]
        loader, workers = loader_rate(demo_settings, frames, masks, demo.batch, args.steps)
        print(f"\n== training: mixed precision {'on' if demo.mixed else 'off'}, XLA {'on' if demo.jit else 'off'}, "
              f"the second of two epochs of {args.steps} batches timed")  # fmt: skip
        print(f"{'':22s} {'batch':>5s} {'images/s':>9s} {'GPU util mean/max':>18s} {'peak GiB':>9s} {'rule GiB':>9s}")
        for name, t in results.items():
            print(f"{name:22s} {t.batch:5d} {t.rate:9.1f} {t.util:>18s} {t.peak:>9s} {t.rule_gib:9.2f}")
        print(f"{f'loader, {workers} threads':22s} {demo.batch:5d} {loader:9.1f}   (no model)")

        info = BundleInfo(kind="unet", bands=bands, dtype="uint16", normalization=demo.norm, threshold=0.5,
                          pad_multiple=demo.multiple, targets=["footprint", "boundary", "contact"],
                          settings=demo_settings.model_dump(mode="json"))  # fmt: skip
        unet_bundle.save(work / "bundle", float32_copy(demo.model) if demo.mixed else demo.model, info)
        started = time.perf_counter()
        raster = make_raster(work / "big.tif", args.raster, bands)
        print(f"\n== prediction: demo network's bundle (float32), {args.raster}x{args.raster}x{bands} raster "
              f"written in {time.perf_counter() - started:.0f} s")  # fmt: skip
        pargs = PredictArgs(save_probabilities=False, instances=False, min_area=0.0)
        predictor = load_predictor(work / "bundle")
        batched = with_batch(pargs, predictor)
        rows, cols, wh, ww, _ = plan_windows(args.raster, args.raster, batched)
        window = read_window(raster, wh, ww)
        prepared = predictor.prepare(np.repeat(window[np.newaxis], batched.batch_size, axis=0))
        predictor.forward(prepared)  # trace once
        reset_peak()
        repeats = max(3, 2 * len(rows) * len(cols) // batched.batch_size)
        with GpuWatch() as watch:
            started = time.perf_counter()
            for _ in range(repeats):
                predictor.forward(prepared)
            bare = repeats * batched.batch_size * wh * ww / (time.perf_counter() - started)
        print(f"{'':22s} {'batch':>5s} {'Mpixel/s':>9s} {'GPU util mean/max':>18s} {'peak GiB':>9s}")
        print(f"{'model alone (bare)':22s} {batched.batch_size:5d} {bare / 1e6:9.1f} {watch.summary():>18s} "
              f"{peak_gib():>9s}")  # fmt: skip
        reset_peak()
        with GpuWatch() as watch:
            started = time.perf_counter()
            predict_all(work / "bundle", [raster], work / "pred", pargs, overwrite=True)
            e2e = args.raster**2 / (time.perf_counter() - started)
        print(f"{'predict.py end to end':22s} {batched.batch_size:5d} {e2e / 1e6:9.1f} {watch.summary():>18s} "
              f"{peak_gib():>9s}   ({len(rows) * len(cols)} windows of {wh}, overlap {pargs.overlap})")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def read_window(raster: Path, rows: int | None = None, cols: int | None = None) -> np.ndarray:
    """The raster's top-left ``rows`` x ``cols`` pixels (all of it by default), as predict reads a window."""
    from rasterio.windows import Window

    from core.raster import open_raster

    with open_raster(raster) as src:
        return src.read(window=Window(0, 0, cols or src.width, rows or src.height))


if __name__ == "__main__":
    sys.exit(main())
