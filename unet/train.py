"""Training the U-Net: data checks, fit with callbacks, threshold tuning, bundle and reports.

Called by ``python train/train.py --model unet``. Writes results/EXPERIMENT/unet/: bundle/
(model.keras + bundle.json), history.csv, curves.png, metrics.json, overlays.png, and while
training the TensorBoard logs (tensorboard/) and the backup a rerun resumes from (backup/).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from core.bundle import BUNDLE_JSON, BundleInfo, Normalization, library_versions, now, read_info
from core.errors import CollapseError, DataError
from core.index import chip_kind, split_pairs
from core.metrics import (
    ClassSample,
    Confusion,
    calibrate_classes,
    class_metrics,
    combine,
    metrics_record,
    tta_threshold,
    validate_pairs,
    write_metrics,
)
from core.objects import train_object_filter, tune_instances
from core.raster import UNKNOWN, band_statistics, common_classes, mask_labels, read_mask_bands
from core.settings import ModelArgs, Settings, checkpoint_file
from core.tree import DataTree, refuse_overwrite

log = logging.getLogger(__name__)

#: Below this training roof share a warning suggests keep_empty or another loss.
LOW_ROOF_SHARE = 0.005

#: With ``steps_per_epoch: null`` an epoch is every training chip once but at least this many
#: batches. On a few dozen chips an epoch would otherwise be 4 steps, and early stopping, the
#: learning-rate schedule, the collapse monitor (all counted in epochs) and the batch-norm
#: moving statistics would judge the network after a few dozen steps (SpaceNet Rio, 32 chips:
#: stopped after 40 steps at held-out IoU 0.28).
MIN_STEPS_PER_EPOCH = 20


def steps_per_epoch(n_chips: int, batch_size: int, setting: int | None) -> int:
    """Training batches per epoch: the setting, or every chip once and at least MIN_STEPS_PER_EPOCH."""
    if setting is not None:
        return setting
    return max(math.ceil(n_chips / min(batch_size, n_chips)), MIN_STEPS_PER_EPOCH)


def _learning_rate(args, steps: int):
    """The optimizer's learning rate: a number (halved on plateaus by a callback) or a cosine schedule."""
    if args.lr_schedule == "plateau":
        return args.learning_rate
    import keras

    # alpha: the rate ends at learning_rate/100, the floor the plateau schedule stops at.
    return keras.optimizers.schedules.CosineDecay(args.learning_rate, decay_steps=args.epochs * steps, alpha=0.01)


def _classes_phrase(classes) -> str:
    return f"the classes {list(classes)}" if classes else "one class"


def mask_pixels(masks: list[Path], classes: int = 0) -> tuple[float, list[int]]:
    """One pass over the training masks: the share of roof pixels among their pixels of known class, and
    with ``classes`` the pixels of each class (ids 1..classes)."""
    roof = total = 0
    counts = np.zeros(classes + 1, np.int64)
    for m in masks:
        data, names, kinds, _ = read_mask_bands(m)
        roof += int(np.count_nonzero(data[0] == 255))
        total += int(np.count_nonzero(data[0] != UNKNOWN))
        if classes:
            labels, known = mask_labels(data, names, kinds, m)
            counts += np.bincount(labels[known], minlength=classes + 1)
    return (roof / total if total else 0.0), [int(n) for n in counts[1:]]


def mask_classes_of(masks: list[Path], num_classes: int | None) -> tuple[str, ...]:
    """The class names every mask agrees on (empty: one class), checked against model_args.num_classes."""
    classes = common_classes(masks)
    if num_classes is not None and num_classes != max(1, len(classes)):
        held = f"the classes {list(classes)}" if classes else "one class (no class band)"
        raise DataError(
            f"model_args.num_classes is {num_classes} but the masks hold {held}: set num_classes null, or rerun python "
            "mask/mask.py with the mask_args.classes you mean"
        )
    return classes


