"""pipeline.py and workflow.runner: stage selection, skipping finished stages, stopping at the first failure."""

from __future__ import annotations

import functools
import shlex
from pathlib import Path

import pytest
from conftest import REPO_SETTINGS

import pipeline
from core.settings import load_settings
from core.tree import DataTree
from workflow.runner import DEMO, STAGES, Stage, run_stages, select

NAMES = ["sample", "mosaic", "chip", "mask", "split"]


@pytest.mark.parametrize(
    ("start", "stop", "only", "expected"),
    [
        (None, None, None, NAMES),
        ("chip", None, None, ["chip", "mask", "split"]),
        (None, "chip", None, ["sample", "mosaic", "chip"]),
        ("mosaic", "mask", None, ["mosaic", "chip", "mask"]),
        (None, None, ["split", "sample"], ["sample", "split"]),
    ],
)
def test_select(start, stop, only, expected) -> None:
    assert select(NAMES, start, stop, only) == expected


@pytest.fixture
def fake_stages(tmp_path: Path):
    """Three stages whose main() records its argv and writes a marker file; 'b' can be made to fail."""
    calls: list[tuple[str, list[str]]] = []
    state = {"fail": None}

    def main(argv, name):
        calls.append((name, argv))
        if state["fail"] == name:
            return 1
        (tmp_path / name).write_text("done")
        return 0

    stages = [
        Stage(n, functools.partial(main, name=n), exists=lambda t, m, n=n: (tmp_path / n).exists())
        for n in ("a", "b", "c")
    ]
    return stages, calls, state


def test_runs_in_order_and_skips_finished_stages(fake_stages, tmp_path: Path) -> None:
    stages, calls, _ = fake_stages
    (tmp_path / "a").write_text("done")
    rows = run_stages(stages, None, ["--quiet"], overwrite=False, settings=None)
    assert [(n, r) for n, r, _ in rows] == [("a", "skipped"), ("b", "ok"), ("c", "ok")]
    assert calls == [("b", ["--quiet"]), ("c", ["--quiet"])]


def test_stops_at_the_first_failure(fake_stages) -> None:
    stages, calls, state = fake_stages
    state["fail"] = "b"
    rows = run_stages(stages, None, [], overwrite=False, settings=None)
    assert [(n, r) for n, r, _ in rows] == [("a", "ok"), ("b", "failed (exit 1)")]
    assert [c[0] for c in calls] == ["a", "b"]


def test_overwrite_reruns_finished_stages(fake_stages, tmp_path: Path) -> None:
    stages, calls, _ = fake_stages
    for n in ("a", "b", "c"):
        (tmp_path / n).write_text("done")
    rows = run_stages(stages, None, [], overwrite=True, settings=None)
    assert [r for _, r, _ in rows] == ["ok", "ok", "ok"]
    assert all(argv == ["--overwrite"] for _, argv in calls)


def test_main_unknown_stage_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert pipeline.main(["--from", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --from: invalid choice: 'nope'") and err.endswith(" --help)\n")
    assert err.count("\n") == 1  # one line, no usage block


def test_main_runs_data_stages_on_a_small_sample(stage_argv: list[str], tmp_path: Path, capsys) -> None:
    argv = [*stage_argv, "--to", "split", "--set", "split_args.block=1"]
    # A small scene: the sample stage's own options are not pipeline options, so shrink it through its main.
    import sample.sample as sample_stage

    assert sample_stage.main([*stage_argv, "--tiles", "1", "--tile-size", "512"]) == 0
    assert pipeline.main(argv) == 0
    out = capsys.readouterr().out
    assert "download    skipped" in out  # raw/ holds tiles; sample runs only with --demo
    assert "sample " not in out
    for stage in ("mosaic", "chip", "mask", "split"):
        assert f"{stage:<11} ok" in out
    assert (tmp_path / "data" / "train_frames" / "train_0.tif").is_file()
    # A bucket set now: download would be skipped (raw/ has tiles) and the synthetic town mapped as its imagery.
    bucket = ["--set", "download_args.bucket=my-imagery"]
    assert pipeline.main([*argv, *bucket]) == 1
    raw, labels = tmp_path / "data" / "raw", tmp_path / "data" / "labels"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: download_args.bucket is set, but {raw} holds the sample scene (made by python pipeline.py --demo), "
        f"not its imagery: set data_root to another folder for the bucket's imagery, or remove {raw}, {labels} and "
        f"{tmp_path / 'data' / 'quicklook.png'} first"
    )
    assert pipeline.main(["check", *argv, *bucket]) == 1  # the check says so first
    assert f"FATAL    download_args.bucket is set, but {raw} holds the sample scene" in capsys.readouterr().out


def test_the_check_warns_when_download_would_have_to_ask_for_the_bucket(stage_argv, tmp_path, capsys) -> None:
    assert pipeline.main(["check", *stage_argv, "--to", "mosaic"]) == 0
    raw = tmp_path / "data" / "raw"
    assert (
        f"warning  {raw} holds no tiles and download_args.bucket is not set: download will ask for the bucket (in a "
        "terminal; elsewhere it stops): set download_args.bucket, put your tiles in it, or run python pipeline.py "
        "--demo for the sample scene"
    ) in capsys.readouterr().out


