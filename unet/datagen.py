"""The training data generator: chips and masks from disk, normalized and augmented.

Masks on disk are uint8 0/255 (128: unknown, in the footprint band; a class map's class band holds
class ids); :func:`read_targets` maps them to float 0/1 exactly once (class ids to one channel per
class), adds the known channel the loss weighs pixels with, and refuses any other value (a 0/1 mask read as 0/255 was one cause of blank masks). Images go
through :meth:`core.bundle.Normalization.apply`, the function predict uses too. Augmentation
moves image and mask together; shear and zoom resample the image bilinearly and the mask
with nearest neighbour only. Inputs are padded (reflect) to the network's multiple, never
resized.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import keras
import numpy as np

from core import raster
from core.bundle import Normalization
from core.errors import DataError
from core.raster import pad_to_multiple, read_raster
from core.settings import LoadDatasetArgs


def read_mask(path: Path) -> np.ndarray:
    """A mask's 0/255 footprint as float32 0/1 (rows, cols)."""
    roof, _ = raster.read_mask(path)
    return roof.astype(np.float32)


def read_targets(path: Path) -> np.ndarray:
    """Every target band of a mask as float32 0/1, then with a class map one channel per class (1 where
    a roof is of that class), and last the known channel (0 where the footprint is 128, unknown class):
    (rows, cols, targets + classes + 1). The one place masks become targets."""
    data, names, classes, _ = raster.read_mask_bands(path)
    targets = data[[i for i, n in enumerate(names) if n != raster.CLASS_BAND]] if classes else data
    known = data[0] != raster.UNKNOWN
    parts = [targets == 255]
    if classes:
        ids = data[names.index(raster.CLASS_BAND)]
        parts.append(ids[None] == np.arange(1, len(classes) + 1, dtype=np.uint8)[:, None, None])
    return np.concatenate([*parts, known[None]]).transpose(1, 2, 0).astype(np.float32)


def mask_targets(path: Path) -> tuple[str, ...]:
    """The names of a mask's target bands (mask.py writes them as band descriptions; the class band of a
    class map is not one); one unnamed band is a footprint."""
    with raster.open_raster(path) as src:
        names = tuple(d or "" for d in src.descriptions)
    if names == ("",):
        return ("footprint",)
    if not all(names) or names[0] != "footprint":
        raise DataError(
            f"mask {path} has {len(names)} bands named {list(names)}: masks of several bands come from python "
            "mask/mask.py, which names them (footprint first); rerun mask and split"
        )
    return tuple(n for n in names if n != raster.CLASS_BAND)


def read_input_targets(frame: Path, mask: Path, norm: Normalization) -> tuple[np.ndarray, np.ndarray]:
    """Normalized image (rows, cols, bands) and targets (rows, cols, mask bands + known) of one chip."""
    image, _ = read_raster(frame)
    y = read_targets(mask)
    if image.shape[1:] != y.shape[:2]:
        raise DataError(
            f"mask {mask} is {y.shape[0]}x{y.shape[1]} but its chip {frame} is {image.shape[1]}x{image.shape[2]}"
        )
    return norm.apply(image), y


def augment(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, args: LoadDatasetArgs
) -> tuple[np.ndarray, np.ndarray]:
    """The same random flips, 90-degree turns, shear and zoom for image and mask, then a random hue turn
    (``hue_range``) of the image alone."""
    if args.horizontal_flip and rng.random() < 0.5:
        x, y = x[:, ::-1], y[:, ::-1]
    if args.vertical_flip and rng.random() < 0.5:
        x, y = x[::-1], y[::-1]
    if args.rotate90 and x.shape[0] == x.shape[1]:
        k = int(rng.integers(4))
        x, y = np.rot90(x, k), np.rot90(y, k)
    if args.shear_range > 0 or args.zoom_range > 0:
        shear = math.radians(rng.uniform(-args.shear_range, args.shear_range))
        zoom = rng.uniform(1 - args.zoom_range, 1 + args.zoom_range)
        x, y = warp(x, shear, zoom, order=1), warp(y, shear, zoom, order=0)
    if args.hue_range > 0:
        limits = (0.0, 1.0) if args.normalization == "percentile" else None  # the range predict's input has
        x = turn_hue(x, math.radians(rng.uniform(-args.hue_range, args.hue_range)), limits)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def turn_hue(x: np.ndarray, angle: float, limits: tuple[float, float] | None = None) -> np.ndarray:
    """``x`` (rows, cols, bands) with the colour of its red, green and blue bands (:func:`core.raster.rgb_bands`:
    the first three, or WorldView-3's red, green and blue of 8 bands) turned by ``angle`` radians about the grey
    axis (1, 1, 1). Grey stays grey and each pixel's mean of the three is kept (in the normalized units the
    network reads); a turn of 2*pi/3 sends red to green and green to blue. With ``limits`` the turned values are
    clipped to them (0..1 after percentile normalization, the range predict's input never leaves), which changes
    the mean of saturated pixels. Other bands are untouched."""
    if x.shape[-1] < 3:
        raise DataError(f"a hue turn needs red, green and blue bands, not {x.shape[-1]}")
    rgb = list(raster.rgb_bands(x.shape[-1]))
    # Rodrigues' rotation about the unit vector (1, 1, 1)/sqrt(3).
    c, s = math.cos(angle), math.sin(angle)
    a, b = (1 - c) / 3, s / math.sqrt(3)
    turn = np.array([[c + a, a - b, a + b], [a + b, c + a, a - b], [a - b, a + b, c + a]], dtype=x.dtype)
    colours = x[..., rgb]
    out = x.copy()
    turned = colours @ turn.T
    out[..., rgb] = turned if limits is None else np.clip(turned, *limits)
    return out


