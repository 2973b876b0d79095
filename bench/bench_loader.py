"""Benchmark the U-Net's training loader (no model): images/s of ChipSequence batches.

    python bench/bench_loader.py [--chips 32] [--side 650] [--bands 8] [--repeats 2]

On SpaceNet-sized chips (650 x 650 x 8 uint16, ZSTD, with 3-band masks) and the original
settings' augmentation (flips, quarter turns, shear_range 0.2, zoom_range 0.2), batch 8:

1. one worker, shear and zoom as before (``scipy.ndimage.affine_transform`` once per band)
   vs one worker with today's ``unet.datagen.warp`` (one ``cv2.warpAffine`` for all bands);
   target: >= 3x;
2. today's loader with 2 workers vs 1 worker (threads, as ``PyDataset`` runs them);
   target: >= 1.7x on a 2-core machine;
3. that the batches are byte-identical for 1 and 2 workers.

Every configuration reads the whole epoch, repeated; the best repeat counts.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from affine import Affine
from scipy import ndimage

from core.bundle import Normalization
from core.raster import band_statistics, write_raster
from core.settings import LoadDatasetArgs
from unet import datagen
from unet.datagen import ChipSequence

BEFORE_PER_BAND = 7.2  # images/s the issue measured before, one thread, shear and zoom on


def scipy_warp(a: np.ndarray, shear: float, zoom: float, order: int) -> np.ndarray:
    """The loader's shear and zoom before: one scipy.ndimage.affine_transform per band."""
    matrix = np.array([[1 / zoom, math.tan(shear) / zoom], [0.0, 1 / zoom]])
    centre = (np.array(a.shape[:2]) - 1) / 2
    offset = centre - matrix @ centre
    bands = [
        ndimage.affine_transform(a[..., b], matrix, offset, order=order, mode="reflect") for b in range(a.shape[-1])
    ]
    return np.stack(bands, axis=-1)


def make_chips(folder: Path, n: int, side: int, bands: int) -> tuple[list[Path], list[Path]]:
    """``n`` uint16 ZSTD chips of smooth noise and 3-band 0/255 masks (footprint, boundary, contact)."""
    rng = np.random.default_rng(0)
    frames, masks = [], []
    transform = Affine(0.3, 0, 500000, 0, -0.3, 3000000)
    for i in range(n):
        image = ndimage.gaussian_filter(rng.random((bands, side, side), dtype=np.float32), (0, 3, 3))
        image = (200 + 1600 * image).astype(np.uint16)
        roof = ndimage.gaussian_filter(rng.random((side, side), dtype=np.float32), 12) > 0.5
        edge = roof & ~ndimage.binary_erosion(roof, iterations=3)
        mask = np.stack([roof, edge, np.zeros_like(roof)]).astype(np.uint8) * 255
        frames.append(write_raster(folder / "frames" / f"chip_{i}.tif", image, crs="EPSG:32644", transform=transform))
        masks.append(
            write_raster(
                folder / "masks" / f"chip_{i}.tif",
                mask,
                crs="EPSG:32644",
                transform=transform,
                descriptions=("footprint", "boundary", "contact"),
            )
        )
    return frames, masks


def epoch_rate(seq: ChipSequence, workers: int, repeats: int) -> tuple[float, list[bytes]]:
    """Best images/s of reading one epoch with ``workers`` threads, and the epoch's batches as bytes."""
    best, batches = 0.0, []
    for _ in range(repeats):
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            out = list(pool.map(seq.__getitem__, range(len(seq))))
        elapsed = time.perf_counter() - started
        best = max(best, sum(len(x) for x, _ in out) / elapsed)
        batches = [x.tobytes() + y.tobytes() for x, y in out]
    return best, batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chips", type=int, default=32, help="chips in the epoch (default 32)")
    parser.add_argument("--side", type=int, default=650, help="chip side in pixels (default 650)")
    parser.add_argument("--bands", type=int, default=8, help="image bands (default 8)")
    parser.add_argument("--repeats", type=int, default=2, help="epochs read per configuration (default 2)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        frames, masks = make_chips(Path(tmp), args.chips, args.side, args.bands)
        norm = Normalization.from_stats(band_statistics(frames), "percentile", 0)
        load = LoadDatasetArgs(batch_size=8, seed=0, shear_range=0.2, zoom_range=0.2, workers=1)

        def sequence() -> ChipSequence:
            return ChipSequence(frames, masks, norm, load, 16, augment_data=True)

        today = datagen.warp
        datagen.warp = scipy_warp
        try:
            before, _ = epoch_rate(sequence(), 1, args.repeats)
        finally:
            datagen.warp = today
        one, batches_one = epoch_rate(sequence(), 1, args.repeats)
        two, batches_two = epoch_rate(sequence(), 2, args.repeats)

    print(f"loader on {args.chips} chips of {args.side}x{args.side}x{args.bands} uint16, batch 8, flips, turns,")
    print(f"shear 0.2 and zoom 0.2, {os.cpu_count()} cores; best of {args.repeats} epochs")
    print(f"{'configuration':44s} {'images/s':>9s}")
    print(f"{'before: scipy affine per band, 1 worker':44s} {before:9.1f}")
    print(f"{'today: one cv2.warpAffine, 1 worker':44s} {one:9.1f}")
    print(f"{'today: one cv2.warpAffine, 2 workers':44s} {two:9.1f}")
    print(f"1 worker, today / before: {one / before:.2f}x (target >= 3x; the issue measured {BEFORE_PER_BAND} images/s "
          f"before: {one / BEFORE_PER_BAND:.2f}x that)")  # fmt: skip
    print(f"2 workers / 1 worker: {two / one:.2f}x (target >= 1.7x)")
    same = batches_one == batches_two
    print(f"batches of 1 and 2 workers identical: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
