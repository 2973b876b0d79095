"""Encoder U-Nets (model_args.architecture mobilenetv2, resnet50): the fixed input map, the band adapter,
encoder weights from a file or Keras's ImageNet download (get_file replaced, no network), every refusal,
and a tiny training through train and the bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import keras.src.utils.file_utils as file_utils  # noqa: E402

from core.bundle import load_predictor  # noqa: E402
from core.errors import PipelineError, SettingsError  # noqa: E402
from core.settings import ModelArgs, OutputArgs, load_settings  # noqa: E402
from core.tree import DataTree  # noqa: E402
from tests.test_unet import tiny_overrides, tiny_tree  # noqa: E402
from unet.device import chip_bytes  # noqa: E402
from unet.model import ENCODERS, build_model, pad_multiple  # noqa: E402

MNV2_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def encoder_weights_file(path: Path, builder: str = "MobileNetV2", **kwargs) -> Path:
    """A weights file of keras.applications' ``builder`` without its top, from seeded random weights."""
    keras.utils.set_random_seed(7)
    encoder = getattr(keras.applications, builder)(
        include_top=False, weights=None, input_shape=(None, None, 3), **kwargs
    )
    encoder.save_weights(path)
    return path


def assert_encoder_weights_equal(model: keras.Model, path: Path) -> int:
    reference = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(None, None, 3))
    reference.load_weights(path)
    ours = {layer.name for layer in model.layers}
    # The decoder starts below MobileNetV2's last 1 x 1 convolution to 1280 channels: Conv_1 and Conv_1_bn are not in
    # the U-Net; every other layer with weights is.
    assert {layer.name for layer in reference.layers if layer.weights} - ours == {"Conv_1", "Conv_1_bn"}
    compared = 0
    for layer in (layer for layer in reference.layers if layer.weights and layer.name in ours):
        for mine, theirs in zip(model.get_layer(layer.name).get_weights(), layer.get_weights(), strict=True):
            np.testing.assert_array_equal(mine, theirs)
            compared += 1
    return compared


def test_mobilenetv2_unet_maps_0_1_to_minus_1_1_and_outputs_every_channel() -> None:
    m = ModelArgs(architecture="mobilenetv2", filters=8, input_shape=(64, 64, 3))
    model = build_model(3, m, OutputArgs(), channels=3)
    assert pad_multiple(m) == 32
    assert model.output_shape == (None, None, None, 3)
    entry = model.get_layer("encoder_input")
    assert entry.trainable is False
    kernel, bias = entry.get_weights()
    np.testing.assert_array_equal(kernel[0, 0], np.diag([2.0, 2.0, 2.0]))
    np.testing.assert_array_equal(bias, [-1.0, -1.0, -1.0])
    assert "band_adapter" not in {layer.name for layer in model.layers}
    # The encoder's batch norm follows bachnorm_momentum (MobileNetV2's own 0.999 lagged behind fine-tuning).
    norms = [layer for layer in model.layers if type(layer).__name__ == "BatchNormalization"]
    assert len(norms) == 62 and {layer.momentum for layer in norms} == {0.9}
    # The decoder's levels: filters * 2**level from stride 16 up, then filters at full size.
    ours = [layer for layer in model.layers if type(layer).__name__ == "Conv2D" and layer.name.startswith("conv2d")]
    assert sorted(layer.filters for layer in ours) == [8, 8, 8, 8, 16, 16, 32, 32, 64, 64, 128, 128]
    out = model.predict(np.random.default_rng(0).random((2, 96, 64, 3), dtype=np.float32), verbose=0)
    assert out.shape == (2, 96, 64, 3)


