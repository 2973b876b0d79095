"""The object filter: a logistic regression on each predicted roof's features that tells real roofs from
false objects, as SpaceNet 4's winners rejected false objects after their watershed.

A model's probability map holds, beside its roofs, many small or faint blobs (a yard, a car, a
shadow); each becomes an object of its own and a false polygon. After the decision threshold is
tuned, train runs the watershed predict runs on the validation chips, computes each object's
features (:data:`FEATURES`: its size, its probabilities, its shape, its boundary and contact
bands) and learns which objects lie on true roofs (at least half of their pixels of known class
are roof), and the cut on that probability that maximises the mean of the validation pixel
F1 and object F1. The coefficients and the cut go into bundle.json (``object_filter``:
readable, nothing to unpickle); predict drops the objects whose probability of being a roof
is under the cut (or ``predict_args.object_filter``), from the roofs, the mask and the class
raster alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from core.errors import BundleError

#: Each object's features, in the order the filter reads them; then the mean of each further target band.
FEATURES = ("log_pixels", "mean", "std", "max", "core_share", "fill", "aspect")
#: Objects of each kind (roof, false) the validation chips must hold for a filter to be fitted.
MIN_OBJECTS = 5
#: An object lies on a roof when at least this share of its pixels of known class is roof.
ROOF_SHARE = 0.5
#: The object F1 the cut is tuned on counts objects of at least this ground area (m2): predict_args.min_area's
#: default, under which predict drops polygons anyway, and SpaceNet ignores smaller buildings.
MIN_OBJECT_M2 = 4.0


def object_features(
    labels: np.ndarray,
    ids: np.ndarray | list[int],
    bands: np.ndarray,
    seed_threshold: float,
    chw: np.ndarray | None = None,
    norm: Any = None,
) -> np.ndarray:
    """The features (:data:`FEATURES`, then the mean of each band after the first, then with ``chw`` (the
    image, raw) and ``norm`` (the bundle's normalization) its :func:`image_features`) of the objects ``ids`` of
    a label image: (len(ids), 7 + bands - 1 [+ 3 x image bands]). ``bands`` (targets, rows, cols): the footprint probability first, then the boundary and contact
    bands a U-Net may have. core_share is the share of the object's pixels at or above the seed threshold;
    fill its pixels over its bounding box's; aspect its bounding box's short side over its long side."""
    ids = np.asarray(ids, np.int64)
    if ids.size == 0:
        width = len(FEATURES) + len(bands) - 1 + (3 * chw.shape[0] if chw is not None else 0)
        return np.zeros((0, width), np.float64)
    prob = bands[0]
    pixels = np.bincount(labels.ravel(), minlength=int(ids.max()) + 1)[ids].astype(np.float64)
    boxes = ndimage.find_objects(labels, max_label=int(ids.max()))
    sides = np.array([[b[0].stop - b[0].start, b[1].stop - b[1].start] for b in (boxes[i - 1] for i in ids)], float)
    columns = [
        np.log(np.maximum(pixels, 1.0)),
        ndimage.mean(prob, labels, ids),
        ndimage.standard_deviation(prob, labels, ids),
        ndimage.maximum(prob, labels, ids),
        ndimage.mean(prob >= seed_threshold, labels, ids),
        pixels / sides.prod(axis=1),
        sides.min(axis=1) / sides.max(axis=1),
    ]
    columns += [ndimage.mean(band, labels, ids) for band in bands[1:]]
    if chw is not None:
        columns += image_features(labels, ids, chw, norm)
    return np.column_stack([np.atleast_1d(np.asarray(c, np.float64)) for c in columns])


def image_features(labels: np.ndarray, ids: np.ndarray, chw: np.ndarray, norm: Any) -> list[np.ndarray]:
    """What an object looks like in the image ``chw`` (bands, rows, cols, raw): for each band the mean and
    spread of its pixels normalized as the model reads them (``norm``), then for each band its mean share of
    the pixel's sum of bands (raw values): the object's colour, whatever its brightness. A false object on a
    concrete roof or a yard is often only told apart by that."""
    image = norm.apply(chw)
    raw = chw.astype(np.float64)
    total = np.maximum(raw.sum(axis=0), 1e-9)
    means = [ndimage.mean(image[..., k], labels, ids) for k in range(len(chw))]
    spreads = [ndimage.standard_deviation(image[..., k], labels, ids) for k in range(len(chw))]
    shares = [ndimage.mean(raw[k] / total, labels, ids) for k in range(len(chw))]
    return [*means, *spreads, *shares]


@dataclass
class ObjectFilter:
    """A fitted filter: features standardised by ``mean`` and ``scale``, then a logistic regression."""

    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    cut: float = 0.5  # objects under this probability are dropped (tuned on validation)
    max_pixels: float | None = None  # the largest validation object: larger objects are kept, unjudged
    objects: int = 0  # validation objects it was fitted on
    roofs: int = 0  # of which on roofs
    split_classes: bool = False  # a class bundle's: fitted on objects split by class (predict_args.split_classes)
    image_bands: int = 0  # the filter also reads the image (its bands' image_features); 0: probabilities only
    stats: dict[str, Any] = field(default_factory=dict)
    # A class bundle's filters of each class, by class name (ObjectFilter entries): each judges the objects of
    # its class on whether they lie on a roof of that class; objects of a class without one are judged by this.
    by_class: dict[str, dict[str, Any]] = field(default_factory=dict)

    def probability(self, x: np.ndarray) -> np.ndarray:
        """Each object's probability of lying on a roof (x: objects x features)."""
        if x.shape[1] != len(self.coef):
            raise BundleError(
                f"the bundle's object filter reads {len(self.coef)} features ({', '.join(self.features)}) but the "
                f"objects have {x.shape[1]}: the bundle's bands disagree with its filter; retrain"
            )
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        p = 1.0 / (1.0 + np.exp(-(z @ np.asarray(self.coef) + self.intercept)))
        # A regression extrapolates: an object larger than any it learnt from (a whole block of houses merged
        # in a raster larger than the validation chips) is not judged, but kept.
        if self.max_pixels is None:
            return p
        return np.where(x[:, 0] > math.log(self.max_pixels) + 1e-9, 1.0, p)

    def keep(
        self,
        x: np.ndarray,
        kinds: np.ndarray | None = None,
        classes: list[str] | tuple[str, ...] = (),
        cut: float | None = None,
    ) -> np.ndarray:
        """Which objects to keep (x: objects x features): those whose probability reaches the cut. An object
        of a class (``kinds``: each object's class, 0-based, of ``classes``) with a filter of its own in
        :attr:`by_class` is judged by that one and its cut; ``cut`` replaces every tuned cut."""
        out = self.probability(x) >= (self.cut if cut is None else cut)
        if kinds is None or not self.by_class:
            return out
        for k, name in enumerate(classes):
            own = ObjectFilter.from_dict(self.by_class.get(name, {}))
            mine = np.asarray(kinds) == k
            if own is not None and mine.any():
                out[mine] = own.probability(x[mine]) >= (own.cut if cut is None else cut)
        return out

    def class_cuts(self, classes: list[str] | tuple[str, ...], cut: float | None = None) -> dict[str, float]:
        """The cut that judges the objects of each class: its own filter's, else this one's; ``cut`` replaces
        every tuned cut."""
        return {
            name: cut if cut is not None else float(self.by_class.get(name, {}).get("cut", self.cut))
            for name in classes
        }

    def cuts(self, classes: list[str] | tuple[str, ...] = ()) -> str:
        """The cuts in words: '0.35', or with filters of each class 'metal 0.65, other_roof 0.5, brick 0.35'."""
        if not any(name in self.by_class for name in classes):
            return f"{self.cut:g}"
        return ", ".join(f"{name} {c:g}" for name, c in self.class_cuts(classes).items())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ObjectFilter | None:
        """The filter of bundle.json's ``object_filter`` entry; None for an empty one (a bundle without)."""
        if not data:
            return None
        try:
            return cls(**data)
        except TypeError as exc:
            raise BundleError(f"bundle.json's object_filter entry is damaged ({exc}): retrain") from exc


def feature_names(
    targets: list[str] | tuple[str, ...], image_bands: int = 0, classes: list[str] | tuple[str, ...] = ()
) -> list[str]:
    """The features' names for a model with these target bands (and a filter that reads the image's
    ``image_bands``, and a class bundle's filter the mean of each class band: :func:`class_features`)."""
    image = [f"{kind}_band{k}" for kind in ("mean", "std", "share") for k in range(1, image_bands + 1)]
    return [*FEATURES, *(f"mean_{t}" for t in targets[1:]), *image, *(f"{CLASS_FEATURE}{c}" for c in classes)]


#: The name of a class band's feature: its mean over the object (mean_class_metal).
CLASS_FEATURE = "mean_class_"


def class_features(labels: np.ndarray, ids: np.ndarray | list[int], class_bands: np.ndarray) -> np.ndarray:
    """Each object's mean of each class band (objects x classes): how sure the network is that the object is a
    roof of that class. A U-Net's sigmoid class bands carry this (a band low everywhere on a yard the footprint
    took for a roof); a filter of the objects of one class reads it beside the footprint's features."""
    ids = np.asarray(ids, np.int64)
    if ids.size == 0:
        return np.zeros((0, len(class_bands)), np.float64)
    return np.column_stack([np.atleast_1d(ndimage.mean(band, labels, ids)) for band in class_bands])


def reads_classes(features: list[str]) -> bool:
    """Whether a filter with these features reads the class bands (fitted since filters read them)."""
    return any(f.startswith(CLASS_FEATURE) for f in features)


def filter_mismatch(
    entry: dict[str, Any], targets: list[str] | tuple[str, ...], classes: list[str], split_classes: bool
) -> str:
    """Why a bundle's object filter (its bundle.json entry) cannot judge the objects predict makes, seeded with
    ``targets`` and split by class or not: "none" (no filter), "bands" (it reads bands the seeds leave out),
    "split" (it learnt from objects split by class otherwise); "" when it can. Predict keeps every object then,
    and predict_args.object_filter is unread."""
    if not entry:
        return "none"
    features = entry.get("features") or []
    if features not in (feature_names(targets, entry.get("image_bands", 0), c) for c in ((), classes)):
        return "bands"  # (a class bundle's filter reads its class bands since filters read them; before, not)
    if classes and bool(entry.get("split_classes")) != split_classes:
        return "split"
    return ""


@dataclass
class ValidationObjects:
    """The objects the watershed finds on the validation chips: their features (objects x features), their
    roof pixels and their other pixels of known class, and the roof pixels of the chips in all (in an object
    or not)."""

    x: np.ndarray
    roof_pixels: np.ndarray
    other_pixels: np.ndarray
    all_roof_pixels: int
    area_m2: np.ndarray | None = None  # each object's ground area; None: every object counts as large enough
    # A class bundle's: each object's class (0-based, as predict gives it), its pixels of each class (objects x
    # classes) and the chips' roof pixels of each class.
    kinds: np.ndarray | None = None
    class_pixels: np.ndarray | None = None
    all_class_pixels: np.ndarray | None = None

    def of_class(self, k: int) -> ValidationObjects:
        """The objects of class ``k``, each judged on whether it lies on a roof of that class: its pixels of
        that class against its other pixels of known class (background and roofs of other classes)."""
        assert self.kinds is not None and self.class_pixels is not None and self.all_class_pixels is not None
        mine = self.kinds == k
        own = self.class_pixels[mine, k]
        known = self.roof_pixels[mine] + self.other_pixels[mine]
        area = None if self.area_m2 is None else self.area_m2[mine]
        return ValidationObjects(self.x[mine], own, known - own, int(self.all_class_pixels[k]), area)

    @property
    def roof(self) -> np.ndarray:
        """Whether each object lies on a roof: at least :data:`ROOF_SHARE` of its pixels of known class are."""
        return self.roof_pixels >= ROOF_SHARE * np.maximum(self.roof_pixels + self.other_pixels, 1)

    def scores(self, keep: np.ndarray) -> tuple[float, float]:
        """The validation pixel F1 and object F1 when only the objects ``keep`` are kept; the object F1 over the
        objects of at least :data:`MIN_OBJECT_M2` (all, when none is that large)."""
        tp = float(self.roof_pixels[keep].sum())
        pixel = 2 * tp / max(2 * tp + float(self.other_pixels[keep].sum()) + (self.all_roof_pixels - tp), 1.0)
        large = np.ones(len(keep), bool) if self.area_m2 is None else self.area_m2 >= MIN_OBJECT_M2
        if not large.any():
            large[:] = True
        roof = self.roof & large
        hits = float((keep & roof).sum())
        objects = 2 * hits / max(float((keep & large).sum()) + float(roof.sum()), 1.0)
        return pixel, objects


#: The cuts tried on the filter's probability.
CUTS = np.round(np.arange(0.0, 0.96, 0.05), 2)


def too_few(objects: ValidationObjects, kind: str = "") -> str | None:
    """Why the validation objects are too few to fit a filter on (under :data:`MIN_OBJECTS` of either kind),
    else None; ``kind`` as in :func:`fit_object_filter`."""
    roofs, false = int(objects.roof.sum()), int((~objects.roof).sum())
    if roofs >= MIN_OBJECTS and false >= MIN_OBJECTS:
        return None
    roofs_of = f"{kind} roofs" if kind else "roofs"
    return f"the validation chips hold {roofs} objects on {roofs_of} and {false} false ones, under {MIN_OBJECTS} of either kind"


def fit_object_filter(objects: ValidationObjects, names: list[str], kind: str = "") -> tuple[ObjectFilter | None, str]:
    """A filter fitted on the validation objects, with its cut: of :data:`CUTS`, the one that maximises the
    mean of the validation pixel F1 and object F1 (the first, the lowest, of equals), so the filter drops
    objects only where that does not cost the pixels more than it brings the objects. None and why when
    the objects are too few of either kind (:data:`MIN_OBJECTS`). ``kind``: the class of a class's own filter
    (its objects judged on roofs of that class), for the log."""
    roofs_of = f"{kind} roofs" if kind else "roofs"
    others = f"the {kind} objects on no {kind} roof" if kind else "the false ones"
    kept = f"those on {kind} roofs" if kind else "the roofs"
    x, roof = objects.x, objects.roof
    roofs, false = int(roof.sum()), int((~roof).sum())
    few = too_few(objects, kind)
    if few:
        return None, f"{few}: no object filter (predict keeps every object)"
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0  # a feature all objects share (no contact anywhere) standardises to 0
    model = LogisticRegression(max_iter=1000, class_weight="balanced").fit((x - mean) / scale, roof)
    fitted = ObjectFilter(
        features=names, mean=mean.tolist(), scale=scale.tolist(),
        coef=model.coef_[0].tolist(), intercept=float(model.intercept_[0]),
        max_pixels=float(np.exp(x[:, 0].max())), objects=len(roof), roofs=roofs,
    )  # fmt: skip
    p = fitted.probability(x)
    gains = [float(np.mean(objects.scores(p >= cut))) for cut in CUTS]
    fitted.cut = float(CUTS[int(np.argmax(gains))])
    keep = p >= fitted.cut
    # The log says what the record holds (the report reads the record): the figures rounded once.
    (pixel0, object0), (pixel1, object1) = (
        (round(f, 4) for f in objects.scores(k)) for k in (np.ones(len(roof), bool), keep)
    )
    fitted.stats = {
        "false_dropped": round(float((~keep & ~roof).sum() / false), 4),
        "roofs_kept": round(float((keep & roof).sum() / roofs), 4),
        "pixel_f1": [pixel0, pixel1],
        "object_f1": [object0, object1],
    }
    return fitted, (
        f"object filter fitted on {len(roof)} validation objects ({roofs} on {roofs_of}), cut {fitted.cut:g}: it "
        f"drops {fitted.stats['false_dropped']:.0%} of {others} and keeps {fitted.stats['roofs_kept']:.0%} of "
        f"{kept}; validation pixel F1 {pixel0:.3f} -> {pixel1:.3f}, object F1 {object0:.3f} -> {object1:.3f}"
    )


def validation_objects(
    predictor: Any,
    pairs: list[tuple[Path, Path]],
    threshold: float,
    seed_threshold: float,
    class_bias: list[float] | None = None,
    merge: float = 0.0,
    seeds: float | None = None,
) -> ValidationObjects:
    """The objects the watershed finds on the validation chips (at the tuned threshold, seeded as predict
    seeds by default: from ``seeds`` up, ``seed_threshold`` where None; a bundle trained on classes split where
    the most probable class changes, its class probabilities shifted by ``class_bias``, as predict does by
    default; touching objects merged as :func:`tune_instances` chose, ``merge``). ``seed_threshold`` is also the
    core of the core_share feature (:func:`object_features`). Objects mostly of unknown class are left out;
    nodata pixels are unknown."""
    from core.cli import progress
    from core.instances import class_kinds, label_instances, object_classes, part_pixels, seed_score
    from core.metrics import shift_classes
    from core.raster import read_mask_bands, read_pair, usable_pixels, valid_pixels
    from core.vector import pixel_m2

    targets = tuple(predictor.info.targets)
    nodata = predictor.info.normalization.nodata
    classes = len(predictor.info.classes)
    xs, roofs, others, areas, total = [], [], [], [], 0
    called, per_class, class_total = [], [], np.zeros(classes, np.int64)
    for frame, mask in progress(pairs, desc="object filter", unit="chip"):
        chw, roof, known, profile = read_pair(frame, mask)
        use = usable_pixels(chw, nodata, known)
        total += int((roof & use).sum())
        every = predictor.forward_targets(predictor.prepare(chw[np.newaxis]))[0]
        bands, kinds, probs, truth = every[: len(targets)], None, None, None
        if classes:  # each pixel's class, as predict splits the roofs (predict_args.split_classes)
            probs = shift_classes(every[len(targets) :], class_bias) if class_bias else every[len(targets) :]
            kinds = class_kinds(probs)
            data, names, _, _ = read_mask_bands(mask)
            truth = np.where(roof & use, data[names.index("class")], 0)  # each roof pixel's class id, 1..classes
            class_total += np.bincount(truth.ravel(), minlength=classes + 1)[1 : classes + 1]
        bands[:, ~valid_pixels(chw, nodata)] = 0.0  # as predict writes nodata: no object grows over it
        score = seed_score(bands, targets) if len(targets) > 1 else None
        area = pixel_m2(profile, chw.shape[1:])
        boundary = bands[targets.index("boundary")] if "boundary" in targets else None
        labels, n = label_instances(
            bands[0], threshold, seed_threshold if seeds is None else seeds, score, kinds, part_pixels(area), boundary,
            merge,
        )  # fmt: skip
        if not n:
            continue
        ids = np.arange(1, n + 1)
        pixels = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        on_roof = np.bincount(labels[roof & use], minlength=n + 1)[1:]
        other = np.bincount(labels[~roof & use], minlength=n + 1)[1:]
        keep = on_roof + other >= 0.5 * pixels  # objects mostly of unknown class (or nodata) are left out
        x = object_features(labels, ids[keep], bands, seed_threshold, chw, predictor.info.normalization)
        xs.append(np.column_stack([x, class_features(labels, ids[keep], probs)]) if classes else x)
        roofs.append(on_roof[keep])
        others.append(other[keep])
        areas.append(pixels[keep] * area)
        if classes:
            called.append(object_classes(labels, ids[keep], probs))
            per_class.append(np.column_stack([
                np.bincount(labels[truth == k + 1], minlength=n + 1)[1:][keep] for k in range(classes)
            ]))  # fmt: skip
    width = len(feature_names(targets, predictor.info.bands, predictor.info.classes))
    split = (
        {"kinds": np.concatenate(called) if called else np.zeros(0, np.int64),
         "class_pixels": np.concatenate(per_class) if per_class else np.zeros((0, classes), np.int64),
         "all_class_pixels": class_total}
        if classes else {}
    )  # fmt: skip
    if not xs:
        empty = np.zeros(0, np.int64)
        return ValidationObjects(np.zeros((0, width)), empty, empty, total, np.zeros(0), **split)
    return ValidationObjects(
        np.concatenate(xs), np.concatenate(roofs), np.concatenate(others), total, np.concatenate(areas), **split
    )


def train_object_filter(
    predictor: Any,
    pairs: list[tuple[Path, Path]],
    threshold: float,
    class_bias: list[float] | None = None,
    merge: float = 0.0,
    seed_fraction: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Fit the object filter of a trained model on its validation chips at its tuned threshold (and class
    offsets, merge limit, seed fraction: :func:`tune_instances`): bundle.json's ``object_filter`` entry (empty:
    none), metrics.json's, and a line for the log. The core_share feature counts the pixels over the default
    seed threshold, as predict's filter does."""
    from core.instances import default_seed_threshold

    targets = list(predictor.info.targets)
    channels = len(targets) > 1
    core = default_seed_threshold(threshold, None, channels)
    seeds = default_seed_threshold(threshold, None, channels, seed_fraction)
    objects = validation_objects(predictor, pairs, threshold, core, class_bias, merge, seeds)
    names = feature_names(targets, predictor.info.bands, predictor.info.classes)
    fitted, why = fit_object_filter(objects, names)
    if fitted is None:
        return {}, {"objects": len(objects.roof_pixels), "roofs": int(objects.roof.sum())}, why
    fitted.split_classes = bool(predictor.info.classes)
    fitted.image_bands = predictor.info.bands
    record = {"objects": fitted.objects, "roofs": fitted.roofs, "cut": fitted.cut, **fitted.stats}
    # A class bundle: the objects of each class judged on whether they lie on a roof of that class (an object
    # called metal on a concrete roof is a roof, but not a metal one); on Banepa's held-out rows this raised the
    # 60-epoch class model's metal pixel IoU from 0.416 to 0.435.
    whys = [why]
    for k, name in enumerate(predictor.info.classes):
        mine = objects.of_class(k)
        if few := too_few(mine, name):
            whys.append(f"the {name} objects judged by the filter of all objects ({few})")
            continue
        own, own_why = fit_object_filter(mine, names, name)  # (enough objects: a filter)
        own.split_classes, own.image_bands = True, predictor.info.bands
        fitted.by_class[name] = own.to_dict()
        record.setdefault("by_class", {})[name] = {"objects": own.objects, "roofs": own.roofs, "cut": own.cut,
                                                   **own.stats}  # fmt: skip
        whys.append(f"the {name} objects' own {own_why}")
    return fitted.to_dict(), record, "; ".join(whys)


# --- merging the pieces of one roof ---------------------------------------------------------------

#: The merge limits train tries: touching objects join where the mean boundary probability along their border
#: is under the limit. 0 never merges; 1.01 merges every touching pair (the connected groups of roof pixels).
MERGE_LIMITS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01)
#: The seed fractions train tries: the watershed's seeds are the pixels whose seed score is at least this share
#: of the way from the decision threshold to 1 (0: every roof pixel may seed).
SEED_FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


@dataclass
class InstanceTuning:
    """What :func:`tune_instances` chose: the seed fraction and the merge limit (bundle.json seed_fraction and
    merge), metrics.json's record of the validation object F1 of each, and lines for the log."""

    seed_fraction: float | None  # None: not tuned (the default)
    merge: float
    record: dict[str, Any]
    lines: list[str]


def truth_instances(footprint: np.ndarray, boundary: np.ndarray) -> tuple[np.ndarray, int]:
    """The true roofs of a mask as a label image: the cores of its footprint (the roof pixels off the boundary
    band, which parts touching roofs) grown back over the footprint, each core through its own group of roof
    pixels. A group without a core (a roof narrower than twice the band) stays 0."""
    from skimage.segmentation import watershed

    from core.instances import label_objects

    cores, n = label_objects(footprint & ~boundary)
    if not n:
        return np.zeros(footprint.shape, np.int32), 0
    flat = np.zeros(footprint.shape, np.uint8)
    return watershed(flat, cores, mask=footprint, connectivity=1).astype(np.int32), n


def object_matches(truth: np.ndarray, pred: np.ndarray, known: np.ndarray, min_pixels: int) -> tuple[int, int, int]:
    """SpaceNet counts (matched, false, missed) of two label images (:func:`core.metrics.match_labels`, IoU >=
    0.5), as evaluate counts them: objects under ``min_pixels`` and predicted objects mostly on pixels of unknown
    class are left out."""
    from core.instances import keep_labels
    from core.metrics import drop_unknown, match_labels

    truth, n_t = keep_labels(truth, np.bincount(truth.ravel()) >= min_pixels)
    pred, n_p = keep_labels(pred, np.bincount(pred.ravel()) >= min_pixels)
    if n_p:
        pred, n_p = drop_unknown(pred, n_p, known)
    counts = match_labels(truth, n_t, pred, n_p, 0.5)
    return counts.tp, counts.fp, counts.fn


def rounded_f1(counts: np.ndarray) -> float:
    """The object F1 of (matched, false, missed), to 4 decimals, as metrics.json holds it."""
    return round(float(2 * counts[0] / max(2 * counts[0] + counts[1] + counts[2], 1)), 4)


def standard_error(counts: np.ndarray) -> float:
    """The standard error of an object F1 from its counts (matched, false, missed): sqrt(F (1 - F) / n), n = 2
    matched + false + missed, the F1's denominator, as of a share of n trials, with F = (2 matched + 1) / (n + 2)
    (one success and one failure added, so that an F1 of 0 or 1 still has a spread)."""
    n = int(2 * counts[0] + counts[1] + counts[2])
    f = (2 * counts[0] + 1) / (n + 2)
    return float(np.sqrt(f * (1 - f) / n)) if n else 0.0


def choose_seeds(counts: dict[tuple[float, float], np.ndarray], default: float) -> tuple[float, float]:
    """The (seed fraction, merge limit) of the best object F1 of ``counts`` ((matched, false, missed) of each),
    F1 rounded to 4 decimals as the record holds it. The ``default`` fraction stays unless another beats its
    best by more than one standard error of that F1 (:func:`standard_error`): on Banepa's 12 validation chips
    the best gained 0.015 over the default, against a standard error of 0.032 (noise; on the held-out rows its
    polygon F1 was 0.510 against 0.544); on Rio's it gained 0.40. Ties go to the fraction nearest the default
    (the stricter of two as near), then to the least merging."""
    f1 = rounded_f1
    best = max(counts, key=lambda k: (f1(counts[k]), -abs(k[0] - default), k[0], -k[1]))
    kept = default_best(counts, default)
    return best if f1(counts[best]) - f1(counts[kept]) > standard_error(counts[kept]) else kept


def default_best(counts: dict[tuple[float, float], np.ndarray], default: float) -> tuple[float, float]:
    """The (``default`` fraction, merge limit) of the default seeds' best object F1 in ``counts`` (the least
    merging of equals): what :func:`choose_seeds` measures other seeds against."""
    return max((k for k in counts if k[0] == default), key=lambda k: (rounded_f1(counts[k]), -k[1]))


def tune_instances(predictor: Any, pairs: list[tuple[Path, Path]], threshold: float) -> InstanceTuning:
    """Where a U-Net's watershed seeds start and its merge limit, for a U-Net with a boundary band (whose masks
    part touching true roofs): the seed fraction of :data:`SEED_FRACTIONS` (the seeds are the pixels whose
    :func:`core.instances.seed_score` is at least that share of the way from the decision threshold to 1) and the
    merge limit of :data:`MERGE_LIMITS` whose objects on the validation chips match the true roofs best (object
    F1 at IoU >= 0.5, objects of :data:`MIN_OBJECT_M2` and up; :func:`choose_seeds`: the default fraction stays
    unless another beats it by more than one standard error). A large roof's ridges and seams can seed the
    watershed more than once (on Banepa's validation chips 39 of 46 pairs of touching objects on roofs were
    pieces of one roof): merging joins them. Where the boundary band is wide against the roofs the default seeds
    are too strict: on SpaceNet Rio's validation chips no roof reached them. A model without a boundary band is
    not tuned (seed fraction None: the default; merge 0). The objects are not split by class here (a class
    bundle's predict splits them after merging)."""
    from core.cli import progress
    from core.instances import (
        border_means,
        default_seed_fraction,
        default_seed_threshold,
        label_instances,
        merge_fragments,
        seed_score,
        seed_words,
    )
    from core.raster import read_mask_bands, read_pair, usable_pixels, valid_pixels
    from core.vector import pixel_m2

    targets = tuple(predictor.info.targets)
    if "boundary" not in targets:  # (nor have its masks: the true roofs do not part where they touch)
        return InstanceTuning(None, 0.0, {}, [
            "no seeds tuned and no merge of touching objects (the model has no boundary band, and without it the "
            "masks' true roofs do not part where they touch)"
        ])  # fmt: skip
    channels = len(targets) > 1
    nodata = predictor.info.normalization.nodata
    counts = {(q, limit): np.zeros(3, np.int64) for q in SEED_FRACTIONS for limit in MERGE_LIMITS}
    for frame, mask in progress(pairs, desc="seeds and merge", unit="chip"):
        chw, roof, known, profile = read_pair(frame, mask)  # (and the two on one grid)
        data, names, _, _ = read_mask_bands(mask)
        truth, _ = truth_instances(roof, data[names.index("boundary")] == 255)  # touching true roofs apart
        known = usable_pixels(chw, nodata, known)
        bands = predictor.forward_targets(predictor.prepare(chw[np.newaxis]))[0][: len(targets)]
        bands[:, ~valid_pixels(chw, nodata)] = 0.0
        score = seed_score(bands, targets)
        boundary = bands[targets.index("boundary")]
        least = max(1, math.ceil(MIN_OBJECT_M2 / pixel_m2(profile, chw.shape[1:])))
        for q in SEED_FRACTIONS:
            labels, n = label_instances(bands[0], threshold, default_seed_threshold(threshold, fraction=q), score)
            borders = border_means(labels, boundary) if n > 1 else None
            for limit in MERGE_LIMITS:
                merged = merge_fragments(labels, boundary, limit, borders)[0] if limit > 0 and n > 1 else labels
                counts[q, limit] += object_matches(truth, merged, known, least)

    f1 = rounded_f1
    default = default_seed_fraction(channels)
    q, limit = choose_seeds(counts, default)
    kept = default_best(counts, default)
    seed = default_seed_threshold(threshold, fraction=q)
    by_seed = {f"{p:g}": f1(counts[p, limit]) for p in SEED_FRACTIONS}
    noise = round(standard_error(counts[kept]), 4)
    record: dict[str, Any] = {"seeds": {
        "fraction": q, "default": default, "threshold": round(seed, 4), "object_f1": by_seed,
        "default_f1": f1(counts[kept]), "standard_error": noise,
    }}  # fmt: skip
    what = seed_words(targets)
    if q == default:
        lines = [f"watershed seeds where {what} >= {seed:.3f} ({q:g} of the way from the threshold to 1, the "
                 f"default: no other beat its validation object F1 {f1(counts[kept]):.3f} by more than one standard "
                 f"error, {noise:.3f})"]  # fmt: skip
    else:
        lines = [f"watershed seeds where {what} >= {seed:.3f} ({q:g} of the way from the threshold to 1, tuned on "
                 f"validation: object F1 {by_seed[f'{q:g}']:.3f}, against {f1(counts[kept]):.3f} at the default "
                 f"{default:g}, beyond one standard error, {noise:.3f}; predict_args.seed_threshold)"]  # fmt: skip
    scores = {f"{v:g}": f1(counts[q, v]) for v in MERGE_LIMITS}
    record["merge"] = {"limit": limit, "object_f1": scores}
    if limit == 0:
        lines.append(f"no merge of touching objects: none helped on validation (object F1 {scores['0']:.3f})")
    else:
        lines.append(
            f"touching objects merge where their border's mean boundary probability is under {limit:g} "
            f"(validation object F1 {scores[f'{limit:g}']:.3f}, unmerged {scores['0']:.3f}; predict_args.merge)"
        )
    return InstanceTuning(q, limit, record, lines)