def test_without_demo_the_imagery_is_downloads_or_raws_and_never_the_sample_scene() -> None:
    from core.settings import Settings
    from workflow.runner import choose

    names = [s.name for s in choose(Settings())]
    assert names[0] == "download" and "sample" not in names
    assert [s.name for s in choose(Settings(), only=["sample"])] == ["sample"]


# --- stages run once per trained model ------------------------------------------------------------


@pytest.fixture
def per_model(tmp_path: Path):
    """A fake per-model stage whose main() records its argv (done when a marker for the model exists), and a tree."""
    settings = load_settings(REPO_SETTINGS, [f"data_root={tmp_path}", f"training_args.results_folder={tmp_path}"])
    tree = DataTree.from_settings(settings)
    calls: list[list[str]] = []

    def main(argv):
        calls.append(argv)
        model = argv[argv.index("--model") + 1]
        (tmp_path / f"scored-{model}").write_text("done")
        return 0

    stage = Stage("score", main, exists=lambda t, m: (t.root / f"scored-{m}").exists(), per_model=True)
    return stage, calls, tree


def trained(tree: DataTree, *models: str) -> None:
    for m in models:
        tree.bundle(m).mkdir(parents=True)
        (tree.bundle(m) / "bundle.json").write_text("{}")


def test_a_per_model_stage_runs_for_every_trained_model_in_pipeline_order(per_model) -> None:
    stage, calls, tree = per_model
    trained(tree, "unet", "forest")
    (tree.root / "scored-forest").write_text("done")
    rows = run_stages([stage], tree, ["-q"], overwrite=False, settings=None)
    assert [(n, r) for n, r, _ in rows] == [("score forest", "skipped"), ("score unet", "ok")]
    assert calls == [["-q", "--model", "unet"]]


def test_predict_and_evaluate_run_for_the_kind_of_the_bundle_predict_args_names(per_model, tmp_path) -> None:
    from core.bundle import BundleInfo, Normalization, write_info

    stage, calls, tree = per_model
    trained(tree, "unet", "forest")
    norm = Normalization("zscore", (0.0,) * 3, (1.0,) * 3, (0.0,) * 3, (1.0,) * 3, None)
    write_info(tmp_path / "elsewhere", BundleInfo(kind="regression", bands=3, dtype="uint16", normalization=norm,
                                                  threshold=0.5))  # fmt: skip
    settings = load_settings(REPO_SETTINGS, [f"data_root={tmp_path}", f"predict_args.bundle={tmp_path / 'elsewhere'}"])
    rows = run_stages([stage], tree, ["-q"], overwrite=False, settings=settings)
    assert [(n, r) for n, r, _ in rows] == [("score regression", "ok")]  # its predictions are a regression's
    assert calls == [["-q", "--model", "regression"]]


def test_a_per_model_stage_without_a_trained_model_fails(per_model) -> None:
    stage, calls, tree = per_model
    rows = run_stages([stage], tree, [], overwrite=False, settings=None)
    assert [(n, r) for n, r, _ in rows] == [("score", "failed (no model)")]
    assert calls == []


def test_every_stage_is_in_the_pipeline_and_the_demo() -> None:
    assert [s.name for s in STAGES] == [
        "download", "sample", "mosaic", "chip", "mask", "split", "flatten", "summarize",
        "train-forest", "train-regression", "train-unet", "predict", "evaluate",
    ]  # fmt: skip
    assert tuple(s.name for s in STAGES[1:]) == DEMO


def test_the_demo_runs_the_stages_from_to_and_only_choose() -> None:
    from core.settings import Settings
    from workflow.runner import choose

    def names(**how) -> list[str]:
        return [s.name for s in choose(Settings(), demo=True, **how)]

    assert names() == list(DEMO)
    assert names(stop="train-regression") == list(DEMO[: DEMO.index("train-regression") + 1])
    assert names(start="predict") == ["predict", "evaluate"]
    assert names(only=["predict", "download"]) == ["predict"]
    assert names(only=["download"]) == []  # (pipeline.py: a usage error)


# --- the stages after split on a tiny scene ---------------------------------------------------------

#: A tiny scene and small classical models: the whole run takes seconds.
TINY = [
    "parallel.workers=1",
    "split_args.block=1",
    "chip_args.size=128",
    "model_args.input_shape=[128,128,8]",
    "flatten_args.sample_fraction=0.02",
    "ml_args.max_train_pixels=3000",
    "ml_args.texture_windows=[]",
    "ml_args.forest.n_estimators=5",
    "ml_args.forest.n_jobs=1",
]


