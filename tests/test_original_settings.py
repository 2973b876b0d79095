"""The original pipeline's settings.json, verbatim, through every stage to a prediction and an evaluation.

All seven blocks as the original README prints them (``tests/conftest.py: ORIGINAL_SETTINGS``:
``checkpoint_path: "results_4.h5"``, ``target_size``, ``rescale``, ``class_mode``, shear and zoom
0.2, filters 64, ``bachnorm_momentum`` 0.01); only ``data_root``, the epochs and the steps are
made small, so that this cannot break again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ORIGINAL_SETTINGS, pixel_box, write_geotiff, write_labels

pytest.importorskip("keras")

import core.settings
import pipeline
from core.settings import load_settings
from core.tree import DataTree

SIDE = 1024  # 16 chips of the default 256 px: four spatial blocks


def scene(root: Path) -> None:
    """A 3-band tile (the original settings say 3 channels) with bright metal roofs and dull others."""
    rng = np.random.default_rng(1)
    image = rng.normal(400, 50, (3, SIDE, SIDE))
    rects, kinds = [], []
    for i in range(60):
        r, c = rng.integers(4, SIDE - 40, 2)
        h, w = rng.integers(12, 30, 2)
        metal = i % 3 != 0
        image[:, r : r + h, c : c + w] = 1500 if metal else 700
        rects.append(pixel_box(int(c), int(r), int(c + w), int(r + h)))
        kinds.append("metal" if metal else "concrete")
    write_geotiff(root / "raw" / "tile.tif", array=np.clip(image, 1, 4000).astype(np.uint16), nodata=0)
    write_labels(root / "labels" / "roofs.geojson", rects, roof_type=kinds)


@pytest.mark.slow
def test_the_original_settings_run_every_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    original = json.loads(json.dumps(ORIGINAL_SETTINGS))
    original["data_root"] = str(tmp_path / "data")
    original["training_args"].update(epochs=1, steps_per_epoch=1, validation_steps=1,
                                     results_folder=str(tmp_path / "results"))  # fmt: skip
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(original, indent=2))
    scene(tmp_path / "data")
    argv = ["--settings", str(path), "--set", "parallel.workers=1", "--set", f"predict_args.output={tmp_path / 'p'}"]

    assert pipeline.main([*argv, "check"]) == 0
    out = capsys.readouterr().out
    for key in ("load_dataset_args.target_size", "load_dataset_args.rescale", "load_dataset_args.class_mode"):
        assert f"warning  settings: {key} is the original pipeline's and ignored: " in out

    assert pipeline.main([*argv, "--from", "mosaic", "--to", "split", "--quiet"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(core.settings, "_explained", set())  # as in a new process
    assert pipeline.main([*argv, "--only", "train-unet", "predict", "evaluate"]) == 0
    out, err = capsys.readouterr()
    for label in ("train-unet", "predict unet", "evaluate unet"):
        assert f"{label:<13} ok" in out, out
    # The legacy keys are explained once for the whole run, not by every stage.
    assert err.count("the original pipeline's and ignored here") == 1
    settings = load_settings(path)
    tree = DataTree.from_settings(settings)
    results = tree.model_dir("unet")
    assert (results / "results_4.weights.h5").is_file()  # results_4.h5, as Keras 3 saves weights
    assert f"best epoch's weights are kept in {results / 'results_4.weights.h5'}" in err
    assert (tree.bundle("unet") / "model.keras").is_file()
    metrics = json.loads((results / "evaluation" / "val" / "metrics.json").read_text())
    assert metrics["chips"] >= 1 and 0.0 <= metrics["pixel"]["iou"] <= 1.0
    assert (tmp_path / "p" / settings.experiment / "unet" / "roofs.gpkg").is_file()
