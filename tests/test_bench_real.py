"""The real-data benchmarks' shared options (bench/_real.py): --seeds, its refusals, the spread table; real_banepa.py's
--average-seeds refusal."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from _real import options, parse, print_spread, trainings


def parsed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *argv: str):
    (tmp_path / "buildings.geojson").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["real_x.py", "--data", str(tmp_path), "--workdir", str(tmp_path / "w"), *argv])
    return parse(options("Benchmark.", tmp_path), "real_x")


def test_seeds_give_each_training_its_folder_and_seeds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    args, work = parsed(monkeypatch, tmp_path, "--seeds", "3", "0")
    seeded = ["--set", "training_args.seed={0}", "--set", "load_dataset_args.seed={0}", "--set", "ml_args.seed={0}"]
    assert trainings(args, work) == [
        ("seed 3", work / "seed-3", [a.format(3) for a in seeded]),
        ("seed 0", work / "seed-0", [a.format(0) for a in seeded]),
    ]
    args, work = parsed(monkeypatch, tmp_path, "--set", "training_args.seed=4")
    assert trainings(args, work) == [("", work, [])]  # without --seeds: WORKDIR itself, settings as given


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "1", "2", "1"], "real_x: --seeds 1 2 1 names a seed twice\n"),
        (
            ["--seeds", "1", "2", "--set", "ml_args.seed=5"],
            "real_x: --seeds sets ml_args.seed itself; drop --set ml_args.seed=...\n",
        ),
        (
            ["--seeds", "1", "--set", "load_dataset_args.seed=5", "--set", "ml_args.seed=5"],
            "real_x: --seeds sets load_dataset_args.seed and ml_args.seed itself; drop --set load_dataset_args.seed=...\n",
        ),
        (
            ["--set", "training_args.epochs=3", "--set", "training_args.results_folder=/elsewhere"],
            "real_x: the benchmark puts training_args.results_folder under WORKDIR itself; drop --set "
            "training_args.results_folder=... and give --workdir\n",
        ),
        (
            ["--set", "predict_args.output=/elsewhere"],
            "real_x: the benchmark puts predict_args.output under WORKDIR itself; drop --set predict_args.output=... "
            "and give --workdir\n",
        ),
        (["--reuse"], None),  # filled in below: needs the tmp_path
    ],
)
def test_refused(monkeypatch, tmp_path: Path, capsys, argv: list[str], message: str | None) -> None:
    if message is None:  # --reuse --seeds on a WORKDIR without one of their folders
        (tmp_path / "w" / "seed-4").mkdir(parents=True)
        argv = [*argv, "--seeds", "4", "5", "6"]
        message = f"real_x: --reuse --seeds: {tmp_path / 'w'} has no seed-5, seed-6 (made by an earlier run with these --seeds)\n"
    with pytest.raises(SystemExit) as stop:
        parsed(monkeypatch, tmp_path, *argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err == message


def test_spread_table_gives_mean_sample_deviation_and_each_run(capsys) -> None:
    runs = [
        ("seed 0", {"unet": {"pixel IoU": 0.40, "poly F1": 0.30}, "forest": {"pixel IoU": 0.30, "poly F1": 0.10}}),
        ("seed 1", {"unet": {"pixel IoU": 0.50, "poly F1": 0.20}, "forest": {"pixel IoU": 0.30, "poly F1": 0.10}}),
    ]
    print_spread(runs)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "over 2 trainings (seed 0, seed 1): mean ± standard deviation [each]"
    assert lines[2].split() == ["step", "pixel", "IoU", "poly", "F1"]
    assert lines[3].split() == ["unet", "0.450", "±", "0.071", "[0.400", "0.500]", "0.250", "±", "0.071", "[0.300",
                                "0.200]"]  # fmt: skip
    assert lines[4].split() == ["forest", "0.300", "±", "0.000", "[0.300", "0.300]", "0.100", "±", "0.000", "[0.100",
                                "0.100]"]  # fmt: skip
    print_spread(runs[:1])  # one training has no spread
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("seeds", [[], ["4"], ["0", "2"], ["1", "0"]])
def test_average_seeds_needs_consecutive_seeds(monkeypatch, tmp_path: Path, capsys, seeds: list[str]) -> None:
    import real_banepa

    (tmp_path / "buildings.geojson").write_text("{}")
    argv = ["real_banepa.py", "--data", str(tmp_path), "--workdir", str(tmp_path / "w"), "--average-seeds"]
    monkeypatch.setattr(sys, "argv", [*argv, *(["--seeds", *seeds] if seeds else [])])
    with pytest.raises(SystemExit) as stop:
        real_banepa.main()
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "real_banepa: --average-seeds needs --seeds of two or more consecutive seeds (N N+1 ...: a member's seed is "
        "the first plus its place)\n"
    )
    assert not (tmp_path / "w").exists()