def configure_tensorflow(settings: Settings, from_bundle: bool = False) -> tuple[bool, bool]:
    """Seed, and pick XLA and precision for the device; returns whether XLA and mixed precision are on.

    A training continued from a bundle computes in float32: a bundle is saved in float32 and its
    layers keep that policy when loaded.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(settings.training_args.seed)
    gpus = tf.config.list_physical_devices("GPU")
    jit = settings.training_args.jit_compile
    if jit is None:
        jit = bool(gpus)  # measured on a 2-core CPU: XLA made training slower (bench/bench_unet.py)
    mixed = bool(gpus) and settings.training_args.mixed_precision is not False and not from_bundle
    # Set either way: the policy is global, and an earlier training in this process may have set it.
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    precision = ""
    if gpus:
        precision = f", mixed precision {'on' if mixed else 'off'}"
        if from_bundle:
            precision += " (a float32 bundle continued)"
    log.info("train: %s, XLA %s%s", f"{len(gpus)} GPU(s)" if gpus else "CPU only", "on" if jit else "off", precision)
    return jit, mixed


def _bundle_settings(settings: Settings, network: ModelArgs) -> dict:
    """The settings bundle.json records, with the model_args of the network trained (a continued bundle's own)."""
    dumped = settings.model_dump(mode="json")
    dumped["model_args"] = network.model_dump(mode="json")
    return dumped


def training_batch(
    settings: Settings, frame: Path, multiple: int, mixed: bool, network: ModelArgs | None = None
) -> int:
    """load_dataset_args.batch_size, or when null the batch unet.device chooses (logged) for ``network`` (the
    architecture and filters of the network trained: default model_args)."""
    if settings.load_dataset_args.batch_size is not None:
        return settings.load_dataset_args.batch_size
    from core.raster import open_raster
    from unet.device import choose_batch, describe, gpu_memory, padded

    with open_raster(frame) as src:
        rows, cols = padded(src.height, multiple), padded(src.width, multiple)
    memory = gpu_memory()
    m = settings.model_args if network is None else network
    batch = choose_batch(memory, rows * cols, m.filters, architecture=m.architecture, mixed=mixed)
    log.info(
        "train: load_dataset_args.batch_size null: %d chips per batch (%s; %d x %d padded chips, filters %d)",
        batch, describe(memory), rows, cols, m.filters,
    )  # fmt: skip
    return batch


def _strategy(settings: Settings):
    """``tf.distribute.MirroredStrategy`` over the visible GPUs for ``distribute: mirrored``, else None.

    Without a GPU the strategy holds the CPU alone (one replica): training runs there, as it says.
    """
    if settings.training_args.distribute != "mirrored":
        return None
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        log.warning("train: training_args.distribute is mirrored but no GPU is visible: training on the CPU")
    if not log.isEnabledFor(logging.DEBUG):
        # tf.distribute logs every all-reduce it sets up at INFO; --verbose shows them.
        logging.getLogger("tensorflow").setLevel(logging.WARNING)
    strategy = tf.distribute.MirroredStrategy()
    log.info(
        "train: MirroredStrategy over %d replica(s) (%s)",
        strategy.num_replicas_in_sync,
        ", ".join(strategy.extended.worker_devices),
    )
    return strategy


class _Monitor:
    """Callback factory: logs predicted vs true roof share and stops on a collapse."""

    @staticmethod
    def make(patience: int):
        import keras

        class CollapseMonitor(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.bad_epochs = 0
                self.collapsed: str | None = None

            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                logs = logs or {}
                pred, true = logs.get("val_pred_share"), logs.get("val_true_share")
                if pred is None or true is None:
                    return
                log.info(
                    "epoch %d: val IoU %.3f, predicted roof share %.2f%% vs true %.2f%%",
                    epoch + 1,
                    logs.get("val_iou", 0.0),
                    100 * pred,
                    100 * true,
                )
                kind = None
                if true > 0 and pred < 0.02 * true:
                    kind = "all background"
                elif pred > 0.9:
                    kind = "all roof"
                if kind is None:
                    self.bad_epochs = 0
                    return
                self.bad_epochs += 1
                log.warning("epoch %d: the network predicts %s (%.3f%% roof)", epoch + 1, kind, 100 * pred)
                if self.bad_epochs >= patience:
                    self.collapsed = kind
                    self.model.stop_training = True

        return CollapseMonitor()


def train_unet(
    settings: Settings,
    tree: DataTree,
    *,
    overwrite: bool = False,
    from_bundle: Path | None = None,
    resume: bool = False,
) -> Path:
    """Train the U-Net on the train split, tune the threshold on val, write the bundle and reports.

    With ``resume`` a backup left by an interrupted run of the same training (unet/resume.py)
    is restored and only the remaining epochs run. With ``training_args.members`` above 1, that many
    networks train one after another, each from its own seeds, and the bundle averages them
    (:func:`_train_members`). Returns the bundle folder.
    """
    settings.training_args.refuse_from_bundle(from_bundle)
    if settings.training_args.members == 1:
        out = tree.model_dir("unet")
        bundle = _train_network(settings, tree, out, overwrite=overwrite, from_bundle=from_bundle, resume=resume)
        shutil.rmtree(members_dir(out), ignore_errors=True)  # an earlier ensemble's (continued from its best member)
        return bundle
    return _train_members(settings, tree, overwrite=overwrite, resume=resume)


def members_dir(out: Path) -> Path:
    """results/EXPERIMENT/unet/members/: one folder per member of a seed ensemble (seed-N/, as a training's own)."""
    return Path(out) / "members"


def resumable(out: Path, members: int = 1) -> int:
    """What a resumed run in ``out`` (results/EXPERIMENT/unet/) of ``members`` networks would keep: the epochs in
    its backup, or with members in theirs, plus the members trained (0: nothing, a resumed run starts afresh)."""
    from unet.resume import backup_dir, finished_epochs

    if members == 1:
        return finished_epochs(backup_dir(out))
    folders = sorted(members_dir(out).glob("seed-*"))
    return sum(finished_epochs(backup_dir(f)) + int(_member_done(f)) for f in folders)


def _member_done(folder: Path) -> bool:
    """Whether a member's training ended: its bundle and metrics.json (written last) are there."""
    return (folder / "bundle" / BUNDLE_JSON).is_file() and (folder / "metrics.json").is_file()


def _member_settings(settings: Settings, k: int) -> Settings:
    """The settings member ``k`` of a seed ensemble trains with: both seeds plus ``k``, one network."""
    return settings.model_copy(
        update={
            "training_args": settings.training_args.model_copy(
                update={"seed": settings.training_args.seed + k, "members": 1}
            ),
            "load_dataset_args": settings.load_dataset_args.model_copy(
                update={"seed": settings.load_dataset_args.seed + k}
            ),
        }
    )


def _train_members(settings: Settings, tree: DataTree, *, overwrite: bool, resume: bool) -> Path:
    """A seed ensemble: train each member into members/seed-N/ (a member finished before an interruption is kept
    when resuming; the one that was training resumes from its backup), then the bundle averages them, the
    threshold, merge limit and object filter tuned on the average."""
    import keras

    out = tree.model_dir("unet")
    refuse_overwrite([tree.bundle("unet")], overwrite, "train (unet)")
    n = settings.training_args.members
    for stale in (out / "history.csv", out / checkpoint_file(settings)):  # of a one-network run: not this one's
        stale.unlink(missing_ok=True)
    folders = []
    for k in range(n):
        member = _member_settings(settings, k)
        folder = members_dir(out) / f"seed-{member.training_args.seed}"
        if resume and _member_done(folder):
            log.info("train: member %d of %d was trained before the run was interrupted: %s", k + 1, n, folder)
        else:
            log.info(
                "train: member %d of %d (training_args.seed %d, load_dataset_args.seed %d) -> %s",
                k + 1, n, member.training_args.seed, member.load_dataset_args.seed, folder,
            )  # fmt: skip
            _train_network(member, tree, folder, overwrite=True, resume=resume, member=True)
            keras.backend.clear_session()  # the next member's batch rule reads the GPU's free memory
            gc.collect()
        folders.append(folder)
    return _average_members(settings, tree, folders)


def _average_members(settings: Settings, tree: DataTree, folders: list[Path]) -> Path:
    """The bundle of a seed ensemble: one model averaging the members' networks, the best member by validation IoU
    first (the network a training continued from the bundle goes on from), tuned on val as any bundle."""
    from unet import bundle as unet_bundle
    from unet.plots import plot_member_curves
    from unet.snapshots import average

    started = time.perf_counter()
    out = tree.model_dir("unet")
    records = [json.loads((f / "metrics.json").read_text(encoding="utf-8")) for f in folders]
    order = sorted(range(len(folders)), key=lambda i: -records[i]["pixel"]["iou"])
    model = average([unet_bundle.load_model(folders[i] / "bundle") for i in order])
    first = read_info(folders[order[0]] / "bundle")
    info = replace(
        first,
        features={**first.features, "ensemble": len(folders)},
        settings=_bundle_settings(settings, settings.model_args),
        versions=library_versions(),
        created=now(),
    )
    train_pairs, val_pairs = split_pairs(tree, "train"), split_pairs(tree, "val")
    classes = tuple(info.classes)
    _, pixels = mask_pixels([m for _, m in train_pairs], len(classes))
    batch = training_batch(settings, train_pairs[0][0], info.pad_multiple, False, settings.model_args)
    members = [
        {
            "seed": settings.training_args.seed + i,
            "folder": folders[i].relative_to(out).as_posix(),
            "val_iou": records[i]["pixel"]["iou"],
            "threshold": records[i]["threshold"],
            "epochs": records[i]["epochs"],
            "train_seconds": records[i]["train_seconds"],
        }
        for i in range(len(folders))
    ]
    plot_member_curves([(f"seed {m['seed']}", out / m["folder"] / "history.csv") for m in members], out / "curves.png")
    log.info(
        "train: the bundle averages %d networks (training_args.members); validation IoU of each: %s",
        len(folders), ", ".join(f"seed {m['seed']} {m['val_iou']:.3f}" for m in members),
    )  # fmt: skip
    return _tune_and_save(
        model, info, out, [f for f, _ in val_pairs], [m for _, m in val_pairs], classes, pixels, batch,
        epochs=sum(m["epochs"] for m in members), members=members,
        seconds=sum(m["train_seconds"] for m in members) + time.perf_counter() - started,  # a resumed run's too
    )  # fmt: skip


def _train_network(
    settings: Settings,
    tree: DataTree,
    out: Path,
    *,
    overwrite: bool = False,
    from_bundle: Path | None = None,
    resume: bool = False,
    member: bool = False,
) -> Path:
    """Train one network into ``out`` (results/EXPERIMENT/unet/, or a member's folder): its bundle in
    ``out``/bundle. A ``member`` of a seed ensemble gets its threshold tuned and its reports, not the object
    steps (merge, object filter, test-time augmentation), which the average gets."""
    bundle_dir = out / "bundle"
    checkpoint = out / checkpoint_file(settings)
    start_from, warm = from_bundle, None
    if start_from is None and settings.training_args.pretrained:
        # As documented: continue from the bundle, else from the best-epoch checkpoint of a stopped run.
        if (bundle_dir / BUNDLE_JSON).is_file():
            start_from = bundle_dir
        elif checkpoint.is_file():
            warm = checkpoint
        else:
            raise DataError(
                f"training_args.pretrained is true but there is neither a bundle ({bundle_dir}) nor a checkpoint "
                f"({checkpoint}) to continue from: train once with training_args.pretrained false"
            )
    if start_from is None:
        refuse_overwrite([bundle_dir], overwrite, "train (unet)")
    train_pairs, val_pairs = split_pairs(tree, "train"), split_pairs(tree, "val")
    train_frames, train_masks = [c for c, _ in train_pairs], [m for _, m in train_pairs]
    val_frames, val_masks = [c for c, _ in val_pairs], [m for _, m in val_pairs]
    # One nodata value for the normalization: the one every chip that declares one agrees on.
    bands, dtype, nodata = chip_kind(train_frames + val_frames, settings.bands)
    if settings.load_dataset_args.hue_range > 0 and bands < 3:
        raise DataError(
            f"load_dataset_args.hue_range turns the colours of red, green and blue bands, but the chips ({train_frames[0]}) "
            f"have {bands} band(s): set it to 0"
        )

    from unet.datagen import mask_targets

    targets = mask_targets(train_masks[0])
    for mask in (*train_masks[1:], *val_masks):
        if mask_targets(mask) != targets:
            raise DataError(
                f"mask {mask} has the bands {list(mask_targets(mask))} but {train_masks[0]} has {list(targets)}: they "
                "come from different runs of mask; rerun python mask/mask.py --overwrite and python split/split.py "
                "--overwrite"
            )
    classes = mask_classes_of([*train_masks, *val_masks], settings.model_args.num_classes)
    share, pixels = mask_pixels(train_masks, len(classes))
    if share == 0:
        raise DataError(
            "the training masks hold no roof pixel: check mask_args.filter and the label file, then rerun mask and split"
        )
    if share < LOW_ROOF_SHARE:
        log.warning(
            "roof pixels are only %.2f%% of the training masks: consider split_args.keep_empty < 1 or "
            "training_args.loss focal",
            100 * share,
        )

    import keras

    from unet import bundle as unet_bundle
    from unet import logs
    from unet.datagen import ChipSequence
    from unet.losses import TargetLoss
    from unet.metrics import training_metrics
    from unet.model import build_model, float32_copy, pad_multiple
    from unet.resume import Backup, backup_dir, finished_epochs, restore
    from unet.resume import remove as remove_backup
    from unet.snapshots import BestEpochs, best_member, ensemble, snapshot_dir

    backup = backup_dir(out)
    resuming = resume and finished_epochs(backup) > 0
    jit, mixed = configure_tensorflow(settings, from_bundle=start_from is not None)
    strategy = _strategy(settings)
    # Variables (model, optimizer, metrics) are made inside the strategy's scope to be mirrored.
    scope = strategy.scope if strategy is not None else contextlib.nullcontext
    with scope():
        if start_from is not None:
            previous = read_info(start_from)
            fresh = "train without --from-bundle" if from_bundle else "set training_args.pretrained false"
            if list(previous.targets) != list(targets):
                raise DataError(
                    f"the bundle {start_from} was trained on the mask bands {previous.targets}, the masks now have "
                    f"{list(targets)}: {fresh}, or mask_args.targets {previous.targets}"
                )
            if list(previous.classes) != list(classes):
                raise DataError(
                    f"the bundle {start_from} was trained on {_classes_phrase(previous.classes)}, the masks now hold "
                    f"{_classes_phrase(classes)}: {fresh}, or mask_args.classes as the bundle's"
                )
            norm = previous.normalization
            # The bundle's network, whatever model_args say now: its architecture and filters size the batch, and its
            # model_args go into the new bundle.json, whose architecture and filters size predict's batches.
            built = previous.settings.get("model_args")
            try:
                network = ModelArgs.model_validate_json(json.dumps(built)) if built else settings.model_args
            except ValueError:  # a bundle of an older version, whose model_args no longer validate
                network = settings.model_args
            model = best_member(unet_bundle.load_model(start_from))  # an ensemble goes on from its best epoch
            multiple = previous.pad_multiple
            log.info("train: continuing from %s", start_from)
        else:
            network = settings.model_args
            stats = band_statistics(train_frames)
            norm = Normalization.from_stats(stats, settings.load_dataset_args.normalization, nodata)
            model_args = settings.model_args
            if warm is not None or resuming:
                # The checkpoint or the backup holds every weight: no encoder weights to fetch (or download).
                model_args = model_args.model_copy(update={"encoder_weights": None})
            model = build_model(bands, model_args, settings.output_args, len(targets), len(classes))
            multiple = pad_multiple(settings.model_args)
            if warm is not None:
                try:
                    model.load_weights(warm)
                except Exception as exc:  # Keras raises several types for weights of another model
                    raise DataError(
                        f"checkpoint {warm} does not fit the model of the current model_args ({exc}): set "
                        "training_args.pretrained false, or restore the model_args it was trained with"
                    ) from exc
                log.info("train: continuing from the checkpoint %s", warm)

    args = settings.training_args
    data_args = settings.load_dataset_args.model_copy(
        update={"batch_size": training_batch(settings, train_frames[0], multiple, mixed, network)}
    )
    if strategy is not None:
        # batch_size is per replica: each batch is split evenly over the GPUs.
        data_args = data_args.model_copy(update={"batch_size": data_args.batch_size * strategy.num_replicas_in_sync})
    steps = steps_per_epoch(len(train_frames), data_args.batch_size, args.steps_per_epoch)
    train_seq = ChipSequence(train_frames, train_masks, norm, data_args, multiple, augment_data=True, steps=steps)
    val_steps_all = math.ceil(len(val_frames) / min(data_args.batch_size, len(val_frames)))
    val_seq = ChipSequence(
        val_frames,
        val_masks,
        norm,
        data_args,
        multiple,
        augment_data=False,
        steps=min(args.validation_steps or val_steps_all, val_steps_all),
    )
    if classes:
        log.info("train: classes %s", ", ".join(f"{c} {n} px" for c, n in zip(classes, pixels, strict=True)))
    optimizers = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}
    with scope():
        model.compile(
            optimizer=optimizers[args.optimizer](learning_rate=_learning_rate(args, steps)),
            loss=TargetLoss(
                args.loss,
                [getattr(args.target_weights, t) for t in targets],
                classes=len(classes),
                class_weight=args.target_weights.classes,
            ),
            metrics=training_metrics(targets=len(targets), classes=len(classes)),
            jit_compile=jit,
        )
    out.mkdir(parents=True, exist_ok=True)
    log.info(
        "train: the best epoch's weights are kept in %s while training; the bundle is what predict reads", checkpoint
    )
    monitor = _Monitor.make(args.patience)
    done_epochs = 0
    if resuming:
        with scope():
            done_epochs = restore(model, backup)
        log.info("train: resuming from the end of epoch %d of %d (backup in %s)", done_epochs, args.epochs, backup)
        train_seq.set_epoch(done_epochs)  # the remaining epochs' batches are those of an uninterrupted run
    board = logs.log_dir(out)
    if done_epochs == 0:
        logs.remove(board)  # a fresh training (also one continued from a bundle) counts its epochs from 1
        # A backup left here is of another run (one continued from a bundle does not clear it): if this run were
        # killed before its first epoch's backup, a rerun would otherwise resume from it.
        remove_backup(backup)
    info = BundleInfo(
        kind="unet",
        bands=bands,
        dtype=dtype,
        normalization=norm,
        threshold=0.5,
        pad_multiple=multiple,
        targets=list(targets),
        classes=list(classes),
        features={"architecture": network.architecture},
        settings=_bundle_settings(settings, network),
    )
    schedule = (  # a cosine schedule is the optimizer's own (_learning_rate): only its rate is logged
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss",
            factor=0.5,
            patience=max(2, args.patience // 2),
            min_lr=args.learning_rate / 100,
            verbose=0,
        )
        if args.lr_schedule == "plateau"
        else logs.RateInHistory()
    )
    callbacks = [
        keras.callbacks.ModelCheckpoint(
            checkpoint, monitor="val_iou", mode="max", save_best_only=True, save_weights_only=True, verbose=0
        ),
        keras.callbacks.EarlyStopping(
            monitor="val_iou", mode="max", patience=args.patience, restore_best_weights=True, verbose=0
        ),
        schedule,  # before the CSVLogger: both put the epoch's learning rate in history.csv
        keras.callbacks.CSVLogger(out / "history.csv", append=done_epochs > 0),
        monitor,
    ]
    best = BestEpochs(snapshot_dir(backup), args.ensemble) if args.ensemble > 1 else None
    if best is not None:
        callbacks.append(best)  # before the backup, which keeps its list
    callbacks.append(Backup(backup, callbacks, restore=done_epochs > 0))  # restores after the others reset
    if args.tensorboard and logs.available():
        shown = logs.pick_chips(val_frames, val_masks) if args.tensorboard_images_every else []
        callbacks.append(  # after the backup: an epoch is logged once the backup holds it, never twice
            logs.EpochLogs(
                board,
                unet_bundle.UNetPredictor(model, info),
                [val_frames[i] for i in shown],
                [val_masks[i] for i in shown],
                args.tensorboard_images_every,
            )
        )
        log.info("train: TensorBoard logs: tensorboard --logdir %s", board)
    log.info(
        "train: %d training chips (%.2f%% roof), %d batches of %d per epoch, %d validation chips, %d bands %s, "
        "padded to x%d; targets %s",
        len(train_frames),
        100 * share,
        steps,
        train_seq.batch_size,
        len(val_frames),
        bands,
        dtype,
        multiple,
        ", ".join(targets),
    )
    started = time.perf_counter()
    verbose = args.verbose
    if verbose == 1 and not sys.stdout.isatty():
        verbose = 2  # a progress bar written to a log file is a screenful per epoch
    history = model.fit(
        train_seq,
        validation_data=val_seq,
        epochs=args.epochs,
        initial_epoch=done_epochs,
        callbacks=callbacks,
        verbose=verbose,
    )
    seconds = time.perf_counter() - started
    if monitor.collapsed:
        raise CollapseError(
            f"training stopped: the network predicted {monitor.collapsed} for {args.patience} epochs. Likely causes: "
            "masks without roofs or on the wrong scale (check python mask/mask.py output), a learning rate too high "
            f"(training_args.learning_rate={args.learning_rate}), or a loss that rewards background "
            f"(training_args.loss={args.loss}; bce_dice is the default)"
        )
    snapshots = best.epochs() if best is not None else []
    if len(snapshots) > 1:
        model = ensemble(model, best.files())  # float32 copies, as below
        # predict's batch on a GPU is shared by the networks (they may run at once); so is validation's here
        info = replace(info, features={**info.features, "ensemble": len(snapshots)})
        log.info(
            "train: the bundle averages the networks of epochs %s, the %d best by validation IoU "
            "(training_args.ensemble %d)",
            ", ".join(map(str, snapshots)), len(snapshots), args.ensemble,
        )  # fmt: skip
    else:
        if checkpoint.is_file():
            model.load_weights(checkpoint)
        if mixed:
            model = float32_copy(model)  # the bundle computes in float32 wherever it is loaded, a CPU included

    from unet.plots import plot_curves

    plot_curves(out / "history.csv", out / "curves.png")
    bundle = _tune_and_save(
        model, info, out, val_frames, val_masks, classes, pixels, data_args.batch_size,
        epochs=done_epochs + len(history.epoch), seconds=seconds, snapshots=snapshots, objects=not member,
    )  # fmt: skip
    remove_backup(backup)  # the bundle is written: nothing to resume
    return bundle


def _tune_and_save(
    model,
    info: BundleInfo,
    out: Path,
    val_frames: list[Path],
    val_masks: list[Path],
    classes: tuple[str, ...],
    pixels: list[int],
    batch: int,
    *,
    epochs: int,
    seconds: float,
    snapshots: list[int] | None = None,
    members: list[dict] | None = None,
    objects: bool = True,
) -> Path:
    """Tune the trained ``model`` on val (threshold; class offsets; with ``objects`` the watershed's seed fraction and merge limit, the object
    filter and the threshold with test-time augmentation), save the bundle in ``out``/bundle, and write
    metrics.json and overlays.png there. ``snapshots``: the epochs of a snapshot ensemble; ``members``: the
    members of a seed ensemble (seed, folder, validation IoU ...)."""
    from unet import bundle as unet_bundle
    from unet.plots import plot_overlays

    networks = int(info.features.get("ensemble", 1))
    predictor = unet_bundle.UNetPredictor(model, info, batch_size=max(1, batch // networks))
    sample = ClassSample(len(classes), len(val_frames)) if classes else None
    threshold, confusion, per_chip = evaluate_split(predictor, val_frames, val_masks, sample)
    info = replace(info, threshold=threshold)
    kinds = {}
    if sample is not None:  # the validation roof pixels' classes: the offsets that make the decision fair to each
        bias, class_confusion, raw = calibrate_classes(sample, pixels)
        info = replace(info, class_bias=bias)
        kinds = class_metrics(classes, pixels, class_confusion, bias, raw)
    extra: dict = {}
    if objects:
        pairs = list(zip(val_frames, val_masks, strict=True))
        tuned = tune_instances(predictor, pairs, threshold)  # before the filter, which judges the objects they make
        info = replace(info, merge=tuned.merge, seed_fraction=tuned.seed_fraction)
        for line in tuned.lines:
            log.info("train: unet %s", line)
        entry, kept, why = train_object_filter(
            predictor, pairs, threshold, info.class_bias or None, tuned.merge, tuned.seed_fraction
        )
        info = replace(info, object_filter=entry)
        log.info("train: unet %s", why)
        threshold_tta, tta_confusion = tta_threshold(predictor, pairs)  # for predict_args.tta
        info = replace(info, threshold_tta=threshold_tta)
        log.info("train: unet threshold with test-time augmentation %.3f (validation IoU %.3f; predict_args.tta)",
                 threshold_tta, tta_confusion.scores()["iou"])  # fmt: skip
        extra = {"object_filter": kept, **tuned.record, "threshold_tta": threshold_tta,
                 "tta_pixel": tta_confusion.scores()}  # fmt: skip
    bundle_dir = unet_bundle.save(out / "bundle", model, info)
    record = metrics_record(
        "unet", "val", threshold, confusion, epochs=epochs, train_seconds=round(seconds, 1),
        **({"ensemble": snapshots} if snapshots and networks > 1 else {}), **({"members": members} if members else {}),
        **extra, **kinds,
    )  # fmt: skip
    write_metrics(out / "metrics.json", record)
    plot_overlays(val_frames, val_masks, predictor, threshold, per_chip, out / "overlays.png")
    scores = record["pixel"]
    log.info(
        "train: unet validation IoU %.3f, F1 %.3f, precision %.3f, recall %.3f at threshold %.2f "
        "(%d epochs, %.0f s) -> %s",
        scores["iou"],
        scores["f1"],
        scores["precision"],
        scores["recall"],
        threshold,
        epochs,
        seconds,
        out,
    )
    if classes:
        recalls = ", ".join(f"{n} {'-' if r is None else format(r, '.3f')}" for n, r in kinds["class_recall"].items())
        accuracy = kinds["material_accuracy"]
        log.info("train: unet validation material accuracy %s on the roof pixels (recall: %s)",
                 "-" if accuracy is None else f"{accuracy:.3f}", recalls)  # fmt: skip
    return bundle_dir


def evaluate_split(
    predictor, frames: list[Path], masks: list[Path], classes: ClassSample | None = None
) -> tuple[float, Confusion, list[float]]:
    """Tune the F1-best threshold over a whole split (valid pixels only, as the classical models do);
    return it, the counts there, and each chip's IoU. A chip with no roof that gets none predicted scores 1.
    ``classes`` gathers the roof pixels' class probabilities in the same pass.
    """
    chips = validate_pairs(predictor, list(zip(frames, masks, strict=True)), classes=classes)
    threshold, confusion = combine(chips).best()
    per_chip = []
    for chip in chips:
        c = chip.confusion_at(threshold)
        per_chip.append(1.0 if c.tp + c.fp + c.fn == 0 else c.scores()["iou"])
    return threshold, confusion, per_chip
