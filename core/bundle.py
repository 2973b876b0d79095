"""The model bundle: a folder with the model and ``bundle.json``, and the one normalization.

Every model (U-Net, forest, regression) is saved as a bundle folder::

    results/EXPERIMENT/bundle/
        bundle.json    kind, bands, dtype, normalization, threshold, padding multiple,
                       features, settings snapshot, library versions
        model.keras    (U-Net)  or  model.skops  (classical models)

predict takes a bundle, never a bare weights file, so it cannot run with other
preprocessing than training used: :class:`Normalization` is computed once from the training
chips, stored in bundle.json, and :meth:`Normalization.apply` is the only function that
turns raw pixels into model input, at training and at prediction time alike.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import importlib.metadata
import json
import os
import platform
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from core.errors import BundleError, DataError
from core.files import atomic_path
from core.raster import BandStats, valid_pixels

BUNDLE_JSON = "bundle.json"
KINDS = ("unet", "forest", "regression")

#: Percentiles that bound the "percentile" normalization.
LOW_PCT, HIGH_PCT = 2.0, 98.0


@dataclass(frozen=True)
class Normalization:
    """Per-band scaling computed from the training chips, applied identically everywhere.

    ``percentile``: clip each band to its training [p2, p98] and scale to [0, 1].
    ``zscore``: subtract the training mean and divide by the training std.
    Nodata pixels (every band equal to ``nodata``) become 0 in every band.
    """

    method: Literal["percentile", "zscore"]
    low: tuple[float, ...]
    high: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    nodata: float | None

    @classmethod
    def from_stats(
        cls, stats: Sequence[BandStats], method: Literal["percentile", "zscore"], nodata: float | None
    ) -> Normalization:
        """Build from :func:`core.raster.band_statistics` of the training chips."""
        empty = [s.band for s in stats if s.count == 0]
        if empty:
            raise DataError(f"bands {empty} of the training chips hold only nodata: check the chips' nodata value")
        low = tuple(float(s.percentiles[f"p{LOW_PCT:g}"]) for s in stats)
        high = tuple(float(s.percentiles[f"p{HIGH_PCT:g}"]) for s in stats)
        return cls(
            method=method,
            low=low,
            high=high,
            mean=tuple(float(s.mean) for s in stats),
            std=tuple(float(s.std) for s in stats),
            nodata=nodata,
        )

    @property
    def bands(self) -> int:
        return len(self.low)

    def apply(self, chw: np.ndarray) -> np.ndarray:
        """Raw (bands, rows, cols) pixels -> float32 (rows, cols, bands) model input."""
        if chw.ndim != 3 or chw.shape[0] != self.bands:
            raise DataError(f"expected {self.bands} bands (bands, rows, cols), got an array of shape {chw.shape}")
        # One C-contiguous float32 copy, then in place: what the network reads, without the
        # temporaries and the extra copy a strided array costs when it becomes a tensor.
        out = np.empty((*chw.shape[1:], chw.shape[0]), np.float32)
        out[...] = np.moveaxis(chw, 0, -1)
        if self.method == "percentile":
            low = np.asarray(self.low, np.float32)
            span = np.maximum(np.asarray(self.high, np.float32) - low, np.float32(1e-6))
            np.subtract(out, low, out=out)
            np.divide(out, span, out=out)
            np.clip(out, 0.0, 1.0, out=out)
        else:
            mean = np.asarray(self.mean, np.float32)
            std = np.maximum(np.asarray(self.std, np.float32), np.float32(1e-6))
            np.subtract(out, mean, out=out)
            np.divide(out, std, out=out)
        out[~valid_pixels(chw, self.nodata)] = 0.0
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalization:
        return cls(
            method=data["method"],
            low=tuple(data["low"]),
            high=tuple(data["high"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            nodata=data["nodata"],
        )


def now() -> str:
    """The time a bundle is made, as bundle.json records it (UTC, to the second)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def library_versions(
    names: Sequence[str] = ("numpy", "rasterio", "scikit-learn", "skops", "tensorflow-cpu", "keras"),
) -> dict[str, str]:
    """Versions of the libraries that made a bundle (those installed)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class BundleInfo:
    """What bundle.json holds."""

    kind: Literal["unet", "forest", "regression"]
    bands: int
    dtype: str
    normalization: Normalization
    threshold: float
    pad_multiple: int = 1
    threshold_tta: float | None = None  # a U-Net's threshold tuned on test-time-augmented probabilities; None: none
    targets: list[str] = field(default_factory=lambda: ["footprint"])  # the model's output bands (a U-Net's)
    classes: list[str] = field(default_factory=list)  # a class map's classes (ids 1, 2 ...); empty: one class
    class_bias: list[float] = field(default_factory=list)  # per-class log offsets tuned on validation; empty: none
    object_filter: dict[str, Any] = field(default_factory=dict)  # core.objects.ObjectFilter fitted on validation
    # Touching objects merge where their border's mean boundary probability is under this (a U-Net with a
    # boundary band; tuned on validation by core.objects.tune_instances); 0: never; None: a bundle from before.
    merge: float | None = None
    # The watershed's seeds start this share of the way from the decision threshold to 1 (a U-Net's; tuned on
    # validation by core.objects.tune_instances); None: the default (core.instances.default_seed_fraction).
    seed_fraction: float | None = None
    features: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    created: str = field(default_factory=now)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["normalization"] = self.normalization.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleInfo:
        data = dict(data)
        data["normalization"] = Normalization.from_dict(data["normalization"])
        return cls(**data)


def write_info(folder: Path, info: BundleInfo) -> Path:
    """Write bundle.json atomically into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / BUNDLE_JSON
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(info.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


@contextlib.contextmanager
def new_bundle(bundle: Path) -> Iterator[Path]:
    """A temporary folder beside ``bundle`` to write a whole bundle into (model and bundle.json).

    On success it takes the bundle's place by renames (the old bundle moved aside, then removed),
    so predict never reads a new model with an old bundle.json; on failure it is removed and
    the old bundle stays. A kill leaves ``.BUNDLE.XXXX.tmp`` folders, which the next run of the
    stage removes.
    """
    bundle = Path(bundle)
    bundle.parent.mkdir(parents=True, exist_ok=True)
    tmp = bundle.with_name(f".{bundle.name}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = bundle.with_name(f".{bundle.name}.{secrets.token_hex(4)}.old.tmp")
        if bundle.exists():
            os.replace(bundle, old)
        os.replace(tmp, bundle)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_info(folder: Path) -> BundleInfo:
    """Read bundle.json; a missing or corrupt one raises :class:`BundleError` saying what to do."""
    folder = Path(folder)
    if not folder.is_dir():
        kind = folder.parent.name if folder.name == "bundle" and folder.parent.name in KINDS else None
        command = "python train/train.py" + (f" --model {kind}" if kind else "")
        raise BundleError(f"model bundle {folder} not found: train a model first ({command})")
    path = folder / BUNDLE_JSON
    if not path.is_file():
        raise BundleError(
            f"{folder} is not a model bundle (no {BUNDLE_JSON}): pass the bundle folder train.py wrote, "
            "not a weights file"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError(f"not a JSON object but {json.dumps(data)[:40]}")
        info = BundleInfo.from_dict(data)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"{path} is corrupt ({type(exc).__name__}: {exc}): retrain, or restore the bundle") from exc
    if info.kind not in KINDS:
        raise BundleError(f"{path}: unknown model kind {info.kind!r} (expected one of {', '.join(KINDS)})")
    wrong = _wrong_field(info)
    if wrong:
        raise BundleError(f"{path} is corrupt ({wrong}): retrain, or restore the bundle")
    if info.normalization.bands != info.bands:
        raise BundleError(f"{path} is corrupt: normalization has {info.normalization.bands} bands, bundle {info.bands}")
    return info


def _wrong_field(info: BundleInfo) -> str:
    """The first field of bundle.json whose value is not of its kind, in words ("" when all are): a file edited
    by hand must fail here in one line, not deep inside predict."""

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    def words(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    def sound(entry: Any) -> bool:  # an object filter's entry (core.objects.ObjectFilter), or {} for none
        if not isinstance(entry, dict) or not entry:
            return entry == {}
        parts = ("cut", "features", "mean", "scale", "coef", "intercept")
        return (
            all(k in entry for k in parts)
            and number(entry["cut"])
            and number(entry["intercept"])
            and words(entry["features"])
            and all(isinstance(entry[k], list) and all(number(x) for x in entry[k]) for k in ("mean", "scale", "coef"))
            and isinstance(entry.get("image_bands", 0), int)
            and isinstance(entry.get("by_class", {}), dict)
            and all(sound(own) and own for own in entry.get("by_class", {}).values())
        )

    checks = {
        "bands": count(info.bands),
        "threshold": number(info.threshold),
        "threshold_tta": info.threshold_tta is None or number(info.threshold_tta),
        "pad_multiple": count(info.pad_multiple),
        "targets": words(info.targets) and bool(info.targets) and info.targets[0] == "footprint",
        "classes": words(info.classes),
        "class_bias": isinstance(info.class_bias, list)
        and all(number(b) for b in info.class_bias)
        and len(info.class_bias) in (0, len(info.classes) if isinstance(info.classes, list) else 0),
        "object_filter": sound(info.object_filter),
        "merge": info.merge is None or number(info.merge),
        "seed_fraction": info.seed_fraction is None or (number(info.seed_fraction) and 0 <= info.seed_fraction < 1),
    }
    wrong = next((name for name, ok in checks.items() if not ok), "")
    return f"{wrong} is {json.dumps(getattr(info, wrong))[:200]}" if wrong else ""


def unread_warnings(info: BundleInfo, args: Any) -> list[str]:
    """A line for each predict setting set away from its default that the bundle does not read
    (:func:`unread_predict_args`: the contract leaves them out, so they call for no rerun either)."""
    defaults = type(args).model_fields
    return [
        f"predict: predict_args.{key} {json.dumps(getattr(args, key))} is unused: {why}"
        for key, why in unread_predict_args(info, args).items()
        if getattr(args, key) != defaults[key].default
    ]


def unread_predict_args(info: BundleInfo, args: Any) -> dict[str, str]:
    """The predict_args (core.settings.PredictArgs) that change nothing predict makes with this bundle, each
    with why: the class settings of a one-class bundle, the merge limit of a model without a boundary band, the
    watershed's settings without instances ... Predict warns about those set otherwise than by default, and
    its contract leaves them out, so that setting one does not make the predictions outdated."""
    from core.objects import filter_mismatch

    why: dict[str, str] = {}
    if not args.instances:
        watershed = "it acts on the watershed's objects (predict_args.instances is false)"
        for key in ("seeds", "seed_threshold", "merge", "object_filter", "split_classes"):
            why[key] = watershed
    if len(info.targets) == 1:
        why.setdefault("seeds", f"the {info.kind} bundle predicts the footprint alone")
    if len(info.targets) == 1 and args.seeds == "channels":
        why.pop("seeds")  # read: predict refuses it (core.settings' seeds: channels needs the bands)
    if "boundary" not in info.targets:
        why.setdefault("merge", f"merging reads the boundary band, which the {info.kind} bundle does not predict")
    elif args.seeds == "footprint":
        why.setdefault("merge", "merging reads the boundary band, and predict_args.seeds is footprint")
    seeded = tuple(info.targets) if args.seeds != "footprint" else ("footprint",)
    mismatch = filter_mismatch(info.object_filter, seeded, info.classes, args.split_classes)
    if mismatch:
        why.setdefault("object_filter", {
            "none": "the bundle has no object filter",
            "bands": "the object filter reads the bands predict_args.seeds footprint leaves out",
            "split": "the object filter learnt from objects split by class otherwise than predict_args.split_classes "
                     "splits them",
        }[mismatch])  # fmt: skip
    if not info.classes:
        for key in ("roof_class", "split_classes", "calibrated_classes"):
            why.setdefault(key, "the bundle was not trained on classes")
    elif not info.class_bias:
        why.setdefault("calibrated_classes", "the bundle has no class offsets")
    return why


class Predictor(Protocol):
    """What predict needs of a loaded bundle, whatever the model."""

    info: BundleInfo

    def predict(self, chips: np.ndarray) -> np.ndarray:
        """Raw (n, bands, rows, cols) pixels -> (n, rows, cols) float32 roof probabilities."""
        ...

    def prepare(self, chips: np.ndarray) -> Any:
        """The part of :meth:`predict` that only reads the pixels (checks, normalization).

        predict.py runs it for the next batch in a reader thread; ``forward(prepare(chips))``
        equals ``predict(chips)``.
        """
        ...

    def forward(self, prepared: Any) -> np.ndarray:
        """The rest of :meth:`predict`: the model, on what :meth:`prepare` returned."""
        ...

    def forward_targets(self, prepared: Any) -> np.ndarray:
        """Every output band (n, len(info.targets) + len(info.classes), rows, cols): the targets (footprint
        first), then with classes each class's probability: a U-Net's of a roof of that class (adding up to 1
        or less), the classical models' given a roof (adding up to 1)."""
        ...


def load_predictor(folder: Path) -> Predictor:
    """Load any bundle for prediction.

    The loaders are imported here, not at the top: unet.bundle and ml.bundle build on this
    module, and TensorFlow is imported only when a U-Net is loaded.
    """
    info = read_info(folder)
    if info.kind == "unet":
        from unet.bundle import load
    else:
        from ml.bundle import load
    return load(Path(folder), info)


def forward_targets(
    predictor: Predictor, prepared: Any, targets: tuple[str, ...], calibrated: bool = True
) -> np.ndarray:
    """The predictor's bands (n, len(targets) + classes, rows, cols): the named targets (a U-Net's), then
    each class's probability (a bundle trained on classes: :meth:`Predictor.forward_targets`), else its roof
    probabilities."""
    from core.metrics import shift_classes

    info = predictor.info
    if len(targets) == 1 and not info.classes:
        return predictor.forward(prepared)[:, np.newaxis]
    index = [info.targets.index(t) for t in targets] + [len(info.targets) + k for k in range(len(info.classes))]
    every = predictor.forward_targets(prepared)
    every = every if index == list(range(every.shape[1])) else every[:, index]
    if calibrated and info.class_bias:  # the class offsets tuned on validation (predict_args.calibrated_classes)
        k = len(info.classes)
        every[:, -k:] = shift_classes(every[:, -k:], info.class_bias, axis=1)
    return every


def tta_forward(
    predictor: Predictor, chips: np.ndarray, targets: tuple[str, ...] = ("footprint",), calibrated: bool = True
) -> np.ndarray:
    """Bands (n, len(targets), rows, cols) averaged over the 8 flips and quarter turns of the chips
    (test-time augmentation).

    Each view is prepared from the raw chips, as training prepared its augmented chips, and its
    probabilities turned back before averaging.
    """
    total = None
    for turns in range(4):
        for flip in (False, True):
            view = np.rot90(chips, turns, axes=(2, 3))
            view = view[..., ::-1] if flip else view
            prob = forward_targets(predictor, predictor.prepare(np.ascontiguousarray(view)), targets, calibrated)
            prob = prob[..., ::-1] if flip else prob
            turned = np.rot90(prob, -turns, axes=(2, 3)).astype(np.float64)
            total = turned if total is None else total + turned
    return (total / 8).astype(np.float32)