def test_resnet50_unet_feeds_bgr_0_255_less_imagenets_mean() -> None:
    model = build_model(3, ModelArgs(architecture="resnet50", filters=4, input_shape=(64, 64, 3)), OutputArgs())
    kernel, bias = model.get_layer("encoder_input").get_weights()
    expected = np.zeros((3, 3), np.float32)
    expected[2, 0] = expected[1, 1] = expected[0, 2] = 255.0  # out[0] = blue, out[1] = green, out[2] = red
    np.testing.assert_array_equal(kernel[0, 0], expected)
    np.testing.assert_allclose(bias, [-103.939, -116.779, -123.68], rtol=0, atol=1e-4)
    x = np.zeros((1, 32, 32, 3), np.float32)
    x[..., 0], x[..., 2] = 1.0, 0.5  # red 1, blue 0.5
    fed = keras.Model(model.inputs[0], model.get_layer("encoder_input").output)(x)
    np.testing.assert_allclose(np.asarray(fed)[0, 0, 0], [127.5 - 103.939, -116.779, 255 - 123.68], atol=1e-3)
    # The skips join at strides 2 to 16 and the bottom is at 32: any other stride would fail here, on a chip that
    # is not square.
    assert model.predict(np.zeros((1, 64, 96, 3), np.float32), verbose=0).shape == (1, 64, 96, 1)
    probe = keras.Model(
        model.inputs[0], [model.get_layer(n).output for n in (*ENCODERS["resnet50"].skips, "conv5_block3_out")]
    )
    assert [tuple(o.shape[1:3]) for o in probe.predict(np.zeros((1, 64, 96, 3), np.float32), verbose=0)] == [
        (32, 48),
        (16, 24),
        (8, 12),
        (4, 6),
        (2, 3),
    ]


def test_eight_bands_pass_a_trainable_adapter_that_starts_as_worldview_red_green_blue() -> None:
    model = build_model(8, ModelArgs(architecture="mobilenetv2", filters=4, input_shape=(64, 64, 8)), OutputArgs())
    adapter = model.get_layer("band_adapter")
    assert adapter.trainable is True
    kernel, bias = adapter.get_weights()
    picked = [(int(band), int(out)) for band, out in zip(*np.nonzero(kernel[0, 0]), strict=True)]
    assert sorted(picked, key=lambda p: p[1]) == [(4, 0), (2, 1), (1, 2)]
    assert kernel[0, 0][kernel[0, 0] != 0].tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_array_equal(bias, np.zeros(3))


def test_encoder_weights_from_a_file_fill_every_encoder_layer(tmp_path: Path) -> None:
    path = encoder_weights_file(tmp_path / "encoder.weights.h5")
    model = build_model(3, ModelArgs(architecture="mobilenetv2", filters=4, encoder_weights=str(path)), OutputArgs())
    assert assert_encoder_weights_equal(model, path) == 255  # MobileNetV2's kernels and batch-norm tensors
    unweighted = build_model(3, ModelArgs(architecture="mobilenetv2", filters=4), OutputArgs())
    assert not np.array_equal(unweighted.get_layer("Conv1").get_weights()[0], model.get_layer("Conv1").get_weights()[0])


def test_encoder_weights_in_kerass_own_h5_layout_are_loaded(tmp_path: Path) -> None:
    """Keras's ImageNet files are legacy .h5 (weights by layer), not .weights.h5."""
    import h5py
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    keras.utils.set_random_seed(7)
    encoder = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(None, None, 3))
    path = tmp_path / MNV2_FILE
    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, encoder)
    model = build_model(3, ModelArgs(architecture="mobilenetv2", filters=4, encoder_weights=str(path)), OutputArgs())
    reference = tmp_path / "reference.weights.h5"
    encoder.save_weights(reference)
    assert assert_encoder_weights_equal(model, reference) == 255


