"""Polygon labels: find, read, filter, repair, reproject, and index them.

Labels come as Shapefile, GeoJSON or GeoPackage in any CRS. Every failure names the file
and says what to do, because the classic silent failure of this kind of pipeline is a label
file in another CRS that overlaps nothing and yields all-empty masks.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import geopandas as gpd
import numpy as np
import shapely
from shapely import STRtree
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from core.errors import DataError, LabelError

if TYPE_CHECKING:
    from core.settings import MaskArgs

log = logging.getLogger(__name__)

#: File suffixes read as label files.
LABEL_SUFFIXES = (".shp", ".geojson", ".json", ".gpkg")


def find_label_file(labels_dir: Path, name: str | None = None) -> Path:
    """The label file to use: ``name`` inside ``labels_dir``, else the only one there."""
    if name is not None:
        path = Path(name) if Path(name).is_absolute() else labels_dir / name
        if not path.is_file():
            raise LabelError(f"label file {path} not found: check mask_args.label_file")
        return path
    if not labels_dir.is_dir():
        raise LabelError(f"labels folder {labels_dir} not found: put a Shapefile, GeoJSON or GeoPackage there")
    found = sorted(p for p in labels_dir.iterdir() if p.suffix.lower() in LABEL_SUFFIXES and not p.name.startswith("."))
    if not found:
        raise LabelError(
            f"no label file in {labels_dir}: put a Shapefile, GeoJSON or GeoPackage of roof polygons there"
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise LabelError(f"several label files in {labels_dir} ({names}): set mask_args.label_file to one of them")
    return found[0]


def read_labels(path: Path) -> gpd.GeoDataFrame:
    """Read a label file; refuse unreadable, empty or CRS-less files with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"label file {path} not found")
    if path.stat().st_size == 0:
        raise LabelError(f"label file {path} is empty (0 bytes): replace it with the real label file")
    try:
        gdf = gpd.read_file(path, engine="pyogrio")
    except Exception as exc:  # pyogrio raises several types for unreadable files
        raise LabelError(
            f"label file {path} cannot be read ({exc}): is it a valid Shapefile, GeoJSON or GeoPackage?"
        ) from exc
    if len(gdf) == 0:
        raise LabelError(f"label file {path} has no features: it should hold the roof polygons")
    if gdf.crs is None:
        raise LabelError(
            f"label file {path} has no CRS: for a Shapefile add its .prj; for GeoJSON use EPSG:4326 coordinates"
        )
    return gdf


def close_attribute(gdf: gpd.GeoDataFrame, name: str, cutoff: float = 0.6) -> tuple[str | None, list[str]]:
    """The attribute of ``gdf`` closest to ``name`` (difflib, at least ``cutoff`` alike; None when none is), and
    all its attributes (the columns but the geometry): for the message about an attribute it lacks."""
    names = [str(c) for c in gdf.columns if c != gdf.geometry.name]
    close = difflib.get_close_matches(name, names, n=1, cutoff=cutoff)
    return (close[0] if close else None), names


def filter_labels(
    gdf: gpd.GeoDataFrame, attribute: str, values: Sequence[str], source: Any = "labels"
) -> gpd.GeoDataFrame:
    """Keep features whose ``attribute`` is one of ``values``; all of them if there is no such attribute (a
    warning), unless an attribute of a close name suggests a typo (an error: every building would be a roof)."""
    if attribute not in gdf.columns:
        close, names = close_attribute(gdf, attribute, cutoff=0.8)
        if close:
            raise LabelError(
                f"{source} has no attribute {attribute!r}; did you mean {close!r}? Set mask_args.filter.attribute "
                f"to it (or mask_args.filter null to make every polygon a roof)"
            )
        log.warning(
            "%s has no attribute %r (it has %s): every polygon is a roof (mask_args.filter null says so without "
            "this warning)",
            source, attribute, ", ".join(names) or "none",
        )  # fmt: skip
        return gdf
    kept = gdf[gdf[attribute].astype(str).isin([str(v) for v in values])]
    if len(kept) == 0:
        present = sorted(str(v) for v in gdf[attribute].dropna().unique())
        raise LabelError(
            f"no polygon in {source} has {attribute} in {list(values)}; values present: {present}: "
            f"set mask_args.filter.values to the roof values"
        )
    return kept


