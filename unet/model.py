"""The U-Net, built from model_args and output_args.

``architecture: satellite`` is the original pipeline's network: the satellite-imagery U-Net
(deepsense.ai's, as keras-unet's ``satellite_unet`` has it) with every size, activation and
momentum taken from settings instead of hard-coded. ``architecture: custom`` builds
keras-unet's ``custom_unet``. ``architecture: mobilenetv2`` and ``resnet50`` put a Keras Applications
encoder (ImageNet-pretrained with ``encoder_weights``) under this project's decoder. The input is ``(None, None, bands)``: one model serves any
chip size that is a multiple of :func:`pad_multiple`; the data generator and predict pad to
it (reflect) and crop back, so nothing is ever resized.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import layers

from core.errors import PipelineError
from core.raster import rgb_bands
from core.settings import ModelArgs, OutputArgs
from core.tree import IMAGENET_FILES, encoder_weights_file, keras_cache


@dataclass(frozen=True)
class Encoder:
    """A Keras Applications network as a U-Net's encoder.

    ``skips``: the layers whose outputs the decoder joins, at strides 2, 4, 8 and 16; ``bottom``: the
    layer at stride 32 the decoder starts from. The image reaches the encoder through a fixed 1 x 1
    convolution, ``out[j] = scale * in[order[j]] + offset[j]``, from percentile normalization's 0..1
    to what the encoder's ImageNet weights were trained on (Keras's ``preprocess_input``).
    ``weights_file``: the name Keras gives the ImageNet weights in ``~/.keras/models``.
    """

    builder: str
    skips: tuple[str, str, str, str]
    bottom: str
    scale: float
    offset: tuple[float, float, float]
    order: tuple[int, int, int]
    weights_file: str


#: The encoders ``model_args.architecture`` may name.
ENCODERS = {
    "mobilenetv2": Encoder(
        "MobileNetV2",
        ("block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu", "block_13_expand_relu"),
        "block_16_project_BN",
        2.0,
        (-1.0, -1.0, -1.0),  # "tf" mode: -1..1
        (0, 1, 2),
        IMAGENET_FILES["mobilenetv2"],
    ),
    "resnet50": Encoder(
        "ResNet50",
        ("conv1_relu", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out"),
        "conv5_block3_out",
        255.0,
        (-103.939, -116.779, -123.68),  # "caffe" mode: BGR, 0..255, less ImageNet's mean
        (2, 1, 0),
        IMAGENET_FILES["resnet50"],
    ),
}
#: The widest decoder level of an encoder U-Net (the levels halve from it: filters * 2**level at most).
MAX_DECODER_FILTERS = 256


def pad_multiple(model_args: ModelArgs) -> int:
    """Input sides must be multiples of this: 2 ** (number of poolings)."""
    if model_args.architecture in ENCODERS:
        return 32
    poolings = model_args.num_layers + 1 if model_args.architecture == "satellite" else model_args.num_layers
    return 2**poolings


def _normalize(x: Any, m: ModelArgs) -> Any:
    """Batch normalization, or group normalization over the largest divisor of the channels up to norm_groups."""
    if m.normalization == "batch":
        return layers.BatchNormalization(momentum=m.bachnorm_momentum)(x)
    channels = x.shape[-1]
    groups = max(g for g in range(1, min(m.norm_groups, channels) + 1) if channels % g == 0)
    return layers.GroupNormalization(groups=groups)(x)


def _norm_conv(x: Any, filters: int, m: ModelArgs, conv: dict[str, Any]) -> Any:
    return layers.Conv2D(filters, **conv)(_normalize(x, m))


def _norm_upconv(x: Any, filters: int, m: ModelArgs, upconv: dict[str, Any]) -> Any:
    return layers.Conv2DTranspose(filters, **upconv)(_normalize(x, m))


def _output(x: Any, channels: int, o: OutputArgs) -> Any:
    """The output layer from output_args: one band per target, in float32 (also under mixed precision)."""
    return layers.Conv2D(
        channels,
        kernel_size=o.kernel_size,
        strides=o.strides,
        activation=o.activation,
        padding=o.padding,
        dtype="float32",
        name="roof_probability",
    )(x)


def satellite_unet(bands: int, m: ModelArgs, o: OutputArgs, channels: int = 1) -> keras.Model:
    """The satellite U-Net: batch (or group) norm before each convolution, constant width, skip at every level."""
    conv = {
        "kernel_size": m.kernel_size,
        "activation": m.activation,
        "strides": m.strides,
        "padding": m.padding,
        "kernel_initializer": m.kernel_initializer,
    }
    upconv = {
        "kernel_size": m.kernel_size,
        "activation": m.activation,
        "strides": (2, 2),
        "padding": "same",
        "kernel_initializer": m.kernel_initializer,
    }
    pool = {"pool_size": m.pool_size, "strides": m.pool_strides, "padding": m.pool_padding}
    filters = m.filters

    inputs = keras.Input((None, None, bands), name="image")
    x = layers.Conv2D(filters, **conv)(inputs)
    top = _norm_conv(x, filters, m, conv)
    x = _norm_conv(top, filters, m, conv)
    x = layers.MaxPooling2D(**pool)(x)

    skips = []
    for _ in range(m.num_layers):
        x = _norm_conv(x, filters, m, conv)
        x = _norm_conv(x, filters, m, conv)
        skips.append(x)
        x = _norm_conv(x, filters, m, conv)
        x = layers.MaxPooling2D(**pool)(x)

    x = _norm_conv(x, filters, m, conv)
    x = _norm_conv(x, filters, m, conv)
    x = _norm_upconv(x, filters, m, upconv)
    for skip in reversed(skips):
        x = layers.concatenate([x, skip])
        x = _norm_conv(x, m.upconv_filters, m, conv)
        x = _norm_conv(x, filters, m, conv)
        x = _norm_upconv(x, filters, m, upconv)

    x = layers.concatenate([x, top])
    x = _norm_conv(x, m.upconv_filters, m, conv)
    x = _norm_conv(x, filters, m, conv)
    outputs = _output(x, channels, o)
    return keras.Model(inputs, outputs, name="satellite_unet")


def custom_unet(bands: int, m: ModelArgs, o: OutputArgs, channels: int = 1) -> keras.Model:
    """keras-unet's custom_unet with this project's settings (its import banner silenced)."""
    with contextlib.redirect_stdout(io.StringIO()):
        from keras_unet.models import custom_unet as build

    return build(
        input_shape=(None, None, bands),
        num_classes=channels,
        activation=m.activation,
        use_batch_norm=m.use_batch_norm,
        upsample_mode=m.upsample_mode,
        dropout=m.dropout,
        filters=m.filters,
        num_layers=m.num_layers,
        output_activation=o.activation,
    )


def encoder_unet(bands: int, m: ModelArgs, o: OutputArgs, channels: int = 1) -> keras.Model:
    """A U-Net on a Keras Applications encoder (:data:`ENCODERS`), its initial weights from
    ``model_args.encoder_weights`` (:func:`load_encoder_weights`).

    Chips of other than 3 bands first pass a trainable 1 x 1 convolution to 3 (``band_adapter``, starting
    as the pick of :func:`core.raster.rgb_bands`: WorldView-3's red, green and blue of 8 bands). The
    decoder doubles the size at each of the encoder's 5 strides (nearest: Keras 3.15's bilinear upsampling fails
    in a graph of unknown chip size, as predict traces), joins the skip of that size
    and runs two normalized convolutions of ``filters * 2**level`` (at most 256) filters; at full size it
    joins two convolutions of the image itself, as the satellite U-Net's top level.
    """
    spec = ENCODERS[m.architecture]
    conv = {
        "kernel_size": m.kernel_size,
        "activation": m.activation,
        "padding": "same",
        "kernel_initializer": m.kernel_initializer,
    }
    inputs = keras.Input((None, None, bands), name="image")
    x = inputs
    if bands != 3:
        adapter = layers.Conv2D(3, 1, name="band_adapter")
        x = adapter(x)
        pick = np.zeros((1, 1, bands, 3), np.float32)
        for j, band in enumerate(rgb_bands(bands)):
            pick[0, 0, band, j] = 1.0
        adapter.set_weights([pick, np.zeros(3, np.float32)])
    entry = layers.Conv2D(3, 1, trainable=False, dtype="float32", name="encoder_input")
    x = entry(x)
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    for j, band in enumerate(spec.order):
        kernel[0, 0, band, j] = spec.scale
    entry.set_weights([kernel, np.asarray(spec.offset, np.float32)])

    builder = getattr(keras.applications, spec.builder)
    encoder = builder(include_top=False, weights=None, input_tensor=x)
    if m.encoder_weights is not None:
        load_encoder_weights(encoder, m)
    for layer in encoder.layers:
        # Keras Applications' batch norm keeps 0.999 (MobileNetV2) or 0.99 (ResNet50) of its moving statistics per
        # batch: on Banepa, after 15 epochs of 20 batches the validation chips were still normalized by the
        # pretrained statistics and 50-88% of their pixels predicted roof (16% are). bachnorm_momentum (0.9) follows.
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = m.bachnorm_momentum
    skips = [encoder.get_layer(name).output for name in spec.skips]

    top = layers.Conv2D(m.filters, **conv)(inputs)
    top = _norm_conv(top, m.filters, m, conv)
    x = encoder.get_layer(spec.bottom).output
    for level, skip in zip(range(len(skips), 0, -1), reversed(skips), strict=True):
        width = min(m.filters * 2**level, MAX_DECODER_FILTERS)
        x = layers.UpSampling2D(2)(x)
        x = layers.concatenate([x, skip])
        x = _norm_conv(x, width, m, conv)
        x = _norm_conv(x, width, m, conv)
    x = layers.UpSampling2D(2)(x)
    x = layers.concatenate([x, top])
    x = _norm_conv(x, m.filters, m, conv)
    x = _norm_conv(x, m.filters, m, conv)
    outputs = _output(x, channels, o)
    return keras.Model(inputs, outputs, name=f"{m.architecture}_unet")


def load_encoder_weights(encoder: keras.Model, m: ModelArgs) -> None:
    """Copy ``model_args.encoder_weights`` (``imagenet``: Keras's download; else a weights file of the
    encoder without its top) into ``encoder``'s layers, by name. Raises PipelineError when they cannot be had."""
    for layer in weighted_encoder(m).layers:
        if layer.weights:
            encoder.get_layer(layer.name).set_weights(layer.get_weights())


