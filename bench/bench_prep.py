"""Benchmark mosaic, chip and mask against GDAL's command-line tools, side by side.

    python bench/bench_prep.py [--sizes 4096 8192] [--polygons 20000] [--workdir DIR]

Builds a scene of 2048 x 2048 tiles (8 bands, uint16, from the sample generator, each tile
flipped or rotated differently) and polygons spread over it, then times, each as its own
process with wall time and peak resident memory from /usr/bin/time:

- mosaic: ``mosaic/mosaic.py`` vs ``gdalbuildvrt`` + ``gdal_translate`` (same compression)
- chip:   ``chip/chip.py`` (default ZSTD) vs ``gdal_retile.py`` with DEFLATE, and vs our
          own chips written uncompressed
- mask:   ``mask/mask.py`` vs one ``gdal_rasterize`` per chip

First it writes 64 chips with each compression, the measurement behind the default (ZSTD
level 1 with horizontal differencing).

Needs Debian's gdal-bin and python3-gdal (apt-get install gdal-bin python3-gdal). Peak
memory is that of the largest single process (chip and mask run two worker processes by
default; each is reported on its own).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from affine import Affine

from core.raster import create_raster, gtiff_profile, write_raster
from sample.scene import generate_scene

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TILE = 2048
CHIP = 256


def timed(cmd: list[str], **kwargs) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS in MB) measured by /usr/bin/time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        started = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", out.name, *cmd], check=True, **kwargs)
        wall = time.perf_counter() - started
        rss_kb = float(out.read().strip().splitlines()[-1])
    return wall, rss_kb / 1024


def timed_loop(cmds: list[list[str]]) -> tuple[float, float]:
    """Run commands one after another; total wall seconds and the largest peak RSS."""
    started = time.perf_counter()
    peak = 0.0
    for cmd in cmds:
        peak = max(peak, timed(cmd, stdout=subprocess.DEVNULL)[1])
    return time.perf_counter() - started, peak


def folder_bytes(folder: Path, pattern: str = "*.tif") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def make_scene(root: Path, side: int, n_polygons: int, base: np.ndarray) -> tuple[Path, Path]:
    """Write side/TILE x side/TILE tiles and a GeoPackage of polygons; return their folders."""
    raw, labels = root / "raw", root / "labels"
    raw.mkdir(parents=True)
    labels.mkdir(parents=True)
    n = side // TILE
    x0, y0 = 500000.0, 2960000.0
    for r in range(n):
        for c in range(n):
            k = r * n + c
            tile = np.rot90(base, k % 4, axes=(1, 2))
            tile = tile[:, ::-1] if (k // 4) % 2 else tile
            write_raster(
                raw / f"tile_{r}_{c}.tif",
                np.ascontiguousarray(tile),
                crs="EPSG:32644",
                transform=Affine(0.5, 0, x0 + c * TILE * 0.5, 0, -0.5, y0 - r * TILE * 0.5),
                nodata=0,
            )
    rng = np.random.default_rng(0)
    extent = side * 0.5
    cx = x0 + rng.uniform(0, extent, n_polygons)
    cy = y0 - rng.uniform(0, extent, n_polygons)
    w = rng.uniform(4, 20, n_polygons)
    h = rng.uniform(4, 20, n_polygons)
    boxes = shapely.box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    gdf = gpd.GeoDataFrame({"roof_type": ["metal"] * n_polygons}, geometry=boxes, crs="EPSG:32644")
    gdf.to_file(labels / "roofs.gpkg", engine="pyogrio")
    # The peer reads a shapefile: Debian's GDAL 3.6 warns on every open of a GeoPackage 1.4.
    (root / "peer_labels").mkdir()
    gdf.to_file(root / "peer_labels" / "roofs.shp", engine="pyogrio")
    return raw, labels


def run_size(work: Path, side: int, n_polygons: int, base: np.ndarray) -> dict[str, tuple[float, float]]:
    root = work / f"s{side}"
    raw, _labels = make_scene(root, side, n_polygons, base)
    s = ["--quiet", "--set", f"data_root={root}"]
    res: dict[str, tuple[float, float]] = {}

    res["mosaic ours"] = timed([PY, str(REPO / "mosaic/mosaic.py"), *s])
    peer = root / "peer"
    peer.mkdir()
    vrt_wall, vrt_rss = timed(["gdalbuildvrt", "-q", str(peer / "m.vrt"), *map(str, sorted(raw.glob("*.tif")))])
    tr_wall, tr_rss = timed(
        [
            "gdal_translate",
            "-q",
            "-co",
            "TILED=YES",
            "-co",
            "BLOCKXSIZE=256",
            "-co",
            "BLOCKYSIZE=256",
            "-co",
            "COMPRESS=ZSTD",
            "-co",
            "ZSTD_LEVEL=1",
            "-co",
            "PREDICTOR=2",
            "-co",
            "BIGTIFF=IF_SAFER",
            str(peer / "m.vrt"),
            str(peer / "m.tif"),
        ]
    )
    res["mosaic gdal"] = (vrt_wall + tr_wall, max(vrt_rss, tr_rss))

    mosaic = root / "mosaic" / "mosaic.tif"
    res["chip ours"] = timed([PY, str(REPO / "chip/chip.py"), *s])
    res["chip bytes ours"] = (folder_bytes(root / "chips") / 2**20, 0.0)
    plain = work / f"plain{side}"
    res["chip ours none"] = timed(
        [
            PY,
            str(REPO / "chip/chip.py"),
            "--quiet",
            "--set",
            f"data_root={plain}",
            "--input",
            str(mosaic),
            "--set",
            "chip_args.compression=none",
        ]
    )
    retile = root / "retile"
    retile.mkdir()
    res["chip gdal_retile"] = timed(
        [
            "gdal_retile.py",
            "-q",
            "-ps",
            str(CHIP),
            str(CHIP),
            "-co",
            "COMPRESS=DEFLATE",
            "-targetDir",
            str(retile),
            str(mosaic),
        ]
    )
    res["chip bytes retile"] = (folder_bytes(retile) / 2**20, 0.0)

    res["mask ours"] = timed([PY, str(REPO / "mask/mask.py"), *s])
    index = pd.read_csv(root / "chips.csv")
    peer_masks = root / "peer_masks"
    peer_masks.mkdir()
    cmds = [
        [
            "gdal_rasterize",
            "-q",
            "-burn",
            "255",
            "-ot",
            "Byte",
            "-init",
            "0",
            "-te",
            str(r.left),
            str(r.bottom),
            str(r.right),
            str(r.top),
            "-ts",
            str(CHIP),
            str(CHIP),
            "-co",
            "COMPRESS=ZSTD",
            "-co",
            "TILED=YES",
            str(root / "peer_labels" / "roofs.shp"),
            str(peer_masks / r.file),
        ]
        for r in index.itertuples()
    ]
    res["mask gdal_rasterize loop"] = timed_loop(cmds)
    res["chips"] = (float(len(index)), 0.0)
    shutil.rmtree(root)
    shutil.rmtree(plain, ignore_errors=True)
    return res


def compression_choice(base: np.ndarray, work: Path, n: int = 64, repeats: int = 3) -> None:
    """Time writing n 256 x 256 chips of the scene with each compression (best of ``repeats``); print ms and kB."""
    chips = [np.ascontiguousarray(base[:, r : r + CHIP, c : c + CHIP]) for r in range(0, 8 * CHIP, CHIP)
             for c in range(0, 8 * CHIP, CHIP)][:n]  # fmt: skip
    folder = work / "compression"
    print(
        f"\n== default compression: {len(chips)} chips of {CHIP} x {CHIP} x {base.shape[0]} {base.dtype} written once each"
    )
    print(f"{'compression':<22}{'ms/chip':>8}{'kB/chip':>9}")
    options = [
        ("zstd level 1 + diff", {"compression": "zstd"}),
        ("zstd level 1, no diff", {"compression": "zstd", "predictor": 1}),
        ("deflate + diff", {"compression": "deflate"}),
        ("deflate, no diff", {"compression": "deflate", "predictor": 1}),
        ("lzw + diff", {"compression": "lzw"}),
        ("none", {"compression": "none"}),
    ]
    for name, opts in options:
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for i, chip in enumerate(chips):
                profile = gtiff_profile(
                    width=CHIP, height=CHIP, count=chip.shape[0], dtype=chip.dtype, crs="EPSG:32644",
                    transform=Affine(0.5, 0, 500000, 0, -0.5, 2960000), compression=opts["compression"],
                )  # fmt: skip
                if "predictor" in opts:
                    profile["predictor"] = opts["predictor"]
                with create_raster(folder / f"{i}.tif", profile) as dst:
                    dst.write(chip)
            best = min(best, time.perf_counter() - started)
        size = folder_bytes(folder) / len(chips)
        print(f"{name:<22}{1000 * best / len(chips):>8.2f}{size / 1000:>9.1f}")
    shutil.rmtree(folder)


def report(side: int, res: dict[str, tuple[float, float]]) -> None:
    def ratio(a: str, b: str) -> float:
        return res[a][0] / res[b][0]

    print(
        f"\n== {side} x {side} x 8 uint16 mosaic ({side * side * 16 / 2**30:.2f} GiB raw), {int(res['chips'][0])} chips"
    )
    print(f"{'step':<26}{'wall s':>8}{'peak MB':>9}")
    for key, (wall, rss) in res.items():
        if "bytes" in key or key == "chips":
            continue
        print(f"{key:<26}{wall:>8.2f}{rss:>9.0f}")
    print(f"mosaic ours / gdalbuildvrt+gdal_translate  = {ratio('mosaic ours', 'mosaic gdal'):.2f}  (target <= 0.8)")
    print(f"chip ours / gdal_retile.py DEFLATE         = {ratio('chip ours', 'chip gdal_retile'):.2f}  (target <= 0.5)")
    print(f"chip ours / ours uncompressed              = {ratio('chip ours', 'chip ours none'):.2f}  (target <= 1.5)")
    print(
        f"chip bytes ours / retile                   = {res['chip bytes ours'][0] / res['chip bytes retile'][0]:.2f}"
        f"  ({res['chip bytes ours'][0]:.0f} MB vs {res['chip bytes retile'][0]:.0f} MB; target <= 1)"
    )
    print(
        f"mask ours / gdal_rasterize loop            = {ratio('mask ours', 'mask gdal_rasterize loop'):.3f} (target <= 0.1)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192], help="mosaic sides, multiples of 2048")
    parser.add_argument("--polygons", type=int, default=20000)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    missing = [t for t in ("gdalbuildvrt", "gdal_translate", "gdal_retile.py", "gdal_rasterize") if not shutil.which(t)]
    if missing:
        print(f"bench_prep: {', '.join(missing)} not found: apt-get install gdal-bin python3-gdal", file=sys.stderr)
        return 1
    base = generate_scene(seed=0, tiles=2, tile_size=TILE // 2).image
    work = Path(tempfile.mkdtemp(prefix="bench_prep_", dir=args.workdir))
    try:
        compression_choice(base, work)
        for side in args.sizes:
            report(side, run_size(work, side, args.polygons, base))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