@pytest.mark.parametrize(
    ("architecture", "name"),
    [("mobilenetv2", MNV2_FILE), ("resnet50", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")],
)
def test_imagenet_weights_come_through_kerass_download_by_the_name_the_error_gives(
    architecture: str, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def offline(fname=None, origin=None, **kwargs):
        asked.append(fname)
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    assert ENCODERS[architecture].weights_file == name
    with pytest.raises(PipelineError) as err:
        build_model(3, ModelArgs(architecture=architecture, filters=4, encoder_weights="imagenet"), OutputArgs())
    assert asked == [name]
    message = str(err.value)
    assert message.startswith(
        f"model_args.encoder_weights imagenet: Keras could not get or read {name} (URL fetch failure on "
    )
    assert (
        message.endswith("models from a machine that can download it, or set encoder_weights to its path")
        and "\n" not in message
    )


def test_imagenet_weights_already_in_kerass_cache_are_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = encoder_weights_file(tmp_path / "cached.weights.h5")
    monkeypatch.setattr(file_utils, "get_file", lambda fname=None, origin=None, **kwargs: str(path))
    model = build_model(3, ModelArgs(architecture="mobilenetv2", filters=4, encoder_weights="imagenet"), OutputArgs())
    assert assert_encoder_weights_equal(model, path) == 255


def test_missing_or_foreign_encoder_weights_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.h5"
    with pytest.raises(PipelineError) as err:
        build_model(3, ModelArgs(architecture="mobilenetv2", encoder_weights=str(missing)), OutputArgs())
    assert str(err.value) == (
        f"model_args.encoder_weights {str(missing)!r} is not a file: give the path of MobileNetV2's weights without "
        f"its top (Keras's {MNV2_FILE}, or a .weights.h5 of keras.applications.MobileNetV2(include_top=False)), "
        "'imagenet' to download them, or null to start from random weights"
    )
    half = encoder_weights_file(tmp_path / "half.weights.h5", alpha=0.5)  # MobileNetV2 of half the width
    with pytest.raises(PipelineError) as err:
        build_model(3, ModelArgs(architecture="mobilenetv2", encoder_weights=str(half)), OutputArgs())
    assert str(err.value).startswith(
        f"model_args.encoder_weights {str(half)!r} are not weights of MobileNetV2 without its top ("
    )
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model_args.encoder_weights=imagenet"],
            "encoder_weights 'imagenet' are for architecture mobilenetv2 or resnet50; the satellite U-Net starts "
            "from random weights (set encoder_weights null)",
        ),
        (
            ["model_args.architecture=resnet50", "model_args.normalization=group"],
            "normalization group builds the satellite U-Net; architecture resnet50's encoder has batch normalization "
            "(its pretrained weights include its statistics): set normalization batch, or architecture satellite",
        ),
    ],
)
def test_settings_refuse_encoder_weights_without_an_encoder_and_group_norm_with_one(
    settings_file: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(settings_file, overrides)
    assert message in str(err.value)


#: Peak memory per chip (MB) of encoder U-Nets, measured on a CPU (3 bands, 3 targets, 256 x 256 chips, the growth
#: from batches of 2 to 6): (architecture, filters, training) -> MB.
MEASURED_MB = {
    ("mobilenetv2", 4, True): 148, ("mobilenetv2", 16, True): 217, ("mobilenetv2", 32, True): 370,
    ("resnet50", 4, True): 178, ("resnet50", 16, True): 271, ("resnet50", 32, True): 412,
    ("mobilenetv2", 4, False): 24, ("mobilenetv2", 16, False): 36, ("mobilenetv2", 32, False): 106,
    ("resnet50", 4, False): 24, ("resnet50", 16, False): 36, ("resnet50", 32, False): 75,
}  # fmt: skip


@pytest.mark.parametrize("key", list(MEASURED_MB))
def test_the_batch_rule_covers_every_measured_encoder_unet_without_doubling_it(key: tuple[str, int, bool]) -> None:
    architecture, filters, training = key
    rule = chip_bytes(256 * 256, filters, architecture=architecture, training=training) / 2**20
    assert 0.95 <= rule / MEASURED_MB[key] <= 2.2, rule


def test_tiny_training_with_a_pretrained_encoder_makes_a_bundle_predict_reads_and_new_weights_outdate_it(
    tmp_path: Path, settings_file: Path
) -> None:
    from train.train import main
    from workflow.contract import status

    tiny_tree(tmp_path / "data")
    weights = encoder_weights_file(tmp_path / "encoder.weights.h5")
    overrides = [
        *tiny_overrides(tmp_path),
        "training_args.epochs=2",
        "model_args.architecture=mobilenetv2",
        f"model_args.encoder_weights={weights}",
    ]
    argv = ["--settings", str(settings_file), "--quiet", "--model", "unet"]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 0
    settings = load_settings(settings_file, overrides)
    tree = DataTree.from_settings(settings)
    info = json.loads((tree.bundle("unet") / "bundle.json").read_text())
    assert info["pad_multiple"] == 32
    assert info["features"]["architecture"] == "mobilenetv2"
    predictor = load_predictor(tree.bundle("unet"))
    kernel, bias = predictor.model.get_layer("encoder_input").get_weights()  # fixed: not trained
    np.testing.assert_array_equal(kernel[0, 0], np.diag([2.0, 2.0, 2.0]))
    np.testing.assert_array_equal(bias, [-1.0, -1.0, -1.0])
    chips = np.random.default_rng(1).integers(0, 2000, (2, 3, 50, 70)).astype(np.uint16)  # padded to 64 x 96
    prob = predictor.predict(chips)
    assert prob.shape == (2, 50, 70)
    assert prob.dtype == np.float32

    before = status("train", settings, tree, "unet")
    assert (before.state, before.changes) == ("complete", [])
    keras.utils.set_random_seed(8)  # other weights under the same name: the bundle is outdated
    keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(None, None, 3)).save_weights(weights)
    after = status("train", settings, tree, "unet")
    assert after.changes == [f"from {weights.resolve()} as it was before it changed"]

    # Continued with --from-bundle under settings that name no encoder (and with the weights file gone): the network
    # stays the bundle's, and so do the model_args the new bundle records (predict sizes its batches by them).
    weights.unlink()
    shutil.copytree(tree.bundle("unet"), tmp_path / "first")
    plain = [o for o in overrides if not o.startswith(("model_args.architecture", "model_args.encoder_weights"))]
    argv = ["--settings", str(settings_file), "--quiet", "--model", "unet", "--from-bundle", str(tmp_path / "first")]
    for item in [*plain, "experiment=tiny2", "training_args.epochs=1"]:
        argv += ["--set", item]
    assert main(argv) == 0
    second = json.loads((tmp_path / "results" / "tiny2" / "unet" / "bundle" / "bundle.json").read_text())
    assert second["features"]["architecture"] == "mobilenetv2"
    assert second["settings"]["model_args"]["architecture"] == "mobilenetv2"
    assert second["settings"]["model_args"]["encoder_weights"] == str(weights)


