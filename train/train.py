"""Train a model and save its bundle: python train/train.py [--model unet|forest|regression]

Reads the split chips (train_frames/ train_masks/ val_frames/ val_masks/) and writes
results/EXPERIMENT/MODEL/: the model bundle (bundle/: the model plus bundle.json with the
normalization, the decision threshold tuned on validation, the settings and library
versions), metrics.json on the validation split, and plots. --model defaults to
training_args.model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core import cli
from core.bundle import KINDS
from core.check import preflight
from core.settings import Settings
from core.tree import DataTree


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    parser.add_argument("--model", choices=KINDS, help="model to train (default: training_args.model)")
    parser.add_argument("--from-bundle", type=Path, metavar="PATH", help="U-Net: continue training from this bundle")

    def body(args: argparse.Namespace, settings: Settings, tree: DataTree) -> None:
        kind = args.model or settings.training_args.model
        preflight(settings, tree, "train")
        # Imported here: TensorFlow loads only when a U-Net is trained.
        if kind == "unet":
            from unet.train import train_unet

            train_unet(settings, tree, overwrite=args.overwrite, from_bundle=args.from_bundle)
        else:
            from ml.train import train_classical

            train_classical(kind, settings, tree, overwrite=args.overwrite)

    return cli.run(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
