"""DataTree: the one place that knows where every folder and fixed file name of data/ lives.

No stage builds a data path from strings of its own; it asks the tree. Moving ``data_root``
in settings moves everything under it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.errors import InputMissingError, OutputExistsError
from core.settings import DEFAULT_SETTINGS_PATH, Settings

#: The repository root: relative ``data_root`` and ``results_folder`` are taken from here.
REPO_ROOT = DEFAULT_SETTINGS_PATH.parent

SPLITS = ("train", "val", "test")


#: The names Keras gives the ImageNet weights of the encoders (without their top) in its cache.
IMAGENET_FILES = {
    "mobilenetv2": "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
}


def keras_cache() -> Path:
    """Where keras.utils.get_file keeps downloads, as Keras 3 decides it: $KERAS_HOME/models, else ~/.keras/models
    (/tmp/.keras when the home folder, or that folder, is not writable)."""
    if "KERAS_HOME" in os.environ:
        home = Path(os.environ["KERAS_HOME"]).expanduser()
    else:
        home = (Path.home() if os.access(Path.home(), os.W_OK) else Path("/tmp")) / ".keras"
    if home.exists() and not os.access(home, os.W_OK):
        home = Path("/tmp/.keras")
    return home / "models"


def encoder_weights_file(weights: str | None) -> Path | None:
    """``model_args.encoder_weights`` as the file it names (relative to the repository root unless absolute, ``~``
    expanded); None for null (random weights) and ``imagenet`` (Keras's download)."""
    if weights is None or weights == "imagenet":
        return None
    path = Path(weights).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


@dataclass(frozen=True)
class DataTree:
    """Paths of the data tree, results and predictions for one settings object."""

    root: Path
    results_root: Path
    predictions_root: Path
    experiment: str
    folders: dict[str, str]
    extension: str = ".tif"

    @classmethod
    def from_settings(cls, settings: Settings, base: Path | None = None) -> DataTree:
        """Build the tree; relative paths in settings are taken from ``base`` (the repo root)."""
        base = REPO_ROOT if base is None else Path(base)
        return cls(
            root=(base / settings.data_root).resolve(),
            results_root=(base / settings.training_args.results_folder).resolve(),
            predictions_root=(base / settings.predict_args.output).resolve(),
            experiment=settings.experiment,
            folders=settings.path_args.model_dump(),
            extension=settings.extension_args.extension,
        )

    # --- data/ ---
    @property
    def raw(self) -> Path:
        """Imagery tiles as downloaded or generated."""
        return self.root / "raw"

    @property
    def labels(self) -> Path:
        """Polygon label files (Shapefile, GeoJSON, GeoPackage)."""
        return self.root / "labels"

    @property
    def quicklook(self) -> Path:
        """PNG preview of the raw scene with labels drawn on it."""
        return self.root / "quicklook.png"

    @property
    def mosaic_dir(self) -> Path:
        return self.root / "mosaic"

    @property
    def mosaic(self) -> Path:
        """The single raster built from raw/."""
        return self.mosaic_dir / "mosaic.tif"

    @property
    def chips(self) -> Path:
        return self.root / "chips"

    @property
    def masks(self) -> Path:
        return self.root / "masks"

    @property
    def chips_csv(self) -> Path:
        """The chip index shared by chip, mask and split."""
        return self.root / "chips.csv"

    @property
    def flat(self) -> Path:
        return self.root / "flat"

    @property
    def summary(self) -> Path:
        return self.root / "summary"

    def frames(self, split: str) -> Path:
        """Folder of image chips of a split (train, val, test), named by path_args."""
        return self.root / self.folders[f"{_check_split(split)}_frames"]

    def split_masks(self, split: str) -> Path:
        """Folder of masks of a split, named by path_args."""
        return self.root / self.folders[f"{_check_split(split)}_masks"]

    def chip_name(self, index: int) -> str:
        """File name of chip number ``index`` in chips/ and masks/."""
        return f"chip_{index:06d}{self.extension}"

    def split_name(self, split: str, index: int) -> str:
        """File name of a chip in a split folder, as the original pipeline named them."""
        return f"{_check_split(split)}_{index}{self.extension}"

    # --- results/ and predictions/ ---
    @property
    def results(self) -> Path:
        """results/EXPERIMENT/: bundle, history, curves, metrics, overlays."""
        return self.results_root / self.experiment

    @property
    def predictions(self) -> Path:
        """predictions/EXPERIMENT/: masks, probabilities, roofs.gpkg."""
        return self.predictions_root / self.experiment

    def model_dir(self, model: str) -> Path:
        """results/EXPERIMENT/MODEL/: one model's bundle, metrics, plots (model: unet, forest, regression)."""
        return self.results / model

    def bundle(self, model: str) -> Path:
        """The model bundle folder train writes and predict reads."""
        return self.model_dir(model) / "bundle"

    def prediction_dir(self, model: str) -> Path:
        """predictions/EXPERIMENT/MODEL/: one model's masks, probabilities and polygons."""
        return self.predictions / model

    def list_rasters(self, folder: Path) -> list[Path]:
        """GeoTIFFs in a folder, sorted by name (hidden temporary files excluded)."""
        return sorted(
            p for p in folder.iterdir() if p.suffix.lower() in (".tif", ".tiff") and not p.name.startswith(".")
        )

    def rasters_at(self, path: Path, *, empty: str, missing: str) -> list[Path]:
        """The GeoTIFFs of a folder, or the one file ``path``: a stage's --input. An InputMissingError says
        ``empty`` for a folder without GeoTIFFs, ``missing`` for a path that does not exist."""
        if path.is_dir():
            found = self.list_rasters(path)
            if not found:
                raise InputMissingError(empty)
            return found
        if not path.exists():
            raise InputMissingError(missing)
        return [path]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return split


def require(path: Path, what: str, fix: str) -> Path:
    """Return ``path`` if it exists, else raise an error saying what it is and how to make it."""
    if not path.exists():
        raise InputMissingError(f"{what} {path} not found: {fix}")
    if path.is_dir() and not any(path.iterdir()):
        raise InputMissingError(f"{what} {path} is empty: {fix}")
    return path


def refuse_overwrite(paths: list[Path], overwrite: bool, stage: str) -> None:
    """Refuse to redo finished outputs unless ``--overwrite`` was given."""
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise OutputExistsError(f"{stage} outputs already exist ({shown}): add --overwrite to redo them")
