"""core.parallel: the tile stages on a Dask cluster give the same bytes as a local run.

One ``distributed.LocalCluster`` of two worker processes on 127.0.0.1 serves the module.
chip, mask, flatten and predict run once locally and once through the scheduler's address;
every output file is compared byte for byte. A worker killed mid-run loses and duplicates
nothing; an unreachable scheduler and an error inside a task end in one clear line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cloudpickle
import geopandas as gpd
import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from chip.chip import make_chips, plan_chips  # noqa: E402
from core import parallel  # noqa: E402
from core.errors import PipelineError  # noqa: E402
from core.parallel import map_tasks, worker_cached  # noqa: E402
from core.settings import ChipArgs, ParallelArgs, PredictArgs, load_settings  # noqa: E402
from core.tree import DataTree  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LOCAL = ParallelArgs(workers=1)
#: The sample scene as chip and mask see it: raw tiles chipped directly, 64 chips in 4 batches.
SCENE = ["chip_args.source=raw", "chip_args.size=32"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[distributed.LocalCluster]:
    # Functions of this module go to the workers by value: tests/ is not importable there.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )
    try:
        yield cluster
    finally:
        cluster.close()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def client(cluster) -> Iterator[distributed.Client]:
    with distributed.Client(cluster.scheduler_address, set_as_default=False) as client:
        yield client


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data tree with the sample scene's raw tiles (2 x 2 of 128 px) and labels."""
    from sample.sample import main as sample_main

    root = tmp_path_factory.mktemp("scene") / "data"
    assert sample_main(["--quiet", "--set", f"data_root={root}", "--tiles", "2", "--tile-size", "128"]) == 0
    return root


def copy_scene(scene: Path, to: Path) -> Path:
    shutil.copytree(scene / "raw", to / "raw")
    shutil.copytree(scene / "labels", to / "labels")
    return to


def argv(settings_file: Path, root: Path, *more: str) -> list[str]:
    args = ["--settings", str(settings_file), "--quiet", "--set", f"data_root={root}"]
    for item in more:
        args += ["--set", item]
    return args


