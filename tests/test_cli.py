"""core.cli: the shared parser and run() wrapper, exit codes and error output."""

from __future__ import annotations

import json

import pytest

from core import cli
from core.errors import DataError
from core.settings import dump_settings, load_settings


class Recorder:
    """A stage body that records its arguments, or raises ``error``."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.calls: list[tuple] = []
        self.error = error

    def __call__(self, args, settings, tree) -> None:
        self.calls.append((args, settings, tree))
        if self.error is not None:
            raise self.error


def run(argv: list[str], body: Recorder) -> int:
    parser = cli.make_parser("Doc line.\n\nDetails.")
    parser.add_argument("--flag", action="store_true")
    return cli.run(parser, argv, body)


def test_success_calls_body_once(settings_file, tmp_path):
    body = Recorder()
    assert run(["--settings", str(settings_file), "--flag"], body) == 0
    assert len(body.calls) == 1
    args, settings, tree = body.calls[0]
    assert args.flag is True
    assert args.overwrite is False
    assert settings == load_settings(settings_file)
    assert tree.root == (tmp_path / "data").resolve()
    assert tree.experiment == settings.experiment


def test_overrides_reach_body(settings_file):
    body = Recorder()
    assert (
        run(["--settings", str(settings_file), "--set", "training_args.epochs=3", "--set", "experiment=x1"], body) == 0
    )
    _, settings, tree = body.calls[0]
    assert settings.training_args.epochs == 3
    assert tree.experiment == "x1"


def test_print_settings(settings_file, capsys):
    body = Recorder()
    assert run(["--settings", str(settings_file), "--set", "training_args.epochs=3", "--print-settings"], body) == 0
    assert body.calls == []
    printed = json.loads(capsys.readouterr().out)
    expected = json.loads(dump_settings(load_settings(settings_file, ["training_args.epochs=3"])))
    assert printed == expected
    assert printed["training_args"]["epochs"] == 3


def test_pipeline_error_is_one_line(settings_file, capsys):
    body = Recorder(DataError("boom: fix it"))
    assert run(["--settings", str(settings_file)], body) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: boom: fix it\n"
    assert captured.out == ""


def test_verbose_shows_traceback(settings_file, capsys):
    body = Recorder(DataError("boom: fix it"))
    assert run(["--settings", str(settings_file), "--verbose"], body) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.endswith("error: boom: fix it\n")


def test_unexpected_error_is_one_line_and_the_traceback_on_request(settings_file, capsys):
    body = Recorder(RuntimeError("bug\n in two lines"))
    assert run(["--settings", str(settings_file)], body) == 1
    assert capsys.readouterr().err == (
        "error: unexpected RuntimeError: bug in two lines (run with --verbose for the traceback)\n"
    )
    assert run(["--settings", str(settings_file), "--verbose"], body) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "RuntimeError: bug" in err


def test_bad_usage_is_2(settings_file, capsys):
    body = Recorder()
    assert run(["--settings", str(settings_file), "--nonsense"], body) == 2
    assert body.calls == []
    assert "--nonsense" in capsys.readouterr().err


def test_help_is_0(capsys):
    body = Recorder()
    assert run(["--help"], body) == 0
    assert body.calls == []
    out = capsys.readouterr().out
    assert "Doc line." in out
    assert "Details." in out
    assert "--settings" in out


def test_quiet_and_verbose_together_is_2(settings_file):
    body = Recorder()
    assert run(["--settings", str(settings_file), "--quiet", "--verbose"], body) == 2
    assert body.calls == []


def test_missing_settings_file_is_1(tmp_path, capsys):
    body = Recorder()
    missing = tmp_path / "missing.json"
    assert run(["--settings", str(missing)], body) == 1
    assert body.calls == []
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "not found" in err
    assert str(missing) in err
    assert "Traceback" not in err


def test_unknown_set_key_is_1(settings_file, capsys):
    body = Recorder()
    assert run(["--settings", str(settings_file), "--set", "model_args.filtres=3"], body) == 1
    assert body.calls == []
    assert "did you mean filters" in capsys.readouterr().err


def test_invalid_set_value_is_1(settings_file, capsys):
    body = Recorder()
    assert run(["--settings", str(settings_file), "--set", "training_args.epochs=0"], body) == 1
    assert "training_args.epochs" in capsys.readouterr().err


def test_quiet_turns_progress_off(settings_file):
    body = Recorder()
    assert run(["--settings", str(settings_file), "--quiet"], body) == 0
    assert cli.progress(range(3)).disable is True


def test_a_usage_mistake_is_one_line(capsys):
    parser = cli.make_parser("Do a thing.", prog="thing.py")
    parser.add_argument("--model", choices=["unet", "forest"])
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--model", "foo"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "error: argument --model: invalid choice: 'foo' (choose from 'unet', 'forest') (see thing.py --help)\n"
    )
