"""Settings: one pydantic model per section of settings.json.

Every stage reads the same ``settings.json``. Each field is typed, described and defaulted;
unknown keys are an error that names the key path and the closest valid name; values are
validated strictly (``"epochs": "50"`` is a wrong type, not a silent coercion). The
original pipeline's sections (``path_args`` ... ``output_args``) load unchanged, including
the misspelled ``bachnorm_momentum``.

Use :func:`load_settings` to read a file and apply ``--set key.path=value`` overrides.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.errors import DataError, SettingsError

log = logging.getLogger(__name__)

#: The settings file every stage reads unless ``--settings`` names another.
DEFAULT_SETTINGS_PATH = Path(__file__).resolve().parent.parent / "settings.json"


class Section(BaseModel):
    """Base of every section: strict types, unknown keys rejected, assignments validated."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, populate_by_name=True)


def _default_experiment() -> str:
    return "exp-" + _dt.date.today().isoformat()


#: Most classes a class map may name (class ids 1..MAX_CLASSES; 0 is background, 128 unknown).
MAX_CLASSES = 32

# --- the original pipeline's sections -------------------------------------------------------


#: The compression settings' description: the default is chosen from bench/bench_prep.py.
COMPRESSION_HELP = (
    "GeoTIFF compression, with horizontal differencing; zstd (level 1) writes 256 x 256 x 8 uint16 chips 6x "
    "faster than deflate for files 7% larger (bench/bench_prep.py; docs/speed.md)."
)


class PathArgs(Section):
    """Folder names of the split chips, relative to ``data_root``."""

    train_frames: str = Field("train_frames", description="Folder of training image chips.")
    train_masks: str = Field("train_masks", description="Folder of training masks (uint8, 0 or 255).")
    val_frames: str = Field("val_frames", description="Folder of validation image chips.")
    val_masks: str = Field("val_masks", description="Folder of validation masks (uint8, 0 or 255).")
    test_frames: str = Field(
        "test_frames", description="Folder of test image chips (when split_args.fractions.test > 0)."
    )
    test_masks: str = Field("test_masks", description="Folder of test masks.")


class CheckpointArgs(Section):
    """Where training keeps its best-epoch checkpoint."""

    checkpoint_path: str = Field(
        "checkpoint.weights.h5",
        description="File name of the best-epoch weights checkpoint, written inside results/EXPERIMENT/unet/; "
        "a name not ending in .weights.h5 (the original results_4.h5) is saved as NAME.weights.h5, as Keras 3 "
        "requires. predict never reads it: it reads the model bundle next to it.",
    )


class ExtensionArgs(Section):
    """File extension of chips and masks."""

    extension: Literal[".tif", ".tiff"] = Field(".tif", description="Extension of chip and mask files (GeoTIFF).")


#: The batch sizes a null load_dataset_args.batch_size / predict_args.batch_size means without a GPU
#: (the fixed defaults they had before null meant "choose"); on a GPU unet/device.py chooses.
CPU_TRAIN_BATCH = 8
CPU_PREDICT_BATCH = 4


class LoadDatasetArgs(Section):
    """How the U-Net's data generator reads and augments chips."""

    custom: int = Field(
        1,
        ge=0,
        le=1,
        description="Legacy: 1 selected the original custom (rasterio) reader, which is now the only one.",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="Chips per training batch (per GPU with training_args.distribute mirrored); null = "
        f"{CPU_TRAIN_BATCH} on a CPU; on a GPU, as many as fit in its free memory by a rule measured per chip "
        "pixel and filter (unet/device.py). The choice is logged.",
    )
    target_size: tuple[int, int] | None = Field(
        None,
        description="Legacy, ignored: chips are never resized (resizing 650 to 640 was one cause of blank masks). "
        "Chip size is chip_args.size; the network pads to a multiple of its poolings (2**(num_layers+1) for satellite, "
        "2**num_layers for custom, 32 for an encoder) and crops back.",
    )
    rescale: float | None = Field(
        None,
        description="Legacy, ignored: pixel values are normalized once, from training statistics "
        "(see normalization); a fixed rescale was one cause of double scaling.",
    )
    shear_range: float = Field(0.0, ge=0.0, le=45.0, description="Random shear augmentation, degrees (0 = off).")
    zoom_range: float = Field(0.0, ge=0.0, lt=1.0, description="Random zoom augmentation, fraction (0 = off).")
    hue_range: float = Field(
        0.0,
        ge=0.0,
        le=180.0,
        description="Random hue turn of the red, green and blue bands (the first three; of 8 bands, WorldView-3's "
        "5th, 3rd and 2nd), degrees either way (0 = off): the normalized colours turn about the grey axis, so grey "
        "stays grey and a blue roof may become red or green. Needs at least 3 bands.",
    )
    horizontal_flip: bool = Field(True, description="Random left-right flips.")
    vertical_flip: bool = Field(True, description="Random up-down flips.")
    rotate90: bool = Field(True, description="Random 90-degree rotations.")
    class_mode: str | None = Field(
        None, description="Legacy, ignored: masks are always read from the masks folder beside the frames."
    )
    mask_color: Literal["grayscale"] = Field("grayscale", description="Masks are single-band 0/255 rasters.")
    channels: int | None = Field(
        None,
        ge=1,
        description="Bands per chip; null = the chips' band count. Set it to insist on one: training refuses chips "
        "with another count (model_args.input_shape's third number, when given, must agree).",
    )
    data_format: Literal["channels_last"] = Field("channels_last", description="Array layout fed to the network.")
    normalization: Literal["percentile", "zscore"] = Field(
        "percentile",
        description="percentile: clip each band to its training 2nd..98th percentile and scale to 0..1; "
        "zscore: subtract the training mean, divide by the training std.",
    )
    seed: int = Field(
        0,
        description="Seed of shuffling and augmentation; each chip's augmentation comes from (seed, epoch, batch, "
        "place in the batch), so the batches are the same whatever the number of workers.",
    )
    workers: int | None = Field(
        None,
        ge=1,
        description="Threads that read and augment batches ahead of the model; null = the machine's cores less one "
        "(at least 1). The batches do not depend on it.",
    )