def outputs(root: Path) -> dict[str, bytes]:
    """Every finished file under ``root`` (temporary ones start with a dot), by relative path."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def assert_same_files(local: Path, remote: Path) -> None:
    a, b = outputs(local), outputs(remote)
    assert sorted(a) == sorted(b)
    # Stage records differ in their run ids and times, not in the settings that made the outputs.
    records = [name for name in a if name.endswith(".record.json")]
    for name in records:
        assert json.loads(a[name])["settings"] == json.loads(b[name])["settings"], name
    different = [name for name in a if a[name] != b[name] and name not in records]
    assert different == []


# --- chip, mask, flatten ----------------------------------------------------------------------


def test_chip_mask_flatten_on_the_cluster_write_the_same_bytes(cluster, scene, settings_file, tmp_path) -> None:
    from chip.chip import main as chip_main
    from flatten.flatten import main as flatten_main
    from mask.mask import main as mask_main

    flat = ["flatten_args.frames=chips", "flatten_args.masks=masks", "flatten_args.layout=wide",
            "flatten_args.sample_fraction=0.2", "flatten_args.balance=2"]  # fmt: skip
    runs = {"local": ["parallel.workers=1"], "dask": [f"parallel.scheduler={cluster.scheduler_address}"]}
    for name, backend in runs.items():
        root = copy_scene(scene, tmp_path / name)
        for main in (chip_main, mask_main, flatten_main):
            assert main(argv(settings_file, root, *SCENE, *flat, *backend)) == 0, (name, main.__module__)
    local, remote = outputs(tmp_path / "local"), outputs(tmp_path / "dask")
    n_chips = local["chips.csv"].count(b"\n") - 1
    assert n_chips > 50  # of 64: chips mostly in the scene's nodata corner are skipped
    assert sum(n.startswith("chips/") for n in local) == sum(n.startswith("masks/") for n in local) == n_chips
    assert {"chips.csv", "flat/pixels.csv"} <= set(local)
    assert_same_files(tmp_path / "local", tmp_path / "dask")
    assert local["chips.csv"] == remote["chips.csv"]


def test_an_error_inside_a_task_is_the_same_line_as_locally(cluster, scene, settings_file, tmp_path, capsys) -> None:
    from chip.chip import main as chip_main
    from mask.mask import main as mask_main

    errors = []
    for name, backend in {
        "local": "parallel.workers=1",
        "dask": f"parallel.scheduler={cluster.scheduler_address}",
    }.items():
        root = copy_scene(scene, tmp_path / name)
        assert chip_main(argv(settings_file, root, *SCENE, backend)) == 0
        capsys.readouterr()
        chip = root / "chips" / "chip_000005.tif"
        chip.write_bytes(b"")  # a RasterError inside burn_mask, on a worker
        assert mask_main(argv(settings_file, root, *SCENE, backend)) == 1
        # The in-process scheduler logs to this stderr too (INFO, with tracebacks of closed comms);
        # a real one logs elsewhere. The stage's own output is its error lines.
        err = capsys.readouterr().err.replace(str(root), "ROOT")
        errors.append([line for line in err.splitlines() if line.startswith("error")])
    assert errors[0] == errors[1] == ["error: ROOT/chips/chip_000005.tif is empty (0 bytes): delete it and rerun "
                                      "the stage or download that made it"]  # fmt: skip


def test_an_unreachable_scheduler_is_one_clear_line_quickly(
    scene, settings_file, tmp_path, capsys, monkeypatch
) -> None:
    from chip.chip import main as chip_main

    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT", 1.0)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = copy_scene(scene, tmp_path / "data")
    started = time.perf_counter()
    assert chip_main(argv(settings_file, root, *SCENE, f"parallel.scheduler=tcp://127.0.0.1:{port}")) == 1
    assert time.perf_counter() - started < 10
    # Background threads of the earlier in-process cluster may still log ("--- Logging error ---")
    # into this capture; the stage's own output is its error lines, exactly one.
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: cannot reach the Dask scheduler at tcp://127.0.0.1:{port} ")
    assert "dask scheduler" in errors[0] and "leave parallel.scheduler empty" in errors[0]
    assert chip_main(argv(settings_file, root, *SCENE, "parallel.scheduler=tcp://127.0.0.1")) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1
    assert errors[0].startswith(
        "error: parallel.scheduler='tcp://127.0.0.1' is not a Dask scheduler address (missing port"
    )


def test_worker_cached_builds_once_per_key_and_keeps_the_latest() -> None:
    made = []

    def make(tag: str):
        def build() -> str:
            made.append(tag)
            return tag

        return build

    assert worker_cached(("t", 1), make("a")) == "a"
    assert worker_cached(("t", 1), make("b")) == "a"
    assert worker_cached(("t", 2), make("c")) == "c"
    assert worker_cached(("t", 1), make("d")) == "d"  # only the latest key is kept
    assert made == ["a", "c", "d"]


# --- predict ----------------------------------------------------------------------------------


def make_bundle(folder: Path, raster: Path) -> Path:
    """A tiny random U-Net (filters 2, one layer) for 8-band uint16 imagery, threshold inside its range."""
    keras = pytest.importorskip("keras")
    import rasterio

    from core.bundle import BundleInfo, Normalization
    from core.settings import ModelArgs, OutputArgs
    from unet import bundle as unet_bundle
    from unet.model import build_model, pad_multiple

    keras.utils.set_random_seed(0)
    args = ModelArgs(filters=2, upconv_filters=2, num_layers=1, input_shape=(64, 64, 8))
    model = build_model(8, args, OutputArgs())
    norm = Normalization("percentile", low=(0.0,) * 8, high=(2047.0,) * 8, mean=(0.0,) * 8, std=(1.0,) * 8, nodata=0)
    info = BundleInfo(kind="unet", bands=8, dtype="uint16", normalization=norm, threshold=0.5,
                      pad_multiple=pad_multiple(args))  # fmt: skip
    with rasterio.open(raster) as src:
        prob = unet_bundle.UNetPredictor(model, info).predict(src.read()[None])[0]
    info.threshold = float(np.quantile(prob, 0.8))  # some roof, not all
    return unet_bundle.save(folder, model, info)


def read_roofs(path: Path) -> list:
    gdf = gpd.read_file(path, engine="pyogrio")
    return [gdf.crs, list(gdf.columns), gdf.drop(columns="geometry").values.tolist(), list(gdf.geometry.to_wkb())]


def test_predict_on_the_cluster_writes_the_same_bytes_and_loads_the_bundle_once(
    cluster, client, scene, tmp_path
) -> None:
    from predict.predict import predict_all

    inputs = sorted((scene / "raw").glob("*.tif"))
    bundle = make_bundle(tmp_path / "bundle", inputs[0])
    args = PredictArgs(window=64, overlap=8)
    dask = ParallelArgs(scheduler=cluster.scheduler_address)
    local = predict_all(bundle, inputs, tmp_path / "local", args, parallel=LOCAL)
    remote = predict_all(bundle, inputs, tmp_path / "dask", args, parallel=dask)
    assert [r.roof_pixels for r in local] == [r.roof_pixels for r in remote]
    assert sum(r.roof_pixels for r in local) > 0
    for sub in ("masks", "probabilities"):
        assert len(list((tmp_path / "local" / sub).glob("*.tif"))) == 4
        assert_same_files(tmp_path / "local" / sub, tmp_path / "dask" / sub)
    # A GeoPackage records when it was written: compare what it holds.
    assert read_roofs(tmp_path / "local" / "roofs.gpkg") == read_roofs(tmp_path / "dask" / "roofs.gpkg")
    # Two local worker processes (spawned) take the same path as the cluster's workers.
    predict_all(bundle, inputs, tmp_path / "pool", args, parallel=ParallelArgs(workers=2))
    assert_same_files(tmp_path / "local" / "masks", tmp_path / "pool" / "masks")
    assert read_roofs(tmp_path / "local" / "roofs.gpkg") == read_roofs(tmp_path / "pool" / "roofs.gpkg")

    # Each worker loaded the bundle for its first raster and kept it: a second run reuses it.
    def loaded() -> list[int]:
        return [id(v) for k, v in parallel._cache.items() if k[0] == "predictor"]

    before = client.run(loaded)
    assert sum(len(ids) for ids in before.values()) >= 1
    predict_all(bundle, inputs, tmp_path / "again", args, parallel=dask)
    after = client.run(loaded)
    assert all(after[w] == ids for w, ids in before.items() if ids)
    assert_same_files(tmp_path / "local" / "masks", tmp_path / "again" / "masks")


def test_predict_script_on_the_cluster(cluster, scene, settings_file, tmp_path) -> None:
    """As users run it: predict.py is __main__ there, so its functions travel to the workers by value."""
    from predict.predict import predict_all

    inputs = sorted((scene / "raw").glob("*.tif"))
    bundle = make_bundle(tmp_path / "bundle", inputs[0])
    predict_all(bundle, inputs, tmp_path / "local", PredictArgs(window=64, overlap=8), parallel=LOCAL)
    cmd = [sys.executable, str(REPO / "predict" / "predict.py"), "--bundle", str(bundle), "--input", str(scene / "raw"),
           *argv(settings_file, scene, "predict_args.window=64", "predict_args.overlap=8", "experiment=x",
                 f"predict_args.output={tmp_path / 'dask'}", f"parallel.scheduler={cluster.scheduler_address}")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for sub in ("masks", "probabilities"):
        assert_same_files(tmp_path / "local" / sub, tmp_path / "dask" / "x" / "unet" / sub)


# --- a worker lost mid-run --------------------------------------------------------------------


def _slow_chips(batch):
    """make_chips after a pause, long enough to kill the worker running it."""
    time.sleep(0.8)
    return make_chips(batch)


def test_a_worker_killed_mid_run_loses_and_duplicates_no_output(cluster, client, scene, tmp_path) -> None:
    args = ChipArgs(source="raw", size=32)
    trees = {}
    for name in ("local", "dask"):
        tree = DataTree.from_settings(load_settings(None, [f"data_root={tmp_path / name}"]))
        tree.chips.mkdir(parents=True)
        trees[name] = tree
    sources = sorted((scene / "raw").glob("*.tif"))

    def batches(tree: DataTree) -> list[tuple]:
        tasks = plan_chips(sources, tree, args, reuse=True)
        return [tuple(tasks[i : i + 8]) for i in range(0, len(tasks), 8)]

    expected = map_tasks(make_chips, batches(trees["local"]), LOCAL)
    pids = client.run(os.getpid)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            map_tasks, _slow_chips, batches(trees["dask"]), ParallelArgs(scheduler=cluster.scheduler_address)
        )
        deadline = time.monotonic() + 30
        busy: list[str] = []
        while not busy and time.monotonic() < deadline:
            busy = [w for w, keys in client.processing().items() if keys]
            time.sleep(0.05)
        assert busy, "no task started"
        os.kill(pids[busy[0]], signal.SIGKILL)
        got = running.result(timeout=60)
    assert busy[0] not in client.scheduler_info()["workers"]  # the worker did die
    assert got == expected
    assert_same_files(trees["local"].chips, trees["dask"].chips)
    client.wait_for_workers(2, timeout=30)  # the nanny restarts it


# --- training on several GPUs ------------------------------------------------------------------


def test_mirrored_training_without_a_gpu_says_so_and_trains_on_the_cpu(tmp_path, settings_file, caplog) -> None:
    pytest.importorskip("keras")
    from test_unet import TINY, tiny_tree

    from unet.train import train_unet

    tiny_tree(tmp_path / "data", n_train=4, n_val=2)
    overrides = [*TINY, f"data_root={tmp_path / 'data'}", f"training_args.results_folder={tmp_path / 'results'}",
                 "experiment=mirrored", "training_args.epochs=1", "training_args.distribute=mirrored",
                 "model_args.filters=2", "model_args.upconv_filters=2"]  # fmt: skip
    settings = load_settings(settings_file, overrides)
    with caplog.at_level("INFO"):
        bundle = train_unet(settings, DataTree.from_settings(settings))
    assert (bundle / "model.keras").is_file()
    messages = [r.getMessage() for r in caplog.records]
    assert "train: training_args.distribute is mirrored but no GPU is visible: training on the CPU" in messages
    assert any(m.startswith("train: MirroredStrategy over 1 replica(s)") for m in messages)


def test_map_tasks_returns_results_in_input_order_on_every_backend(cluster) -> None:
    items = list(range(20))
    for backend in (LOCAL, ParallelArgs(scheduler=cluster.scheduler_address)):
        assert map_tasks(abs, [-i for i in items], backend) == items
    assert map_tasks(abs, [], ParallelArgs(scheduler=cluster.scheduler_address)) == []


def test_a_pipeline_error_is_not_retried(cluster, tmp_path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    with pytest.raises(PipelineError, match="bad tile 3"):
        map_tasks(
            _fail_on_three, [(str(marks), i) for i in range(5)], ParallelArgs(scheduler=cluster.scheduler_address)
        )
    assert len(list(marks.glob("3-*"))) == 1  # ran once: retrying a bad input cannot help


def _fail_on_three(item: tuple[str, int]) -> int:
    folder, i = item
    if i == 3:
        (Path(folder) / f"3-{threading.get_ident()}-{time.monotonic_ns()}").touch()
        raise PipelineError(f"bad tile {i}")
    return i