def test_from_to_only_after_split_on_a_tiny_scene(settings_file: Path, tmp_path: Path, capsys) -> None:
    argv = ["--settings", str(settings_file), "--quiet"]
    for item in (f"data_root={tmp_path / 'data'}", f"training_args.results_folder={tmp_path / 'results'}",
                 f"predict_args.output={tmp_path / 'predictions'}", "experiment=tiny", *TINY):  # fmt: skip
        argv += ["--set", item]
    import sample.sample as sample_stage

    assert sample_stage.main([*argv, "--tiles", "1", "--tile-size", "512"]) == 0
    assert pipeline.main([*argv, "--to", "split"]) == 0
    capsys.readouterr()

    assert pipeline.main([*argv, "--from", "flatten", "--to", "train-regression"]) == 0
    out = capsys.readouterr().out
    ran = [line.split()[0] for line in out.splitlines() if line.endswith(tuple("0123456789")) and " ok " in line]
    assert ran == ["flatten", "summarize", "train-forest", "train-regression"]
    assert "train-unet" not in out
    table = out[out.index("validation metrics") :].splitlines()
    assert [line.split()[:2] for line in table[2:4]] == [["forest", "val"], ["regression", "val"]]

    # predict and evaluate run for each trained model; unet was not trained, so it is not there.
    assert pipeline.main([*argv, "--only", "predict", "evaluate"]) == 0
    out = capsys.readouterr().out
    for label in ("predict forest", "predict regression", "evaluate forest", "evaluate regression"):
        assert f"{label:<19} ok" in out, label
    assert "object F1" in out and f"report: {tmp_path / 'results' / 'tiny' / 'report.html'}" in out
    assert (tmp_path / "results" / "summary.md").is_file()

    assert pipeline.main([*argv, "--only", "evaluate"]) == 0
    out = capsys.readouterr().out
    assert f"{'evaluate forest':<19} skipped" in out and "evaluate regression skipped" in out

    # An edit of a mask setting: check names mask, then every stage after it that the run redoes, and the
    # command that runs them (this test's own options); the run then redoes exactly those.
    edited = [*argv, "--set", "mask_args.all_touched=true"]
    options = [a for a in edited if a not in ("--settings", str(settings_file), "--quiet")]
    chosen = ["--only", "mask", "split", "flatten", "summarize", "train-forest", "train-regression", "predict",
              "evaluate"]  # fmt: skip
    assert pipeline.main([*edited, "check", *chosen]) == 0
    out = capsys.readouterr().out
    assert (
        "  warning  mask: masks/ are outdated: made with mask_args.all_touched false, now true: the run redoes it\n"
        in out
    )
    later = ["split", "flatten", "summarize", "train-forest", "train-regression", "predict forest",
             "predict regression", "evaluate forest", "evaluate regression"]  # fmt: skip
    assert f"  warning  {', '.join(later)}: done, but from what mask made before: the run redoes them too\n" in out
    run = shlex.join(["python", "pipeline.py", "--settings", str(settings_file), *options, *chosen])
    assert out.endswith(f"0 fatal problems, 2 warnings\nthe run: {run}\n")
    # Leaving out a stage in between: the run would stop at a stage that reads it; check says so first.
    assert pipeline.main([*edited, "check", "--only", "mask", "split", "evaluate"]) == 1
    out = capsys.readouterr().out
    from_mask = shlex.join(["python", "pipeline.py", "--settings", str(settings_file), *options, "--from", "mask"])
    for model in ("forest", "regression"):
        assert (
            f"  FATAL    evaluate {model} reads the outputs of predict {model}, which the run would leave outdated (it "
            f"redoes mask, and predict is not among the stages chosen): choose predict too, or run {from_mask}\n"
        ) in out
    assert "  warning  split: done, but from what mask made before: the run redoes it too\n" in out  # (not evaluate)
    assert pipeline.main([*edited, *chosen]) == 0
    out = capsys.readouterr().out
    ran = [line[:19].strip() for line in out.splitlines() if line.endswith(tuple("0123456789")) and " ok " in line]
    assert ran == ["mask", *later]
    # A mask removed by hand: mask resumes (its run and record kept), so nothing after it is redone.
    tree = DataTree.from_settings(load_settings(settings_file, [o for o in options if o != "--set"]))
    next(tree.masks.glob("*.tif")).unlink()
    assert pipeline.main([*edited, "check", *chosen]) == 0
    out = capsys.readouterr().out
    assert (
        "  warning  mask: masks/ are incomplete (files were removed since it ran): python mask/mask.py --settings"
        in out
    )
    assert "redoes" not in out and out.endswith("0 fatal problems, 1 warning\n")

    # Chips cut again at another size: the masks on disk are of the old size, but mask, among the stages, redoes
    # them: the check says so and finds nothing fatal (it called the size difference fatal, while the run went on).
    resized = [*edited, "--set", "chip_args.size=96"]
    assert pipeline.main([*resized, "--only", "chip", "--overwrite"]) == 0
    capsys.readouterr()
    assert pipeline.main([*resized, "check", "--only", "mask", "split"]) == 0
    out = capsys.readouterr().out
    assert "masks/ are outdated" in out and "differ in size" not in out and "\n0 fatal problems, 2 warnings\n" in out
    # Without mask among them, the masks split would read are of the old size: fatal, as before.
    assert pipeline.main([*resized, "check", "--only", "split"]) == 1
    assert "differ in size from their chip" in capsys.readouterr().out