def weighted_encoder(m: ModelArgs) -> keras.Model:
    """The Keras Applications encoder of ``model_args.architecture`` without its top, with
    ``model_args.encoder_weights`` loaded (downloaded into Keras's cache for ``imagenet``). Raises PipelineError
    when they cannot be had: train calls it before it removes a previous run's outputs."""
    spec = ENCODERS[m.architecture]
    source = m.encoder_weights
    path = encoder_weights_file(source)
    if path is not None:
        if not path.is_file():
            raise PipelineError(
                f"model_args.encoder_weights {source!r} is not a file: give the path of {spec.builder}'s weights "
                f"without its top (Keras's {spec.weights_file}, or a .weights.h5 of keras.applications.{spec.builder}"
                f"(include_top=False)), 'imagenet' to download them, or null to start from random weights"
            )
        source = str(path)
    builder = getattr(keras.applications, spec.builder)
    try:
        with warnings.catch_warnings():  # a file of another network: a warning per layer, then the error below
            warnings.simplefilter("ignore", UserWarning)
            weighted = builder(include_top=False, weights=source, input_shape=(None, None, 3))
    except Exception as exc:  # a failed download, a file of another network: one line, the cause kept
        cache = keras_cache()
        if m.encoder_weights == "imagenet":
            raise PipelineError(
                f"model_args.encoder_weights imagenet: Keras could not get or read {spec.weights_file} ({exc}): copy "
                f"it into {cache} from a machine that can download it, or set encoder_weights to its path"
            ) from exc
        # Keras's message ends with a dump of the variable's values: one line, without it.
        cause = " ".join(str(exc).split("Target variable:")[0].split())
        raise PipelineError(
            f"model_args.encoder_weights {m.encoder_weights!r} are not weights of {spec.builder} without its top "
            f"({type(exc).__name__}: {cause if len(cause) <= 400 else cause[:400] + '...'})"
        ) from exc
    return weighted


