"""The built-in demo scene as a library: a synthetic, deterministic town in 8-band imagery.

:func:`generate_scene` builds the scene in memory (a :class:`Scene`: the image, its
transform and CRS, the building polygons); :func:`write_scene` writes its tiles, labels and
quicklook. ``python sample/sample.py`` is the command around them, and its docstring says
what the scene holds. Benchmarks and tests import this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.features import rasterize
from scipy import ndimage
from shapely import affinity
from shapely.geometry import LineString, Point, Polygon
from shapely.geometry.base import BaseGeometry

from core import cli
from core.files import atomic_path
from core.raster import write_raster

BANDS = ("coastal", "blue", "green", "yellow", "red", "red_edge", "nir1", "nir2")
RED, GREEN, BLUE = 4, 2, 1
CRS_EPSG = 32644
PIXEL_SIZE = 0.5
#: Scene centre (lon, lat): a village area east of Gorakhpur.
CENTRE_LONLAT = (83.37, 26.76)
NODATA = 0
MAX_VALUE = 2047  # 11-bit sensor
MIN_TILE_SIZE = 64
LABELS_NAME = "roofs.geojson"
ROOF_TYPES = ("metal", "concrete", "brick")

#: Sun from the south-east, as at WorldView's mid-morning overpass: shadows fall north-west.
SUN_AZIMUTH = math.radians(140.0)
SUN_ELEVATION = math.radians(55.0)
#: Unit vector (east, north) pointing from an object towards its shadow.
_SHADOW_DIR = np.array([-math.sin(SUN_AZIMUTH), -math.cos(SUN_AZIMUTH)])

#: Surface reflectance per band (coastal ... NIR2), shaped after library spectra.
SPECTRA: dict[str, np.ndarray] = {
    k: np.array(v, dtype=np.float32)
    for k, v in {
        "crop": [0.035, 0.045, 0.1, 0.07, 0.045, 0.24, 0.46, 0.48],  # green leaves: red low, NIR high
        "dry_grass": [0.07, 0.085, 0.13, 0.14, 0.14, 0.22, 0.28, 0.29],
        "soil": [0.1, 0.12, 0.155, 0.18, 0.2, 0.225, 0.25, 0.265],  # grey-brown alluvial loam
        "canopy": [0.03, 0.04, 0.085, 0.058, 0.036, 0.2, 0.4, 0.42],
        "water": [0.065, 0.062, 0.07, 0.05, 0.038, 0.028, 0.014, 0.01],  # lowest in NIR
        "shallow": [0.07, 0.075, 0.095, 0.085, 0.075, 0.07, 0.06, 0.055],
        "asphalt": [0.075, 0.078, 0.083, 0.088, 0.092, 0.097, 0.103, 0.107],
        "dirt_road": [0.15, 0.175, 0.215, 0.24, 0.26, 0.28, 0.3, 0.31],
        "paved": [0.17, 0.19, 0.215, 0.23, 0.24, 0.25, 0.26, 0.265],
        "concrete": [0.25, 0.28, 0.31, 0.33, 0.34, 0.35, 0.36, 0.36],  # bright and flat
        "brick": [0.065, 0.075, 0.105, 0.17, 0.24, 0.28, 0.31, 0.32],  # reddish
        "tank": [0.035, 0.035, 0.035, 0.035, 0.035, 0.037, 0.04, 0.04],  # black plastic water tank
        # Metal: bright, and unlike concrete or soil the reflectance falls towards NIR.
        "galvanized": [0.5, 0.49, 0.47, 0.45, 0.43, 0.41, 0.38, 0.36],
        "blue_paint": [0.3, 0.34, 0.2, 0.1, 0.075, 0.12, 0.26, 0.27],
        "green_paint": [0.07, 0.09, 0.2, 0.13, 0.075, 0.12, 0.22, 0.22],
        "red_paint": [0.08, 0.075, 0.085, 0.24, 0.37, 0.4, 0.38, 0.36],
        "rusted": [0.055, 0.065, 0.1, 0.19, 0.27, 0.31, 0.27, 0.29],  # iron-oxide dip at NIR1
    }.items()
}
METAL_VARIANTS = ("galvanized", "rusted", "blue_paint", "green_paint", "red_paint")
METAL_VARIANT_P = (0.38, 0.27, 0.17, 0.06, 0.12)
#: Variants a viewer cannot tell apart next to each other.
_SIMILAR = {"rusted": "red", "red_paint": "red"}
#: Width (m) of the parapet on a wall that two roofs of a row share.
FIREWALL_WIDTH = (0.35, 0.6)
#: Shadowed surfaces keep diffuse skylight, which is bluer than direct sun.
SHADOW_FACTOR = np.array([0.48, 0.44, 0.37, 0.33, 0.31, 0.29, 0.28, 0.28], dtype=np.float32)
#: Reflectance to 11-bit counts: dark offset (haze, strongest in the blue) plus a gain.
DARK = np.array([170, 130, 90, 72, 58, 48, 38, 32], dtype=np.float32)
GAIN = 2000.0

# --- the scene -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """A generated scene: the whole image, its georeference and the building polygons."""

    image: np.ndarray  # (bands, rows, cols) uint16, 0 = nodata
    transform: Affine
    crs: CRS
    roofs: gpd.GeoDataFrame  # id, roof_type, geometry in ``crs``
    tiles: int
    tile_size: int
    seed: int
    metal_share: float  # metal-roof pixels / valid pixels

    def tile(self, row: int, col: int) -> tuple[np.ndarray, Affine]:
        """Array and transform of tile (row, col) of the grid."""
        size = self.tile_size
        array = self.image[:, row * size : (row + 1) * size, col * size : (col + 1) * size]
        return np.ascontiguousarray(array), self.transform @ Affine.translation(col * size, row * size)


@dataclass
class _Building:
    polygon: Polygon
    roof_type: str
    variant: str
    cx: float
    cy: float
    angle: float  # of the long axis, radians from east, counter-clockwise
    length: float
    width: float
    height: float
    row: int = 0  # the row of touching roofs it belongs to (1, 2 ...), 0 for a detached building


@dataclass
class _Road:
    line: LineString
    width: float
    kind: str  # asphalt, dirt_road or paved


@dataclass
class _Layout:
    box: Polygon
    roads: list[_Road]
    pond: Polygon | None
    nodata: Polygon
    clusters: list[tuple[float, float, float, float]]  # x, y, sigma, angle
    field_angle: float
    buildings: list[_Building] = field(default_factory=list)
    trees: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # x, y, radius, height


@cache
def scene_centre() -> tuple[float, float]:
    """UTM 44N easting and northing of :data:`CENTRE_LONLAT`, rounded to whole metres."""
    east, north = Transformer.from_crs(4326, CRS_EPSG, always_xy=True).transform(*CENTRE_LONLAT)
    return float(round(east)), float(round(north))


def scene_transform(size: int) -> Affine:
    """Transform of a ``size`` x ``size`` scene centred on :func:`scene_centre`."""
    east, north = scene_centre()
    half = size * PIXEL_SIZE / 2
    return Affine(PIXEL_SIZE, 0.0, east - half, 0.0, -PIXEL_SIZE, north + half)


def tile_paths(raw_dir: Path, tiles: int) -> list[Path]:
    """Paths of the tiles of a ``tiles`` x ``tiles`` grid, row by row."""
    return [raw_dir / f"tile_{r}_{c}.tif" for r in range(tiles) for c in range(tiles)]


def generate_scene(seed: int = 0, tiles: int = 2, tile_size: int = 1024) -> Scene:
    """Generate the demo scene in memory; no I/O.

    Args:
        seed: seed of ``numpy.random.default_rng``; the same seed gives the same scene.
        tiles: side of the tile grid (``tiles`` x ``tiles`` tiles).
        tile_size: side of a tile in pixels.
    """
    if tiles < 1 or tile_size < MIN_TILE_SIZE:
        raise ValueError(f"need tiles >= 1 and tile_size >= {MIN_TILE_SIZE}, got {tiles} and {tile_size}")
    rng = np.random.default_rng(seed)
    size = tiles * tile_size
    transform = scene_transform(size)
    layout = _plan_layout(rng, transform, size, tile_size)
    image, metal_px = _render(rng, layout, transform, size)
    valid = np.count_nonzero(image[0] != NODATA)
    buildings = layout.buildings
    roofs = gpd.GeoDataFrame(
        {
            "id": np.arange(1, len(buildings) + 1, dtype=np.int32),
            "roof_type": [b.roof_type for b in buildings],
            "row": np.array([b.row for b in buildings], dtype=np.int32),
            "layout": ["row" if b.row else "detached" for b in buildings],
        },
        geometry=[b.polygon for b in buildings],
        crs=CRS_EPSG,
    )
    return Scene(
        image=image,
        transform=transform,
        crs=CRS.from_epsg(CRS_EPSG),
        roofs=roofs,
        tiles=tiles,
        tile_size=tile_size,
        seed=seed,
        metal_share=metal_px / valid if valid else 0.0,
    )


# --- layout: vector geometry in scene coordinates (metres) -------------------------------------


def _plan_layout(rng: np.random.Generator, transform: Affine, size: int, tile_size: int) -> _Layout:
    side = size * PIXEL_SIZE
    left, top = transform.c, transform.f
    box = shapely.box(left, top - side, left + side, top)
    nodata = _nodata_corner(rng, transform, size, tile_size)
    roads = _roads(rng, box)
    pond = _pond(rng, box, roads, nodata)
    clusters = _clusters(rng, box, roads)
    layout = _Layout(box, roads, pond, nodata, clusters, field_angle=float(rng.uniform(-0.35, 0.35)))
    layout.buildings = _buildings(rng, layout)
    layout.trees = _trees(rng, layout)
    return layout


def _nodata_corner(rng: np.random.Generator, transform: Affine, size: int, tile_size: int) -> Polygon:
    """A triangle in the outer corner of one corner tile, like the edge of an image strip."""
    corner = int(rng.integers(4))
    legs = rng.uniform(0.25, 0.5, size=2) * tile_size  # shorter than a tile: one tile only
    x0, sx = (0.0, 1.0) if corner in (0, 2) else (float(size), -1.0)
    y0, sy = (0.0, 1.0) if corner in (0, 1) else (float(size), -1.0)
    pixels = [(x0, y0), (x0 + sx * legs[0], y0), (x0, y0 + sy * legs[1])]
    return Polygon([transform @ p for p in pixels])


def _polyline(rng: np.random.Generator, through: np.ndarray, angle: float, length: float, wiggle: float) -> LineString:
    """A gently bending line through a point, ``length`` long each way."""
    t = np.linspace(-length, length, 9)
    offsets = rng.normal(0.0, wiggle, size=t.size)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    return LineString(through + t[:, None] * direction + offsets[:, None] * normal)


def _roads(rng: np.random.Generator, box: Polygon) -> list[_Road]:
    minx, miny, maxx, maxy = box.bounds
    side = maxx - minx
    centre = np.array([(minx + maxx) / 2, (miny + maxy) / 2])
    roads: list[_Road] = []
    for k in range(2 if side >= 300 else 1):
        through = centre + rng.uniform(-0.25, 0.25, size=2) * side
        angle = k * math.pi / 2 + rng.uniform(-0.35, 0.35)
        line = _polyline(rng, through, angle, side * 1.5, side * 0.01)
        roads.append(_Road(line, float(rng.uniform(7.0, 9.0)), "asphalt"))
    mains = [r.line for r in roads]
    for _ in range(max(1, round(side * side / 1e6 * 8))):
        main = mains[int(rng.integers(len(mains)))]
        start = _point_in(rng, main, box)
        heading = _heading(main, start) + math.pi / 2 * rng.choice([-1.0, 1.0]) + rng.normal(0.0, 0.2)
        length = rng.uniform(80.0, 100.0 + side / 2)
        end = start + length * np.array([math.cos(heading), math.sin(heading)])
        mid = (start + end) / 2 + rng.normal(0.0, length * 0.05, size=2)
        kind = "paved" if rng.random() < 0.35 else "dirt_road"
        roads.append(_Road(LineString([start, mid, end]), float(rng.uniform(3.5, 5.0)), kind))
    return roads


def _point_in(rng: np.random.Generator, line: LineString, box: Polygon) -> np.ndarray:
    """A random point of ``line`` inside ``box`` (the line's midpoint if none is found)."""
    inside = line.intersection(box)
    if inside.is_empty or inside.length == 0:
        inside = line
    point = inside.interpolate(rng.uniform(0.0, inside.length))
    return np.array([point.x, point.y])


def _heading(line: LineString, at: np.ndarray) -> float:
    """Direction of ``line`` near point ``at``, radians from east."""
    d = line.project(Point(at))
    a, b = line.interpolate(max(d - 1.0, 0.0)), line.interpolate(min(d + 1.0, line.length))
    return math.atan2(b.y - a.y, b.x - a.x)


def _pond(rng: np.random.Generator, box: Polygon, roads: list[_Road], nodata: Polygon) -> Polygon | None:
    side = box.bounds[2] - box.bounds[0]
    keep_off = shapely.union_all([r.line.buffer(r.width / 2 + 6) for r in roads] + [nodata.buffer(10)])
    inner = box.buffer(-8)
    radius = min(rng.uniform(22.0, 40.0), side * 0.09)
    angles = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    # Smooth wobble: a few low harmonics with random phases.
    wobble = sum(rng.uniform(0.03, 0.12) * np.cos(k * angles + rng.uniform(0, 2 * math.pi)) for k in (2, 3, 5))
    aspect, turn = rng.uniform(0.6, 1.0), rng.uniform(0, math.pi)
    x = radius * (1 + wobble) * np.cos(angles)
    y = radius * aspect * (1 + wobble) * np.sin(angles)
    shape = np.column_stack([x * math.cos(turn) - y * math.sin(turn), x * math.sin(turn) + y * math.cos(turn)])
    minx, miny, maxx, maxy = box.bounds
    for _ in range(80):
        centre = rng.uniform((minx, miny), (maxx, maxy))
        pond = Polygon(shape + centre)
        if inner.contains(pond) and not keep_off.intersects(pond):
            return pond
    return None


def _clusters(rng: np.random.Generator, box: Polygon, roads: list[_Road]) -> list[tuple[float, float, float, float]]:
    """Village cores: centres near roads, a spread and a preferred building orientation."""
    side = box.bounds[2] - box.bounds[0]
    clusters = []
    for _ in range(max(1, round(side * side / 1e6 * 5))):
        road = roads[int(rng.integers(len(roads)))]
        at = _point_in(rng, road.line, box) + rng.normal(0.0, 25.0, size=2)
        sigma = min(rng.uniform(45.0, 95.0), side / 3)
        clusters.append((float(at[0]), float(at[1]), float(sigma), _heading(road.line, at)))
    return clusters


def _rectangle(cx: float, cy: float, angle: float, length: float, width: float) -> Polygon:
    c, s = math.cos(angle), math.sin(angle)
    corners = ((1, 1), (-1, 1), (-1, -1), (1, -1))
    return Polygon(
        [(cx + u * length / 2 * c - v * width / 2 * s, cy + u * length / 2 * s + v * width / 2 * c) for u, v in corners]
    )


class _Grid:
    """Buildings bucketed by a coarse grid, to test a candidate against its neighbours only."""

    def __init__(self, cell: float = 40.0) -> None:
        self.cell = cell
        self.buckets: dict[tuple[int, int], list[Polygon]] = {}

    def _keys(self, geom: BaseGeometry) -> list[tuple[int, int]]:
        minx, miny, maxx, maxy = (v / self.cell for v in geom.bounds)
        return [
            (i, j)
            for i in range(math.floor(minx), math.floor(maxx) + 1)
            for j in range(math.floor(miny), math.floor(maxy) + 1)
        ]

    def near(self, geom: BaseGeometry, distance: float) -> bool:
        """Whether any stored polygon lies within ``distance`` of ``geom``."""
        seen: list[Polygon] = []
        for key in self._keys(geom.buffer(distance, quad_segs=1)):
            seen.extend(self.buckets.get(key, ()))
        return bool(seen) and bool(shapely.dwithin(geom, seen, distance).any())

    def add(self, geom: Polygon) -> None:
        for key in self._keys(geom):
            self.buckets.setdefault(key, []).append(geom)


def _buildings(rng: np.random.Generator, layout: _Layout) -> list[_Building]:
    """Place non-overlapping buildings until metal and other roofs reach their target areas."""
    box = layout.box
    valid_area = box.area - layout.nodata.area
    metal_target = rng.uniform(0.041, 0.049) * valid_area
    other_target = rng.uniform(0.05, 0.07) * valid_area
    obstacles = [r.line.buffer(r.width / 2 + 1.5) for r in layout.roads] + [layout.nodata.buffer(6.0)]
    if layout.pond is not None:
        obstacles.append(layout.pond.buffer(3.0))
    blocked = shapely.union_all(obstacles)
    shapely.prepare(blocked)
    inner = box.buffer(-2.0)
    shapely.prepare(inner)
    lengths = np.array([r.line.intersection(box).length for r in layout.roads])
    road_p = lengths / lengths.sum() if lengths.sum() > 0 else np.full(len(lengths), 1 / len(lengths))
    grid = _Grid()
    buildings = _rows_of_roofs(rng, layout, grid, blocked, inner, road_p)
    metal_area = sum(b.polygon.area for b in buildings)
    other_area = 0.0
    max_tries = 400 + int(60 * (metal_target + other_target) / 120.0)
    for _ in range(max_tries):
        need_metal, need_other = metal_area < metal_target, other_area < other_target
        if not (need_metal or need_other):
            break
        metal = bool(rng.random() < 0.4) if need_metal and need_other else need_metal
        if metal:
            length = rng.uniform(8.0, 25.0)
            width = rng.uniform(6.0, min(length, 16.0))
            # Keep the last roofs from overshooting the target share in small scenes.
            room = metal_target - metal_area + 0.004 * valid_area
            if length * width > room:
                shrink = math.sqrt(max(room, 36.0) / (length * width))
                length, width = max(6.0, length * shrink), max(6.0, width * shrink)
        else:
            length = rng.uniform(6.0, 18.0)
            width = rng.uniform(6.0, min(length, 14.0))
        if rng.random() < 0.55:  # along a road, facing it
            road = layout.roads[int(rng.choice(len(layout.roads), p=road_p))]
            at = _point_in(rng, road.line, box)
            heading = _heading(road.line, at)
            across = rng.random() < 0.4
            depth = length if across else width
            offset = (
                road.width / 2
                + rng.uniform(1.5, 5.0)
                + depth / 2
                + (rng.exponential(12.0) if rng.random() < 0.4 else 0.0)
            )
            side = rng.choice([-1.0, 1.0])
            centre = at + side * offset * np.array([-math.sin(heading), math.cos(heading)])
            angle = heading + (math.pi / 2 if across else 0.0) + rng.normal(0.0, 0.05)
        else:  # in a village core
            cx, cy, sigma, base = layout.clusters[int(rng.integers(len(layout.clusters)))]
            centre = np.array([cx, cy]) + rng.normal(0.0, sigma, size=2)
            angle = (
                rng.uniform(0, math.pi)
                if rng.random() < 0.25
                else base + rng.choice([0.0, math.pi / 2]) + rng.normal(0.0, 0.12)
            )
        poly = _rectangle(float(centre[0]), float(centre[1]), float(angle), float(length), float(width))
        if not inner.contains(poly) or blocked.intersects(poly) or grid.near(poly, 1.5):
            continue
        grid.add(poly)
        if metal:
            roof_type, variant = "metal", str(rng.choice(METAL_VARIANTS, p=METAL_VARIANT_P))
            metal_area += poly.area
        else:
            roof_type = "concrete" if rng.random() < 0.6 else "brick"
            variant = roof_type
            other_area += poly.area
        height = rng.uniform(3.0, 4.5) if metal or rng.random() < 0.6 else rng.uniform(5.5, 7.5)
        buildings.append(
            _Building(
                poly,
                roof_type,
                variant,
                float(centre[0]),
                float(centre[1]),
                float(angle),
                float(length),
                float(width),
                float(height),
            )
        )
    return buildings


def _rows_of_roofs(
    rng: np.random.Generator, layout: _Layout, grid: _Grid, blocked: BaseGeometry, inner: BaseGeometry,
    road_p: np.ndarray,
) -> list[_Building]:  # fmt: skip
    """Rows of 3 to 6 metal roofs sharing walls along the roads (shop-houses): touching roofs of other
    colours, the case a roof mask merges into one blob. About 24 rows per km2, enough for a model to
    learn the seams (a fifth of them land in the validation split)."""
    wanted = max(2, round(24 * (layout.box.area - layout.nodata.area) / 1e6))
    rows: list[_Building] = []
    for _ in range(40 * wanted):
        if len(rows) and rows[-1].row >= wanted:
            break
        road = layout.roads[int(rng.choice(len(layout.roads), p=road_p))]
        at = _point_in(rng, road.line, box=layout.box)
        heading = _heading(road.line, at)
        depth = rng.uniform(8.0, 13.0)
        widths = rng.uniform(5.0, 9.0, int(rng.integers(3, 7)))
        side = rng.choice([-1.0, 1.0])
        across = np.array([-math.sin(heading), math.cos(heading)])
        along = np.array([math.cos(heading), math.sin(heading)])
        centre = at + side * (road.width / 2 + rng.uniform(2.0, 4.0) + depth / 2) * across
        starts = np.concatenate([[0.0], np.cumsum(widths)]) - widths.sum() / 2
        polys = [
            _rectangle(*(centre + (starts[i] + widths[i] / 2) * along), heading + math.pi / 2, depth, widths[i])
            for i in range(len(widths))
        ]
        whole = shapely.union_all(polys)
        if not inner.contains(whole) or blocked.intersects(whole) or grid.near(whole, 1.5):
            continue
        row = (rows[-1].row if rows else 0) + 1
        variant = ""
        for poly, width, k in zip(polys, widths, range(len(polys)), strict=True):
            # Neighbours differ in colour, as sheets bought and painted at different times do
            # (rust and red paint look alike, so they are not neighbours either).
            choices = [v for v in METAL_VARIANTS if _SIMILAR.get(v, v) != _SIMILAR.get(variant, variant)]
            p = np.array([METAL_VARIANT_P[METAL_VARIANTS.index(v)] for v in choices])
            variant = str(rng.choice(choices, p=p / p.sum()))
            mid = centre + (starts[k] + width / 2) * along
            grid.add(poly)
            rows.append(_Building(poly, "metal", variant, float(mid[0]), float(mid[1]), float(heading + math.pi / 2),
                                  float(depth), float(width), float(rng.uniform(3.0, 4.5)), row))  # fmt: skip
    return rows


def _trees(rng: np.random.Generator, layout: _Layout) -> np.ndarray:
    """Tree crowns (x, y, radius, height): over roof edges, in the villages, by roads, in an orchard."""
    minx, miny, maxx, maxy = layout.box.bounds
    side = maxx - minx
    area_km2 = side * side / 1e6
    parts: list[np.ndarray] = []
    # Some crowns hang over roof edges; they hide part of a roof that the label still covers.
    over = [b for b in layout.buildings if rng.random() < 0.22]
    if over:
        rows = []
        for b in over:
            edge = b.polygon.exterior.interpolate(rng.uniform(0, b.polygon.exterior.length))
            radius = min(rng.uniform(2.2, 4.0), 0.45 * b.width)
            out = np.array([edge.x - b.cx, edge.y - b.cy])
            centre = np.array([edge.x, edge.y]) + out / np.linalg.norm(out) * rng.uniform(0.0, 0.6) * radius
            rows.append((centre[0], centre[1], radius, rng.uniform(6.0, 10.0)))
        parts.append(np.array(rows))
    n = int(area_km2 * 2200)
    if layout.clusters:
        k = rng.integers(len(layout.clusters), size=int(n * 0.55))
        c = np.array(layout.clusters)[k]
        xy = c[:, :2] + rng.normal(size=(k.size, 2)) * c[:, 2:3] * 1.3
        parts.append(np.column_stack([xy, rng.uniform(1.8, 4.5, k.size), rng.uniform(5.0, 12.0, k.size)]))
    by_road = []
    for _ in range(int(n * 0.25)):
        road = layout.roads[int(rng.integers(len(layout.roads)))]
        at = _point_in(rng, road.line, layout.box)
        heading = _heading(road.line, at)
        offset = rng.choice([-1.0, 1.0]) * (road.width / 2 + rng.uniform(2.0, 6.0))
        xy = at + offset * np.array([-math.sin(heading), math.cos(heading)])
        by_road.append((xy[0], xy[1], rng.uniform(2.0, 4.5), rng.uniform(6.0, 12.0)))
    if by_road:
        parts.append(np.array(by_road))
    m = int(n * 0.2)
    parts.append(
        np.column_stack(
            [
                rng.uniform(minx, maxx, m),
                rng.uniform(miny, maxy, m),
                rng.uniform(1.5, 4.0, m),
                rng.uniform(4.0, 10.0, m),
            ]
        )
    )
    for _ in range(max(1, round(area_km2 * 2))):  # mango orchards: crowns on a grid
        spacing = rng.uniform(8.0, 10.0)
        n_u, n_v = rng.integers(5, 14, size=2)
        origin = rng.uniform((minx, miny), (maxx, maxy))
        a = layout.field_angle
        u, v = np.meshgrid(np.arange(n_u) * spacing, np.arange(n_v) * spacing)
        xy = origin + np.column_stack(
            [u.ravel() * math.cos(a) - v.ravel() * math.sin(a), u.ravel() * math.sin(a) + v.ravel() * math.cos(a)]
        )
        xy += rng.normal(0.0, 0.4, size=xy.shape)
        parts.append(np.column_stack([xy, rng.uniform(3.0, 4.2, len(xy)), rng.uniform(6.0, 9.0, len(xy))]))
    edge_count = len(over)
    trees = np.concatenate(parts) if parts else np.zeros((0, 4))
    # Other crowns keep clear of roofs, roads and the pond.
    crowns = shapely.buffer(shapely.points(trees[:, :2]), trees[:, 2], quad_segs=4)
    keep = np.ones(len(trees), dtype=bool)
    if layout.buildings:
        hits = shapely.STRtree([b.polygon for b in layout.buildings]).query(
            crowns[edge_count:], predicate="intersects"
        )[0]
        keep[edge_count + hits] = False
    ground = [r.line.buffer(r.width / 2) for r in layout.roads] + ([layout.pond] if layout.pond is not None else [])
    blocked = shapely.union_all(ground)
    shapely.prepare(blocked)
    keep[edge_count:] &= ~shapely.contains_xy(blocked, trees[edge_count:, 0], trees[edge_count:, 1])
    return trees[keep]


# --- rendering: layers of reflectance, then the sensor ----------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: int) -> np.ndarray:
    """Noise of unit spread with features about ``scale_px`` pixels across."""
    scale = max(int(scale_px), 1)
    coarse = rng.standard_normal((shape[0] // scale + 4, shape[1] // scale + 4), dtype=np.float32)
    fine = ndimage.zoom(coarse, scale, order=3, prefilter=False)[: shape[0], : shape[1]]
    return fine / max(float(fine.std()), 1e-6)


def _burn(shapes: list[tuple[BaseGeometry, int]], transform: Affine, size: int, dtype: str = "uint8") -> np.ndarray:
    """Rasterize (geometry, value) pairs onto the scene grid; later shapes win."""
    if not shapes:
        return np.zeros((size, size), dtype=dtype)
    return rasterize(shapes, out_shape=(size, size), transform=transform, fill=0, dtype=dtype)


def _shadow(footprint: BaseGeometry, height: float) -> BaseGeometry:
    """Ground covered by the shadow of an object of ``height`` metres (footprint included)."""
    dx, dy = _SHADOW_DIR * height / math.tan(SUN_ELEVATION)
    return shapely.convex_hull(shapely.union(footprint, affinity.translate(footprint, dx, dy)))


def _render(rng: np.random.Generator, layout: _Layout, transform: Affine, size: int) -> tuple[np.ndarray, int]:
    """Paint the layout into an 8-band uint16 image; return it and its metal-roof pixel count."""
    shape = (size, size)
    xs = (transform.c + (np.arange(size, dtype=np.float64) + 0.5) * PIXEL_SIZE).astype(np.float32)
    ys = (transform.f - (np.arange(size, dtype=np.float64) + 0.5) * PIXEL_SIZE).astype(np.float32)
    centre = layout.box.centroid
    fine = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 0.8)
    fine /= max(float(fine.std()), 1e-6)
    mid = _smooth_noise(rng, shape, round(4 / PIXEL_SIZE))
    low = _smooth_noise(rng, shape, round(25 / PIXEL_SIZE))
    broad = _smooth_noise(rng, shape, round(80 / PIXEL_SIZE))

    refl = _ground(rng, layout, xs - centre.x, ys - centre.y, fine, low, broad, transform, size)

    if layout.pond is not None:
        water = _burn([(layout.pond, 1)], transform, size).astype(bool)
        depth = np.clip(ndimage.distance_transform_edt(water) * PIXEL_SIZE / 6.0, 0, 1).astype(np.float32)[water]
        mix = SPECTRA["water"][:, None] * depth + SPECTRA["shallow"][:, None] * (1 - depth)
        refl[:, water] = mix * (1 + 0.03 * mid[water])

    # Shoulders first, asphalt last, so junctions keep the main road on top.
    kinds = {"shoulder": 1, "dirt_road": 2, "paved": 3, "asphalt": 4}
    road_shapes = [(r.line.buffer(r.width / 2 + 1.2, cap_style="flat"), 1) for r in layout.roads if r.kind == "asphalt"]
    road_shapes += [
        (r.line.buffer(r.width / 2, cap_style="round"), kinds[r.kind]) for r in layout.roads if r.kind != "asphalt"
    ]
    road_shapes += [(r.line.buffer(r.width / 2, cap_style="flat"), 4) for r in layout.roads if r.kind == "asphalt"]
    roads = _burn(road_shapes, transform, size)
    for name, value in (("dirt_road", 1), ("dirt_road", 2), ("paved", 3), ("asphalt", 4)):
        where = roads == value
        refl[:, where] = SPECTRA[name][:, None] * (1 + 0.05 * low[where] + 0.04 * fine[where])

    buildings = layout.buildings
    shadows = _burn([(_shadow(b.polygon, b.height), 1) for b in buildings], transform, size).astype(bool)
    refl[:, shadows] *= SHADOW_FACTOR[:, None]
    ids = _burn([(b.polygon, i + 1) for i, b in enumerate(buildings)], transform, size, "int32")
    if buildings:
        _paint_roofs(rng, refl, ids, buildings, xs, ys, fine, mid)
        _paint_firewalls(rng, refl, ids, buildings, xs, ys)

    trees = layout.trees
    if len(trees):
        crowns = shapely.buffer(shapely.points(trees[:, :2]), trees[:, 2], quad_segs=6)
        # A crown's shadow is the crown moved away from the sun, kept touching its tree.
        reach = np.minimum((trees[:, 3] - trees[:, 2]) / math.tan(SUN_ELEVATION), 1.5 * trees[:, 2])
        moved = np.array([affinity.translate(c, *(_SHADOW_DIR * r)) for c, r in zip(crowns, reach, strict=True)])
        shade = _burn([(m, 1) for m in moved], transform, size).astype(bool)
        refl[:, shade] *= SHADOW_FACTOR[:, None]
        tid = _burn([(c, i + 1) for i, c in enumerate(crowns)], transform, size, "int32")
        rows, cols = np.nonzero(tid)
        k = tid[rows, cols] - 1
        # Crowns are lit on the sun side and dark on the other, with leafy clumps.
        dx, dy = xs[cols] - trees[k, 0], ys[rows] - trees[k, 1]
        lit = -(dx * _SHADOW_DIR[0] + dy * _SHADOW_DIR[1]) / trees[k, 2]
        vigour = rng.uniform(0.8, 1.15, size=len(trees))[k]
        gain = (vigour * (1 + 0.3 * lit) * (1 + 0.12 * mid[rows, cols] + 0.08 * fine[rows, cols])).astype(np.float32)
        refl[:, rows, cols] = SPECTRA["canopy"][:, None] * gain

    for b in range(refl.shape[0]):  # optics: a slight blur
        refl[b] = ndimage.gaussian_filter(refl[b], 0.6)
    image = _to_counts(rng, refl)
    nodata = _burn([(layout.nodata, 1)], transform, size).astype(bool)
    image[:, nodata] = NODATA
    is_metal = np.array([False] + [b.roof_type == "metal" for b in buildings])
    return image, int(np.count_nonzero(is_metal[ids] & ~nodata))


def _ground(
    rng: np.random.Generator,
    layout: _Layout,
    xs: np.ndarray,
    ys: np.ndarray,
    fine: np.ndarray,
    low: np.ndarray,
    broad: np.ndarray,
    transform: Affine,
    size: int,
) -> np.ndarray:
    """Fields in strips, bare village ground around houses; returns (bands, rows, cols) reflectance."""
    a = layout.field_angle
    ca, sa = math.cos(a), math.sin(a)
    u = xs[None, :] * ca + ys[:, None] * sa
    v = -xs[None, :] * sa + ys[:, None] * ca
    half = size * PIXEL_SIZE * 0.75 + 60
    edges = -half + np.cumsum(rng.uniform(20.0, 55.0, size=int(2 * half / 20) + 2))
    strip = np.searchsorted(edges, v).astype(np.int32)
    n_strips = edges.size + 1
    field_len = rng.uniform(25.0, 90.0, size=n_strips).astype(np.float32)
    shift = (rng.uniform(0, 1, size=n_strips) * field_len).astype(np.float32)
    along = u + half + shift[strip]
    col = np.floor(along / field_len[strip]).astype(np.int32)
    per_strip = int(4 * half / 25) + 2
    fid = strip * per_strip + np.clip(col, 0, per_strip - 1)
    n_fields = n_strips * per_strip
    # Per field: crop, fallow grass or bare soil, how green, how bright the soil.
    kind = rng.choice(3, size=n_fields, p=[0.5, 0.2, 0.3])
    cover = np.where(
        kind == 0,
        rng.uniform(0.65, 0.95, n_fields),
        np.where(kind == 1, rng.uniform(0.3, 0.6, n_fields), rng.uniform(0.0, 0.12, n_fields)),
    )
    green = np.where(kind == 0, rng.uniform(0.75, 1.0, n_fields), rng.uniform(0.1, 0.4, n_fields))
    soil = rng.uniform(0.7, 1.15, n_fields)
    rows_p = rng.uniform(2.0, 3.0, n_fields) * (rng.random(n_fields) < 0.4)  # crop rows in some fields
    f = cover.astype(np.float32)[fid]
    g = green.astype(np.float32)[fid]
    sb = soil.astype(np.float32)[fid]
    period = rows_p.astype(np.float32)[fid]
    with np.errstate(divide="ignore", invalid="ignore"):
        f *= np.where(period > 0, 1 + 0.1 * np.cos(2 * np.pi * v / np.where(period > 0, period, 1)), 1).astype(
            np.float32
        )
    del period
    # Bunds: grassy strips along field edges.
    lo_edge = np.concatenate([[-np.inf], edges]).astype(np.float32)[strip]
    hi_edge = np.concatenate([edges, [np.inf]]).astype(np.float32)[strip]
    pos = along - col * field_len[strip]
    bund = (np.minimum(v - lo_edge, hi_edge - v) < 0.7) | (np.minimum(pos, field_len[strip] - pos) < 0.7)
    del u, v, along, col, fid, lo_edge, hi_edge, pos, strip
    f[bund], g[bund], sb[bund] = 0.45, 0.5, 1.1
    # Village ground: packed bare earth around houses and in the village cores.
    if layout.buildings:
        yards = [(b.polygon.buffer(rng.uniform(3.0, 9.0), join_style="mitre"), 1) for b in layout.buildings]
        yard = ndimage.gaussian_filter(_burn(yards, transform, size).astype(np.float32), 4.0)
    else:
        yard = np.zeros((size, size), dtype=np.float32)
    for cx, cy, sigma, _ in layout.clusters:
        gx = np.exp(-((xs - (cx - layout.box.centroid.x)) ** 2) / (2 * (0.8 * sigma) ** 2)).astype(np.float32)
        gy = np.exp(-((ys - (cy - layout.box.centroid.y)) ** 2) / (2 * (0.8 * sigma) ** 2)).astype(np.float32)
        yard = np.maximum(yard, 0.8 * gy[:, None] * gx[None, :])
    village = np.clip(yard * (1 + 0.5 * low), 0, 1)
    f = np.clip(f * (1 - 0.7 * village) + 0.08 * low + 0.03 * fine, 0, 1)
    g = np.clip(g + 0.08 * broad, 0, 1)
    sb = sb * (1 + 0.08 * broad) * (1 + 0.1 * village)
    if layout.pond is not None:  # lush grass on the banks
        bank = _burn([(layout.pond.buffer(4.0), 1)], transform, size).astype(bool)
        f[bank], g[bank] = 0.85, 0.9
    w_crop, w_dry, w_soil = f * g, f * (1 - g), (1 - f) * sb
    texture = 1 + 0.035 * fine + 0.03 * low
    refl = np.empty((len(BANDS), size, size), dtype=np.float32)
    for b in range(len(BANDS)):
        refl[b] = (
            w_crop * SPECTRA["crop"][b] + w_dry * SPECTRA["dry_grass"][b] + w_soil * SPECTRA["soil"][b]
        ) * texture
    return refl


def _paint_roofs(
    rng: np.random.Generator,
    refl: np.ndarray,
    ids: np.ndarray,
    buildings: list[_Building],
    xs: np.ndarray,
    ys: np.ndarray,
    fine: np.ndarray,
    mid: np.ndarray,
) -> None:
    """Paint roofs in place: spectra per variant, corrugation and gables on metal, parapets and tanks on concrete."""
    n = len(buildings)
    spec = np.stack([SPECTRA[b.variant] for b in buildings])
    cx = np.array([b.cx for b in buildings])
    cy = np.array([b.cy for b in buildings])
    cos = np.cos([b.angle for b in buildings])
    sin = np.sin([b.angle for b in buildings])
    half_l = np.array([b.length for b in buildings]) / 2
    half_w = np.array([b.width for b in buildings]) / 2
    metal = np.array([b.roof_type == "metal" for b in buildings])
    concrete = np.array([b.roof_type == "concrete" for b in buildings])
    bright = rng.uniform(0.85, 1.15, n)
    # Corrugated sheets: bright/dark stripes across the long axis (ridges run down the slope).
    period = rng.uniform(1.5, 3.0, n)
    phase = rng.uniform(0, 2 * math.pi, n)
    amp = np.where(metal, rng.uniform(0.08, 0.16, n), 0.0)
    # Gable roofs: the half facing the sun is brighter; the rest are flat or single-pitch.
    normal_sun = -(-sin * _SHADOW_DIR[0] + cos * _SHADOW_DIR[1])  # sun component along +v
    gable = np.where(metal & (rng.random(n) < 0.6), 0.15 * np.sign(normal_sun), 0.0)
    rust = np.where(
        np.array([b.variant == "galvanized" for b in buildings]) & (rng.random(n) < 0.35), rng.uniform(0.3, 0.7, n), 0.0
    )
    tank = concrete & (rng.random(n) < 0.5)
    tank_u = rng.uniform(-1, 1, n) * np.maximum(half_l - 1.5, 0)
    tank_v = rng.uniform(-1, 1, n) * np.maximum(half_w - 1.5, 0)
    tank_r = rng.uniform(0.6, 0.9, n)
    stain = np.where(metal, 0.04, np.where(concrete, 0.1, 0.07))

    rows, cols = np.nonzero(ids)
    k = ids[rows, cols] - 1
    dx, dy = xs[cols] - cx[k], ys[rows] - cy[k]
    u = dx * cos[k] + dy * sin[k]
    v = -dx * sin[k] + dy * cos[k]
    gain = bright[k] * (1 + stain[k] * mid[rows, cols]) * (1 + 0.03 * fine[rows, cols])
    gain *= 1 + amp[k] * np.cos(2 * np.pi * u / period[k] + phase[k])
    gain *= 1 + gable[k] * np.sign(v)
    parapet = concrete[k] & ((np.abs(u) > half_l[k] - 0.5) | (np.abs(v) > half_w[k] - 0.5))
    gain[parapet] *= 0.8
    w = (rust[k] * np.clip(0.5 + 0.5 * mid[rows, cols], 0, 1))[:, None]
    pixels = spec[k] * (1 - w) + SPECTRA["rusted"][None, :] * w
    in_tank = tank[k] & ((u - tank_u[k]) ** 2 + (v - tank_v[k]) ** 2 < tank_r[k] ** 2)
    pixels[in_tank] = SPECTRA["tank"]
    refl[:, rows, cols] = (pixels * gain[:, None]).T.astype(np.float32)


def _paint_firewalls(
    rng: np.random.Generator,
    refl: np.ndarray,
    ids: np.ndarray,
    buildings: list[_Building],
    xs: np.ndarray,
    ys: np.ndarray,
) -> None:
    """Paint the parapet on each wall two roofs of a row share: a light masonry line, drawn with the
    share of each pixel it covers, so a 0.4 m wall on 0.5 m pixels is a faint seam, as in real imagery."""
    for i in range(len(buildings) - 1):
        a, b = buildings[i], buildings[i + 1]
        if not a.row or a.row != b.row:
            continue
        wall = shapely.intersection(a.polygon.buffer(1e-3, join_style="mitre"), b.polygon.boundary)
        if wall.is_empty:
            continue
        width = rng.uniform(*FIREWALL_WIDTH)
        shade = rng.uniform(0.8, 1.1)
        minx, miny, maxx, maxy = wall.bounds
        c0, c1 = np.searchsorted(xs, [minx - 1.0, maxx + 1.0])
        r0, r1 = np.searchsorted(-ys, [-(maxy + 1.0), -(miny - 1.0)])
        window = ids[r0:r1, c0:c1]
        rows, cols = np.nonzero((window == i + 1) | (window == i + 2))
        if not len(rows):
            continue
        rows, cols = rows + r0, cols + c0
        distance = shapely.distance(shapely.points(xs[cols], ys[rows]), wall)
        alpha = np.clip((width / 2 - distance) / PIXEL_SIZE + 0.5, 0.0, 1.0).astype(np.float32)
        on = alpha > 0
        rows, cols, alpha = rows[on], cols[on], alpha[on]
        refl[:, rows, cols] = refl[:, rows, cols] * (1 - alpha) + SPECTRA["concrete"][:, None] * shade * alpha


def _to_counts(rng: np.random.Generator, refl: np.ndarray) -> np.ndarray:
    """Reflectance to 11-bit counts with sensor noise; valid pixels are 1..2047, never nodata."""
    counts = refl
    for b in range(counts.shape[0]):
        counts[b] *= GAIN
        counts[b] += DARK[b]
        # Read noise plus shot noise that grows with the signal.
        counts[b] += rng.standard_normal(counts.shape[1:], dtype=np.float32) * np.sqrt(6.0 + 0.02 * counts[b])
    np.rint(counts, out=counts)
    np.clip(counts, 1, MAX_VALUE, out=counts)
    return counts.astype(np.uint16)


# --- output ----------------------------------------------------------------------------------


def write_labels(roofs: gpd.GeoDataFrame, path: Path) -> Path:
    """Write roof polygons as GeoJSON in EPSG:4326, atomically and byte-for-byte reproducibly."""
    # Full double precision: reprojecting back to UTM lands within nanometres of the original.
    # The layer name is given because it is written into the file and would otherwise be the
    # random temporary file name.
    with atomic_path(path) as tmp:
        roofs.to_crs(4326).to_file(tmp, driver="GeoJSON", engine="pyogrio", layer=path.stem)
    return path


def draw_quicklook(scene: Scene, path: Path, max_width: int = 1000) -> Path:
    """Natural-colour PNG of the scene, percentile stretched, with the roof outlines."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    size = scene.image.shape[2]
    step = math.ceil(size / max_width)
    rgb = scene.image[[RED, GREEN, BLUE], ::step, ::step].astype(np.float32)
    valid = rgb[0] != NODATA
    for band in rgb:
        lo, hi = np.percentile(band[valid], (1.0, 99.5)) if valid.any() else (0.0, 1.0)
        band[:] = np.clip((band - lo) / max(hi - lo, 1.0), 0, 1) ** 0.9
    rgb[:, ~valid] = 0
    left, top = scene.transform.c, scene.transform.f
    side = size * PIXEL_SIZE
    fig = Figure(figsize=(9.0, 9.6), dpi=110)
    ax = fig.add_axes((0.08, 0.09, 0.9, 0.84))
    ax.imshow(rgb.transpose(1, 2, 0), extent=(left, left + side, top - side, top), interpolation="nearest")
    colours = {"metal": "#ffe600", "concrete": "#00e5ff", "brick": "#ff3df5"}
    handles = []
    for roof_type, colour in colours.items():
        subset = scene.roofs[scene.roofs["roof_type"] == roof_type]
        if len(subset):
            subset.boundary.plot(ax=ax, color=colour, linewidth=0.5)
        handles.append(Line2D([], [], color=colour, linewidth=2, label=f"{roof_type} ({len(subset)})"))
    ax.legend(handles=handles, loc="lower right", framealpha=0.8, fontsize=9)
    ax.set_xlim(left, left + side)
    ax.set_ylim(top - side, top)
    ax.set_xlabel(f"easting (m, EPSG:{CRS_EPSG})")
    ax.set_ylabel("northing (m)")
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.set_title(
        f"Demo scene, seed {scene.seed}: {scene.tiles}x{scene.tiles} tiles of {scene.tile_size} px at {PIXEL_SIZE} m, "
        f"bands R,G,B\nmetal roofs {100 * scene.metal_share:.2f}% of valid pixels",
        fontsize=10,
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return path


def write_scene(scene: Scene, raw_dir: Path, labels_dir: Path, quicklook_path: Path) -> list[Path]:
    """Write the tiles, the labels and the quicklook; return their paths in that order."""
    paths = tile_paths(raw_dir, scene.tiles)
    cells = [(r, c) for r in range(scene.tiles) for c in range(scene.tiles)]
    for (row, col), path in cli.progress(zip(cells, paths, strict=True), total=len(paths), desc="tiles", unit="tile"):
        array, transform = scene.tile(row, col)
        write_raster(path, array, crs=scene.crs, transform=transform, nodata=NODATA, compression="zstd")
    labels = write_labels(scene.roofs, labels_dir / LABELS_NAME)
    quicklook = draw_quicklook(scene, quicklook_path)
    return [*paths, labels, quicklook]