class ModelArgs(Section):
    """The U-Net's architecture."""

    architecture: Literal["satellite", "custom", "mobilenetv2", "resnet50"] = Field(
        "satellite",
        description="satellite: the original pipeline's U-Net built from the fields below; "
        "custom: keras-unet's custom_unet; mobilenetv2, resnet50: that Keras Applications network as the encoder "
        "(encoder_weights: ImageNet's), under a decoder of filters * 2**level filters per level, at most 256 "
        "(num_layers, upconv_filters, strides and the pooling fields do not apply; inputs are padded to a multiple of "
        "32).",
    )
    encoder_weights: str | None = Field(
        None,
        description="mobilenetv2 and resnet50 only: the encoder's initial weights. null: random; imagenet: Keras's "
        "ImageNet weights (downloaded once into ~/.keras/models); or the path of a weights file of the encoder "
        "without its top (Keras's ImageNet file copied from elsewhere, or keras.applications' save_weights), relative "
        "to the repository root unless absolute. They expect percentile normalization (0..1).",
    )
    input_shape: tuple[int, int] | tuple[int, int, int] = Field(
        (256, 256),
        description="[rows, cols] of a training chip, or [rows, cols, bands] (bands as load_dataset_args.channels: "
        "say the band count in either place, or in neither to take it from the chips). The model accepts any "
        "size: inputs are padded to a multiple of 2**(num_layers+1) (satellite), 2**num_layers (custom) or 32 (an "
        "encoder).",
    )
    num_classes: int | None = Field(
        None,
        ge=1,
        le=MAX_CLASSES,
        description="Roof classes: 1 = one kind of roof against everything else (metal roofs, the default); more = "
        "the classes of mask_args.classes, a sigmoid output per class beside the footprint; null = from the masks. The "
        "U-Net has one output channel per mask band (mask_args.targets), the footprint first, then one per class.",
    )
    num_layers: int = Field(
        4, ge=1, le=8, description="satellite and custom: encoder depth (poolings); an encoder's depth is its own (5)."
    )
    filters: int = Field(
        16,
        ge=1,
        description="Convolution filters: at every level for satellite; of the first level, doubled at each, for custom; "
        "of the full-size decoder level for an encoder, doubled at each level below up to 256.",
    )
    upconv_filters: int = Field(
        24, ge=1, description="satellite: filters of the first convolution after each skip joins the decoder."
    )
    kernel_size: tuple[int, int] = Field((3, 3), description="Convolution kernel size.")
    activation: str = Field("relu", description="Activation of the hidden convolutions (a Keras activation name).")
    strides: tuple[int, int] = Field((1, 1), description="satellite: convolution strides.")
    padding: Literal["same", "valid"] = Field("same", description="Convolution padding.")
    kernel_initializer: str = Field("he_normal", description="Keras kernel initializer name.")
    bachnorm_momentum: float = Field(
        0.9,
        gt=0.0,
        lt=1.0,
        validation_alias=AliasChoices("bachnorm_momentum", "batchnorm_momentum"),
        description="Batch-norm moving-average momentum (also accepted as batchnorm_momentum). The original "
        "0.01 keeps almost only the last batch's statistics, which differ from prediction's. An encoder's batch norm "
        "takes it too, in place of Keras Applications' 0.999 (MobileNetV2) or 0.99 (ResNet50), which lag behind "
        "fine-tuning.",
    )
    normalization: Literal["batch", "group"] = Field(
        "batch",
        description="satellite only: the normalization before each convolution. batch: batch normalization, whose "
        "moving statistics (bachnorm_momentum), which prediction uses, differ from the batch's own that training "
        "uses; group: group normalization, each chip by its own statistics over groups of channels (norm_groups), "
        "the same in training and prediction.",
    )
    norm_groups: int = Field(
        4,
        ge=1,
        description="satellite with normalization group: groups of channels (each layer takes the largest divisor of "
        "its channel count that is at most this).",
    )
    pool_size: tuple[int, int] = Field((2, 2), description="Max-pooling window.")
    pool_strides: tuple[int, int] = Field((2, 2), description="Max-pooling strides.")
    pool_padding: Literal["valid", "same"] = Field("valid", description="Max-pooling padding.")
    use_batch_norm: bool = Field(True, description="custom only: batch normalization in every block.")
    upsample_mode: Literal["deconv", "simple"] = Field(
        "deconv", description="custom only: transposed convolutions (deconv) or plain upsampling (simple)."
    )
    dropout: float = Field(0.3, ge=0.0, lt=1.0, description="custom only: dropout after the first block.")

    @field_validator("activation", "kernel_initializer")
    @classmethod
    def _known_keras_name(cls, value: str, info: ValidationInfo) -> str:
        names, what = (
            (KERAS_ACTIVATIONS, "activation")
            if info.field_name == "activation"
            else (KERAS_INITIALIZERS, "initializer")
        )
        if value not in names:
            close = difflib.get_close_matches(value, names, n=1)
            hint = f"; did you mean {close[0]}?" if close else f" (one of {', '.join(names)})"
            raise ValueError(f"{value!r} is not a Keras {what}{hint}")
        return value

    @model_validator(mode="after")
    def _group_norm_is_satellite(self) -> ModelArgs:
        if self.normalization == "group" and self.architecture == "custom":
            raise ValueError(
                "normalization group builds the satellite U-Net; architecture custom has use_batch_norm instead"
            )
        if self.normalization == "group" and self.architecture != "satellite":
            raise ValueError(
                f"normalization group builds the satellite U-Net; architecture {self.architecture}'s encoder has "
                "batch normalization (its pretrained weights include its statistics): set normalization batch, or "
                "architecture satellite"
            )
        return self

    @model_validator(mode="after")
    def _encoder_weights_need_an_encoder(self) -> ModelArgs:
        if self.encoder_weights is not None and self.architecture in ("satellite", "custom"):
            raise ValueError(
                f"encoder_weights {self.encoder_weights!r} are for architecture mobilenetv2 or resnet50; the "
                f"{self.architecture} U-Net starts from random weights (set encoder_weights null)"
            )
        return self

    @model_validator(mode="after")
    def _unet_shapes_line_up(self) -> ModelArgs:
        # A U-Net concatenates each encoder level with the decoder level of the same size:
        # anything that changes sizes other than the poolings' halving breaks it mid-run.
        if self.padding != "same":
            raise ValueError(
                "padding valid shrinks every convolution, so the U-Net's skip connections no longer line up: use "
                "same (predictions keep the input's size; inputs are padded, never resized)"
            )
        if tuple(self.strides) != (1, 1):
            raise ValueError("strides must be [1, 1]: in a U-Net the poolings halve the size, the convolutions keep it")
        if tuple(self.pool_strides) != (2, 2) or (self.pool_padding == "valid" and tuple(self.pool_size) != (2, 2)):
            raise ValueError(
                "pool_strides must be [2, 2] (and pool_size [2, 2] with pool_padding valid): each level halves the "
                "size and the decoder doubles it back"
            )
        return self


#: Names Keras 3 resolves (keras.activations.get, keras.initializers.get); checked here so a typo
#: fails when the settings load, not when the model is built.
KERAS_ACTIVATIONS = ("relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu", "swish", "mish", "softplus",
                     "softsign", "tanh", "sigmoid", "hard_sigmoid", "hard_silu", "hard_swish", "exponential",
                     "linear")  # fmt: skip
KERAS_INITIALIZERS = ("he_normal", "he_uniform", "glorot_normal", "glorot_uniform", "lecun_normal", "lecun_uniform",
                      "random_normal", "random_uniform", "truncated_normal", "orthogonal", "variance_scaling",
                      "zeros", "ones")  # fmt: skip


