"""Benchmark the tile stages on 1 and 2 local workers and on a 2-worker Dask cluster.

    python bench/bench_parallel.py [--tiles 2] [--tile-size 1024] [--workers 1 2] [--dask-workers 2]

Writes the sample scene (``--tiles`` x ``--tiles`` tiles of ``--tile-size`` px, 8 bands
uint16) and a U-Net bundle with the default model settings (random weights: prediction
costs the same), then runs chip (raw tiles, 256 px chips), mask and predict (the raw tiles,
512 px windows) as users run them, each script in its own process, with:

- ``parallel.workers=1``: inline; predict in one process;
- ``parallel.workers=2``: two spawned local worker processes (predict: one per raster);
  ``--workers 1 2 4`` adds more;
- ``parallel.scheduler=tcp://127.0.0.1:PORT``: a ``distributed.LocalCluster`` of two worker
  processes (``--dask-workers``), one thread each, started before the clock (its start-up is
  printed apart).
  predict runs twice there: cold (workers import TensorFlow and load the bundle) and warm
  (a long-lived cluster keeps both).

Prints wall times, ratios to one worker, throughput scaling (speed-up / workers) and checks
that every output is byte-identical across the runs. Then the cost the backend adds per
task: N no-op tasks through ``core.parallel.map_tasks`` inline, on the local pool and on the
cluster, and the time to connect to the scheduler.
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

import numpy as np

from core.parallel import connect_scheduler, map_tasks
from core.raster import band_statistics
from core.settings import ParallelArgs, load_settings
from sample.scene import generate_scene, write_scene

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
STAGES = ("chip", "mask", "predict")


def make_bundle(folder: Path, tiles: list[Path]) -> Path:
    """A U-Net bundle of the default model settings, random weights, normalization from the tiles."""
    import keras

    from core.bundle import BundleInfo, Normalization
    from unet import bundle as unet_bundle
    from unet.model import build_model, pad_multiple

    settings = load_settings()
    keras.utils.set_random_seed(0)
    model = build_model(8, settings.model_args, settings.output_args)
    norm = Normalization.from_stats(band_statistics(tiles), "percentile", 0)
    info = BundleInfo(kind="unet", bands=8, dtype="uint16", normalization=norm, threshold=0.5,
                      pad_multiple=pad_multiple(settings.model_args))  # fmt: skip
    from rasterio import open as rio_open

    with rio_open(tiles[0]) as src:
        prob = unet_bundle.UNetPredictor(model, info).predict(src.read(window=((0, 512), (0, 512)))[None])[0]
    info.threshold = float(np.quantile(prob, 0.9))  # a tenth of the pixels are "roof": never blank
    return unet_bundle.save(folder, model, info)


def run_stage(stage: str, root: Path, backend: str, bundle: Path, out: Path) -> float:
    cmd = [PY, str(REPO / stage / f"{stage}.py"), "--quiet", "--set", f"data_root={root}", "--set", backend,
           "--set", "chip_args.source=raw", "--overwrite"]  # fmt: skip
    if stage == "predict":
        cmd += ["--bundle", str(bundle), "--input", str(root / "raw"), "--set", f"predict_args.output={out}",
                "--set", "experiment=bench"]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - started


def outputs(root: Path, out: Path) -> dict[str, bytes]:
    """Every chip, mask, predicted mask and probability, and chips.csv, by relative path."""
    data = [*sorted((root / "chips").glob("*.tif")), *sorted((root / "masks").glob("*.tif")), root / "chips.csv"]
    predictions = out / "bench" / "unet"
    return {
        **{p.relative_to(root).as_posix(): p.read_bytes() for p in data},
        **{p.relative_to(predictions).as_posix(): p.read_bytes() for p in sorted(predictions.glob("*/*.tif"))},
    }


def noop_overhead(n: int, address: str) -> dict[str, float]:
    """Seconds per task of ``n`` no-op tasks, and seconds per connection to the scheduler."""
    res = {}
    for name, backend in (("inline", ParallelArgs(workers=1)), ("local pool x2", ParallelArgs(workers=2)),
                          ("dask x2", ParallelArgs(scheduler=address))):  # fmt: skip
        map_tasks(abs, range(4), backend)  # warm: imports, first connection
        started = time.perf_counter()
        assert map_tasks(abs, [-i for i in range(n)], backend) == list(range(n))
        res[name] = (time.perf_counter() - started) / n
        started = time.perf_counter()
        map_tasks(abs, [-1], backend)  # one item never starts the local pool: inline
        res[name + " (1 task)"] = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(5):
        connect_scheduler(address).close()
    res["connect"] = (time.perf_counter() - started) / 5
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiles", type=int, default=2, help="grid side of the sample scene")
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="local worker counts; the first is the base"
    )
    parser.add_argument("--dask-workers", type=int, default=2, help="worker processes of the LocalCluster")
    parser.add_argument("--noops", type=int, default=500, help="no-op tasks for the per-task overhead")
    args = parser.parse_args()

    from distributed import LocalCluster

    work = Path(tempfile.mkdtemp(prefix="bench_parallel_"))
    try:
        scene = generate_scene(seed=0, tiles=args.tiles, tile_size=args.tile_size)
        base = work / "scene"
        write_scene(scene, base / "raw", base / "labels", work / "quicklook.png")
        bundle = make_bundle(work / "bundle", sorted((base / "raw").glob("*.tif")))

        started = time.perf_counter()
        cluster = LocalCluster(n_workers=args.dask_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None)  # fmt: skip
        cluster_start = time.perf_counter() - started
        dask = f"dask {args.dask_workers} workers"
        try:
            configs = {f"{n} worker{'s' if n > 1 else ''}": f"parallel.workers={n}" for n in args.workers}
            configs[dask] = f"parallel.scheduler={cluster.scheduler_address}"
            times: dict[str, dict[str, float]] = {}
            files: dict[str, dict[str, bytes]] = {}
            for name, backend in configs.items():
                root, out = work / name.replace(" ", "_"), work / ("pred_" + name.replace(" ", "_"))
                shutil.copytree(base, root)
                times[name] = {s: run_stage(s, root, backend, bundle, out) for s in STAGES}
                if name.startswith("dask"):
                    times[name]["predict warm"] = run_stage("predict", root, backend, bundle, out)
                files[name] = outputs(root, out)
            overhead = noop_overhead(args.noops, cluster.scheduler_address)
        finally:
            cluster.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    names = list(configs)
    base, counts = names[0], {**dict(zip(names, args.workers, strict=False)), dask: args.dask_workers}
    n_chips = sum(k.startswith("chips/") for k in files[base])
    side = args.tiles * args.tile_size
    print(f"\n== {side} x {side} x 8 uint16 scene in {args.tiles**2} tiles: {n_chips} chips of 256 px, "
          f"predict over {args.tiles**2} tiles; {os.cpu_count()} cores; LocalCluster start {cluster_start:.1f} s")  # fmt: skip
    print(f"{'stage':<14}" + "".join(f"{n:>16}" for n in names))
    for stage in (*STAGES, "predict warm"):
        cells = [f"{times[n][stage]:>15.2f}s" if stage in times[n] else f"{'':>16}" for n in names]
        print(f"{stage:<14}" + "".join(cells))
    total = {n: sum(times[n][s] for s in STAGES) for n in names}
    print(f"{'total':<14}" + "".join(f"{total[n]:>15.2f}s" for n in names))
    print(f"\nratios to {base} (wall time; < 1 is faster), speed-up and efficiency (speed-up per worker added):")

    def line(stage: str, name: str, t: float, one: float) -> None:
        k = counts[name] / counts[base]
        print(
            f"  {stage:<13} {name:<16} ratio {t / one:5.2f}   speed-up {one / t:4.2f}x   efficiency {one / t / k:4.0%}"
        )

    for stage in (*STAGES, "total"):
        one = total[base] if stage == "total" else times[base][stage]
        for n in names[1:]:
            line(stage, n, total[n] if stage == "total" else times[n][stage], one)
    line("predict warm", dask, times[dask]["predict warm"], times[base]["predict"])
    same = all(files[n] == files[base] for n in names)
    print(f"\noutputs byte-identical across the {len(names)} runs ({len(files[base])} files): {same}")

    print(f"\nper-task cost of the backend ({args.noops} no-op tasks through map_tasks):")
    for name in ("inline", "local pool x2", "dask x2"):
        print(f"  {name:<14} {overhead[name] * 1e3:8.3f} ms/task")
    print(
        f"  local pool: {(overhead['local pool x2'] - overhead['inline']) * 1e3:.3f} ms/task over inline, "
        "mostly spawning the processes, once per call"
    )
    print(f"  dask: {(overhead['dask x2'] - overhead['inline']) * 1e3:.3f} ms/task over inline; a 1-task call "
          f"{overhead['dask x2 (1 task)'] * 1e3:.0f} ms, of which connecting to the scheduler "
          f"{overhead['connect'] * 1e3:.0f} ms (once per map_tasks call)")  # fmt: skip
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
