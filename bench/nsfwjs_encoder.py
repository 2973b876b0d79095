"""A pretrained MobileNetV2 encoder for machines that cannot download Keras's ImageNet weights.

Keras fetches its ImageNet weights from storage.googleapis.com, which the machines these
benchmarks ran on cannot reach; the npm registry they can. The npm package nsfwjs (MIT
licence) ships a Keras MobileNetV2 (alpha 1.0, Keras Applications' layer names) that was
trained from ImageNet's weights to sort photos into 5 classes, its weights quantized to 8
bits. This script takes that network's weights without its top, dequantized, into a Keras
weights file that ``model_args.encoder_weights`` reads for ``architecture: mobilenetv2``:

    python bench/nsfwjs_encoder.py /tmp/mobilenetv2_nsfwjs.weights.h5
    python bench/real_banepa.py --set model_args.architecture=mobilenetv2 \\
        --set model_args.encoder_weights=/tmp/mobilenetv2_nsfwjs.weights.h5

They are not ImageNet's weights: measured with them, a gain is what a pretrained encoder
gives at least; with ``encoder_weights: imagenet`` on a machine that can download, use those.

nsfwjs feeds its network 0..1; the encoder U-Net feeds MobileNetV2 -1..1 (ImageNet's "tf"
preprocessing), so the first convolution is halved and the constant it then misses is taken
into its batch norm's moving mean: the same outputs away from the image's border.
"""

from __future__ import annotations

import argparse
import base64
import io
import re
import sys
import tarfile
import urllib.request
from pathlib import Path

import numpy as np

TARBALL = "https://registry.npmjs.org/nsfwjs/-/nsfwjs-4.4.0.tgz"
MODEL = "package/dist/models/mobilenet_v2/model.min.js"
SHARD = "package/dist/models/mobilenet_v2/group1-shard1of1.min.js"
#: One entry of the weights manifest in model.min.js (a JavaScript object literal, keys unquoted).
ENTRY = re.compile(
    r'\{name:"(?P<name>[^"]+)",shape:\[(?P<shape>[0-9,]*)\],dtype:"float32",'
    r'quantization:\{min:(?P<min>[-+0-9.e]+),scale:(?P<scale>[-+0-9.e]+),dtype:"uint8"\}\}'
)
#: The base64 text of the weights shard inside its JavaScript wrapper.
BLOB = re.compile(r'"([A-Za-z0-9+/]{10000,}={0,2})"')


def read_tarball(source: str) -> dict[str, str]:
    """The model and shard files of the nsfwjs package at ``source`` (a URL or a local .tgz)."""
    if re.match(r"https?://", source):
        with urllib.request.urlopen(source, timeout=120) as response:  # the npm registry, or another URL given
            data = response.read()
    else:
        data = Path(source).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {name: tar.extractfile(name).read().decode("utf-8") for name in (MODEL, SHARD)}


def dequantized(model_js: str, shard_js: str) -> dict[str, np.ndarray]:
    """Every weight of the manifest by its name (``layer/variable``), as float32."""
    entries = [m.groupdict() for m in ENTRY.finditer(model_js)]
    blob = BLOB.search(shard_js)
    if not entries or blob is None:
        raise SystemExit("error: the nsfwjs package has no MobileNetV2 weights manifest or shard where expected")
    raw = np.frombuffer(base64.b64decode(blob.group(1)), np.uint8)
    values, offset = {}, 0
    for e in entries:
        shape = tuple(int(s) for s in e["shape"].split(",") if s)
        n = int(np.prod(shape))
        q = raw[offset : offset + n].astype(np.float64)
        values[e["name"]] = (float(e["min"]) + float(e["scale"]) * q).astype(np.float32).reshape(shape)
        offset += n
    if offset != raw.size:
        raise SystemExit(f"error: the manifest names {offset} weights, the shard holds {raw.size}")
    return values


def encoder_weights(values: dict[str, np.ndarray]):
    """keras.applications.MobileNetV2 without its top, filled with ``values`` and moved to -1..1 input."""
    import keras

    model = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(None, None, 3))
    for layer in model.layers:
        new = []
        for var in layer.weights:
            leaf = var.path.split("/")[-1]
            if isinstance(layer, keras.layers.DepthwiseConv2D) and leaf == "kernel":
                leaf = "depthwise_kernel"  # Keras 2's name
            key = f"{layer.name}/{leaf}"
            if key not in values or values[key].shape != tuple(var.shape):
                raise SystemExit(f"error: nsfwjs's MobileNetV2 has no weight {key} of shape {tuple(var.shape)}")
            new.append(values[key])
        if new:
            layer.set_weights(new)
    conv, bn = model.get_layer("Conv1"), model.get_layer("bn_Conv1")
    (w,) = conv.get_weights()
    gamma, beta, mean, var = bn.get_weights()
    conv.set_weights([w / 2])  # conv(w, (v + 1) / 2) = conv(w / 2, v) + sum(w) / 2
    bn.set_weights([gamma, beta, mean - w.sum(axis=(0, 1, 2)) / 2, var])
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the weights file to write (ends in .weights.h5)")
    parser.add_argument("--tarball", default=TARBALL, help="the nsfwjs package: its npm URL or a local .tgz")
    args = parser.parse_args(argv)
    if not args.out.name.endswith(".weights.h5"):
        parser.error(f"{args.out}: the file name must end in .weights.h5 (Keras's weights format)")
    files = read_tarball(args.tarball)
    model = encoder_weights(dequantized(files[MODEL], files[SHARD]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(args.out)
    print(f"{args.out}: MobileNetV2 without its top, {model.count_params():,} weights, from {args.tarball}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