def test_the_pre_flight_check_of_encoder_weights(
    tmp_path: Path, settings_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workflow.check import run_checks

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    junk = tmp_path / "junk.weights.h5"
    junk.write_text("not weights")

    def found(*overrides: str, continuing: bool = False) -> list[str]:
        settings = load_settings(settings_file, [f"data_root={tmp_path / 'data'}", *overrides])
        findings, _ = run_checks(settings, DataTree.from_settings(settings), ["train-unet"], continuing=continuing)
        return [str(f) for f in findings if "encoder_weights" in str(f)]

    assert found("model_args.architecture=mobilenetv2") == []  # random weights: nothing to check
    assert found("model_args.architecture=mobilenetv2", f"model_args.encoder_weights={junk}") == [
        f"fatal: model_args.encoder_weights names {junk}, which is not a Keras weights file (HDF5): give the path of "
        "the encoder's weights without its top, 'imagenet' to download them, or null to start from random weights"
    ]
    # Continuing from a bundle reads no encoder weights: a file gone since is no problem.
    assert found("model_args.architecture=mobilenetv2", f"model_args.encoder_weights={junk}", continuing=True) == []
    cached = tmp_path / "keras" / "models" / MNV2_FILE
    assert found("model_args.architecture=mobilenetv2", "model_args.encoder_weights=imagenet") == [
        f"warning: model_args.encoder_weights imagenet: {cached} is not there yet: train downloads it (offline, copy it "
        "there from a machine that can download it)"
    ]
    encoder_weights_file(tmp_path / "e.weights.h5").rename(cached.parent.mkdir(parents=True) or cached)
    assert found("model_args.architecture=mobilenetv2", "model_args.encoder_weights=imagenet") == []
    assert found(
        "model_args.architecture=mobilenetv2",
        "model_args.encoder_weights=imagenet",
        "load_dataset_args.normalization=zscore",
    ) == [
        "warning: model_args.encoder_weights are pretrained on inputs in 0..1, but load_dataset_args.normalization "
        "zscore gives the encoder other values: set it percentile"
    ]


def test_weights_that_cannot_be_read_stop_train_before_it_removes_the_last_run(
    tmp_path: Path, settings_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from train.train import main

    tiny_tree(tmp_path / "data")
    half = encoder_weights_file(tmp_path / "half.weights.h5", alpha=0.5)  # another MobileNetV2
    last = tmp_path / "results" / "tiny" / "unet" / "bundle" / "bundle.json"
    last.parent.mkdir(parents=True)
    last.write_text("{}")  # what a previous run left
    argv = ["--settings", str(settings_file), "--quiet", "--model", "unet", "--overwrite"]
    for item in [
        *tiny_overrides(tmp_path),
        "model_args.architecture=mobilenetv2",
        f"model_args.encoder_weights={half}",
    ]:
        argv += ["--set", item]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: model_args.encoder_weights {str(half)!r} are not weights of MobileNetV2 without its top"
    )
    assert err.count("\n") == 1
    assert last.read_text() == "{}"
