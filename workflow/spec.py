"""The types a stage is declared with: its outputs, its inputs and the declaration itself.

:mod:`workflow.stages` declares every stage with these; :mod:`workflow.contract` reads the
declarations to decide what a stage's outputs are. They hold no logic about records, so the
declarations import nothing of the engine that reads them.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Output:
    """An output a stage owns: a file, or the files matching ``pattern`` in a folder.

    ``counted``: a finished run records how many there are, and fewer later make the stage
    unfinished (a rerun remakes them). Logs are not counted: removing them loses no result.
    A fresh start removes every output, counted or not.
    """

    path: Path
    pattern: str | None = None
    counted: bool = True

    def existing(self) -> list[Path]:
        if self.pattern is None:
            return [self.path] if self.path.exists() else []
        return sorted(self.path.glob(self.pattern)) if self.path.is_dir() else []

    def folder(self) -> Path:
        return self.path if self.pattern is not None else self.path.parent

    def leftovers(self) -> list[Path]:
        """Temporary files of a killed run (atomic writes name them ``.STEM.XXXX.tmp...``)."""
        folder = self.folder()
        if not folder.is_dir():
            return []
        glob = ".*.tmp*" if self.pattern is not None else f".{self.path.stem}.*.tmp*"
        return sorted(folder.glob(glob))


@dataclass(frozen=True)
class Dep:
    """An upstream stage a stage reads. ``artifact``: only its identity counts (a trained bundle is
    what it is; a later edit of the training settings does not make a prediction with it stale)."""

    stage: str
    artifact: bool = False


@dataclass(frozen=True)
class Inputs:
    """What a run reads: upstream stages and outside files (``hashed``: identified by content)."""

    deps: tuple[Dep, ...] = ()
    files: tuple[Path, ...] = ()
    hashed: bool = False


@dataclass(frozen=True)
class StageSpec:
    """One stage's declaration.

    Attributes:
        name: the stage name (``pipeline.py`` uses it too).
        command: how a user runs it (used in messages).
        what: its outputs in words, as messages name them ("chips/").
        settings: the dotted settings keys (sections or single fields) that shape its outputs.
        exclude: keys under those that do not (progress verbosity, output folders).
        inputs: ``(settings, tree, model, given) -> Inputs``; ``given`` holds command-line
            paths (``--input``, ``--bundle``) that replace what the settings name.
        outputs: ``(settings, tree, model) -> [Output]``: what a fresh start removes.
        record: ``(settings, tree, model) -> Path`` of its record.
        per_model: runs once per model (train, predict, evaluate).
        model_settings: ``model -> extra keys`` for per-model stages.
        unread: ``(settings, tree, model, given) -> keys`` under ``settings`` that change nothing with the
            inputs as they are now (predict's class settings with a one-class bundle): left out like
            ``exclude``, so setting one does not make the outputs outdated.
        skipped: ``(settings, tree, model, given) -> lines`` to warn when the stage is skipped as up to date
            (predict: the settings set that its bundle does not read).
        options: the command-line option of each recorded ``given`` path whose name is not ``--KEY``
            (train's ``bundle`` is ``--from-bundle``).
        artifact: ``(settings, tree, model) -> folder`` that a stage reading it as an artifact reads (train's:
            the bundle): the sizes and times of its files are part of that reader's record, so a file of it
            edited by hand (bundle.json's threshold) makes the reader outdated though no run made it.
    """

    name: str
    command: str
    what: str
    settings: tuple[str, ...]
    inputs: Callable[..., Inputs]
    outputs: Callable[..., list[Output]]
    record: Callable[..., Path]
    exclude: tuple[str, ...] = ()
    per_model: bool = False
    model_settings: Callable[[str], tuple[str, ...]] | None = None
    unread: Callable[..., tuple[str, ...]] | None = None
    skipped: Callable[..., list[str]] | None = None
    options: tuple[tuple[str, str], ...] = ()
    plural: bool = True
    complete: Callable[..., bool] | None = None
    artifact: Callable[..., Path] | None = None

    @property
    def were(self) -> str:
        return f"{self.what} {'were' if self.plural else 'was'}"

    @property
    def are(self) -> str:
        return f"{self.what} {'are' if self.plural else 'is'}"

    def keys(self, model: str | None) -> tuple[str, ...]:
        extra = self.model_settings(model) if (self.model_settings and model) else ()
        return (*self.settings, *extra)

    def run_command(self, model: str | None, overwrite: bool = False, given: dict[str, Any] | None = None) -> str:
        """How to rerun it, with the command-line paths its run was given (``--bundle DIR``)."""
        cmd = self.command + (f" --model {model}" if self.per_model and model else "")
        flags = dict(self.options)
        cmd += "".join(
            f" {flags.get(k, '--' + k)} {shlex.quote(str(v))}"
            for k, v in sorted((given or {}).items())
            if v is not None
        )
        return cmd + (" --overwrite" if overwrite else "")