def build_model(
    bands: int, model_args: ModelArgs, output_args: OutputArgs, channels: int = 1, classes: int = 0
) -> keras.Model:
    """The U-Net for ``bands``-band input of any size that is a multiple of :func:`pad_multiple`, with one
    output channel per target (footprint first: the roof probability; then boundary, contact) and, with
    ``classes``, one sigmoid per class after them: the probability of a roof of that class (the predictor
    scales them to add up to 1 where they add up to more)."""
    builders = {"satellite": satellite_unet, "custom": custom_unet, **dict.fromkeys(ENCODERS, encoder_unet)}
    if model_args.architecture not in builders:
        raise PipelineError(
            f"model_args.architecture {model_args.architecture!r} is unknown: use one of {', '.join(builders)}"
        )
    model = builders[model_args.architecture](bands, model_args, output_args, channels)
    if model.outputs[0].dtype != "float32":
        # Under mixed precision keras-unet's last layer computes in float16: the losses and the
        # probabilities near 0 and 1 want float32, as the satellite network's output layer has.
        out = layers.Activation("linear", dtype="float32", name="roof_probability")(model.outputs[0])
        model = keras.Model(model.inputs[0], out, name=model.name)
    if classes:
        model = with_class_head(model, classes)
    return model


def with_class_head(model: keras.Model, classes: int) -> keras.Model:
    """The network with a second head beside its targets: a 1 x 1 convolution and a sigmoid per class on the
    features the targets' output layer reads (float32, as the targets). Each class band is learnt as the
    one-class footprint is, over every pixel; on Banepa this beat a softmax over the classes learnt on roofs
    only (docs/stages/train-unet.md#roof-classes)."""
    head = next(layer for layer in reversed(model.layers) if isinstance(layer, layers.Conv2D))
    kind = layers.Conv2D(classes, 1, activation="sigmoid", dtype="float32", name="roof_class")(head.input)
    out = layers.Concatenate(dtype="float32", name="roof_outputs")([model.outputs[0], kind])
    return keras.Model(model.inputs[0], out, name=model.name)


def float32_copy(model: keras.Model, name: str | None = None) -> keras.Model:
    """The same network and weights computing in float32 throughout (named ``name`` when given).

    A model built under mixed precision records the mixed_float16 policy in every layer, and
    would compute in float16 wherever it is loaded, a CPU included; the bundle gets this copy.
    """
    config = model.get_config()  # (not keras.models.clone_model: it would compile the copy as the model is)
    if name is not None:
        config["name"] = name
    for layer in config["layers"]:
        if "dtype" in layer["config"]:
            layer["config"]["dtype"] = "float32"
    copy = keras.Model.from_config(config)
    copy.set_weights(model.get_weights())
    return copy