class TargetWeights(Section):
    """Loss weight of each target band (SpaceNet 6's winners used 1 / 0.25 / 0.1)."""

    footprint: float = Field(1.0, gt=0.0, description="Weight of the footprint's loss.")
    boundary: float = Field(0.25, ge=0.0, description="Weight of the boundary band's loss.")
    contact: float = Field(0.1, ge=0.0, description="Weight of the contact band's loss.")
    classes: float = Field(
        1.0,
        ge=0.0,
        description="Weight of each class band's loss (mask_args.classes): training_args.loss of the band (is this "
        "pixel a roof of that class?) over every pixel of known class.",
    )


class TrainingArgs(Section):
    """Training loop settings."""

    model: Literal["unet", "forest", "regression"] = Field(
        "unet", description="Model train.py trains when --model is not given."
    )
    epochs: int = Field(20, ge=1, description="Maximum training epochs.")
    pretrained: bool = Field(
        False,
        description="Continue from the bundle in results/EXPERIMENT/unet/, else from the best-epoch checkpoint a "
        "stopped run left there (checkpoint_args); neither is an error.",
    )
    results_folder: str = Field("results", description="Folder of experiment results, relative to the repository root.")
    steps_per_epoch: int | None = Field(
        None,
        ge=1,
        description="Batches per epoch; null = all training chips once, and at least 20 batches "
        "(a small training set is then seen several times per epoch, augmented differently each time).",
    )
    validation_steps: int | None = Field(None, ge=1, description="Validation batches; null = all validation chips.")
    verbose: int = Field(
        1,
        ge=0,
        le=2,
        description="Keras verbosity: 0 silent, 1 progress bar (one line per epoch when the output is not a terminal), "
        "2 one line per epoch.",
    )
    optimizer: Literal["adam", "sgd", "rmsprop"] = Field("adam", description="Optimizer.")
    learning_rate: float = Field(1e-3, gt=0.0, description="Initial learning rate.")
    lr_schedule: Literal["plateau", "cosine"] = Field(
        "plateau",
        description="plateau: the learning rate is halved when the validation loss stops falling for patience/2 "
        "epochs (down to learning_rate/100); cosine: it falls along a half cosine from learning_rate to "
        "learning_rate/100 over the whole run (epochs x batches per epoch), so the last epochs take small steps.",
    )
    loss: Literal["bce", "dice", "bce_dice", "focal", "jaccard"] = Field(
        "bce_dice", description="Loss; bce_dice handles the imbalance of a few percent roof pixels."
    )
    target_weights: TargetWeights = Field(
        default_factory=lambda: TargetWeights(),
        description="Weight of each mask band in the U-Net's loss (the loss of each band is training_args.loss); "
        "bands the masks do not have are skipped.",
    )
    patience: int = Field(8, ge=1, description="Epochs without validation IoU gain before early stopping.")
    ensemble: int = Field(
        1,
        ge=1,
        le=16,
        description="U-Net: the bundle averages the networks of this many epochs, those with the best validation "
        "IoU (a snapshot ensemble: no extra training; predict runs each of them, so it takes this many times as "
        "long); 1 = the best epoch alone.",
    )
    members: int = Field(
        1,
        ge=1,
        le=16,
        description="U-Net: train this many networks, each from its own seeds (training_args.seed and "
        "load_dataset_args.seed plus 0, 1, ...: initial weights, chip order, augmentation), and the bundle averages "
        "them (a seed ensemble; the threshold, seeds, merge limit and object filter tuned on the average). Each member's "
        "bundle, metrics and curves stay in results/EXPERIMENT/unet/members/seed-N/. Training and prediction take "
        "this many times as long; 1 = one network.",
    )
    seed: int = Field(0, description="Seed of weight initialization.")
    jit_compile: bool | None = Field(
        None,
        description="XLA compilation; null = off on a CPU (measured faster there), on with a GPU.",
    )
    mixed_precision: bool | None = Field(
        None,
        description="float16 compute with a float32 output layer (mixed_float16) on a GPU; null = on when a GPU is "
        "present, false = off; ignored on a CPU. The bundle is saved in float32 either way, so it predicts on a CPU.",
    )
    distribute: Literal["none", "mirrored"] = Field(
        "none",
        description="mirrored: train on every visible GPU of this machine with tf.distribute.MirroredStrategy; "
        "each batch is load_dataset_args.batch_size chips per GPU (global batch = batch_size x GPUs, learning "
        "rate unchanged). Without a GPU it says so and trains on the CPU.",
    )
    tensorboard: bool = Field(
        True,
        description="Write TensorBoard logs in results/EXPERIMENT/unet/tensorboard/ while the U-Net trains: loss, "
        "metrics and learning rate every epoch (tensorboard --logdir results/EXPERIMENT/unet/tensorboard).",
    )
    tensorboard_images_every: int = Field(
        5,
        ge=0,
        description="Every this many epochs the TensorBoard logs also get a few validation chips as images (image, "
        "true roofs, predicted roof probability); 0 = no images.",
    )

    def refuse_from_bundle(self, from_bundle: object) -> None:
        """A seed ensemble trains new networks: continuing a bundle (train --from-bundle) is one line, said before
        train starts (pretrained with members is refused with the settings)."""
        if self.members > 1 and from_bundle is not None:
            raise DataError(
                f"training_args.members {self.members} trains new networks from their seeds, --from-bundle "
                "continues one: train without --from-bundle, or set training_args.members 1"
            )

    @model_validator(mode="after")
    def _members_are_new_networks(self) -> TrainingArgs:
        if self.members > 1 and self.ensemble > 1:
            raise ValueError(
                f"members {self.members} and ensemble {self.ensemble} both make the bundle an average of networks: "
                "set one of them to 1"
            )
        if self.members > 1 and self.pretrained:
            raise ValueError(
                f"members {self.members} trains new networks from their seeds, pretrained true continues one: set "
                "pretrained false, or members 1"
            )
        return self


class OutputArgs(Section):
    """The U-Net's output layer."""

    kernel_size: tuple[int, int] = Field((1, 1), description="Kernel of the output convolution.")
    strides: tuple[int, int] = Field((1, 1), description="Strides of the output convolution.")
    activation: Literal["sigmoid"] = Field("sigmoid", description="Output activation (roof probability).")
    padding: Literal["valid", "same"] = Field("valid", description="Padding of the output convolution.")


# --- one section per stage ------------------------------------------------------------------


