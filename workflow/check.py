"""The pre-flight check: read every input the next stages need and list, at once, what is wrong.

``python pipeline.py check`` runs it for the stages ahead; train.py and predict.py run it
before they start (:func:`preflight`). Each :class:`Finding` says what is wrong, which file or
setting, and how to fix it. A fatal finding stops the stage (exit 1); a warning does not.

What it reads, by stage (an input that does not exist yet is left to the stage itself, which
says what to run):

- mosaic, chip: the raw tiles and the mosaic (header and first and last blocks: enough to
  find a truncated file without reading a district's imagery);
- mask: the label file, against the imagery's CRS and bounds; the chips;
- split: chips and masks;
- flatten, summarize, train: the train and val chips and masks, every pixel;
- predict: the bundle and the rasters to predict;
- evaluate: the truth masks of ``evaluate_args.split``;
- every stage: free disk space against an estimate of what it writes.

A file reached twice through a hard link (split links chips) is read once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rasterio.errors import RasterioError
from rasterio.windows import Window

from core.bundle import BUNDLE_JSON, BundleError, read_info
from core.errors import CheckError, LabelError, PipelineError, RasterError
from core.files import human_size
from core.raster import open_raster, require_georeference, valid_pixels
from core.settings import Settings
from core.tree import IMAGENET_FILES, DataTree, encoder_weights_file, keras_cache
from workflow.stages import outside_bundle

log = logging.getLogger(__name__)

FATAL, WARNING = "fatal", "warning"

#: Rasters with more pixels than this are read partly (first and last blocks), not whole.
FULL_READ_PIXELS = 4096 * 4096

#: A file list in a message names this many files, then counts the rest.
SHOWN = 5

#: Rough bytes each stage writes beyond what is computed from its inputs.
_MiB = 1 << 20
FIXED_NEEDS = {"summarize": 20 * _MiB, "train": 200 * _MiB, "evaluate": 50 * _MiB}

#: Bytes per value of a flat table: a long CSV row per pixel and band, or a wide value.
FLAT_BYTES = {("long", "csv"): 64, ("wide", "csv"): 8, ("long", "parquet"): 12, ("wide", "parquet"): 3}


@dataclass(frozen=True)
class Finding:
    """One problem: ``level`` fatal or warning, and a message that says what to do."""

    level: str
    message: str

    @property
    def fatal(self) -> bool:
        return self.level == FATAL

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


@dataclass
class RasterInfo:
    """What the check learned from one raster."""

    path: Path
    bands: int
    dtype: str
    width: int
    height: int
    crs: str | None
    res: tuple[float, float]
    bounds: tuple[float, float, float, float]
    nodata: float | None
    full: bool
    nodata_share: float | None = None
    values: tuple[int, ...] = ()
    roof: int = 0
    unplaced: str = ""  # why it cannot be placed on the map (no CRS or geotransform), '' when it can


def _names(paths: Sequence[Path], folder: bool = False) -> str:
    """'a.tif, b.tif ... and 3 more' (with the folder of the first when asked)."""
    shown = ", ".join(p.name for p in paths[:SHOWN])
    more = f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else ""
    where = f" in {paths[0].parent}" if folder and paths else ""
    return f"{shown}{more}{where}"


def _stage_group(stage: str) -> set[str]:
    """The inputs a stage reads, as check groups."""
    if stage in ("download", "sample"):
        return set()
    if stage in ("mosaic", "chip"):
        return {"raw"}
    if stage == "mask":
        return {"labels", "chips"}
    if stage == "split":
        return {"chips", "masks"}
    if stage in ("flatten", "summarize") or stage.startswith("train"):
        return {"split"}
    if stage.startswith("predict"):
        return {"predict"}
    if stage.startswith("evaluate"):
        return {"evaluate"}
    raise ValueError(f"unknown stage {stage!r}")


class Checker:
    """Runs the checks of some stages and collects :class:`Finding` objects."""

    def __init__(self, settings: Settings, tree: DataTree) -> None:
        self.settings = settings
        self.tree = tree
        self.findings: list[Finding] = []
        self.read = 0
        self._cache: dict[tuple[int, int], RasterInfo | None] = {}
        self._topics: set[str] = set()

    def fatal(self, message: str) -> None:
        self._add(Finding(FATAL, message))

    def warn(self, message: str) -> None:
        self._add(Finding(WARNING, message))

    def _add(self, finding: Finding) -> None:
        if finding not in self.findings:  # two stages reading one folder find its problems once
            self.findings.append(finding)

    # --- reading -------------------------------------------------------------------------------

    def inspect(self, path: Path, kind: str = "image") -> RasterInfo | None:
        """Read a raster (whole when small, else its first and last blocks); None when unreadable.

        ``kind`` mask also records the mask's distinct values and roof (255) pixels.
        """
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (stat.st_dev, stat.st_ino)
        if key in self._cache:
            cached = self._cache[key]
            return None if cached is None else dataclasses.replace(cached, path=path)
        self.read += 1
        info = None
        try:
            info = self._read(path, kind)
        except RasterError as exc:
            advice = "" if "rerun" in str(exc) else ": delete it and rerun the stage that wrote it"
            self.fatal(f"{exc}{advice}")
        except (RasterioError, OSError, ValueError) as exc:  # a damaged block fails only when read
            self.fatal(
                f"{path} could not be read ({exc}): it may be truncated or corrupt; rerun the stage that wrote it"
            )
        self._cache[key] = info
        return info

    def _read(self, path: Path, kind: str) -> RasterInfo:
        with open_raster(path) as src:
            info = RasterInfo(
                path=path,
                bands=src.count,
                dtype=src.dtypes[0],
                width=src.width,
                height=src.height,
                crs=src.crs.to_string() if src.crs else None,
                res=(abs(src.res[0]), abs(src.res[1])),
                bounds=tuple(src.bounds),
                nodata=src.nodata,
                full=src.width * src.height <= FULL_READ_PIXELS,
            )
            try:
                require_georeference(src)
            except RasterError as exc:
                info.unplaced = str(exc)
            if not info.full:
                # The first and the last block: a truncated file fails on its last one.
                bh, bw = src.block_shapes[0]
                for row, col in ((0, 0), (src.height - 1, src.width - 1)):
                    r0, c0 = row // bh * bh, col // bw * bw
                    src.read(window=Window(c0, r0, min(bw, src.width - c0), min(bh, src.height - r0)))
                return info
            if kind == "mask":
                band = src.read(1)
                info.values = tuple(int(v) for v in np.unique(band)[:10])
                info.roof = int(np.count_nonzero(band == 255))
            else:
                data = src.read()
                info.nodata_share = 1.0 - float(valid_pixels(data, src.nodata).mean())
        return info

    def rasters(self, folder: Path, kind: str = "image") -> list[RasterInfo]:
        """Every readable raster of a folder (none when the folder does not exist)."""
        if not folder.is_dir():
            return []
        infos = [self.inspect(p, kind) for p in self.tree.list_rasters(folder)]
        return [i for i in infos if i is not None]

    # --- checks ----------------------------------------------------------------------------------

    def bands(self, infos: list[RasterInfo], what: str) -> None:
        """Band counts and dtypes: one kind across rasters, and the count settings expect."""
        if not infos:
            return
        kinds = Counter((i.bands, i.dtype) for i in infos)
        (bands, dtype), _ = kinds.most_common(1)[0]
        odd = [i.path for i in infos if (i.bands, i.dtype) != (bands, dtype)]
        if odd:
            first = next(i for i in infos if i.path == odd[0])
            rest = len(infos) - len(odd)
            self.fatal(
                f"{_names(odd, folder=True)} ha{'s' if len(odd) == 1 else 've'} {first.bands} bands of {first.dtype}; "
                f"the other {rest} raster{'s' * (rest != 1)} there {'have' if rest != 1 else 'has'} {bands} bands of "
                f"{dtype}: every raster must have the same bands; remove the odd ones or rerun the stage that wrote them"
            )
        channels = self.settings.bands
        if channels is not None and bands != channels and not self._said("channels"):
            self.fatal(
                f"{what}: {bands} bands ({infos[0].path.name}) but the settings say {channels} "
                f"(load_dataset_args.channels {json.dumps(self.settings.load_dataset_args.channels)}, "
                "model_args.input_shape "
                f"{list(self.settings.model_args.input_shape)}): set load_dataset_args.channels={bands}, or null "
                "with a two-number input_shape to take the chips' count"
            )

    def _said(self, topic: str) -> bool:
        """Whether a finding on ``topic`` was made already (one is enough); marks it made."""
        said = topic in self._topics
        self._topics.add(topic)
        return said

    def nodata(self, infos: list[RasterInfo], what: str) -> None:
        """Chips that are mostly nodata."""
        shares = [(i.nodata_share, i.path) for i in infos if i.nodata_share is not None]
        if not shares:
            return
        limit = self.settings.chip_args.max_nodata
        empty = [p for s, p in shares if s >= 0.999]
        if len(empty) == len(shares):
            self.fatal(
                f"{what}: every chip is nodata ({_names(empty, folder=True)}): check the imagery's nodata value "
                "(rio info) and rerun chip"
            )
            return
        mostly = sorted(((s, p) for s, p in shares if s > limit), reverse=True)
        if mostly:
            self.warn(
                f"{what}: {len(mostly)} of {len(shares)} chips are more than {limit:.0%} nodata "
                f"({', '.join(f'{p.name} {s:.0%}' for s, p in mostly[:SHOWN])}): they teach little; "
                "rerun chip, which skips chips over chip_args.max_nodata, once the source rasters declare their "
                "nodata value (rio edit-info --nodata 0 FILE)"
            )

    def pairs(
        self, frames_dir: Path, masks_dir: Path | None, what: str, *, need_roof: bool, shape_key: str,
        made_ahead: bool = False,
    ) -> None:  # fmt: skip
        """Chips and their masks: readable, one band kind, masks 0/255 (128 unknown) of their chip's size, one
        band count.

        ``masks_dir`` None checks the chips alone; ``need_roof`` makes masks without a roof fatal;
        ``made_ahead``: mask is among the stages to run and will make its masks (anew: masks of another size
        after chips were cut again are no problem; or the missing ones): the masks on disk now are not what the
        later stages read, so the chips alone are checked.
        """
        frames = self.rasters(frames_dir)
        self.bands(frames, what)
        self.nodata(frames, what)
        self.chip_size(frames, what, shape_key)
        if masks_dir is None or not masks_dir.is_dir() or made_ahead:
            return
        missing, values, size, multi = [], [], [], []
        roof = 0
        masks = []
        for frame in frames:
            path = masks_dir / frame.path.name
            if not path.is_file():
                missing.append(path)
                continue
            mask = self.inspect(path, "mask")
            if mask is None:
                continue
            masks.append(mask)
            roof += mask.roof
            multi.append((path, mask.bands))
            if (mask.width, mask.height) != (frame.width, frame.height):
                size.append((path, mask, frame))
            if mask.full and not set(mask.values) <= {0, 128, 255}:
                values.append((path, mask.values))
        if missing:
            self.fatal(
                f"{what}: {len(missing)} chips have no mask ({_names(missing, folder=True)}): rerun mask and split"
            )
        counts = sorted({bands for _, bands in multi})
        if len(counts) > 1:
            odd = [p for p, bands in multi if bands != multi[0][1]]
            self.fatal(
                f"{what}: the masks have {' or '.join(map(str, counts))} bands (e.g. {_names(odd, folder=True)} "
                f"against {multi[0][0].name}): they come from different runs of mask; rerun mask and split"
            )
        if size:
            path, mask, frame = size[0]
            self.fatal(
                f"{what}: {len(size)} masks differ in size from their chip (e.g. {path} is {mask.width}x{mask.height}, "
                f"its chip {frame.width}x{frame.height}): rerun mask (and split) so masks match the chips"
            )
        if values:
            shown = "; ".join(f"{p.name}: {', '.join(map(str, v))}" for p, v in values[:SHOWN])
            self.fatal(
                f"{what}: {len(values)} masks in {values[0][0].parent} hold values other than 0, 255 (and 128, unknown) "
                f"({shown}): "
                "masks must be uint8 0/255 (a 0/1 mask is read as no roof); rerun python mask/mask.py"
            )
        if masks and roof == 0 and not values:
            if need_roof:
                self.fatal(
                    f"{what}: the masks in {masks_dir} hold no roof pixel, so there is nothing to learn: check "
                    "mask_args.filter and the label file, or change split_args (seed, strategy, keep_empty) and "
                    "rerun split"
                )
            else:
                self.warn(
                    f"{what}: the masks in {masks_dir} hold no roof pixel, so its metrics and the tuned threshold mean "
                    "little: change split_args.seed or use split_args.strategy stratified"
                )

    def chip_size(self, frames: list[RasterInfo], what: str, key: str) -> None:
        """Chip size on disk against chip_args.size (key chip) or model_args.input_shape (key model)."""
        if not frames:
            return
        sizes = Counter((i.height, i.width) for i in frames)
        (rows, cols), _ = sizes.most_common(1)[0]
        if key == "chip":
            size = self.settings.chip_args.size
            if (rows, cols) != (size, size):
                self.warn(
                    f"{what}: chips are {cols}x{rows} pixels but chip_args.size is {size}: set chip_args.size={cols}, "
                    "or rerun chip --overwrite to cut them again"
                )
        else:
            shape = list(self.settings.model_args.input_shape)
            if (rows, cols) != tuple(shape[:2]) and not self._said("input_shape"):
                self.warn(
                    f"{what}: chips are {cols}x{rows} pixels but model_args.input_shape is {shape}: the network "
                    f"takes any size, but set model_args.input_shape="
                    f"[{','.join(str(n) for n in (rows, cols, *shape[2:]))}] so settings describe the data"
                )

    def raw(self) -> None:
        """Raw tiles (and the mosaic): readable, of one kind, on one grid unless reprojecting."""
        folder = self.tree.root / self.settings.mosaic_args.input
        tiles = self.rasters(folder)
        self.bands(tiles, f"raw tiles in {folder}")
        unplaced = [i for i in tiles if i.unplaced]
        if unplaced:  # (mosaic and chip refuse them so: their grid is no grid to warp from)
            more = f" (and {len(unplaced) - 1} more raw tiles)" if len(unplaced) > 1 else ""
            self.fatal(f"{unplaced[0].unplaced}{more}")
            tiles = [i for i in tiles if not i.unplaced]
        grids = Counter((i.crs, i.res) for i in tiles)
        if len(grids) > 1 and not self.settings.mosaic_args.reproject:
            (crs, res), _ = grids.most_common(1)[0]
            odd = [i.path for i in tiles if (i.crs, i.res) != (crs, res)]
            self.fatal(
                f"raw tiles {_names(odd, folder=True)} have another CRS or resolution than the rest ({crs}, "
                f"{res[0]:g} m): set mosaic_args.reproject=true to warp them onto one grid"
            )
        mosaic = self.inspect(self.tree.mosaic) if self.tree.mosaic.is_file() else None
        if mosaic is not None:
            self.bands([mosaic], "the mosaic")
            size = self.settings.chip_args.size
            if size > max(mosaic.width, mosaic.height):
                self.warn(
                    f"chip_args.size ({size}) is larger than the mosaic ({mosaic.width}x{mosaic.height}): every chip "
                    "is mostly padding; lower chip_args.size"
                )

    def imagery_extent(self) -> tuple[str, tuple[float, float, float, float]] | None:
        """CRS and bounds of the imagery the labels must cover: the chip index, the mosaic, or the raw tiles."""
        from core.index import read_index  # pandas: only when labels are checked

        if self.tree.chips_csv.is_file():
            try:
                index = read_index(self.tree.chips_csv)
            except PipelineError:
                index = None
            if index is not None:
                crs = str(index["crs"].iloc[0])
                part = index[index["crs"] == crs]
                return crs, (part["left"].min(), part["bottom"].min(), part["right"].max(), part["top"].max())
        folder = self.tree.root / self.settings.mosaic_args.input
        sources = [self.tree.mosaic] if self.tree.mosaic.is_file() else _files(self.tree, folder)
        crs, boxes = None, []
        for path in sources:
            try:
                with open_raster(path) as src:
                    if src.crs is None or (crs is not None and src.crs.to_string() != crs):
                        continue
                    crs = src.crs.to_string()
                    boxes.append(tuple(src.bounds))
            except RasterError:
                continue  # named by the raw group's own check
        if not boxes:
            return None
        b = np.array(boxes)
        return crs, (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())

    def labels(self) -> None:
        """The label file: readable, with roof polygons (by mask_args.filter, or the class map's values, which
        must all be there), overlapping the imagery."""
        from core.vector import load_labels  # geopandas: only when labels are read

        args = self.settings.mask_args
        if not self.tree.labels.is_dir() and args.label_file is None:
            return
        try:  # the roofs as mask reads them: its filter, or its class map, and its ignore filter
            gdf, _, path = load_labels(self.tree.labels, args)
        except LabelError as exc:
            self.fatal(str(exc))
            return
        extent = self.imagery_extent()
        if extent is None:
            return
        crs, bounds = extent
        try:
            projected = gdf.to_crs(crs)
        except Exception as exc:
            self.fatal(
                f"labels {path.name} ({gdf.crs.to_string()}) cannot be reprojected to the imagery's {crs} ({exc})"
            )
            return
        from shapely.geometry import box

        inside = projected.geometry.intersects(box(*bounds))
        if not inside.any():
            lb = ", ".join(f"{v:.6g}" for v in gdf.total_bounds)
            ib = ", ".join(f"{v:.6g}" for v in bounds)
            self.fatal(
                f"no polygon of labels {path.name} ({gdf.crs.to_string()}, bounds {lb}) overlaps the imagery "
                f"({crs}, bounds {ib}): check the label file's CRS (a .prj, or EPSG:4326 for GeoJSON) and that it "
                "covers this imagery"
            )

    def predict(self, bundle: Path | None, inputs: Sequence[Path] | None) -> list[RasterInfo]:
        """The bundle and the rasters to predict: readable, with the bundle's bands and dtype."""
        if bundle is None:
            bundle = outside_bundle(self.settings) or self.tree.bundle(self.settings.training_args.model)
        info = None
        if (bundle / BUNDLE_JSON).is_file():
            try:
                info = read_info(bundle)
            except BundleError as exc:
                self.fatal(str(exc))
        elif not Path(bundle).resolve().is_relative_to(self.tree.results.resolve()):
            # Not this experiment's (which train makes): a bundle named elsewhere that is not there.
            what = "not found" if not Path(bundle).exists() else f"not a model bundle (no {BUNDLE_JSON})"
            self.fatal(
                f"the bundle {bundle} (predict_args.bundle or --bundle) is {what}: name a bundle folder train wrote "
                "(results/EXPERIMENT/MODEL/bundle), or set predict_args.bundle null to predict with this "
                "experiment's"
            )
        if inputs is None:
            path = Path(self.settings.predict_args.input)
            path = path if path.is_absolute() else self.tree.root / path
            inputs = self.tree.list_rasters(path) if path.is_dir() else [path] if path.is_file() else []
        rasters = [r for r in (self.inspect(Path(p)) for p in inputs) if r is not None]
        if info is None:
            self.bands(rasters, "rasters to predict")
            return rasters
        odd = [r.path for r in rasters if (r.bands, r.dtype) != (info.bands, info.dtype)]
        if odd:
            first = next(r for r in rasters if r.path == odd[0])
            self.fatal(
                f"rasters to predict {_names(odd, folder=True)} have {first.bands} bands of {first.dtype} but the "
                f"bundle {bundle} was trained on {info.bands} bands of {info.dtype}: predict imagery like the "
                "training chips, or train on this imagery"
            )
        return rasters

    def encoder_weights(self) -> None:
        """The weights file model_args.encoder_weights names is there and HDF5; imagenet's, in Keras's cache (a
        warning: train downloads it); the percentile normalization pretrained weights expect."""
        m = self.settings.model_args
        if m.encoder_weights is None:
            return
        if self.settings.load_dataset_args.normalization != "percentile":
            self.warn(
                f"model_args.encoder_weights are pretrained on inputs in 0..1, but load_dataset_args.normalization "
                f"{self.settings.load_dataset_args.normalization} gives the encoder other values: set it percentile"
            )
        path = encoder_weights_file(m.encoder_weights)
        if path is None:
            cached = keras_cache() / IMAGENET_FILES[m.architecture]
            if not cached.is_file():
                self.warn(
                    f"model_args.encoder_weights imagenet: {cached} is not there yet: train downloads it (offline, copy "
                    "it there from a machine that can download it)"
                )
            return
        if not path.is_file():
            self.fatal(
                f"model_args.encoder_weights names {path}, which is not a file: give the path of the encoder's weights "
                "without its top, 'imagenet' to download them, or null to start from random weights"
            )
        elif not _is_hdf5(path):
            self.fatal(
                f"model_args.encoder_weights names {path}, which is not a Keras weights file (HDF5): give the path of "
                "the encoder's weights without its top, 'imagenet' to download them, or null to start from random weights"
            )

    def evaluate(self) -> None:
        """The truth of evaluate_args.split exists."""
        split = self.settings.evaluate_args.split
        if split == "test" and not self.tree.split_masks("test").is_dir() and self.tree.frames("train").is_dir():
            self.fatal(
                "evaluate_args.split is test but there is no test split: set split_args.fractions.test above 0 and "
                "rerun split --overwrite, or set evaluate_args.split=val"
            )
            return
        self.pairs(
            self.tree.frames(split), self.tree.split_masks(split), f"{split} split", need_roof=False, shape_key="model"
        )

    # --- disk space ------------------------------------------------------------------------------

    def space(self, stages: Iterable[str], predict: list[RasterInfo]) -> None:
        """Free space against a rough estimate of what each stage writes, per file system."""
        needs: dict[Path, int] = {}
        for stage in stages:
            where, size = self._need(stage, predict)
            if size:
                needs[where] = needs.get(where, 0) + size
        by_device: dict[int, tuple[Path, int]] = {}
        for where, size in needs.items():
            anchor = _existing(where)
            dev = anchor.stat().st_dev
            path, total = by_device.get(dev, (anchor, 0))
            by_device[dev] = (path, total + size)
        for anchor, need in by_device.values():
            free = shutil.disk_usage(anchor).free
            if free < need:
                self.fatal(
                    f"too little disk space: {human_size(free)} free on {anchor}, the next stages need about {human_size(need)}: "
                    "free some space, or move data_root, training_args.results_folder or predict_args.output"
                )
            elif free < 2 * need:
                self.warn(
                    f"disk space is short: {human_size(free)} free on {anchor}, the next stages write about {human_size(need)}"
                )

    def _need(self, stage: str, predict: list[RasterInfo]) -> tuple[Path, int]:
        tree, s = self.tree, self.settings
        if stage.startswith("train"):  # a seed ensemble writes a training's files once per member, and its own
            members = s.training_args.members if stage == "train-unet" and s.training_args.members > 1 else 0
            return tree.results, FIXED_NEEDS["train"] * (1 + members)
        if stage.startswith("evaluate"):
            return tree.results, FIXED_NEEDS["evaluate"]
        if stage.startswith("predict"):
            per_pixel = 1 + (4 if s.predict_args.save_probabilities else 0)
            return tree.predictions, sum(r.width * r.height * per_pixel for r in predict)
        if stage == "summarize":
            return tree.summary, FIXED_NEEDS["summarize"]
        if stage in ("mosaic", "chip"):
            tiles = self.tree.root / s.mosaic_args.input
            size = sum(p.stat().st_size for p in tree.list_rasters(tiles)) if tiles.is_dir() else 0
            if stage == "chip" and s.chip_args.stride:
                size = int(size * max(1.0, (s.chip_args.size / s.chip_args.stride) ** 2))
            return tree.root, size
        if stage == "mask":
            return tree.masks, sum(p.stat().st_size for p in _files(tree, tree.chips)) // 8
        if stage == "flatten":
            frames = [self.inspect(p) for p in _files(tree, tree.root / s.flatten_args.frames)]
            pixels = sum(f.width * f.height for f in frames if f is not None)
            bands = max((f.bands for f in frames if f is not None), default=0)
            rate = FLAT_BYTES[(s.flatten_args.layout, s.flatten_args.format)]
            per_pixel = rate * bands + (40 if s.flatten_args.layout == "wide" else 0)
            return tree.flat, int(pixels * per_pixel * s.flatten_args.sample_fraction)
        return tree.root, 0