def repair_geometries(gdf: gpd.GeoDataFrame, source: Any = "labels") -> gpd.GeoDataFrame:
    """Repair invalid polygons (make_valid), keep polygonal parts, drop empty or missing ones.

    A warning counts what was repaired or dropped; MultiPolygons and holes are kept as they are.
    """
    geoms = gdf.geometry.array
    missing = gdf.geometry.isna().to_numpy() | shapely.is_empty(geoms)
    invalid = ~missing & ~shapely.is_valid(geoms)
    fixed = np.array(geoms, dtype=object)
    if invalid.any():
        fixed[invalid] = [_polygonal(g) for g in shapely.make_valid(fixed[invalid])]
    nonpolygonal = ~missing & ~np.isin(shapely.get_type_id(fixed), (3, 6))  # Polygon, MultiPolygon
    if nonpolygonal.any():
        fixed[nonpolygonal] = [_polygonal(g) for g in fixed[nonpolygonal]]
    drop = missing | shapely.is_empty(fixed)
    said = [f"repaired {int(invalid.sum())} invalid geometries"] if invalid.any() else []
    said += [f"dropped {int(drop.sum())} empty or non-polygon ones"] if drop.any() else []
    if said:
        log.warning("%s: %s", source, ", ".join(said))
    out = gdf.copy()
    out = out.set_geometry(gpd.GeoSeries(fixed, index=gdf.index, crs=gdf.crs))
    return out[~drop]


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    """The polygon parts of a geometry (make_valid may return a GeometryCollection)."""
    parts = [p for p in shapely.get_parts(geom) if shapely.get_type_id(p) in (3, 6)]
    if not parts:
        return shapely.Polygon()
    return shapely.union_all(parts) if len(parts) > 1 else parts[0]


class LabelIndex:
    """A spatial index over polygons: find those touching a box without scanning them all."""

    def __init__(self, geometries: Sequence[BaseGeometry]) -> None:
        self.geometries = np.asarray(geometries, dtype=object)
        self.tree = STRtree(self.geometries)

    def __len__(self) -> int:
        return len(self.geometries)

    def query(self, bounds: tuple[float, float, float, float]) -> list[BaseGeometry]:
        """Polygons that intersect the box (left, bottom, right, top), in input order."""
        return list(self.geometries[self.positions(bounds)])

    def positions(self, bounds: tuple[float, float, float, float]) -> np.ndarray:
        """Where the polygons that intersect the box stand in the input, in input order."""
        return np.sort(self.tree.query(box(*bounds), predicate="intersects"))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """Bounds of all polygons together."""
        return tuple(shapely.total_bounds(self.geometries))  # type: ignore[return-value]


def load_roofs(labels_dir: Path, args: MaskArgs) -> tuple[gpd.GeoDataFrame, Path]:
    """Read, filter and repair the roof polygons; return (GeoDataFrame, label file)."""
    roofs, _, path = load_labels(labels_dir, args)
    return roofs, path


def load_labels(labels_dir: Path, args: MaskArgs) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame, Path]:
    """Read and repair the label polygons; return the roofs (mask_args.filter; with a class map those it
    maps, their class in the column ``class_id``), the polygons of unknown class (mask_args.ignore, and
    with a class map those it does not map) and the label file. An ignore filter that matches no
    polygon, or every one, is an error naming the values present; so is a class map naming values absent."""
    path = find_label_file(labels_dir, args.label_file)
    gdf = read_labels(path)
    unknown = np.zeros(len(gdf), bool)
    if args.ignore is not None:
        unknown = ignored_labels(gdf, args.ignore.attribute, args.ignore.values, source=path.name)
    if args.classes:
        ids = class_ids(gdf, args.class_source, args.classes, source=path.name)
        unknown |= ids == 0  # a value no class names is unknown, not background
        gdf = gdf.assign(class_id=ids)
    roofs = gdf[~unknown]
    if args.filter is not None and not args.classes:
        roofs = filter_labels(roofs, args.filter.attribute, args.filter.values, source=path.name)
    roofs = repair_geometries(roofs, source=path.name)
    if len(roofs) == 0:
        raise LabelError(f"label file {path} has no usable polygon after repair: check its geometries")
    others = repair_geometries(gdf[unknown], source=path.name) if unknown.any() else gdf.iloc[:0]
    return roofs, others, path


