"""Generate the built-in demo scene: 8-band imagery tiles, roof labels and a quicklook of a synthetic town.

The scene imitates WorldView-3 multispectral imagery near Gorakhpur (26.76 N, 83.37 E):
eight bands (coastal, blue, green, yellow, red, red-edge, NIR1, NIR2) of 11-bit values
stored as uint16, 0.5 m pixels in EPSG:32644, nodata 0, with a no-data corner in one tile
like the edge of a satellite strip. It shows fields, a pond, roads, trees with shadows and
buildings whose roofs are metal (the target: painted, galvanized or rusted, corrugated),
concrete or brick. Outputs, in the data tree: raw/tile_R_C.tif, labels/roofs.geojson
(EPSG:4326; every building, with id, roof_type, row: the row of touching roofs it belongs to,
0 for a detached one, and layout: row or detached) and quicklook.png. The same --seed
gives byte-identical files. The scene is built in memory (about 0.7 GB at the default size).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from core import cli  # first: it makes `import sample` find the package

if __name__ == "__main__":
    cli.unshadow_package(__file__)

from core.settings import Settings
from core.tree import DataTree, refuse_overwrite
from sample.scene import (
    BANDS,
    CRS_EPSG,
    LABELS_NAME,
    MIN_TILE_SIZE,
    ROOF_TYPES,
    generate_scene,
    tile_paths,
    write_scene,
)

log = logging.getLogger(__name__)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum`` (else a usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _body(args: argparse.Namespace, settings: Settings, tree: DataTree) -> None:
    tiles = tile_paths(tree.raw, args.tiles)
    old = sorted(tree.raw.glob("tile_*.tif")) if tree.raw.is_dir() else []
    refuse_overwrite(
        [*tiles, *(p for p in old if p not in tiles), tree.labels / LABELS_NAME, tree.quicklook],
        args.overwrite,
        "sample",
    )
    scene = generate_scene(args.seed, args.tiles, args.tile_size)
    written = write_scene(scene, tree.raw, tree.labels, tree.quicklook)
    for stale in old:  # an earlier run with more tiles must not leave extra ones for mosaic
        if stale not in tiles:
            stale.unlink()
    counts = scene.roofs["roof_type"].value_counts()
    log.info(
        "wrote %d tiles of %d px (%d bands, uint16, EPSG:%d) to %s",
        len(tiles),
        args.tile_size,
        len(BANDS),
        CRS_EPSG,
        tree.raw,
    )
    log.info("wrote %s: %s", written[-2], ", ".join(f"{counts.get(t, 0)} {t}" for t in ROOF_TYPES))
    log.info("metal roofs cover %.2f%% of valid pixels", 100 * scene.metal_share)
    if not 0.03 <= scene.metal_share <= 0.06:
        log.warning(
            "metal share %.2f%% is outside 3-6%%: the scene is too small to place roofs as planned",
            100 * scene.metal_share,
        )
    log.info("wrote %s", written[-1])


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed gives identical files (default: 0)"
    )
    parser.add_argument(
        "--tiles", type=_int_at_least(1), default=2, metavar="N", help="grid side: N x N tiles (default: 2)"
    )
    parser.add_argument(
        "--tile-size",
        type=_int_at_least(MIN_TILE_SIZE),
        default=1024,
        metavar="PX",
        help="tile side in pixels (default: 1024)",
    )
    return cli.run(parser, argv, _body)


if __name__ == "__main__":
    sys.exit(main())
