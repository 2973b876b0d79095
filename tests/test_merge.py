"""Merging the pieces of one roof: touching objects whose border the boundary band does not mark are one
roof; the limit is tuned on validation chips and applied by predict."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import shapely

from core.instances import border_means, label_instances, merge_fragments
from core.objects import (
    MERGE_LIMITS,
    SEED_FRACTIONS,
    InstanceTuning,
    object_matches,
    truth_instances,
    tune_instances,
)
from core.raster import write_raster
from core.settings import PredictArgs
from core.targets import boundary_band
from predict.predict import merge_limit, merge_note, seed_note, seed_threshold


def three_objects() -> tuple[np.ndarray, np.ndarray]:
    """Objects 1 | 2 | 3 side by side (4 x 3 px each); the boundary band is 0.2 along 1|2, 0.9 along 2|3."""
    labels = np.zeros((4, 9), np.int32)
    labels[:, 0:3], labels[:, 3:6], labels[:, 6:9] = 1, 2, 3
    boundary = np.zeros((4, 9), np.float32)
    boundary[:, 2:4] = 0.2
    boundary[:, 5:7] = 0.9
    return labels, boundary


def test_border_means_are_the_mean_boundary_along_each_touching_pair():
    labels, boundary = three_objects()
    low, high, means = border_means(labels, boundary)
    assert low.tolist() == [1, 2] and high.tolist() == [2, 3]
    assert means.tolist() == pytest.approx([0.2, 0.9])
    assert [len(a) for a in border_means(np.zeros((3, 3), np.int32), np.zeros((3, 3)))] == [0, 0, 0]


@pytest.mark.parametrize(
    ("limit", "expected", "n"),
    [(0.1, [1, 2, 3], 3), (0.2, [1, 2, 3], 3), (0.5, [1, 1, 2], 2), (0.95, [1, 1, 1], 1)],
)
def test_merge_fragments_joins_pairs_under_the_limit(limit, expected, n):
    labels, boundary = three_objects()
    merged, m = merge_fragments(labels, boundary, limit)
    assert m == n
    assert merged[0, [0, 4, 8]].tolist() == expected  # one pixel of each old object
    assert (merged > 0).sum() == 36  # no pixel gained or lost


def test_merged_objects_keep_the_order_of_their_lowest_old_number():
    labels, boundary = three_objects()
    labels = 4 - labels  # 3 | 2 | 1, the faint border now between 3 and 2
    merged, m = merge_fragments(labels, boundary, 0.5)
    assert m == 2 and merged[0, [0, 4, 8]].tolist() == [2, 2, 1]  # {3, 2} takes 2's place, after 1


def test_label_instances_merges_the_pieces_a_ridge_seeded_apart():
    """One 8 x 20 roof with a faint ridge across it: the seeds stop at the ridge, so the watershed finds two
    objects; merged where the boundary band is faint, they are one."""
    prob = np.zeros((10, 22), np.float32)
    prob[1:9, 1:21] = 0.95
    boundary = np.zeros_like(prob)
    boundary[1:9, 10] = 0.4  # the ridge
    score = prob * (1 - boundary)
    apart, n = label_instances(prob, 0.5, 0.875, score)
    assert n == 2
    one, m = label_instances(prob, 0.5, 0.875, score, boundary=boundary, merge=0.3)
    assert m == 1 and ((one > 0) == (prob >= 0.5)).all()
    still, k = label_instances(prob, 0.5, 0.875, score, boundary=boundary, merge=0.1)
    assert k == 2 and (still == apart).all()


def test_truth_instances_part_touching_roofs_by_their_boundary_band():
    roofs = np.zeros((12, 16), np.int32)
    roofs[1:6, 1:8], roofs[1:6, 8:15] = 1, 2  # two touching roofs
    roofs[8:11, 2:12] = 3
    roofs[10, 14] = 4  # one pixel: all boundary, no core
    band = boundary_band(roofs, 1)
    labels, n = truth_instances(roofs > 0, band)
    assert n == 3
    for k in (1, 2, 3):  # each true roof is one instance, whole
        assert len(np.unique(labels[roofs == k])) == 1 and (labels == labels[roofs == k][0]).sum() == (roofs == k).sum()
    assert labels[10, 14] == 0


def test_object_matches_count_spacenet_style():
    truth = np.zeros((6, 12), np.int32)
    truth[0:4, 0:4], truth[0:4, 6:10] = 1, 2
    known = np.ones(truth.shape, bool)
    assert object_matches(truth, truth, known, 1) == (2, 0, 2 - 2)
    one = np.where(truth > 0, 1, 0)
    one[0:4, 4:6] = 1  # both roofs and the gap as one object: IoU 16 / 40 with each
    assert object_matches(truth, one, known, 1) == (0, 1, 2)
    two = np.where(truth > 0, 1, 0)  # both roofs as one object without the gap: IoU exactly 0.5 with each
    assert object_matches(truth, two, known, 1) == (1, 0, 1)  # one to one: it matches one of them
    pred = truth.copy()
    pred[5, 0:2] = 3  # a speck of 2 px: left out under 3 px, a false object from 2
    assert object_matches(truth, pred, known, 3) == (2, 0, 0)
    assert object_matches(truth, pred, known, 2) == (2, 1, 0)
    known[5, :] = False  # ... unless it lies on pixels of unknown class
    assert object_matches(truth, pred, known, 2) == (2, 0, 0)


def scene(tmp_path: Path, roofs: np.ndarray, prob: np.ndarray, boundary: np.ndarray, targets=("footprint", "boundary")):
    """One validation chip of the true roofs ``roofs`` (a label image; its mask with a 1 px boundary band) and a
    fake predictor that predicts ``prob`` and ``boundary`` for it: (predictor, [(frame, mask)])."""
    band = boundary_band(roofs, 1)
    mask = np.stack([np.where(roofs > 0, 255, 0), np.where(band, 255, 0)]).astype(np.uint8)
    rows, cols = roofs.shape
    transform = rasterio.transform.from_origin(0, rows, 1, 1)
    frame = write_raster(tmp_path / "f.tif", np.ones((1, rows, cols), np.uint16), crs="EPSG:32644",
                         transform=transform)  # fmt: skip
    truth = write_raster(tmp_path / "m.tif", mask, crs="EPSG:32644", transform=transform,
                         descriptions=["footprint", "boundary"])  # fmt: skip

    class Fake:
        info = SimpleNamespace(targets=list(targets), classes=[], normalization=SimpleNamespace(nodata=None))

        def prepare(self, chips):
            return chips

        def forward_targets(self, chips):
            return np.stack([prob, boundary])[np.newaxis]

    return Fake(), [(frame, truth)]


def test_tune_instances_chooses_the_least_merging_that_makes_each_roof_one(tmp_path):
    """A 10 x 30 roof whose two faint ridges seed it in three pieces (none matches the roof: IoU 1/3), and two
    touching roofs whose border the boundary band marks. Merging under 0.4 makes the large roof one and keeps
    the touching pair apart; 1.01 merges the pair too, which then matches only the larger of the two."""
    roofs = np.zeros((34, 34), np.int32)
    roofs[2:12, 2:32] = 1
    roofs[20:30, 2:10], roofs[20:30, 10:26] = 2, 3  # merged, the pair matches the larger roof (IoU 2/3)
    band = boundary_band(roofs, 1)
    prob = np.where(roofs > 0, 0.95, 0.0).astype(np.float32)
    boundary = np.where(band, 0.95, 0.0).astype(np.float32)
    boundary[3:11, [11, 21]] = (
        0.35  # the ridges, one pixel wide: their borders average about (8 x 0.175 + 2 x 0.95) / 10
    )
    fake, pairs = scene(tmp_path, roofs, prob, boundary)
    tuned = tune_instances(fake, pairs, threshold=0.5)
    f1 = tuned.record["merge"]["object_f1"]
    assert [f1["0"], f1["0.3"], f1["0.4"], f1["0.9"], f1["1.01"]] == [0.5, 0.5, 1.0, 1.0, 0.8]
    assert tuned.merge == 0.4 and tuned.record["merge"]["limit"] == 0.4 and list(f1) == [f"{v:g}" for v in MERGE_LIMITS]
    # Seeds from 0.5 or 0.5625 take in the ridges (score 0.95 x 0.65): the large roof is one seed, one object
    # unmerged; every fraction scores 1.0 at the limit 0.4, so the default three quarters stays.
    # The default's standard error: 3 matched of 3, F = (6 + 1) / (6 + 2), sqrt(F (1 - F) / 6) = 0.135.
    assert tuned.seed_fraction == 0.75 and tuned.record["seeds"] == {
        "fraction": 0.75, "default": 0.75, "threshold": 0.875, "object_f1": {f"{q:g}": 1.0 for q in SEED_FRACTIONS},
        "default_f1": 1.0, "standard_error": 0.135,
    }  # fmt: skip
    assert tuned.lines == [
        "watershed seeds where footprint x (1 - boundary) >= 0.875 (0.75 of the way from the threshold to 1, the "
        "default: no other beat its validation object F1 1.000 by more than one standard error, 0.135)",
        "touching objects merge where their border's mean boundary probability is under 0.4 (validation object "
        "F1 1.000, unmerged 0.500; predict_args.merge)",
    ]
    fake, pairs = scene(tmp_path, roofs, prob, boundary, targets=("footprint",))
    assert tune_instances(fake, pairs, 0.5) == InstanceTuning(None, 0.0, {}, [
        "no seeds tuned and no merge of touching objects (the model has no boundary band, and without it the "
        "masks' true roofs do not part where they touch)"
    ])  # fmt: skip


def test_tune_instances_lowers_the_seeds_where_a_wide_boundary_band_leaves_no_roof_a_seed(tmp_path):
    """Three 8 x 8 roofs in a row, their boundary band predicted 0.4 all over the inside (a band wide against
    small roofs, as on SpaceNet Rio) and 0.95 along the edges: footprint x (1 - boundary) peaks at 0.54. Seeds
    from 0.875 (the default) find none: the row is one object, matching no roof (IoU 1/3). Seeds from the
    threshold itself (fraction 0) find each roof."""
    roofs = np.zeros((12, 28), np.int32)
    roofs[2:10, 2:10], roofs[2:10, 10:18], roofs[2:10, 18:26] = 1, 2, 3
    band = boundary_band(roofs, 1)
    prob = np.where(roofs > 0, 0.9, 0.0).astype(np.float32)
    boundary = np.where(band, 0.95, np.where(roofs > 0, 0.4, 0.0)).astype(np.float32)
    tuned = tune_instances(*scene(tmp_path, roofs, prob, boundary), threshold=0.5)
    assert (tuned.seed_fraction, tuned.merge) == (0.0, 0.0)  # (1.01 would merge the three again)
    assert tuned.record["seeds"] == {
        "fraction": 0.0, "default": 0.75, "threshold": 0.5,
        "object_f1": {f"{q:g}": 1.0 if q == 0 else 0.0 for q in SEED_FRACTIONS},
        "default_f1": 0.0, "standard_error": 0.1863,  # (0 matched, 1 false, 3 missed: F = 1 / 6, n = 4)
    }  # fmt: skip
    assert tuned.lines[0] == (
        "watershed seeds where footprint x (1 - boundary) >= 0.500 (0 of the way from the threshold to 1, tuned on "
        "validation: object F1 1.000, against 0.000 at the default 0.75, beyond one standard error, 0.186; "
        "predict_args.seed_threshold)"
    )
    assert tuned.lines[1] == "no merge of touching objects: none helped on validation (object F1 1.000)"


def test_other_seeds_replace_the_default_only_beyond_one_standard_error():
    from core.objects import choose_seeds, standard_error

    # Banepa's validation chips, the seed ensemble: 70 matched, 55 false, 35 missed -> F1 140 / 230; the spread
    # of (140 + 1) / (230 + 2), so that an F1 of 0 or 1 has one too.
    assert standard_error(np.array([70, 55, 35])) == pytest.approx(np.sqrt((141 / 232) * (91 / 232) / 230))
    assert standard_error(np.array([0, 0, 0])) == 0.0  # no object at all
    assert standard_error(np.array([5, 0, 0])) == pytest.approx(np.sqrt((11 / 12) * (1 / 12) / 10))  # F1 1
    assert standard_error(np.array([0, 4, 6])) == pytest.approx(np.sqrt((1 / 12) * (11 / 12) / 10))  # F1 0
    counts = {
        (0.75, 0.0): np.array([70, 55, 35]),
        (0.75, 0.6): np.array([71, 54, 34]),  # F1 0.6087, 0.6174
        (0.375, 0.3): np.array([73, 50, 33]),
        (0.375, 0.0): np.array([70, 50, 35]),
    }  # 0.6376, 0.6195
    assert choose_seeds(counts, 0.75) == (0.75, 0.6)  # +0.020 over the default's best: within 0.032
    counts[0.375, 0.3] = np.array([80, 40, 26])  # F1 0.7080: +0.09, beyond
    assert choose_seeds(counts, 0.75) == (0.375, 0.3)
    tied = {(0.75, 0.0): np.array([1, 0, 0]), (0.5, 0.0): np.array([1, 0, 0])}
    assert choose_seeds(tied, 0.75) == (0.75, 0.0)
    # Two fractions as near the default and as good, both beyond it: the stricter seeds.
    apart = {(0.75, 0.0): np.array([0, 40, 40]), (0.625, 0.0): np.array([40, 0, 0]), (0.875, 0.0): np.array([40, 0, 0])}
    assert choose_seeds(apart, 0.75) == (0.875, 0.0)


def test_predict_seeds_from_the_bundles_tuned_fraction_unless_the_setting_says_otherwise():
    channels = ("footprint", "boundary", "contact")
    tuned = SimpleNamespace(seed_fraction=0.25, targets=list(channels))
    old = SimpleNamespace(seed_fraction=None, targets=list(channels))
    assert seed_threshold(tuned, PredictArgs(), channels, 0.4) == pytest.approx(0.55)  # 0.4 + 0.25 x 0.6
    assert seed_threshold(tuned, PredictArgs(), channels, 0.2) == pytest.approx(0.4)  # (the TTA threshold, say)
    assert seed_threshold(tuned, PredictArgs(seed_threshold=0.9), channels, 0.4) == 0.9
    assert seed_threshold(tuned, PredictArgs(), ("footprint",), 0.4) == pytest.approx(0.7)  # seeds footprint: halfway
    assert seed_threshold(old, PredictArgs(), channels, 0.4) == pytest.approx(0.85)  # three quarters
    assert seed_note(tuned, PredictArgs(), channels, 0.4) == (
        "watershed seeds where footprint x (1 - boundary) x (1 - contact) >= 0.550 (the bundle's, 0.25 of the way "
        "from the threshold to 1, tuned on validation)"
    )
    kept = SimpleNamespace(seed_fraction=0.75, targets=list(channels))
    assert seed_note(kept, PredictArgs(), channels, 0.4) == (
        "watershed seeds where footprint x (1 - boundary) x (1 - contact) >= 0.850 (the bundle's, 0.75 of the way "
        "from the threshold to 1, kept on validation)"
    )
    assert seed_note(tuned, PredictArgs(seed_threshold=0.9), channels, 0.4) == (
        "watershed seeds where footprint x (1 - boundary) x (1 - contact) >= 0.900 (predict_args.seed_threshold)"
    )
    assert seed_note(tuned, PredictArgs(), ("footprint",), 0.4) == (
        "watershed seeds where the roof probability >= 0.700 (the default, half of the way to 1)"
    )
    assert seed_note(old, PredictArgs(), channels, 0.4) == (
        "watershed seeds where footprint x (1 - boundary) x (1 - contact) >= 0.850 (the default, three quarters "
        "of the way to 1)"
    )


def test_predict_applies_the_bundles_merge_unless_the_setting_says_otherwise():
    tuned, old = SimpleNamespace(merge=0.6), SimpleNamespace(merge=None)
    channels, footprint = ("footprint", "boundary", "contact"), ("footprint",)
    assert merge_limit(tuned, PredictArgs(), channels) == 0.6
    assert merge_limit(tuned, PredictArgs(merge=0.3), channels) == 0.3
    assert merge_limit(tuned, PredictArgs(), footprint) == 0.0  # seeds footprint: no boundary band to read
    assert merge_limit(old, PredictArgs(), channels) == 0.0
    assert merge_note(tuned, PredictArgs(), channels) == (
        "touching objects merged where their border's mean boundary probability is under 0.6 (the bundle's "
        "limit, tuned on validation)"
    )
    assert merge_note(tuned, PredictArgs(merge=0), channels) == "touching objects kept apart (predict_args.merge 0)"
    assert merge_note(SimpleNamespace(merge=0.0), PredictArgs(), channels) == (
        "touching objects kept apart (the bundle's choice: merging did not help on validation)"
    )
    assert merge_note(old, PredictArgs(), channels).startswith("the bundle has no merge limit (trained before")
    assert merge_note(tuned, PredictArgs(), footprint) == ""


def test_merge_fragments_renumbers_labels_with_gaps_and_keeps_merges_within_max_side():
    labels = np.zeros((3, 7), np.int32)
    labels[:, 0:2], labels[:, 5:7] = 1, 3  # no 2, nothing touching
    merged, n = merge_fragments(labels, np.zeros(labels.shape), 0.5)
    assert n == 2 and merged[0, [0, 6]].tolist() == [1, 2]
    labels, boundary = three_objects()
    assert merge_fragments(labels, boundary, 0.5, max_side=5)[1] == 3  # 1 | 2 joined would be 6 px wide
    assert merge_fragments(labels, boundary, 0.5, max_side=6)[1] == 2


def test_raster_instances_merge_within_a_block_margin_and_lose_no_roof_pixel(tmp_path):
    """A long 8 x 60 px roof with a faint ridge every 5 px and a short 8 x 10 px one with a ridge in its middle,
    in blocks of 16 px with a margin of 12. Block by block, only merges that leave the objects within the
    margin are made (the short roof's), so each block sees the objects it owns whole and the polygons hold every
    roof pixel; merged across blocks, the long roof would be cut off where its owning block stops. In one
    block both roofs are one object each."""
    from conftest import write_geotiff

    from core.instances import raster_instances

    prob = np.zeros((2, 24, 64), np.float32)
    prob[0, 2:10, 2:62] = 0.95
    prob[1, 2:10, 2:62][:, ::5] = 0.5  # the long roof's ridges
    prob[0, 14:22, 2:12] = 0.95
    prob[1, 14:22, 7] = 0.5  # the short roof's ridge
    path = write_geotiff(tmp_path / "p.tif", array=prob, nodata=None)
    targets = ("footprint", "boundary")
    apart = raster_instances(path, 0.5, 0.875, targets, block=16, margin=12)
    merged = raster_instances(path, 0.5, 0.875, targets, merge=0.6, block=16, margin=12)
    whole = raster_instances(path, 0.5, 0.875, targets, merge=0.6)
    pixel = 0.5 * 0.5  # conftest's rasters: 0.5 m pixels

    def pixels(found):
        return round(shapely.union_all([g for g, _ in found]).area / pixel)

    # Blocks may share out a ridge pixel differently (a pixel or two in two roofs or none), merged or not; the
    # merge loses nothing more. Merged across the blocks, the long roof would keep only what one block sees.
    assert pixels(merged) == pixels(apart) >= 480 + 80 - 4 and pixels(whole) == 480 + 80
    assert len(whole) == 2 and len(merged) == len(apart) - 1
    assert sorted(round(g.area / pixel) for g, _ in whole) == [80, 480]


def test_truth_instances_grow_each_core_through_its_own_roof():
    """Roof A's one-pixel spur reaches closer to roof B's core than to A's, across a gap: it is still A's."""
    roofs = np.zeros((11, 22), np.int32)
    roofs[1:6, 1:6] = 1
    roofs[3, 6:11] = 1  # the spur, all boundary
    roofs[1:10, 12:21] = 2
    labels, n = truth_instances(roofs > 0, boundary_band(roofs, 1))
    assert n == 2 and len(np.unique(labels[roofs == 1])) == 1 and (labels[roofs == 1] > 0).all()
    assert labels[3, 10] == labels[3, 3] != labels[5, 15]


def test_the_predict_settings_a_bundle_does_not_read():
    from core.bundle import unread_predict_args
    from core.objects import feature_names

    targets = ["footprint", "boundary", "contact"]
    fitted = {"cut": 0.5, "features": feature_names(targets, 3), "image_bands": 3, "split_classes": True}
    unet = SimpleNamespace(kind="unet", targets=targets, classes=["metal", "other"], class_bias=[0.0, -0.5],
                           object_filter=fitted)  # fmt: skip
    assert unread_predict_args(unet, PredictArgs()) == {}  # a class U-Net with bands, offsets and a filter reads all
    assert unread_predict_args(unet, PredictArgs(seeds="footprint")) == {
        "merge": "merging reads the boundary band, and predict_args.seeds is footprint",
        "object_filter": "the object filter reads the bands predict_args.seeds footprint leaves out",
    }
    assert unread_predict_args(unet, PredictArgs(split_classes=False)) == {
        "object_filter": "the object filter learnt from objects split by class otherwise than "
        "predict_args.split_classes splits them"
    }
    plain = unread_predict_args(unet, PredictArgs(instances=False))
    assert list(plain) == ["seeds", "seed_threshold", "merge", "object_filter", "split_classes"]
    assert set(plain.values()) == {"it acts on the watershed's objects (predict_args.instances is false)"}
    forest = SimpleNamespace(kind="forest", targets=["footprint"], classes=[], class_bias=[], object_filter={})
    assert unread_predict_args(forest, PredictArgs()) == {
        "seeds": "the forest bundle predicts the footprint alone",
        "merge": "merging reads the boundary band, which the forest bundle does not predict",
        "object_filter": "the bundle has no object filter",
        "roof_class": "the bundle was not trained on classes",
        "split_classes": "the bundle was not trained on classes",
        "calibrated_classes": "the bundle was not trained on classes",
    }
    assert "seeds" not in unread_predict_args(forest, PredictArgs(seeds="channels"))  # read: predict refuses it
    uncalibrated = SimpleNamespace(**{**vars(unet), "class_bias": []})
    assert unread_predict_args(uncalibrated, PredictArgs()) == {"calibrated_classes": "the bundle has no class offsets"}


def test_rerun_advice_gives_each_path_its_own_option_quoted():
    from workflow.stages import spec_of

    train, predict = spec_of("train"), spec_of("predict")
    assert train.run_command("unet", False, {"bundle": Path("/runs/my bundle")}) == (
        "python train/train.py --model unet --from-bundle '/runs/my bundle'"
    )
    assert predict.run_command("forest", True, {"bundle": Path("/b"), "input": None}) == (
        "python predict/predict.py --model forest --bundle /b --overwrite"
    )


def test_object_classes_by_vote_and_by_majority():
    from core.instances import object_classes

    labels = np.array([[1, 1, 1, 2]])
    metal = np.array([[0.6, 0.6, 0.1, 0.9]], np.float32)  # object 1: two pixels a little metal, one surely other
    bands = np.stack([metal, 1 - metal])
    assert object_classes(labels, np.array([1, 2]), bands).tolist() == [1, 0]  # vote: 1.3 metal against 1.7 other
    assert object_classes(labels, np.array([1, 2]), bands, "majority").tolist() == [0, 0]  # two pixels of three
    assert object_classes(labels, np.array([], np.int64), bands).tolist() == []


def test_why_no_filter_applies_never_names_a_setting_left_unread():
    from predict.predict import filter_decision

    info = SimpleNamespace(object_filter={}, targets=["footprint"], classes=[])
    assert filter_decision(info, PredictArgs(object_filter=0), ("footprint",))[2].startswith(
        "the bundle has no object filter"
    )