def _is_hdf5(path: Path) -> bool:
    import h5py  # (Keras's dependency) only when an encoder weights file is named

    return bool(h5py.is_hdf5(path))


def _files(tree: DataTree, folder: Path) -> list[Path]:
    return tree.list_rasters(folder) if folder.is_dir() else []


def _existing(path: Path) -> Path:
    """The path itself or its nearest existing parent."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def run_checks(
    settings: Settings,
    tree: DataTree,
    stages: Iterable[str],
    *,
    bundle: Path | None = None,
    inputs: Sequence[Path] | None = None,
    space_for: Iterable[str] | None = None,
    continuing: bool = False,
) -> tuple[list[Finding], int]:
    """Check the inputs of ``stages``; return the findings and how many rasters were read.

    Args:
        stages: stage names (pipeline.py's or the scripts': train-unet and train both work).
        bundle, inputs: predict's bundle folder and rasters (default: from settings).
        space_for: the stages that will run and write their outputs, which need disk space (default: ``stages``).
        continuing: train continues from a bundle (``--from-bundle``, ``training_args.pretrained``): no encoder
            weights are read.
    """
    stages = list(stages)
    groups = set().union(*(_stage_group(s) for s in stages)) if stages else set()
    check = Checker(settings, tree)
    predict: list[RasterInfo] = []
    if "raw" in groups:
        check.raw()
    if "labels" in groups:
        check.labels()
    if "chips" in groups:
        masks = tree.masks if "masks" in groups else None
        # Mask among the stages that will run makes the masks: those on disk now are not what later stages read.
        made_ahead = "mask" in (stages if space_for is None else space_for)
        check.pairs(tree.chips, masks, "chips/", need_roof=False, shape_key="chip", made_ahead=made_ahead)
    if "split" in groups:
        check.pairs(tree.frames("train"), tree.split_masks("train"), "train split", need_roof=True, shape_key="model")
        check.pairs(tree.frames("val"), tree.split_masks("val"), "val split", need_roof=False, shape_key="model")
    unet = any(s == "train-unet" or (s == "train" and settings.training_args.model == "unet") for s in stages)
    if unet and not continuing and not settings.training_args.pretrained:  # continuing reads no encoder weights
        check.encoder_weights()
    if "predict" in groups:
        predict = check.predict(bundle, inputs)
    if "evaluate" in groups:
        check.evaluate()
    check.space(stages if space_for is None else space_for, predict)
    return check.findings, check.read


def preflight(
    settings: Settings,
    tree: DataTree,
    stage: str,
    *,
    bundle: Path | None = None,
    inputs: Sequence[Path] | None = None,
    continuing: bool = False,
) -> list[Finding]:
    """The check a stage runs before it starts: warnings are logged, fatal findings raise :class:`CheckError`."""
    findings, read = run_checks(settings, tree, [stage], bundle=bundle, inputs=inputs, continuing=continuing)
    for f in findings:
        if not f.fatal:
            log.warning("pre-flight check: %s", f.message)
    fatal = [f.message for f in findings if f.fatal]
    if len(fatal) == 1:
        raise CheckError(f"pre-flight check: {fatal[0]}")
    if fatal:
        listed = " ".join(f"({i}) {m}" for i, m in enumerate(fatal, 1))
        raise CheckError(f"pre-flight check found {len(fatal)} problems: {listed}")
    log.debug("pre-flight check: %d rasters read, no problem", read)
    return findings