class DownloadArgs(Section):
    """download/download.py: imagery and labels from S3 or an S3-compatible store."""

    bucket: str | None = Field(
        None, description="Bucket name (or s3://bucket/prefix); asked interactively when missing."
    )
    prefix: str | None = Field(
        None,
        description="Key prefix (folder) to download from; null = chosen from a menu when interactive, "
        "the whole bucket when scripted.",
    )
    pattern: str = Field(
        "*.tif",
        description="Glob on key names of imagery to download; without a / it matches the file name, "
        "with one the key below the prefix's folder.",
    )
    labels_pattern: str | None = Field(
        None, description="Glob on key names that go to labels/ instead (e.g. *.geojson); null = none."
    )
    endpoint_url: str | None = Field(None, description="Endpoint of an S3-compatible store (MinIO, Ceph); null = AWS.")
    region: str | None = Field(None, description="AWS region; null = the profile's or environment's.")
    profile: str | None = Field(None, description="AWS credentials profile name (~/.aws/credentials, ~/.aws/config).")
    anonymous: bool = Field(False, description="Unsigned requests, for public buckets; no credentials needed.")
    workers: int = Field(
        8,
        ge=1,
        le=64,
        description="Parallel GET requests (s3transfer's max_request_concurrency): files, and the 8 MiB ranges "
        "of large files.",
    )
    target: Literal["raw", "labels"] = Field("raw", description="data/ folder imagery goes to.")
    keep_folders: bool = Field(
        False,
        description="Keep each file's folders below the prefix (raw/a/x.tif); false = file names only, "
        "as the later stages read raw/ and labels/ (two keys with one file name are then an error).",
    )
    retries: int = Field(
        5,
        ge=1,
        le=20,
        description="Attempts per request, with exponential backoff, for transient errors; also per GET whose "
        "body is cut off (s3transfer's num_download_attempts) and per file that fails its size or MD5 check.",
    )
    connect_timeout: float = Field(
        10.0, gt=0, description="Seconds to wait for a connection; the first request waits at most 5."
    )


class MosaicArgs(Section):
    """mosaic/mosaic.py: raw tiles into one raster."""

    input: str = Field("raw", description="Folder of tiles, relative to data_root.")
    overlap: Literal["first", "last", "max"] = Field(
        "first", description="Which tile wins where tiles overlap: first or last in name order, or the maximum."
    )
    reproject: bool = Field(
        False, description="Reproject tiles with another CRS or resolution to the first tile's grid."
    )
    compression: Literal["zstd", "deflate", "lzw", "none"] = Field("zstd", description=COMPRESSION_HELP)


class ChipArgs(Section):
    """chip/chip.py: fixed-size chips from the mosaic or raw tiles."""

    source: Literal["mosaic", "raw"] = Field("mosaic", description="Chip mosaic/mosaic.tif, or every tile in raw/.")
    size: int = Field(256, ge=8, description="Chip width and height in pixels (any size; 650 works).")
    stride: int | None = Field(None, ge=1, description="Step between chips; null = size (no overlap).")
    pad_value: float | None = Field(None, description="Value of padding at edges; null = the source nodata, else 0.")
    max_nodata: float = Field(0.5, ge=0.0, le=1.0, description="Skip chips whose nodata share exceeds this.")
    compression: Literal["zstd", "deflate", "lzw", "none"] = Field("zstd", description=COMPRESSION_HELP)


class LabelFilter(Section):
    """Which label polygons are burned into masks."""

    attribute: str = Field("roof_type", description="Attribute to filter on.")
    values: list[str] = Field(["metal"], min_length=1, description="Values of the attribute that are roofs.")


class IgnoreFilter(Section):
    """Label polygons whose class is unknown: neither roof nor background."""

    attribute: str = Field(description="Attribute to test.")
    values: list[str | None] = Field(
        min_length=1, description="Values that mean unknown; null matches polygons without a value."
    )


#: Names a class may not take: class id 0, the ignore value, the mask bands (they name probability bands too).
TAKEN_NAMES = ("background", "unknown", "footprint", "boundary", "contact", "class")