def class_ids(gdf: gpd.GeoDataFrame, attribute: str | None, classes: dict[str, list[str]], source: Any) -> np.ndarray:
    """Each polygon's class id (1, 2 ... in the order ``classes`` names them; 0: no class names its value).

    An attribute the file lacks, or a value no polygon has, is an error listing what is there.
    """
    if attribute is None:
        raise LabelError(
            "mask_args.class_attribute and mask_args.filter are both null: name the attribute the class map reads "
            f"(mask_args.class_attribute; {source} has {', '.join(c for c in gdf.columns if c != 'geometry')})"
        )
    if attribute not in gdf.columns:
        raise LabelError(
            f"mask_args.class_attribute {attribute!r} is not an attribute of {source} (it has "
            f"{', '.join(c for c in gdf.columns if c != 'geometry')}): name the one mask_args.classes reads"
        )
    column = gdf[attribute]
    text = column.astype(str).where(column.notna(), None)
    present = sorted(str(v) for v in column.dropna().unique())
    absent = {name: [v for v in values if v not in present] for name, values in classes.items()}
    absent = {name: values for name, values in absent.items() if values}
    if absent:
        named = "; ".join(f"{name}: {values}" for name, values in absent.items())
        raise LabelError(
            f"mask_args.classes names values no polygon of {source} has in {attribute} ({named}); values present: "
            f"{present[:20]}{' ...' if len(present) > 20 else ''}: fix the class map"
        )
    ids = np.zeros(len(gdf), np.uint8)
    for k, values in enumerate(classes.values(), start=1):
        ids[text.isin(values).to_numpy()] = k
    return ids


def ignored_labels(gdf: gpd.GeoDataFrame, attribute: str, values: Sequence[str | None], source: Any) -> np.ndarray:
    """Which polygons have ``attribute`` in ``values`` (None: no value); matching none or all is an error."""
    if attribute not in gdf.columns:
        raise LabelError(
            f"mask_args.ignore.attribute {attribute!r} is not an attribute of {source} (it has "
            f"{', '.join(c for c in gdf.columns if c != 'geometry')}): name one of them, or set mask_args.ignore null"
        )
    column = gdf[attribute]
    named = [str(v) for v in values if v is not None]
    hits = column.astype(str).isin(named).to_numpy() & column.notna().to_numpy()
    if None in values:
        hits |= column.isna().to_numpy() | (column.astype(str).str.strip() == "").to_numpy()
    present = sorted(str(v) for v in column.dropna().unique())
    if not hits.any():
        raise LabelError(
            f"mask_args.ignore matches none of the {len(gdf)} polygons of {source} ({attribute} in {list(values)}; "
            f"values present: {present[:12]}{', and missing' if column.isna().any() else ''}): fix its values, or set "
            "it null"
        )
    if hits.all():
        raise LabelError(
            f"mask_args.ignore matches all {len(gdf)} polygons of {source} ({attribute} in {list(values)}): nothing "
            "would be left to learn from; narrow its values, or set it null"
        )
    return hits


def ground_area(gdf: gpd.GeoDataFrame) -> np.ndarray:
    """True ground areas in m2, whatever the CRS: measured in the local UTM zone.

    The areas of a projected CRS are not ground areas in general (Web Mercator's grow with
    latitude: +27% at Gorakhpur), nor are a geographic CRS's degrees. A UTM zone's scale error
    is under 0.1% inside the zone.
    """
    if gdf.crs is None:
        log.warning("the polygons have no CRS: their areas are in square map units, not m2")
        return gdf.geometry.area.to_numpy()
    return gdf.to_crs(gdf.estimate_utm_crs()).geometry.area.to_numpy()


def pixel_m2(profile: dict[str, Any], shape: tuple[int, int]) -> float:
    """The mean ground area of a raster's pixel in m2 (its bounds measured in the local UTM zone); the square
    map units of a raster without a CRS."""
    import rasterio

    rows, cols = shape
    if profile.get("crs") is None:
        return abs(profile["transform"].a * profile["transform"].e)
    bounds = box(*rasterio.transform.array_bounds(rows, cols, profile["transform"]))
    return float(ground_area(gpd.GeoDataFrame(geometry=[bounds], crs=profile.get("crs")))[0]) / (rows * cols)


#: The most cells a roof grid may have (a grid_size meant in km, typed over a district, made billions).
MAX_GRID_CELLS = 1_000_000


