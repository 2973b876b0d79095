"""One declaration per stage: what it reads, what it writes, which settings shape its outputs.

The stage scripts, ``pipeline.py`` and the pre-flight check all read these (through
:mod:`workflow.contract`), so "done", "outdated" and "resumable" are defined once. download and
sample are not here: they fill ``raw/`` and ``labels/``, which the stages after them read as
outside files (identified by size and time, labels by content).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.settings import PredictArgs, Settings
from core.tree import SPLITS, DataTree, encoder_weights_file
from workflow.spec import Dep, Inputs, Output, StageSpec

#: Models the per-model stages run for, in pipeline order.
MODELS = ("forest", "regression", "unet")


def _index_has(column: str):
    """A stage that adds a column to chips.csv is complete only while the column is there."""

    def complete(settings: Settings, tree: DataTree, model: str | None) -> bool:
        try:
            with tree.chips_csv.open(encoding="utf-8") as f:
                return column in f.readline().strip().split(",")
        except OSError:
            return False

    return complete


def _data_record(name: str):
    return lambda settings, tree, model: tree.root / f"{name}.record.json"


def _rasters(path: Path, tree: DataTree) -> tuple[Path, ...]:
    if path.is_dir():
        return tuple(tree.list_rasters(path))
    return (path,) if path.exists() else ()


def _given_or(given: dict[str, Any], key: str, default: Path) -> tuple[Path, bool]:
    return (Path(given[key]), True) if given.get(key) else (default, False)


# --- inputs of each stage ---------------------------------------------------------------------------


def _mosaic_inputs(settings: Settings, tree: DataTree, model: str | None, given: dict[str, Any]) -> Inputs:
    folder, _ = _given_or(given, "input", tree.root / settings.mosaic_args.input)
    return Inputs(files=_rasters(folder, tree))


def _chip_inputs(settings: Settings, tree: DataTree, model: str | None, given: dict[str, Any]) -> Inputs:
    if given.get("input"):
        return Inputs(files=_rasters(Path(given["input"]), tree))
    if settings.chip_args.source == "raw":
        return Inputs(files=_rasters(tree.raw, tree))
    return Inputs(deps=(Dep("mosaic"),))


def _mask_inputs(settings: Settings, tree: DataTree, model: str | None, given: dict[str, Any]) -> Inputs:
    from core.vector import find_label_file  # geopandas: only when mask's inputs are asked for

    return Inputs(
        deps=(Dep("chip"),), files=(find_label_file(tree.labels, settings.mask_args.label_file),), hashed=True
    )


def _split_inputs(settings: Settings, tree: DataTree, model: str | None, given: dict[str, Any]) -> Inputs:
    return Inputs(deps=(Dep("chip"), Dep("mask")))


def _flatten_inputs(settings: Settings, tree: DataTree, model: str | None, given: dict[str, Any]) -> Inputs:
    return Inputs(deps=(Dep("split"),))


def _summarize_inputs(settings: Settings, tree: DataTree, model: str | None, given: dict[str, Any]) -> Inputs:
    if given.get("input"):
        return Inputs(files=_rasters(Path(given["input"]), tree))
    return Inputs(deps=(Dep("flatten") if settings.summarize_args.source == "flat" else Dep("split"),))


def _train_inputs(settings: Settings, tree: DataTree, model: str | None, given: dict[str, Any]) -> Inputs:
    deps = [Dep("split")]
    if model != "unet" and settings.ml_args.source == "flat":
        deps.append(Dep("flatten"))
    files: tuple[Path, ...] = ()
    if given.get("bundle"):
        files = (Path(given["bundle"]) / "bundle.json",)
    encoder = encoder_weights_file(settings.model_args.encoder_weights)
    if (model or settings.training_args.model) == "unet" and encoder is not None and not given.get("bundle"):
        files += (encoder,)  # its content: new weights under the same name make the bundle outdated
    return Inputs(deps=tuple(deps), files=files, hashed=True)


def split_of_folder(path: Path, tree: DataTree) -> str | None:
    """The split whose chips folder ``path`` is, else None."""
    resolved = Path(path).resolve()
    return next((s for s in SPLITS if tree.frames(s).resolve() == resolved), None)


def predict_source(args: PredictArgs, tree: DataTree, given: dict[str, Any]) -> Path:
    """The raster or folder predict reads: --input, else predict_args.input under data_root."""
    if given.get("input"):
        return Path(given["input"])
    path = Path(args.input)
    return path if path.is_absolute() else tree.root / path


def outside_bundle(settings: Settings, given: dict[str, Any] | None = None) -> Path | None:
    """The bundle --bundle (in ``given``) or else predict_args.bundle names; None when neither does."""
    named = (given or {}).get("bundle") or settings.predict_args.bundle
    return Path(named) if named else None


def outside_kind(settings: Settings, given: dict[str, Any] | None = None) -> str | None:
    """The kind (unet, forest, regression) of the :func:`outside_bundle`: predict files its predictions under it,
    and evaluate scores them there. None without one, or while it cannot be read (a bundle missing or damaged is
    predict's own news)."""
    from core.bundle import read_info
    from core.errors import PipelineError

    outside = outside_bundle(settings, given)
    if outside is None:
        return None
    try:
        return read_info(outside).kind
    except PipelineError:
        return None


def predict_bundle(settings: Settings, tree: DataTree, model: str, given: dict[str, Any]) -> tuple[Path, bool]:
    """The bundle predict uses and whether it is another than this experiment's trained one."""
    outside = outside_bundle(settings, given)
    return (outside, True) if outside is not None else (tree.bundle(model), False)


def _predict_inputs(settings: Settings, tree: DataTree, model: str | None, given: dict[str, Any]) -> Inputs:
    bundle, outside = predict_bundle(settings, tree, model or settings.training_args.model, given)
    deps: list[Dep] = [] if outside else [Dep("train", artifact=True)]
    files: list[Path] = [bundle / "bundle.json"] if outside else []
    source = predict_source(settings.predict_args, tree, given)
    if split_of_folder(source, tree) is not None:
        deps.append(Dep("split"))
    else:
        files += _rasters(source, tree)
    return Inputs(deps=tuple(deps), files=tuple(files))


def _predict_info(settings: Settings, tree: DataTree, model: str | None, given: dict[str, Any]) -> Any:
    """The bundle.json of the bundle predict would use now (core.bundle.BundleInfo); None while there is no
    readable one (a bundle gone or damaged is the stage's own news)."""
    from core.bundle import read_info
    from core.errors import PipelineError

    bundle, _ = predict_bundle(settings, tree, model or settings.training_args.model, given)
    try:
        return read_info(bundle)
    except PipelineError:
        return None


def _predict_unread(settings: Settings, tree: DataTree, model: str | None, given: dict[str, Any]) -> tuple[str, ...]:
    """The predict_args the bundle predict would use now does not read (core.bundle.unread_predict_args);
    none while there is no readable bundle."""
    from core.bundle import unread_predict_args

    info = _predict_info(settings, tree, model, given)
    return () if info is None else tuple(f"predict_args.{k}" for k in unread_predict_args(info, settings.predict_args))


def predict_skipped(settings: Settings, tree: DataTree, model: str | None, given: dict[str, Any]) -> list[str]:
    """What to say when predict is skipped as up to date: the settings set that its bundle does not read (left
    out of the contract, so they are why nothing is redone; core.bundle.unread_warnings)."""
    from core.bundle import unread_warnings

    info = _predict_info(settings, tree, model, given)
    return [] if info is None else unread_warnings(info, settings.predict_args)


def _evaluate_inputs(settings: Settings, tree: DataTree, model: str | None, given: dict[str, Any]) -> Inputs:
    return Inputs(deps=(Dep("predict"), Dep("split")))


# --- the settings of the per-model stages -------------------------------------------------------------


def _train_settings(model: str) -> tuple[str, ...]:
    if model == "unet":
        return ("load_dataset_args", "model_args", "training_args", "output_args", "checkpoint_args")
    # A forest does not depend on the regression's settings, nor the other way round.
    keys = [f"ml_args.{k}" for k in ("texture_windows", "indices", "source", "max_train_pixels", "seed", model)]
    return (*keys, "load_dataset_args.normalization")


def _evaluation_dir(tree: DataTree, model: str, settings: Settings) -> Path:
    return tree.model_dir(model) / "evaluation" / settings.evaluate_args.split


STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        name="mosaic",
        command="python mosaic/mosaic.py",
        what="mosaic/mosaic.tif",
        plural=False,
        settings=("mosaic_args",),
        inputs=_mosaic_inputs,
        outputs=lambda s, t, m: [Output(t.mosaic)],
        record=_data_record("mosaic"),
    ),
    StageSpec(
        name="chip",
        command="python chip/chip.py",
        what="chips/",
        settings=("chip_args", "extension_args"),
        inputs=_chip_inputs,
        outputs=lambda s, t, m: [Output(t.chips, f"chip_*{t.extension}"), Output(t.chips_csv)],
        record=_data_record("chip"),
        complete=_index_has("nodata_share"),
    ),
    StageSpec(
        name="mask",
        command="python mask/mask.py",
        what="masks/",
        settings=("mask_args", "chip_args.compression"),
        inputs=_mask_inputs,
        outputs=lambda s, t, m: [Output(t.masks, f"chip_*{t.extension}")],
        record=_data_record("mask"),
        complete=_index_has("roof_share"),
    ),
    StageSpec(
        name="split",
        command="python split/split.py",
        what="the split folders (train_frames/, val_frames/ ...)",
        settings=("split_args", "path_args", "extension_args"),
        inputs=_split_inputs,
        outputs=lambda s, t, m: [
            Output(folder, f"{split}_*{t.extension}")
            for split in ("train", "val", "test")
            for folder in (t.frames(split), t.split_masks(split))
        ],
        record=_data_record("split"),
        complete=_index_has("split"),
    ),
    StageSpec(
        name="flatten",
        command="python flatten/flatten.py",
        what="flat/",
        plural=False,
        settings=("flatten_args",),
        inputs=_flatten_inputs,
        outputs=lambda s, t, m: [Output(t.flat, "pixels.*")],
        record=_data_record("flatten"),
    ),
    StageSpec(
        name="summarize",
        command="python summarize/summarize.py",
        what="summary/",
        plural=False,
        settings=("summarize_args",),
        exclude=("summarize_args.chunk_rows",),
        inputs=_summarize_inputs,
        outputs=lambda s, t, m: [Output(t.summary, "*")],
        record=_data_record("summarize"),
    ),
    StageSpec(
        name="train",
        command="python train/train.py",
        what="the bundle",
        plural=False,
        settings=(),
        exclude=(
            "training_args.verbose",
            "training_args.tensorboard",
            "training_args.tensorboard_images_every",
            "load_dataset_args.workers",  # the batches are the same for any number of workers
            # The band count and chip size the settings may name only check the chips, which are train's
            # inputs: chips of another kind make it outdated by themselves, and null vs 8 changes nothing.
            "load_dataset_args.channels",
            "model_args.input_shape",
            "model_args.num_classes",  # likewise the class count: the masks hold the classes, null vs 2 is the same
            "training_args.results_folder",
            "training_args.model",
            "ml_args.forest.n_jobs",
        ),
        model_settings=_train_settings,
        options=(("bundle", "--from-bundle"),),  # (train --from-bundle DIR: the bundle it continues from)
        artifact=lambda s, t, m: t.bundle(m),  # what predict reads of it: its bundle, as it is now
        inputs=_train_inputs,
        outputs=lambda s, t, m: [
            Output(t.bundle(m)),
            Output(t.model_dir(m) / "backup", "*"),
            Output(t.model_dir(m) / "tensorboard", counted=False),  # the U-Net's logs (unet/logs.py)
            Output(t.model_dir(m) / "members", counted=False),  # a seed ensemble's networks (training_args.members)
        ],
        record=lambda s, t, m: t.model_dir(m) / "train.record.json",
        per_model=True,
    ),
    StageSpec(
        name="predict",
        command="python predict/predict.py",
        what="the predictions",
        settings=("predict_args",),
        exclude=("predict_args.output", "predict_args.batch_size"),
        unread=_predict_unread,
        skipped=predict_skipped,
        inputs=_predict_inputs,
        outputs=lambda s, t, m: [
            # Named after their inputs: .tif or .tiff; hidden names are a killed run's temporary files.
            Output(t.prediction_dir(m) / "masks", "[!.]*.tif*"),
            Output(t.prediction_dir(m) / "probabilities", "[!.]*.tif*"),
            Output(t.prediction_dir(m) / "instances", "[!.]*.tif*"),
            Output(t.prediction_dir(m) / "classes", "[!.]*.tif*"),
            Output(t.prediction_dir(m) / "classes", "[!.]*.qml"),
            Output(t.prediction_dir(m) / "roofs.gpkg"),
            Output(t.prediction_dir(m) / "grid.gpkg"),
            Output(t.prediction_dir(m) / "grid.csv"),
        ],
        record=lambda s, t, m: t.prediction_dir(m) / "predict.record.json",
        per_model=True,
    ),
    StageSpec(
        name="evaluate",
        command="python evaluate/evaluate.py",
        what="the evaluation",
        plural=False,
        settings=("evaluate_args",),
        inputs=_evaluate_inputs,
        outputs=lambda s, t, m: [Output(_evaluation_dir(t, m, s), "*")],
        record=lambda s, t, m: _evaluation_dir(t, m, s).parent / f"{s.evaluate_args.split}.record.json",
        per_model=True,
    ),
)

_BY_NAME = {s.name: s for s in STAGES}


def spec_of(name: str) -> StageSpec:
    """The declaration of stage ``name``."""
    return _BY_NAME[name]


def order_of(name: str) -> int:
    """The stage's place in the pipeline."""
    return [s.name for s in STAGES].index(name)