class MaskArgs(Section):
    """mask/mask.py: polygon labels into uint8 0/255 masks."""

    label_file: str | None = Field(None, description="Label file in labels/; null = the only one there.")
    filter: LabelFilter | None = Field(
        default_factory=LabelFilter,
        description="Polygons kept; applied when the attribute exists; null = every polygon.",
    )
    all_touched: bool = Field(
        False, description="Burn every pixel a polygon touches, not only those whose centre it covers."
    )
    burn_value: Literal[255] = Field(255, description="Mask value of roof pixels (background is 0).")
    targets: list[Literal["footprint", "boundary", "contact"]] = Field(
        ["footprint", "boundary", "contact"],
        min_length=1,
        description="Bands of each mask: footprint (the roof mask every stage reads), boundary (roof pixels "
        "within boundary_width of a roof's edge) and contact (background pixels in gaps narrower than contact_width "
        "between roofs); the U-Net learns them all and predict seeds its watershed with footprint x (1 - boundary) x "
        "(1 - contact); the classical models use the footprint alone.",
    )
    boundary_width: int | None = Field(
        None,
        ge=1,
        description="Width in pixels of the boundary band inside each roof's edge; null = 0.9 m of ground "
        "(3 px at 0.3 m, 2 px at 0.5 m).",
    )
    contact_width: int | None = Field(
        None,
        ge=1,
        description="Background pixels in a gap narrower than this many pixels between two roofs are contact; "
        "null = 3 m of ground (10 px at 0.3 m, 6 px at 0.5 m).",
    )
    ignore: IgnoreFilter | None = Field(
        None,
        description="Polygons of unknown class (e.g. no roof:material tag): their pixels get the mask value 128 "
        "and are kept out of the loss, the threshold search and every score; null = none.",
    )

    classes: dict[str, list[str]] | None = Field(
        None,
        description='Roof classes from label values, e.g. {"metal": ["tin", "metal"], "other_roof": '
        '["concrete", "clay_tiles"]}: class ids 1, 2 ... in the order named, 0 background; a polygon whose value '
        "no class names (or that has none) is unknown (128, kept out of the loss and every score). Masks get a "
        "class band; mask_args.filter is not used. null = one class: the polygons mask_args.filter keeps.",
    )
    class_attribute: str | None = Field(
        None, description="Attribute the class map reads (e.g. roof:material); null = mask_args.filter's attribute."
    )

    @field_validator("classes")
    @classmethod
    def _class_map(cls, classes: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        if classes is None:
            return None
        if not 2 <= len(classes) <= MAX_CLASSES:
            raise ValueError(
                f"names {len(classes)} class(es): name 2 to {MAX_CLASSES} (one class is mask_args.filter's job: set "
                "classes null)"
            )
        owner: dict[str, str] = {}
        for name, values in classes.items():
            if name.lower() in TAKEN_NAMES:
                raise ValueError(
                    f"class name {name!r} is reserved ({', '.join(TAKEN_NAMES[:-1])} and {TAKEN_NAMES[-1]} already "
                    "mean something here): call the class otherwise"
                )
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
                raise ValueError(f"class name {name!r} must start with a letter and hold letters, digits, _ or -")
            if not values:
                raise ValueError(f"class {name} names no value: give it the label values it stands for")
            for value in values:
                if value in owner and owner[value] != name:
                    raise ValueError(
                        f"value {value!r} is claimed by two classes ({owner[value]} and {name}): one value, one class"
                    )
                owner[value] = name
        return classes

    @property
    def class_source(self) -> str | None:
        """The attribute the class map reads: class_attribute, else the filter's (None without either)."""
        return self.class_attribute or (self.filter.attribute if self.filter is not None else None)

    def shaping(self) -> dict[str, Any]:
        """The settings as they shape masks (what a stage record compares): with a class map the filter is
        not read and the class attribute is the one read; without one the class attribute is not read."""
        values = self.model_dump(mode="json")
        if not self.classes:  # null (a record made before class maps existed lacks it: the default, no change)
            values["classes"] = None  # (kept: masks of a class map are not the metal masks made after it is removed)
            del values["class_attribute"]
            return values
        # The class ids follow the map's order: kept as a list, so a reordered map is a change.
        values["classes"] = [[name, list(kinds)] for name, kinds in self.classes.items()]
        values["class_attribute"] = self.class_source
        values["filter"] = None
        return values

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes of the class map (ids 1, 2 ...); empty without one."""
        return tuple(self.classes or ())

    @field_validator("targets")
    @classmethod
    def _footprint_first(cls, targets: list[str]) -> list[str]:
        if targets[0] != "footprint" or len(set(targets)) != len(targets):
            raise ValueError(f"must start with footprint and name each band once, got {targets}")
        return targets


class SplitFractions(Section):
    """Shares of chips in each split; they sum to 1."""

    train: float = Field(0.8, gt=0.0, le=1.0, description="Share of chips for training.")
    val: float = Field(0.2, gt=0.0, lt=1.0, description="Share of chips for validation.")
    test: float = Field(0.0, ge=0.0, lt=1.0, description="Share of chips for testing (0 = no test split).")

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self


class SplitArgs(Section):
    """split/split.py: chips into train/val(/test) folders."""

    fractions: SplitFractions = Field(default_factory=SplitFractions, description="Shares of each split.")
    seed: int = Field(0, description="Seed of the split.")
    strategy: Literal["random", "spatial", "stratified"] = Field(
        "spatial",
        description="random; spatial: blocks of neighbouring chips go to one split, dealt so that each split, once "
        "the chips that share pixels with training chips are left out of val and test, is close to the overall "
        "roof share; stratified: roof and roof-free chips balanced across splits.",
    )
    block: int = Field(2, ge=1, description="Side of a spatial block, in chips.")
    keep_empty: float = Field(1.0, ge=0.0, le=1.0, description="Share of roof-free chips kept.")


class FlattenArgs(Section):
    """flatten/flatten.py: chips and masks into one pixel table (data/flat/pixels.csv or .parquet)."""

    frames: str = Field("train_frames", description="Folder of chips to flatten, relative to data_root.")
    masks: str = Field("train_masks", description="Folder of the masks of the same names, relative to data_root.")
    layout: Literal["long", "wide"] = Field(
        "long",
        description="long: one row per pixel and band (columns band, value); wide: one row per pixel "
        "(columns band_1 ... band_N).",
    )
    format: Literal["csv", "parquet"] = Field("csv", description="Table format: pixels.csv or pixels.parquet.")
    sample_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="Share of the valid pixels kept, drawn at random (1 = all)."
    )
    balance: float | None = Field(
        None,
        gt=0.0,
        description="Keep every roof pixel and this many times as many background pixels, drawn at random "
        "(after sample_fraction); null = no balancing.",
    )
    seed: int = Field(0, description="Seed of sampling; each chip draws from (seed, chip number).")


class SummarizeArgs(Section):
    """summarize/summarize.py: band statistics and histograms (data/summary/)."""

    source: Literal["flat", "chips"] = Field(
        "flat",
        description="flat: the flat table in data/flat/; chips: the chips and masks flatten_args.frames and "
        "masks name, without flattening.",
    )
    bins: int = Field(128, ge=2, description="Histogram bins.")
    chunk_rows: int = Field(1_000_000, ge=1000, description="Rows of the flat table read at a time.")


class ForestArgs(Section):
    """Random forest hyper-parameters (scikit-learn RandomForestClassifier)."""

    n_estimators: int = Field(50, ge=1, description="Trees.")
    max_depth: int | None = Field(16, ge=1, description="Maximum tree depth; null = unlimited.")
    min_samples_leaf: int = Field(5, ge=1, description="Minimum samples per leaf.")
    class_weight: Literal["balanced", "balanced_subsample"] | None = Field("balanced", description="Class weighting.")
    n_jobs: int = Field(-1, description="Parallel jobs; -1 = all cores.")


class RegressionArgs(Section):
    """Logistic regression hyper-parameters (scikit-learn LogisticRegression after a StandardScaler)."""

    C: float = Field(1.0, gt=0.0, description="Inverse regularization strength.")
    class_weight: Literal["balanced"] | None = Field("balanced", description="Class weighting.")
    max_iter: int = Field(1000, ge=1, description="Solver iterations.")


class MlArgs(Section):
    """Classical models (train.py --model forest / regression): per-pixel features and hyper-parameters."""

    texture_windows: list[int] = Field(
        [5, 11],
        description="Odd window sizes of local mean/std texture features, per band; [] = none.",
    )
    indices: bool = Field(True, description="Add the normalized difference of every pair of bands.")
    source: Literal["chips", "flat"] = Field(
        "chips",
        description="Training pixels: chips: sampled from train_frames/ and train_masks/; flat: read from "
        "the flat table in data/flat/ (no texture: set texture_windows to []).",
    )
    max_train_pixels: int = Field(
        200_000,
        ge=100,
        description="Training pixels drawn at random: all roof pixels up to half of them, background the rest.",
    )
    seed: int = Field(0, description="Seed of pixel sampling and of the models.")
    forest: ForestArgs = Field(default_factory=ForestArgs, description="Random forest.")
    regression: RegressionArgs = Field(default_factory=RegressionArgs, description="Logistic regression.")

    @field_validator("texture_windows")
    @classmethod
    def _odd_windows(cls, value: list[int]) -> list[int]:
        bad = [w for w in value if w < 3 or w % 2 == 0]
        if bad:
            raise ValueError(f"texture windows must be odd and at least 3, got {bad}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _flat_has_no_texture(self) -> MlArgs:
        if self.source == "flat" and self.texture_windows:
            raise ValueError(
                "texture features need each pixel's neighbours, which a flat table does not hold: "
                "set ml_args.texture_windows to [] or ml_args.source to chips"
            )
        return self


class PredictArgs(Section):
    """predict/predict.py: masks, probabilities and polygons from a model bundle."""

    output: str = Field(
        "predictions", description="Folder of predictions/EXPERIMENT/MODEL/, relative to the repository root."
    )
    input: str = Field("val_frames", description="Folder of chips or one raster, relative to data_root.")
    bundle: str | None = Field(None, description="Model bundle folder; null = results/EXPERIMENT/.")
    window: int = Field(512, ge=16, description="Sliding-window size for rasters larger than it.")
    overlap: int = Field(64, ge=0, description="Overlap of sliding windows, blended to avoid seams.")
    batch_size: int | None = Field(
        None,
        ge=1,
        description=f"Windows per prediction batch; null = {CPU_PREDICT_BATCH} on a CPU and for forest and "
        "regression bundles; a U-Net on a GPU, as many as fit in its free memory by a rule measured per window "
        "pixel and filter (unet/device.py). The choice is logged.",
    )
    threshold: float | None = Field(
        None, gt=0.0, lt=1.0, description="Decision threshold; null = the bundle's tuned one."
    )
    save_probabilities: bool = Field(True, description="Also write float32 probability GeoTIFFs.")
    instances: bool = Field(
        True,
        description="One polygon per roof: a seeded watershed on the probabilities separates touching roofs "
        "(instances/NAME.tif holds each roof's id); false: one polygon per connected group of roof pixels.",
    )
    tta: bool = Field(
        False,
        description="Test-time augmentation: average the probabilities of the 8 flips and quarter turns of every "
        "window (8 times the prediction time), with a U-Net's threshold tuned on averaged validation "
        "probabilities (bundle.json threshold_tta) unless predict_args.threshold is set.",
    )
    grid_size: float = Field(
        100.0,
        gt=0.0,
        description="Side in metres of the grid cells of grid.gpkg and grid.csv: roofs and roof area per cell "
        "(a roof counts in the cell holding its centroid); at most 1,000,000 cells over the rasters predicted.",
    )
    seeds: Literal["auto", "footprint", "channels"] = Field(
        "auto",
        description="What seeds the watershed: channels = footprint x (1 - boundary) x (1 - contact) from a U-Net "
        "trained on those mask bands (an error for a bundle without them); footprint = the roof probability "
        "alone; auto = channels when the bundle has them.",
    )
    seed_threshold: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Probability of the roof cores that seed the watershed (of footprint x (1 - boundary) x "
        "(1 - contact) with the bands); null = a U-Net's tuned seeds (train chose, on the validation chips, how far "
        "from the decision threshold to 1 they start: bundle.json seed_fraction), else halfway between the "
        "decision threshold and 1 (0.75 for 0.5) for seeds from the footprint, three quarters of the way (0.875 "
        "for 0.5) for seeds from the boundary and contact bands.",
    )
    merge: float | None = Field(
        None,
        ge=0.0,
        le=1.01,
        description="With instances and a U-Net trained on the boundary band: join touching objects whose shared "
        "border has a mean boundary probability under this (the pieces of one large roof its ridges seeded twice); "
        "null = the limit train chose on the validation chips (bundle.json merge); 0 = never merge; 1.01 = merge "
        "every touching pair.",
    )
    object_filter: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="With instances: drop the roofs whose probability of being a roof, by the object filter "
        "train fitted on the validation chips (a logistic regression on each object's size, probabilities, shape, "
        "bands and what it looks like in the image: each band's mean, spread and share), is under this; they leave the mask, the polygons and the class raster. null = the bundle's "
        "cut (tuned on validation); 0 keeps every object, as does a bundle without a filter, or seeds footprint "
        "on a bundle whose filter reads the boundary and contact bands.",
    )
    roof_class: Literal["vote", "majority"] = Field(
        "vote",
        description="A bundle trained on classes: the class of a roof, one per roof: vote = the class whose "
        "probabilities summed over the roof's pixels are highest (a vote weighted by probability); majority = "
        "the class most of its pixels find most probable.",
    )
    split_classes: bool = Field(
        True,
        description="A bundle trained on classes, with instances: split a roof where its pixels' most probable "
        "class changes, each part a roof of its own (a metal roof touching a concrete one is two roofs, not one "
        "roof of one material; parts under 8 m2 keep their roof's class); false = one class for the whole object "
        "the watershed found, and every object kept (the object filter learnt from split roofs).",
    )
    calibrated_classes: bool = Field(
        True,
        description="A bundle trained on classes: shift each class's probability by the offset train tuned on the "
        "validation roofs (the decision fair to a class the model under-calls: the best mean recall of the "
        "classes); false = the model's own probabilities.",
    )
    min_area: float = Field(4.0, ge=0.0, description="Drop roof polygons smaller than this, m2.")
    simplify: float = Field(0.0, ge=0.0, description="Simplify polygons with this tolerance, map units.")
    compression: Literal["zstd", "deflate", "lzw", "none"] = Field("zstd", description=COMPRESSION_HELP)


class EvaluateArgs(Section):
    """evaluate/evaluate.py: predictions against ground truth (results/EXPERIMENT/MODEL/evaluation/SPLIT/)."""

    split: Literal["val", "test"] = Field(
        "val", description="Split whose masks are the truth; the predictions must be of that split's chips."
    )
    min_area: int = Field(
        20, ge=0, description="Objects (true or predicted) under this many pixels are ignored in the object scores."
    )
    iou_threshold: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="IoU at which a predicted object matches a true one (SpaceNet: 0.5).",
    )
    group_by: str | None = Field(
        None,
        description="An attribute of the label file: polygon scores also for each of its values (e.g. the sample "
        "scene's layout: row for roofs that touch their neighbours, detached for the others); null = none.",
    )
    min_area_m2: float = Field(
        4.0,
        ge=0.0,
        description="Roof polygons (true or predicted, clipped to their chip) under this ground area in m2 are "
        "ignored in the polygon scores, as SpaceNet ignores tiny buildings.",
    )


class ParallelArgs(Section):
    """How tile stages map work: local processes or a Dask cluster."""

    scheduler: str = Field(
        "",
        description="Empty: local processes; else the address of a Dask distributed scheduler (tcp://host:8786) "
        "that runs chip, mask, flatten and predict on its workers; data paths must be the same there.",
    )
    workers: int | None = Field(
        None,
        ge=1,
        description="Local worker processes (scheduler empty); null = number of cores, except predict: one "
        "process, as the model already uses every core.",
    )


class Settings(Section):
    """The whole settings.json."""

    data_root: str = Field(
        "data", description="Root of the data tree; relative paths are relative to the repository root."
    )
    experiment: str = Field(
        default_factory=_default_experiment,
        min_length=1,
        description="Experiment name: results/EXPERIMENT/ and predictions/EXPERIMENT/. Default exp-<today>.",
    )
    path_args: PathArgs = Field(default_factory=PathArgs, description=PathArgs.__doc__)
    checkpoint_args: CheckpointArgs = Field(default_factory=CheckpointArgs, description=CheckpointArgs.__doc__)
    extension_args: ExtensionArgs = Field(default_factory=ExtensionArgs, description=ExtensionArgs.__doc__)
    load_dataset_args: LoadDatasetArgs = Field(default_factory=LoadDatasetArgs, description=LoadDatasetArgs.__doc__)
    model_args: ModelArgs = Field(default_factory=ModelArgs, description=ModelArgs.__doc__)
    training_args: TrainingArgs = Field(default_factory=TrainingArgs, description=TrainingArgs.__doc__)
    output_args: OutputArgs = Field(default_factory=OutputArgs, description=OutputArgs.__doc__)
    download_args: DownloadArgs = Field(default_factory=DownloadArgs, description=DownloadArgs.__doc__)
    mosaic_args: MosaicArgs = Field(default_factory=MosaicArgs, description=MosaicArgs.__doc__)
    chip_args: ChipArgs = Field(default_factory=ChipArgs, description=ChipArgs.__doc__)
    mask_args: MaskArgs = Field(default_factory=MaskArgs, description=MaskArgs.__doc__)
    split_args: SplitArgs = Field(default_factory=SplitArgs, description=SplitArgs.__doc__)
    flatten_args: FlattenArgs = Field(default_factory=FlattenArgs, description=FlattenArgs.__doc__)
    summarize_args: SummarizeArgs = Field(default_factory=SummarizeArgs, description=SummarizeArgs.__doc__)
    ml_args: MlArgs = Field(default_factory=MlArgs, description=MlArgs.__doc__)
    predict_args: PredictArgs = Field(default_factory=PredictArgs, description=PredictArgs.__doc__)
    evaluate_args: EvaluateArgs = Field(default_factory=EvaluateArgs, description=EvaluateArgs.__doc__)
    parallel: ParallelArgs = Field(default_factory=ParallelArgs, description=ParallelArgs.__doc__)

    @field_validator("experiment")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if "/" in value or "\\" in value or value in (".", ".."):
            raise ValueError(f"experiment must be a plain folder name, got {value!r}")
        return value

    @property
    def bands(self) -> int | None:
        """The band count the settings insist on (load_dataset_args.channels, else model_args.input_shape's third
        number); None: whatever the chips have."""
        shape = self.model_args.input_shape
        return self.load_dataset_args.channels or (shape[2] if len(shape) == 3 else None)

    @model_validator(mode="after")
    def _cross_field(self) -> Settings:
        shape, channels = self.model_args.input_shape, self.load_dataset_args.channels
        if len(shape) == 3 and channels is not None and shape[2] != channels:
            raise ValueError(
                f"model_args.input_shape[2] is {shape[2]} but load_dataset_args.channels is {channels}: say the band "
                "count once (load_dataset_args.channels), or in neither place to take it from the chips"
            )
        classes, num = len(self.mask_args.class_names) or 1, self.model_args.num_classes
        if num is not None and num != classes:
            raise ValueError(
                f"model_args.num_classes is {num} but mask_args.classes names {classes} class(es)"
                + (" (it is null: one class)" if not self.mask_args.classes else "")
                + ": set num_classes null to take it from the class map"
            )
        if self.chip_args.stride is not None and self.chip_args.stride > self.chip_args.size:
            log.debug("chip_args.stride > size: chips leave gaps between them")
        if self.predict_args.overlap * 2 >= self.predict_args.window:
            raise ValueError(
                f"predict_args.overlap ({self.predict_args.overlap}) must be under half of predict_args.window "
                f"({self.predict_args.window})"
            )
        return self


#: Settings accepted for old files but ignored: key path -> what replaced them.
LEGACY_KEYS = {
    ("load_dataset_args", "target_size"): "chips are never resized; chip size is chip_args.size",
    ("load_dataset_args", "rescale"): "normalization comes from training statistics (load_dataset_args.normalization)",
    ("load_dataset_args", "class_mode"): "masks are always read from the masks folder beside the frames",
}


# --- loading ---------------------------------------------------------------------------------


def _unwrap(annotation: Any) -> list[Any]:
    """The member types of an annotation (``X | None`` -> [X, None])."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def _section_of(annotation: Any) -> type[BaseModel] | None:
    for member in _unwrap(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def _names(model: type[BaseModel]) -> list[str]:
    names = []
    for name, info in model.model_fields.items():
        names.append(name)
        if isinstance(info.validation_alias, AliasChoices):
            names.extend(str(c) for c in info.validation_alias.choices if isinstance(c, str))
    return sorted(set(names))


def _field(model: type[BaseModel], key: str) -> Any:
    """The field of ``model`` named ``key`` (or accepting it as an alias), else None."""
    if key in model.model_fields:
        return model.model_fields[key]
    for info in model.model_fields.values():
        if isinstance(info.validation_alias, AliasChoices) and key in info.validation_alias.choices:
            return info
    return None


def _model_at(path: tuple[str, ...]) -> type[BaseModel] | None:
    """The section model at a key path (``()`` is the whole Settings), else None."""
    model: type[BaseModel] | None = Settings
    for key in path:
        field = _field(model, key) if model is not None else None
        if field is None:
            return None
        model = _section_of(field.annotation)
    return model


def _unknown_key_message(path: tuple[str, ...]) -> str:
    parent: type[BaseModel] | None = Settings  # the section holding path[-1] (None below a free-form field)
    for depth, key in enumerate(path[:-1]):
        field = _field(parent, key)
        if field is None:  # a section misspelt (chip_arg.size): the hint is for that key
            return _unknown_key_message(path[: depth + 1]) + f" (in {'.'.join(path)})"
        parent = _section_of(field.annotation)
        if parent is None:
            break
    hint = ""
    if parent is not None:
        close = difflib.get_close_matches(path[-1], _names(parent), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(_names(parent))}"
    return f"{'.'.join(path)}: unknown key{hint}"


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(_unknown_key_message(loc))
            continue
        where = ".".join(loc) if loc else "settings"
        msg = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        shown = (
            "" if isinstance(given, dict) or err["type"].startswith("value_error") else f" (got {json.dumps(given)})"
        )
        lines.append(f"{where}: {msg}{shown}")
    return f"invalid settings in {source}: " + "; ".join(lines)


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """Parse one ``--set key.path=value``; the value is JSON, or a plain string.

    Fields typed as strings take the text as it is (``--set experiment=2024`` is "2024").
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SettingsError(f"--set {item!r}: expected key.path=value, e.g. --set training_args.epochs=3")
    path = tuple(key.split("."))
    if any(not part for part in path):
        raise SettingsError(f"--set {item!r}: empty part in key path {key!r}")
    parent = _model_at(path[:-1])
    field = _field(parent, path[-1]) if parent is not None else None
    if field is None:
        raise SettingsError(f"--set {item!r}: {_unknown_key_message(path)}")
    members = _unwrap(field.annotation)
    if str in members:
        value: Any = None if raw == "null" and type(None) in members else raw
    else:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # validation then says which type was expected
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of raw settings ``data`` with ``--set`` overrides applied."""
    result = json.loads(json.dumps(data))
    for item in overrides:
        path, value = parse_override(item)
        node = result
        for key in path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        # Setting a field by one of its names replaces it under any other (bachnorm/batchnorm).
        field = _field(_model_at(path[:-1]), path[-1])
        if isinstance(field.validation_alias, AliasChoices):
            for name in field.validation_alias.choices:
                node.pop(name, None)
        node[path[-1]] = value
    return result


def validate_settings(data: dict[str, Any], source: str = "settings") -> Settings:
    """Validate raw settings; a :class:`SettingsError` names every bad key path."""
    if not isinstance(data, dict):
        raise SettingsError(f"{source}: the top level must be a JSON object {{...}}, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k != "$schema"}  # for editors: settings.schema.json
    model_args = data.get("model_args")
    if isinstance(model_args, dict) and {"bachnorm_momentum", "batchnorm_momentum"} <= model_args.keys():
        raise SettingsError(
            f"invalid settings in {source}: model_args: give bachnorm_momentum or batchnorm_momentum, not both"
        )
    try:
        # JSON mode: strict types as JSON has them (arrays are valid tuples, "50" is not an int).
        settings = Settings.model_validate_json(json.dumps(data))
    except ValidationError as exc:
        raise SettingsError(_format_errors(exc, source)) from None
    explain_legacy(settings)
    return settings


#: Legacy keys already explained in this process: once per stage run, or per pipeline.py run.
_explained: set[str] = set()


def legacy_in_use(settings: Settings) -> list[tuple[str, str]]:
    """(key path, what replaced it) of every original-pipeline key given a value (null is unset)."""
    return [
        (f"{section}.{key}", replacement)
        for (section, key), replacement in LEGACY_KEYS.items()
        if getattr(getattr(settings, section), key) is not None
    ]


def explain_legacy(settings: Settings) -> None:
    """One line naming the original pipeline's keys that are set and ignored, once per process."""
    keys = [k for k, _ in legacy_in_use(settings) if k not in _explained]
    if keys:
        _explained.update(keys)
        log.warning(
            "settings: %s %s the original pipeline's and ignored here (python pipeline.py check says what replaced "
            "each)",
            ", ".join(keys),
            "is" if len(keys) == 1 else "are",
        )


def checkpoint_file(settings: Settings) -> str:
    """The checkpoint's file name: checkpoint_args.checkpoint_path as Keras 3 accepts it (``*.weights.h5``).

    The original settings name it ``results_4.h5``; Keras 3 saves weights only under a name
    ending in ``.weights.h5``, so ``results_4.h5`` becomes ``results_4.weights.h5``.
    """
    name = settings.checkpoint_args.checkpoint_path
    if name.endswith(".weights.h5"):
        return name
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in (".h5", ".hdf5", ".keras") else name
    return stem + ".weights.h5"


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """Read settings.json as raw JSON; errors say which file and where."""
    path = Path(path)
    if path.is_dir():
        inside = " (it holds a settings.json: --settings " + str(path / "settings.json") + ")"
        raise SettingsError(
            f"settings file {path} is a folder{inside if (path / 'settings.json').is_file() else ''}: pass the "
            "settings file itself"
        )
    if not path.is_file():
        raise SettingsError(
            f"settings file {path} not found: pass --settings PATH, or copy settings.json from the repository root"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SettingsError(
            f"{path} is not a UTF-8 text file ({exc.reason} at byte {exc.start}): pass a JSON file"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    return data


def load_settings(path: str | Path | None = None, overrides: list[str] | None = None) -> Settings:
    """Read, override and validate settings.

    Args:
        path: settings file; default ``settings.json`` at the repository root.
        overrides: ``key.path=value`` strings, applied in order.
    """
    path = Path(path) if path is not None else DEFAULT_SETTINGS_PATH
    data = apply_overrides(read_settings_file(path), overrides or [])
    return validate_settings(data, source=f"{path} with the --set overrides" if overrides else str(path))


def dump_settings(settings: Settings) -> str:
    """The resolved settings as pretty JSON; loading it gives the same settings."""
    return json.dumps(settings.model_dump(mode="json"), indent=2) + "\n"


def _type_name(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else repr(annotation)
    for old, new in (
        ("typing.", ""),
        ("core.settings.", ""),
        ("NoneType", "null"),
        ("Literal", "one of "),
        (" | ", " or "),
        ("None", "null"),
    ):
        text = text.replace(old, new)
    return text


def _rows(model: type[BaseModel], values: dict[str, Any], prefix: str = "", scalars_only: bool = False) -> list[str]:
    rows = []
    for name, info in model.model_fields.items():
        sub = _section_of(info.annotation)
        if sub is not None:
            if not scalars_only and values[name] is None:  # an optional section, off by default
                desc = (info.description or "").replace("|", "\\|")
                rows.append(f"| `{prefix}{name}` | {sub.__name__} or null | `null` | {desc} |")
                rows += [r.replace("| `null` |", "| (required) |") for r in _rows(sub, {}, f"{prefix}{name}.")]
            elif not scalars_only:
                if type(None) in typing.get_args(info.annotation):  # set by default, and null may turn it off
                    desc = (info.description or "").replace("|", "\\|")
                    rows.append(f"| `{prefix}{name}` | {sub.__name__} or null | (the keys below) | {desc} |")
                rows += _rows(sub, values[name], f"{prefix}{name}.")
            continue
        default = "exp-<today>" if model is Settings and name == "experiment" else json.dumps(values.get(name))
        desc = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {_type_name(info.annotation)} | `{default}` | {desc} |")
    return rows


def settings_reference() -> str:
    """Markdown tables of every section and key, from the schema's types, defaults and descriptions.

    docs/settings.md holds this text (make readme); ``python -m core.settings`` prints it.
    """
    defaults = Settings(experiment="x").model_dump(mode="json")
    header = ["| key | type | default | description |", "|---|---|---|---|"]
    parts = ["\n".join(header + _rows(Settings, defaults, scalars_only=True))]
    for name, info in Settings.model_fields.items():
        sub = _section_of(info.annotation)
        if sub is not None:
            doc = (sub.__doc__ or "").strip()
            parts.append("\n".join([f"#### `{name}`", "", doc, "", *header, *_rows(sub, defaults[name])]))
    return "\n\n".join(parts) + "\n"


#: The JSON Schema file beside settings.json that editors use to complete and check it.
SCHEMA_NAME = "settings.schema.json"


def settings_schema() -> dict[str, Any]:
    """JSON Schema of settings.json from the models: descriptions, defaults, enums, ranges, unknown keys refused.

    ``settings.json`` names it (``"$schema": "./settings.schema.json"``) so that VS Code and other
    editors complete keys, show the descriptions and flag a typo while editing.
    """
    schema = Settings.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "roof-classify settings.json"
    schema["properties"] = {"$schema": {"type": "string", "description": "This schema, for editors."},
                            **schema["properties"]}  # fmt: skip
    model = schema["$defs"]["ModelArgs"]["properties"]
    model["batchnorm_momentum"] = {**model["bachnorm_momentum"], "description": "Same as bachnorm_momentum."}
    return schema


def schema_text() -> str:
    return json.dumps(settings_schema(), indent=2) + "\n"


README_MARKERS = ("<!-- settings-reference:start -->\n", "<!-- settings-reference:end -->")


def splice_reference(readme: str) -> str:
    """README text with the settings reference between its markers replaced by the current one."""
    start, end = README_MARKERS
    head, _, rest = readme.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}{settings_reference()}{end}{tail}"


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--schema"]:
        Path(sys.argv[2]).write_text(schema_text(), encoding="utf-8")
    elif sys.argv[1:2] == ["--readme"]:
        path = Path(sys.argv[2])
        path.write_text(splice_reference(path.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(settings_reference(), end="")