def grid_layout(
    extents: Sequence[tuple[float, float, float, float]], crs: Any, size: float
) -> tuple[Any, tuple[float, float], int, list[int]]:
    """The cells of ``size`` metres over each of ``extents`` (rasters' bounds in ``crs``): the local UTM CRS (None
    without a CRS), the top left corner of the union in it, the union's columns, and the cells' numbers
    (row x columns + column, ascending). Cells lie only over the extents: two towns far apart get two patches of
    cells, not the country between them. Raises DataError over :data:`MAX_GRID_CELLS` cells, naming a size
    that fits (predict calls it before it predicts anything)."""
    frame = gpd.GeoDataFrame(geometry=[box(*b) for b in extents], crs=crs)
    metric = frame.estimate_utm_crs() if crs is not None else None
    if metric is not None:
        frame = frame.to_crs(metric)
    x0, _, x1, y1 = (float(v) for v in frame.total_bounds)
    cols = max(1, int(np.ceil((x1 - x0) / size)))
    boxes = [tuple(float(v) for v in g.bounds) for g in frame.geometry]

    def spans(side: float) -> list[tuple[int, int, int, int]]:  # rows r0..r1, columns c0..c1 of each extent
        out = []
        for bx0, by0, bx1, by1 in boxes:
            c0, r0 = int((bx0 - x0) // side), int((y1 - by1) // side)
            out.append((r0, max(r0 + 1, int(np.ceil((y1 - by0) / side))),
                        c0, max(c0 + 1, int(np.ceil((bx1 - x0) / side)))))  # fmt: skip
        return out

    def count(side: float) -> int:  # (overlapping extents counted twice: an upper bound, cheap)
        return sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in spans(side))

    if count(size) > MAX_GRID_CELLS:
        area = sum((bx1 - bx0) * (by1 - by0) for bx0, by0, bx1, by1 in boxes)
        fits = max(1, int(np.ceil(np.sqrt(area / MAX_GRID_CELLS))))
        while count(fits) > MAX_GRID_CELLS:
            fits += 1
        raise DataError(
            f"predict_args.grid_size {size:g} m makes {count(size):,} cells over the {area / 1e6:,.1f} km2 "
            f"predicted, more than {MAX_GRID_CELLS:,}: it is in metres; set it to {fits} or more"
        )
    cells = {r * cols + c for r0, r1, c0, c1 in spans(size) for r in range(r0, r1) for c in range(c0, c1)}
    return metric, (x0, y1), cols, sorted(cells)


def roof_grid(
    roofs: gpd.GeoDataFrame, extents: Sequence[tuple[float, float, float, float]], size: float
) -> gpd.GeoDataFrame:
    """Square cells of ``size`` metres over ``extents`` (rasters' bounds, in the roofs' CRS) with the number of
    roofs whose centroid lies in each and their ground area (``area_m2``); cells are laid out in the local UTM
    zone (:func:`grid_layout`), so they are ``size`` metres on the ground whatever the CRS, and returned in the
    roofs' CRS. ``cell`` numbers them row by row over the extents' union (``row``, ``col``)."""
    crs = roofs.crs
    metric, (x0, y1), cols, numbers = grid_layout(extents, crs, size)
    ids = np.asarray(numbers, dtype=np.int64)
    row, col = ids // cols, ids % cols
    cells = [box(x0 + c * size, y1 - (r + 1) * size, x0 + (c + 1) * size, y1 - r * size)
             for r, c in zip(row.tolist(), col.tolist(), strict=True)]  # fmt: skip
    grid = gpd.GeoDataFrame(
        {"cell": ids, "row": row, "col": col}, geometry=cells, crs=metric if metric is not None else crs
    )
    grid["roofs"] = 0
    grid["roof_area_m2"] = 0.0
    if len(roofs):
        centres = roofs.to_crs(grid.crs).geometry.centroid if metric is not None else roofs.geometry.centroid
        rows_n = int(row.max()) + 1
        c = np.clip(((centres.x - x0) // size).astype(int), 0, cols - 1).to_numpy()
        r = np.clip(((y1 - centres.y) // size).astype(int), 0, rows_n - 1).to_numpy()
        # The cell of each roof: roofs lie in the extents' cells (the clips only guard rounding at the edges).
        at = np.clip(np.searchsorted(ids, r * cols + c), 0, len(ids) - 1)
        grid["roofs"] = np.bincount(at, minlength=len(ids))
        grid["roof_area_m2"] = np.bincount(at, weights=roofs["area_m2"].to_numpy(), minlength=len(ids))
    return grid.to_crs(crs) if metric is not None else grid


def clip_to(gdf: gpd.GeoDataFrame, area: BaseGeometry) -> gpd.GeoDataFrame:
    """The polygons of ``gdf`` inside ``area``, cut at its edges (a roof across a chip edge is one in each)."""
    hits = gdf.iloc[gdf.sindex.query(area, predicate="intersects")] if len(gdf) else gdf
    clipped = hits.copy()
    clipped["geometry"] = shapely.intersection(hits.geometry.to_numpy(), area)
    return clipped[~clipped.geometry.is_empty & clipped.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]


def at_least_m2(gdf: gpd.GeoDataFrame, min_area: float) -> gpd.GeoDataFrame:
    """The polygons of at least ``min_area`` square metres of ground (:func:`ground_area`)."""
    return gdf[ground_area(gdf) >= min_area] if len(gdf) else gdf
