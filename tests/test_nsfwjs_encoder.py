"""bench/nsfwjs_encoder.py: a MobileNetV2 encoder from an npm package's 8-bit weights, on a package built here."""

from __future__ import annotations

import base64
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import nsfwjs_encoder  # noqa: E402


def fake_package(path: Path, drop: str | None = None) -> dict[str, tuple[float, float, np.ndarray]]:
    """An nsfwjs-like .tgz: MobileNetV2's weights (Keras 2 names) quantized to 8 bits with a min and a scale each,
    plus a dense head; returns each weight's (min, scale, codes)."""
    reference = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(None, None, 3))
    rng = np.random.default_rng(0)
    entries, codes, truth = [], [], {}
    for layer in reference.layers:
        for var in layer.weights:
            leaf = var.path.split("/")[-1]
            if type(layer).__name__ == "DepthwiseConv2D" and leaf == "kernel":
                leaf = "depthwise_kernel"
            name = f"{layer.name}/{leaf}"
            if name == drop:
                continue
            q = rng.integers(0, 256, tuple(var.shape), dtype=np.uint8)
            low, scale = float(rng.uniform(-1, 0)), float(rng.uniform(0.001, 0.01))
            if leaf == "moving_variance":
                low = 0.5  # positive variances
            truth[name] = (low, scale, q)
            entries.append(f'{{name:"{name}",shape:[{",".join(map(str, var.shape))}],dtype:"float32",'
                           f'quantization:{{min:{low!r},scale:{scale!r},dtype:"uint8"}}}}')  # fmt: skip
            codes.append(q.ravel())
    entries.append('{name:"dense_1/bias",shape:[5],dtype:"float32",quantization:{min:-.5,scale:.25,dtype:"uint8"}}')
    codes.append(np.arange(5, dtype=np.uint8))
    model_js = (
        '!function(e){a.exports={modelTopology:{},weightsManifest:[{paths:["group1-shard1of1"],weights:['
        + ",".join(entries)
        + "]}]}}"
    )
    shard_js = 'h.exports="' + base64.b64encode(np.concatenate(codes).tobytes()).decode() + '"'
    with tarfile.open(path, "w:gz") as tar:
        for name, text in ((nsfwjs_encoder.MODEL, model_js), (nsfwjs_encoder.SHARD, shard_js)):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return truth


def test_the_weights_are_dequantized_and_the_first_convolution_moved_to_minus_1_1(tmp_path: Path, capsys) -> None:
    truth = fake_package(tmp_path / "nsfwjs.tgz")
    out = tmp_path / "enc.weights.h5"
    assert nsfwjs_encoder.main([str(out), "--tarball", str(tmp_path / "nsfwjs.tgz")]) == 0
    assert (
        capsys.readouterr().out
        == f"{out}: MobileNetV2 without its top, 2,257,984 weights, from {tmp_path / 'nsfwjs.tgz'}\n"
    )
    model = keras.applications.MobileNetV2(include_top=False, weights=str(out), input_shape=(None, None, 3))

    def value(name: str) -> np.ndarray:
        low, scale, q = truth[name]
        return (low + scale * q.astype(np.float64)).astype(np.float32)

    np.testing.assert_array_equal(
        model.get_layer("block_5_depthwise").get_weights()[0], value("block_5_depthwise/depthwise_kernel")
    )
    np.testing.assert_array_equal(
        model.get_layer("block_5_project_BN").get_weights()[1], value("block_5_project_BN/beta")
    )
    w = value("Conv1/kernel")
    np.testing.assert_allclose(model.get_layer("Conv1").get_weights()[0], w / 2, rtol=1e-6)
    np.testing.assert_allclose(
        model.get_layer("bn_Conv1").get_weights()[2],
        value("bn_Conv1/moving_mean") - w.sum(axis=(0, 1, 2)) / 2,
        rtol=1e-5,
        atol=1e-5,
    )
    # Away from the border, -1..1 input through the converted layer equals 0..1 input through the original one.
    x = np.random.default_rng(1).random((1, 32, 32, 3), np.float32)
    original = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(None, None, 3))
    original.load_weights(out)
    original.get_layer("Conv1").set_weights([w])
    gamma, beta, _, var = original.get_layer("bn_Conv1").get_weights()
    original.get_layer("bn_Conv1").set_weights([gamma, beta, value("bn_Conv1/moving_mean"), var])
    mine = keras.Model(model.input, model.get_layer("bn_Conv1").output)(2 * x - 1)
    theirs = keras.Model(original.input, original.get_layer("bn_Conv1").output)(x)
    np.testing.assert_allclose(np.asarray(mine)[0, 1:-1, 1:-1], np.asarray(theirs)[0, 1:-1, 1:-1], rtol=1e-4, atol=1e-3)


def test_a_package_without_a_weight_or_a_bad_file_name_is_refused(tmp_path: Path, capsys) -> None:
    fake_package(tmp_path / "nsfwjs.tgz", drop="block_3_expand/kernel")
    with pytest.raises(
        SystemExit,
        match=r"^error: nsfwjs's MobileNetV2 has no weight block_3_expand/kernel of shape \(1, 1, 24, 144\)$",
    ):
        nsfwjs_encoder.main([str(tmp_path / "enc.weights.h5"), "--tarball", str(tmp_path / "nsfwjs.tgz")])
    with pytest.raises(SystemExit) as err:
        nsfwjs_encoder.main([str(tmp_path / "enc.h5"), "--tarball", str(tmp_path / "nsfwjs.tgz")])
    assert err.value.code == 2
    assert capsys.readouterr().err.endswith("the file name must end in .weights.h5 (Keras's weights format)\n")
