"""Train a model and save its bundle: python train/train.py [--model unet|forest|regression]

Reads the split chips (train_frames/ train_masks/ val_frames/ val_masks/) and writes
results/EXPERIMENT/MODEL/: the model bundle (bundle/: the model plus bundle.json with the
normalization, the decision threshold tuned on validation, the settings and library
versions), metrics.json on the validation split, and plots. --model defaults to
training_args.model. A rerun with the same settings and split skips; after a change of the
training settings it refuses (--overwrite retrains); it refuses split folders that are
outdated (made before chip, mask or split ran again, or under other settings).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core import cli
from core.bundle import BUNDLE_JSON, KINDS, read_info
from core.errors import DataError, InputMissingError
from core.index import split_pairs
from core.settings import Settings
from core.tree import DataTree
from workflow.check import preflight
from workflow.contract import begin


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    parser.add_argument("--model", choices=KINDS, help="model to train (default: training_args.model)")
    parser.add_argument("--from-bundle", type=Path, metavar="PATH", help="U-Net: continue training from this bundle")

    def body(args: argparse.Namespace, settings: Settings, tree: DataTree) -> None:
        kind = args.model or settings.training_args.model
        if args.from_bundle is not None and kind != "unet":
            raise DataError(f"--from-bundle continues a U-Net's training; the {kind} trains anew: leave it out")
        if args.from_bundle is not None and not (args.from_bundle / BUNDLE_JSON).is_file():
            raise InputMissingError(  # before the run's record says "running"
                f"--from-bundle {args.from_bundle}: no bundle there (no {BUNDLE_JSON}): give a U-Net's bundle folder, "
                "results/EXPERIMENT/unet/bundle"
            )
        if kind == "unet":
            settings.training_args.refuse_from_bundle(args.from_bundle)  # before the run's record says "running"
        run = begin("train", settings, tree, overwrite=args.overwrite, model=kind, given={"bundle": args.from_bundle})
        if run.skip:
            made = read_info(tree.bundle(kind)).bands
            if settings.bands is not None and settings.bands != made:  # (not a setting train's record holds)
                raise DataError(
                    f"the {kind} bundle is up to date, but it was trained on {made} bands and the settings say "
                    f"{settings.bands} (load_dataset_args.channels or model_args.input_shape): set them to {made}, "
                    "or null to take the chips' count"
                )
            run.say_skip()
            return
        for split in ("train", "val"):  # (a data root without a split: said before the old bundle is removed)
            split_pairs(tree, split)
        # Continuing from the bundle: it must not be removed before it is read.
        continuing = kind == "unet" and (args.from_bundle is not None or settings.training_args.pretrained)
        preflight(settings, tree, f"train-{kind}", continuing=continuing)
        backed_up = 0
        if kind == "unet":  # imported here: TensorFlow loads only when a U-Net is trained
            from unet.train import resumable, train_unet

            backed_up = resumable(tree.model_dir("unet"), settings.training_args.members)
            if settings.model_args.encoder_weights is not None and not continuing and not backed_up:
                from unet.model import weighted_encoder

                weighted_encoder(settings.model_args)  # downloaded and read before the old outputs are removed
        if run.resume and not backed_up:
            run.mode = "fresh"  # nothing to continue from: a new run (training is not deterministic)
        run.start(clear=not continuing)
        if kind == "unet":
            train_unet(settings, tree, overwrite=True, from_bundle=args.from_bundle, resume=run.resume)
        else:
            from ml.train import train_classical

            train_classical(kind, settings, tree, overwrite=True)
        run.finish(bundle=str(tree.bundle(kind)))

    return cli.run(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
