"""What the machine allows: batch sizes from GPU memory when the settings leave them null.

On a CPU nothing changes: a null batch size is the value it has always defaulted to (8 chips
to train, 4 windows to predict). On a GPU a null batch size is the largest that fits
:data:`MEMORY_SHARE` of the memory TensorFlow may still allocate there, by one rule:

    bytes per chip = padded pixels x (filters + 6) x K      K = 104 training, 30 predicting

K was measured as the growth of peak memory per extra chip in a batch (float32, satellite
U-Net, 8 bands, 3 targets, upconv_filters 1.5 x filters, 256 x 256 chips, filters 16 and
32: the rule fits both within 1%). It was measured on a CPU, as peak resident memory;
bench/bench_gpu.py prints a GPU's peak next to the rule's figure, to check it there. Mixed
precision keeps activations in float16 (x :data:`MIXED_SHARE`); keras-unet's ``custom``
network doubles its filters at every level (x :data:`CUSTOM_WIDTH`); an encoder U-Net
(``mobilenetv2``, ``resnet50``) has a decoder that grows with its filters as the satellite U-Net does, and
an encoder that does not: it counts as :data:`ENCODER_FILTERS` filters more (measured on a CPU as above:
3 bands, 3 targets, filters 4, 16 and 32, 256 x 256 chips, batches of 2 and 6). The rest of the memory
holds the weights, the optimizer, cuDNN's workspaces and the allocator's fragmentation.
"""

from __future__ import annotations

import logging
import math

from core.settings import CPU_PREDICT_BATCH, CPU_TRAIN_BATCH

log = logging.getLogger(__name__)

#: Bytes per padded pixel and per filter (plus FILTER_OFFSET) of one chip, float32.
TRAIN_BYTES = 104
PREDICT_BYTES = 30
FILTER_OFFSET = 6
#: Share of those bytes left in mixed precision (activations in float16, some tensors float32).
MIXED_SHARE = 0.6
#: The custom U-Net's memory relative to the satellite one's of the same first-level filters.
CUSTOM_WIDTH = 1.5
#: The filters an encoder U-Net's encoder counts as in the rule: (training, predicting). Measured MB per chip at
#: filters 4 / 16 / 32, training: mobilenetv2 148 / 217 / 370, resnet50 178 / 271 / 412 (satellite 39 / 115 /
#: 239); predicting: mobilenetv2 24 / 36 / 106, resnet50 24 / 36 / 75 (tests/test_unet_device.py holds them).
ENCODER_FILTERS = {"mobilenetv2": (18, 16), "resnet50": (24, 16)}
#: Share of the free GPU memory a batch may take.
MEMORY_SHARE = 0.7
#: Largest batch chosen: beyond it a training batch changes the optimization (the learning rate
#: stays) more than it speeds a step up; a prediction batch gains nothing more.
MAX_TRAIN_BATCH = 32
MAX_PREDICT_BATCH = 64


def padded(side: int, multiple: int) -> int:
    """A side padded (as the data generator and predict pad) to the network's multiple."""
    return math.ceil(side / multiple) * multiple


def chip_bytes(
    pixels: int, filters: int, *, architecture: str = "satellite", training: bool = True, mixed: bool = False
) -> float:
    """Memory one chip (or window) of ``pixels`` padded pixels takes in a batch, by the module's rule."""
    width = filters * (CUSTOM_WIDTH if architecture == "custom" else 1.0) + FILTER_OFFSET
    if architecture in ENCODER_FILTERS:
        width += ENCODER_FILTERS[architecture][0 if training else 1]
    share = MIXED_SHARE if mixed else 1.0
    return pixels * width * (TRAIN_BYTES if training else PREDICT_BYTES) * share


def choose_batch(
    memory: int | None,
    pixels: int,
    filters: int,
    *,
    architecture: str = "satellite",
    training: bool = True,
    mixed: bool = False,
) -> int:
    """Batch size for ``memory`` free bytes of GPU memory (None: no GPU, the CPU default).

    Args:
        memory: bytes TensorFlow may still allocate on the GPU, or None on a CPU.
        pixels: padded pixels of one chip (training) or window (predicting).
        filters: model_args.filters.
        architecture: model_args.architecture.
        training: a training batch (activations kept for the gradients), else a prediction batch.
        mixed: mixed precision.
    """
    if memory is None:
        return CPU_TRAIN_BATCH if training else CPU_PREDICT_BATCH
    one = chip_bytes(pixels, filters, architecture=architecture, training=training, mixed=mixed)
    most = MAX_TRAIN_BATCH if training else MAX_PREDICT_BATCH
    return max(1, min(most, int(MEMORY_SHARE * memory // one)))


def gpu_memory() -> int | None:
    """Bytes TensorFlow may still allocate on its first GPU; None without a GPU (or when unreadable, logged)."""
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return None
    try:
        from tensorflow.python.client import device_lib  # the one API that reports a GPU's memory limit

        limit = next(d.memory_limit for d in device_lib.list_local_devices() if d.device_type == "GPU")
        used = tf.config.experimental.get_memory_info("GPU:0")["current"]
    except Exception as exc:  # a private API: any failure falls back to the CPU defaults
        log.warning("the GPU's memory could not be read (%s): batch sizes left null take the CPU defaults", exc)
        return None
    return max(int(limit) - int(used), 0)


def describe(memory: int | None) -> str:
    """'no GPU' or 'N.N GiB of free GPU memory', for the line that logs a chosen batch."""
    return "no GPU" if memory is None else f"{memory / 2**30:.1f} GiB of free GPU memory"
