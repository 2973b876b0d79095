"""GPU defaults without a GPU: the batch-size rule on given memory figures, the CPU defaults a null
batch size keeps, and a float32 output (and bundle) under mixed precision."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from core.bundle import BundleInfo, Normalization  # noqa: E402
from core.settings import ModelArgs, OutputArgs, PredictArgs, load_settings  # noqa: E402
from unet.device import MAX_PREDICT_BATCH, MAX_TRAIN_BATCH, chip_bytes, choose_batch, padded  # noqa: E402
from unet.model import build_model, float32_copy  # noqa: E402

GIB = 2**30
SEED_CHIP = 672 * 672  # a 650 x 650 chip padded to the satellite network's multiple of 32
DEMO_CHIP = 256 * 256


def test_without_a_gpu_a_null_batch_is_the_old_default() -> None:
    assert choose_batch(None, SEED_CHIP, 64) == 8
    assert choose_batch(None, SEED_CHIP, 64, mixed=True) == 8
    assert choose_batch(None, 512 * 512, 16, training=False) == 4


@pytest.mark.parametrize(
    "memory, pixels, filters, kwargs, expected",
    [
        # 0.7 x 15 GiB / (672^2 x (64 + 6) x 104 B x 0.6) = 5.7: a T4 with the full-width network
        (15 * GIB, SEED_CHIP, 64, {"mixed": True}, 5),
        (15 * GIB, SEED_CHIP, 64, {}, 3),  # float32: 3.4
        (1 * GIB, SEED_CHIP, 64, {}, 1),  # too little for one chip: still one
        (80 * GIB, DEMO_CHIP, 16, {}, MAX_TRAIN_BATCH),  # 401 fit: capped
        (4 * GIB, 512 * 512, 16, {"training": False}, 17),  # 0.7 x 4 GiB / (512^2 x 22 x 30 B) = 17.4
        (16 * GIB, 512 * 512, 16, {"training": False}, MAX_PREDICT_BATCH),  # 69.5 fit: capped
    ],
)
def test_batch_from_gpu_memory(memory: int, pixels: int, filters: int, kwargs: dict, expected: int) -> None:
    assert choose_batch(memory, pixels, filters, **kwargs) == expected


def test_more_memory_never_means_a_smaller_batch_and_wider_networks_get_smaller_ones() -> None:
    batches = [choose_batch(g * GIB, SEED_CHIP, 64) for g in range(1, 200)]
    assert batches == sorted(batches) and batches[0] == 1 and batches[-1] == MAX_TRAIN_BATCH
    assert choose_batch(24 * GIB, SEED_CHIP, 16) > choose_batch(24 * GIB, SEED_CHIP, 64)
    assert choose_batch(24 * GIB, SEED_CHIP, 32, architecture="custom") < choose_batch(24 * GIB, SEED_CHIP, 32)
    assert choose_batch(24 * GIB, SEED_CHIP, 32, mixed=True) > choose_batch(24 * GIB, SEED_CHIP, 32)
    assert chip_bytes(SEED_CHIP, 64, training=False) < chip_bytes(SEED_CHIP, 64) / 3  # no activations kept


@pytest.mark.parametrize("side, multiple, expected", [(650, 32, 672), (256, 32, 256), (64, 8, 64), (65, 8, 72)])
def test_padded_side(side: int, multiple: int, expected: int) -> None:
    assert padded(side, multiple) == expected


def test_a_null_training_batch_is_8_on_a_cpu_and_says_so(tmp_path: Path, make_geotiff, settings_file, caplog) -> None:
    from unet.train import training_batch

    frame = make_geotiff(tmp_path, "train_0.tif", bands=8, rows=650, cols=650)
    settings = load_settings(settings_file, ["model_args.filters=64"])
    assert settings.load_dataset_args.batch_size is None  # the repository's settings leave it to the machine
    with caplog.at_level(logging.INFO, logger="unet.train"):
        assert training_batch(settings, frame, 32, mixed=False) == 8
    assert caplog.messages == [
        "train: load_dataset_args.batch_size null: 8 chips per batch (no GPU; 672 x 672 padded chips, filters 64)"
    ]
    settings = load_settings(settings_file, ["load_dataset_args.batch_size=3"])
    assert training_batch(settings, frame, 32, mixed=False) == 3


def test_a_null_predict_batch_is_4_on_a_cpu_and_reaches_the_unet_predictor(caplog) -> None:
    from predict.predict import with_batch
    from unet.bundle import UNetPredictor

    m = ModelArgs(filters=4, upconv_filters=4, num_layers=1, input_shape=(64, 64, 3))
    info = BundleInfo(
        kind="unet",
        bands=3,
        dtype="uint16",
        normalization=Normalization("zscore", (0.0,) * 3, (1.0,) * 3, (0.0,) * 3, (1.0,) * 3, None),
        threshold=0.5,
        pad_multiple=4,
        settings={"model_args": m.model_dump(mode="json")},
    )
    predictor = UNetPredictor(build_model(3, m, OutputArgs()), info, batch_size=1)
    with caplog.at_level(logging.INFO, logger="predict.predict"):
        args = with_batch(PredictArgs(), predictor)
    assert (args.batch_size, predictor.batch_size) == (4, 4)
    assert caplog.messages == [
        "predict: predict_args.batch_size null: 4 windows per batch (no GPU; windows of 512 x 512 padded, filters 4)"
    ]
    assert with_batch(PredictArgs(batch_size=6), predictor).batch_size == 6 and predictor.batch_size == 6


@pytest.mark.parametrize("architecture", ["satellite", "custom", "mobilenetv2"])
def test_mixed_precision_keeps_a_float32_output_and_the_bundle_copy_is_float32(architecture: str, tmp_path) -> None:
    m = ModelArgs(architecture=architecture, filters=4, upconv_filters=4, num_layers=2, input_shape=(64, 64, 3))
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = build_model(3, m, OutputArgs(), 2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert [o.dtype for o in mixed.outputs] == ["float32"]
    assert "mixed_float16" in json.dumps(mixed.get_config())
    copy = float32_copy(mixed)
    assert "mixed_float16" not in json.dumps(copy.get_config())
    assert [o.dtype for o in copy.outputs] == ["float32"] and copy.output_shape == mixed.output_shape
    x = np.random.default_rng(0).random((2, 64, 64, 3), np.float32)
    np.testing.assert_allclose(np.asarray(copy(x)), np.asarray(mixed(x)), atol=5e-3)  # float16 rounding only
    copy.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False)
    assert {layer.dtype_policy.name for layer in loaded.layers} == {"float32"}


def test_a_float32_model_is_built_as_before() -> None:
    """On a CPU (float32 policy) neither network gets the extra float32 output layer."""
    for architecture in ("satellite", "custom", "mobilenetv2"):
        m = ModelArgs(architecture=architecture, filters=4, upconv_filters=4, num_layers=2, input_shape=(64, 64, 3))
        model = build_model(3, m, OutputArgs())
        assert model.layers[-1].__class__.__name__ == "Conv2D"


@pytest.mark.parametrize("networks, expected", [(1, 17), (3, 5)])
def test_a_gpu_predict_batch_is_shared_by_an_ensembles_networks(monkeypatch, caplog, networks, expected) -> None:
    import unet.device
    from predict.predict import with_batch
    from unet.bundle import UNetPredictor

    monkeypatch.setattr(unet.device, "gpu_memory", lambda: 4 * GIB)  # 17 windows of 512 x 512, filters 16
    m = ModelArgs(filters=16, upconv_filters=4, num_layers=1, input_shape=(64, 64, 3))
    info = BundleInfo(
        kind="unet",
        bands=3,
        dtype="uint8",
        normalization=Normalization("zscore", (0.0,) * 3, (1.0,) * 3, (0.0,) * 3, (1.0,) * 3, None),
        threshold=0.5,
        pad_multiple=32,
        features={"architecture": "satellite", **({"ensemble": networks} if networks > 1 else {})},
        settings={"model_args": m.model_dump(mode="json")},
    )
    predictor = UNetPredictor(build_model(3, m, OutputArgs()), info, batch_size=1)
    with caplog.at_level(logging.INFO, logger="predict.predict"):
        assert with_batch(PredictArgs(), predictor).batch_size == expected
    shared = ", shared by the 3 networks of the ensemble" if networks > 1 else ""
    assert caplog.messages[-1].endswith(f"windows of 512 x 512 padded, filters 16{shared})")
