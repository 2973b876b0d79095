"""The U-Net, built from model_args and output_args.

``architecture: satellite`` is the original pipeline's network: the satellite-imagery U-Net
(deepsense.ai's, as keras-unet's ``satellite_unet`` has it) with every size, activation and
momentum taken from settings instead of hard-coded. ``architecture: custom`` builds
keras-unet's ``custom_unet``. The input is ``(None, None, bands)``: one model serves any
chip size that is a multiple of :func:`pad_multiple`; the data generator and predict pad to
it (reflect) and crop back, so nothing is ever resized.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import keras
from keras import layers

from core.errors import PipelineError
from core.settings import ModelArgs, OutputArgs


def pad_multiple(model_args: ModelArgs) -> int:
    """Input sides must be multiples of this: 2 ** (number of poolings)."""
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
    outputs = layers.Conv2D(
        channels,
        kernel_size=o.kernel_size,
        strides=o.strides,
        activation=o.activation,
        padding=o.padding,
        dtype="float32",
        name="roof_probability",
    )(x)
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


def build_model(
    bands: int, model_args: ModelArgs, output_args: OutputArgs, channels: int = 1, classes: int = 0
) -> keras.Model:
    """The U-Net for ``bands``-band input of any size that is a multiple of :func:`pad_multiple`, with one
    output channel per target (footprint first: the roof probability; then boundary, contact) and, with
    ``classes``, one sigmoid per class after them: the probability of a roof of that class (the predictor
    scales them to add up to 1 where they add up to more)."""
    builders = {"satellite": satellite_unet, "custom": custom_unet}
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