def warp(a: np.ndarray, shear: float, zoom: float, order: int) -> np.ndarray:
    """Shear (radians, along the columns) and zoom ``a`` (rows, cols, bands) about its centre, all bands in
    one ``cv2.warpAffine`` call: bilinear (``order`` 1) or nearest neighbour (0), edges reflected.

    Output pixel (r, c) samples the input at ``[[1/z, tan(s)/z], [0, 1/z]] @ (r, c) + offset``, the
    centre staying in place. One OpenCV call for the stacked bands measured 7x faster than a
    ``scipy.ndimage.affine_transform`` per band on 650x650x8 chips (bench/bench_loader.py).
    """
    matrix = np.array([[1 / zoom, math.tan(shear) / zoom], [0.0, 1 / zoom]])
    centre = (np.array(a.shape[:2]) - 1) / 2
    offset = centre - matrix @ centre
    # OpenCV indexes (x = column, y = row): swap the axes of the row-major matrix.
    cv_matrix = np.array(
        [[matrix[1, 1], matrix[1, 0], offset[1]], [matrix[0, 1], matrix[0, 0], offset[0]]], dtype=np.float64
    )
    flags = (cv2.INTER_LINEAR if order == 1 else cv2.INTER_NEAREST) | cv2.WARP_INVERSE_MAP
    out = cv2.warpAffine(
        np.ascontiguousarray(a), cv_matrix, (a.shape[1], a.shape[0]), flags=flags, borderMode=cv2.BORDER_REFLECT
    )
    return out.reshape(a.shape)  # OpenCV drops a last axis of length 1


class ChipSequence(keras.utils.PyDataset):
    """Batches of (image, mask) from chip and mask folders, reshuffled every epoch.

    Args:
        frames: chip files; masks: the mask of each, same order.
        norm: the training normalization.
        args: load_dataset_args (batch size, augmentation, seed).
        multiple: pad inputs to a multiple of this (the network's).
        augment_data: augment (training) or not (validation).
        steps: batches per epoch; default every chip once.
    """

    def __init__(
        self,
        frames: Sequence[Path],
        masks: Sequence[Path],
        norm: Normalization,
        args: LoadDatasetArgs,
        multiple: int,
        *,
        augment_data: bool,
        steps: int | None = None,
    ) -> None:
        workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 1)
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=2 * workers)
        if len(frames) != len(masks):
            raise DataError(f"{len(frames)} chips but {len(masks)} masks: rerun python split/split.py")
        if not frames:
            raise DataError("no chips to train on: run python split/split.py")
        self.frames, self.masks = list(frames), list(masks)
        self.norm, self.args, self.multiple = norm, args, multiple
        self.augment_data = augment_data
        self.batch_size = min(args.batch_size, len(self.frames))
        self.steps = steps or math.ceil(len(self.frames) / self.batch_size)
        self.epoch = 0
        self.order = np.arange(len(self.frames))
        self._epoch_order()

    def set_epoch(self, epoch: int) -> None:
        """Continue at ``epoch`` (a resumed training): its order and augmentations, as an uninterrupted run's."""
        self.epoch = epoch
        self._epoch_order()

    def _epoch_order(self) -> None:
        # Randomness comes from (seed, epoch[, batch, place]), never from a generator shared by the
        # batches: workers building batches in any order make the same batches.
        if self.augment_data:
            rng = np.random.default_rng([self.args.seed, self.epoch])
            needed = self.steps * self.batch_size
            reps = math.ceil(needed / len(self.frames))
            self.order = np.concatenate([rng.permutation(len(self.frames)) for _ in range(reps)])

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.augment_data:
            ids = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        else:
            ids = np.arange(index * self.batch_size, min((index + 1) * self.batch_size, len(self.frames)))
        xs, ys = [], []
        for place, i in enumerate(ids):
            x, y = read_input_targets(self.frames[i], self.masks[i], self.norm)
            if self.augment_data:
                rng = np.random.default_rng([self.args.seed, self.epoch, index, place])
                x, y = augment(x, y, rng, self.args)
            x, _ = pad_to_multiple(x, self.multiple)
            y, _ = pad_to_multiple(y, self.multiple)
            xs.append(x)
            ys.append(y)
        return np.stack(xs), np.stack(ys)

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._epoch_order()
