"""The stage contract: a rerun after a change never mixes stale data.

Every stage that writes into the data tree, results or predictions has one declaration
(:class:`~workflow.spec.StageSpec`, all of them in :mod:`workflow.stages`): the settings that
shape its outputs, the stages whose outputs it reads, the outside files it reads (tiles,
labels, a bundle), and the outputs it owns. A run records, beside its outputs,
``STAGE.record.json``: those settings, the run ids of the upstream records it read, the
identity of the outside files, and whether it finished. One reading of these records —
:func:`status` — decides for the stage itself, for ``pipeline.py`` and for the pre-flight
check what a stage's outputs are:

- **done**: the record is complete and matches the current settings and inputs: a rerun skips;
- **resumable**: it matches but the run did not finish: a rerun resumes;
- **outdated** (stale): a setting it records changed, an upstream stage ran again, or an outside
  file changed: a rerun refuses with one line naming what changed (``--overwrite`` redoes it),
  ``pipeline.py`` reruns it, and every later stage refuses to read it;
- **missing**: never ran; **unrecorded**: outputs without a record (made by hand or by an older
  version): used with a warning, redone only with ``--overwrite``.

A stage calls :func:`begin` before any work (it refuses here), :meth:`StageRun.start` once its
own input checks pass (a fresh start removes the old outputs and leftovers of a killed run),
and :meth:`StageRun.finish` at the end.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from core.errors import DataError, InputMissingError, OutputExistsError, PipelineError
from core.files import atomic_path
from workflow.spec import Dep, Output, StageSpec
from workflow.stages import order_of, spec_of

if TYPE_CHECKING:
    from core.settings import Settings
    from core.tree import DataTree

log = logging.getLogger(__name__)

#: Version of the record format; a record of another version counts as unrecorded.
RECORD_VERSION = 1


# --- reading the settings and files a record holds -------------------------------------------------


def flatten(data: Any, prefix: str) -> dict[str, Any]:
    """Leaves of nested settings as dotted keys (lists are values)."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out |= flatten(value, f"{prefix}.{key}")
        return out
    return {prefix: data}


def settings_of(settings: Settings, keys: tuple[str, ...], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The values of ``keys`` (sections or fields) as a flat dict of dotted keys; mask_args as they shape
    masks (:meth:`core.settings.MaskArgs.shaping`: a setting the class map makes unread is left out)."""
    dumped = settings.model_dump(mode="json")
    dumped["mask_args"] = settings.mask_args.shaping()
    out: dict[str, Any] = {}
    for key in keys:
        value: Any = dumped
        for part in key.split("."):
            value = value[part]
        out |= flatten(value, key)
    return {k: v for k, v in sorted(out.items()) if not any(k == e or k.startswith(e + ".") for e in exclude)}


def file_key(path: Path, tree: DataTree) -> str:
    """A file's name in a record: relative to the data tree when inside it."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(tree.root).as_posix()
    except ValueError:
        return str(resolved)


def file_identity(path: Path, hashed: bool) -> str:
    """Content hash (small files: labels, bundle.json) or size and modification time (imagery)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return "missing"
    if not hashed:
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:  # status() is asked often (every stage checks its upstream): hash a file once
        _HASHES[key] = _content_hash(path)
    return _HASHES[key]


#: Content hashes by (path, size, modification time).
_HASHES: dict[tuple[str, int, int], str] = {}


def _content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    # A Shapefile is several files: the geometry, its attributes and its CRS.
    parts = [path]
    if path.suffix.lower() == ".shp":
        parts += [p for p in sorted(path.parent.glob(path.stem + ".*")) if p != path]
    for part in parts:
        digest.update(part.name.encode())
        with part.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def read_record(path: Path) -> dict[str, Any] | None:
    """A record, or None when there is none (or it is unreadable or of another version)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        return None
    return record


def write_record(path: Path, record: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")


def _fingerprint(settings: dict[str, Any], inputs: dict[str, Any], files: dict[str, str]) -> str:
    runs = {k: v.get("run") for k, v in inputs.items()}
    blob = json.dumps({"settings": settings, "inputs": runs, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _show(value: Any) -> str:
    return json.dumps(value, default=str)


# --- status ------------------------------------------------------------------------------------------

State = Literal["missing", "unrecorded", "running", "complete"]


@dataclass
class Status:
    """What a stage's outputs are now, against the current settings and inputs."""

    spec: StageSpec
    model: str | None
    state: State
    record: dict[str, Any] | None
    current: dict[str, Any]
    changes: list[str] = field(default_factory=list)
    outputs_present: bool = True
    outputs_whole: bool = True
    inputs_error: PipelineError | None = None

    @property
    def label(self) -> str:
        return f"{self.spec.name} {self.model}" if self.model else self.spec.name

    @property
    def stale(self) -> bool:
        """Made under other settings or from other inputs than now."""
        return self.state in ("running", "complete") and bool(self.changes)

    @property
    def removed(self) -> bool:
        """A finished run whose outputs were removed (some or all) since."""
        return self.state == "complete" and not (self.outputs_present and self.outputs_whole)

    @property
    def done(self) -> bool:
        return self.state == "complete" and not self.changes and not self.removed

    def describe(self) -> str:
        """One phrase: 'done', 'outdated: ...', 'interrupted', 'not run', 'no record'."""
        if self.state == "missing":
            return "not run"
        if self.state == "unrecorded":
            return "outputs without a record"
        if self.changes:
            return "outdated: made " + "; ".join(self.changes)
        if self.state == "running":
            return "interrupted (a rerun resumes)"
        if self.removed:
            return "outputs removed since (a rerun remakes them)"
        return "done"


def _dep_identity(dep: Dep, settings: Settings, tree: DataTree, model: str | None) -> dict[str, Any]:
    spec = spec_of(dep.stage)
    up_model = model if spec.per_model else None
    record = read_record(spec.record(settings, tree, up_model))
    if record is None:
        return {"run": _unrecorded_identity(spec.outputs(settings, tree, up_model))}
    identity = {"run": record["run"], "state": record["state"], "settings": record.get("settings", {})}
    if dep.artifact and spec.artifact is not None:  # its files as they are: an edit by hand is a change too
        folder = spec.artifact(settings, tree, up_model)
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        identity["files"] = {p.name: file_identity(p, hashed=False) for p in files}
    return identity


def _unrecorded_identity(outputs: list[Output]) -> str | None:
    """Outputs without a record (a mosaic put there by hand) are known by their files' sizes and times.

    Folders of files count, single files only when a stage has nothing else: chips.csv is
    rewritten by later stages and would make its own readers look outdated.
    """
    chosen = [o for o in outputs if o.pattern is not None] or outputs
    files = [p for o in chosen for p in o.existing() if p.is_file()]
    if not any(o.existing() for o in outputs):
        return None
    blob = json.dumps([[p.name, file_identity(p, hashed=False)] for p in files])
    return "unrecorded:" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def status(
    name: str, settings: Settings, tree: DataTree, model: str | None = None, given: dict[str, Any] | None = None
) -> Status:
    """The stage's state and, when its outputs exist, what differs from the current settings and inputs.

    ``given`` are command-line paths replacing what the settings name; None takes those the
    record holds (so a stage run with ``--input`` stays done for its downstream stages).
    """
    spec = spec_of(name)
    model = model if spec.per_model else None
    where = spec.record(settings, tree, model)
    record = read_record(where)
    if given is None:
        given = dict(record.get("given") or {}) if record else {}
    given = {k: Path(v) for k, v in given.items() if v is not None}
    unread = spec.unread(settings, tree, model, given) if spec.unread else ()
    every = settings_of(settings, spec.keys(model), spec.exclude)
    left = {k for k in every if any(k == u or k.startswith(u + ".") for u in unread)}
    current: dict[str, Any] = {"settings": {k: v for k, v in every.items() if k not in left}, "given": given}
    if left:  # kept apart in the record: a setting unread then, read now with the same value, changed nothing
        current["unread"] = {k: every[k] for k in sorted(left)}
    inputs_error: PipelineError | None = None
    try:
        inputs = spec.inputs(settings, tree, model, given)
    except PipelineError as exc:  # (two label files, none): the stage says so when it runs
        inputs, inputs_error = None, exc
    if inputs is not None:
        current["inputs"] = {d.stage: _dep_identity(d, settings, tree, model) for d in inputs.deps}
        current["files"] = {file_key(p, tree): file_identity(p, inputs.hashed) for p in inputs.files}
        current["deps"] = inputs.deps
    outputs = spec.outputs(settings, tree, model)
    present = any(o.existing() for o in outputs)
    if record is None:
        state: State = "unrecorded" if present else "missing"
        return Status(spec, model, state, None, current, outputs_present=present, inputs_error=inputs_error)
    st = Status(spec, model, record["state"], record, current, outputs_present=present, inputs_error=inputs_error)
    # The data root the run read, when it is news: not for a record kept in the data root, which moves with it
    # (another root there is the same data copied or mounted), only for results/ and predictions/ ones.
    root, then = tree.root.resolve(), record.get("data_root")
    moved = then if then and Path(then) != root and not where.resolve().is_relative_to(root) else None
    st.changes = _changes(record, current, tree.root, moved)
    if inputs_error is not None:
        st.changes.append(f"from inputs that cannot be read now ({inputs_error})")
    # Outputs removed by hand since the run (a folder deleted, chips.csv's columns lost) make it unfinished.
    made = record.get("made", {})
    st.outputs_whole = all(len(o.existing()) >= made.get(_output_key(o, tree), 0) for o in outputs) and (
        spec.complete is None or spec.complete(settings, tree, model)
    )
    return st


def _output_key(output: Output, tree: DataTree) -> str:
    return file_key(output.path, tree) + (f"/{output.pattern}" if output.pattern else "")


@functools.cache
def _defaults() -> dict[str, Any]:
    """Every setting's default, flat by dotted key, as :func:`settings_of` gives them."""
    from core.settings import Settings

    defaults = Settings()
    return settings_of(defaults, tuple(type(defaults).model_fields))


def _changes(
    record: dict[str, Any], current: dict[str, Any], root: Path | None = None, other_root: str | None = None
) -> list[str]:
    """What differs between a record and now, one phrase each ('with chip_args.size 64, now 128'). ``other_root``:
    the data root the run read, when it is not ``root`` (a record outside the data root: results/, predictions/)."""
    changes = []
    old, new = record.get("settings", {}), current["settings"]
    unread = record.get("unread", {})  # settings the run did not read (predict's, with that bundle)
    # Keys the record holds that the stage no longer reads (a setting it now excludes) changed nothing.
    sections: set[str] = set()
    for key in sorted(new):
        parent = next((k for k in old if key.startswith(k + ".")), None)
        if key not in old and parent is not None:  # a section null then, set now (mask_args.filter): one phrase
            if parent not in sections:
                sections.add(parent)
                now = {k[len(parent) + 1 :]: v for k, v in new.items() if k.startswith(parent + ".")}
                changes.append(f"with {parent} {_show(old[parent])}, now {_show(now)}")
            continue
        if key not in old and new[key] == _defaults().get(key, "absent"):
            continue  # a setting added since the record was made, at its default: what the stage did then
        if key not in old and key in unread and unread[key] == new[key]:
            continue  # set alike then but unread: what makes it read now is a change of its own
        if old.get(key, "absent") != new.get(key, "absent"):
            a = _show(old[key]) if key in old else (f"{_show(unread[key])} (unused)" if key in unread else "unset")
            b = _show(new[key]) if key in new else "unset"
            changes.append(f"with {key} {a}, now {b}")
    if "inputs" not in current:
        return changes
    old_given = {k: str(v) for k, v in (record.get("given") or {}).items()}
    new_given = {k: str(v) for k, v in current["given"].items()}
    if old_given != new_given:  # --input or --bundle then, not now (or another one)

        def said(given: dict[str, str]) -> str:
            return ", ".join(f"--{k} {v}" for k, v in sorted(given.items())) or "the inputs the settings name"

        return [*changes, f"from {said(old_given)}, now {said(new_given)}"]
    old_in, new_in = record.get("inputs", {}), current["inputs"]
    for stage in sorted(set(old_in) | set(new_in)):
        if stage not in new_in:
            changes.append(f"from {stage} outputs it no longer reads")
        elif stage not in old_in:
            changes.append(f"without {stage} outputs it now reads")
        elif old_in[stage].get("run") != new_in[stage].get("run"):
            if other_root is not None and root is not None:
                what = f"a run of {stage} in another data root, {other_root} (now {Path(root).resolve()})"
            elif new_in[stage].get("run"):
                what = f"an earlier run of {stage}"
            else:
                what = f"a run of {stage} since removed"
            diff = [
                f"{k} {_show(old_in[stage].get('settings', {}).get(k))}"
                for k in sorted(new_in[stage].get("settings", {}))
                if old_in[stage].get("settings", {}).get(k) != new_in[stage]["settings"].get(k)
            ]
            changes.append(f"from {what}" + (f" (made with {', '.join(diff)})" if diff else ""))
        elif "files" in old_in[stage] and old_in[stage]["files"] != new_in[stage].get("files"):
            a, b = old_in[stage]["files"], new_in[stage].get("files", {})
            edited = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            changes.append(
                f"from {spec_of(stage).what} as it was before {', '.join(edited)} changed (not by a run of {stage}: "
                f"by hand, or copied over)"
            )
    old_files, new_files = record.get("files", {}), current["files"]
    added = sorted(set(new_files) - set(old_files))
    gone = sorted(set(old_files) - set(new_files))
    edited = sorted(k for k in set(old_files) & set(new_files) if old_files[k] != new_files[k])
    if edited:
        changes.append(
            f"from {edited[0]} as it was before it changed"
            + (f" (and {len(edited) - 1} more)" if len(edited) > 1 else "")
        )
    if added or gone:

        def names(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

        def there(key: str) -> bool:  # (keys are relative to the data tree when inside it)
            path = Path(key)
            return (path if path.is_absolute() or root is None else root / path).exists()

        still, removed = [k for k in gone if there(k)], [k for k in gone if not there(k)]
        what = [
            f"from {names(removed)} (gone now)" if removed else "",
            f"from {names(still)} (no longer read)" if still else "",
            f"without {names(added)} (new)" if added else "",
        ]
        changes.append(", ".join(w for w in what if w))
    return changes


# --- one run -----------------------------------------------------------------------------------------

Mode = Literal["fresh", "resume", "skip"]


@dataclass
class StageRun:
    """A run of a stage that :func:`begin` allowed: ``mode`` says whether it starts afresh, resumes or skips."""

    status: Status
    mode: Mode
    settings: Settings
    tree: DataTree
    given: dict[str, Any]
    run_id: str = ""
    started: str = ""

    @property
    def skip(self) -> bool:
        return self.mode == "skip"

    @property
    def resume(self) -> bool:
        return self.mode == "resume"

    def say_skip(self) -> None:
        """Log that the outputs are up to date and nothing is done."""
        record = self.status.record or {}
        log.info(
            "%s: %s up to date (made %s with the same settings and inputs): nothing to do; --overwrite redoes it",
            self.status.label, self.status.spec.are, record.get("finished", "earlier"),
        )  # fmt: skip

    def _path(self) -> Path:
        return self.status.spec.record(self.settings, self.tree, self.status.model)

    def _outputs(self) -> list[Output]:
        return self.status.spec.outputs(self.settings, self.tree, self.status.model)

    def start(self, clear: bool = True) -> None:
        """Call once the stage's own input checks pass: a fresh start removes the old outputs
        (``clear=False`` keeps them, for a trainer continuing from its bundle); any start removes
        temporary files a killed run left; then the record says "running"."""
        path = self._path()
        # The old record stays while its outputs are removed: a kill in between leaves outputs it
        # describes, some gone (a rerun with its settings remakes them; other settings refuse), never
        # outputs without a record or under the new record.
        if self.mode == "fresh" and clear:
            for output in self._outputs():
                for old in output.existing():
                    _remove(old)
        for output in self._outputs():
            for leftover in output.leftovers():
                with contextlib.suppress(OSError):
                    _remove(leftover)
        if self.mode == "resume" and self.status.record is not None:
            self.run_id = self.status.record["run"]
            self.started = self.status.record.get("started", "")
        else:
            self.run_id = uuid.uuid4().hex
            self.started = _now()
        write_record(path, self._record("running"))

    def finish(self, **summary: Any) -> None:
        """The run completed: the record says so, with a short summary of what was made."""
        record = self._record("complete")
        record["finished"] = _now()
        record["summary"] = summary
        # What was made, so that outputs removed by hand later make the stage unfinished again.
        record["made"] = {_output_key(o, self.tree): len(o.existing()) for o in self._outputs() if o.counted}
        write_record(self._path(), record)

    def _record(self, state: str) -> dict[str, Any]:
        cur = self.status.current
        inputs = cur.get("inputs", {})
        files = cur.get("files", {})
        return {
            "version": RECORD_VERSION,
            "stage": self.status.spec.name,
            "model": self.status.model,
            "run": self.run_id,
            "state": state,
            "started": self.started,
            "fingerprint": _fingerprint(cur["settings"], inputs, files),
            "settings": cur["settings"],
            **({"unread": cur["unread"]} if cur.get("unread") else {}),
            "inputs": inputs,
            "files": files,
            "given": {k: str(v) for k, v in self.given.items()},
            "data_root": str(self.tree.root.resolve()),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "process_start": _process_start(os.getpid()),
        }


def _remove(path: Path) -> None:
    """Remove a file or a folder with what it holds (a link, even to a folder, is removed, not followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _process_start(pid: int) -> str | None:
    """When a process started (Linux: /proc), so that a reused pid is not taken for the run."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def running_elsewhere(record: dict[str, Any] | None) -> bool:
    """Whether a "running" record belongs to a process that is still running (on this machine)."""
    if not record or record.get("state") != "running" or record.get("host") != socket.gethostname():
        return False
    pid = record.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = record.get("process_start")
    return started is None or started == _process_start(pid)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def upstream_problems(
    deps: tuple[Dep, ...], settings: Settings, tree: DataTree, model: str | None, reader: str
) -> list[PipelineError]:
    """What is wrong with the upstream outputs a stage reads, their own upstream included, earliest
    stage first: incomplete (interrupted, or files removed since) or outdated ones.

    Missing outputs pass: the stage's own check says which stage to run. Outputs without a
    record are used as they are (logged).
    """
    seen: dict[str, tuple[Dep, str | None]] = {}
    statuses: dict[str, Status] = {}  # each upstream stage's status is worked out once

    def walk(dep: Dep, m: str | None) -> None:
        spec = spec_of(dep.stage)
        um = m if spec.per_model else None
        key = f"{dep.stage}/{um}"
        if key in seen and (dep.artifact or not seen[key][0].artifact):
            return
        seen[key] = (dep, um)
        if dep.artifact:
            return
        statuses[key] = statuses.get(key) or status(dep.stage, settings, tree, um)
        for up in statuses[key].current.get("deps", ()):
            walk(up, um)

    for dep in deps:
        walk(dep, model)
    problems: list[PipelineError] = []
    for key, (dep, um) in sorted(seen.items(), key=lambda kv: order_of(kv[1][0].stage)):
        st = statuses.get(key) or status(dep.stage, settings, tree, um)
        spec = st.spec
        if st.state == "missing":
            continue
        if st.state == "unrecorded":
            log.info(
                "%s: %s without a record of the settings that made them (made by hand or an older version): "
                "used as they are; %s would redo them",
                reader, spec.are, spec.run_command(um, True, st.current.get("given")),
            )  # fmt: skip
            continue
        if st.changes and not dep.artifact:
            problems.append(
                DataError(
                    f"{spec.are} outdated: made {'; '.join(st.changes)}: rerun {spec.run_command(um, True, st.current.get('given'))} "
                    f"(or python pipeline.py --from {spec.name}) before {reader}"
                )
            )
        elif st.state == "running" and running_elsewhere(st.record):
            problems.append(
                InputMissingError(
                    f"{spec.are} not finished: {st.label} is running now (pid {st.record.get('pid')}): wait for it"
                )
            )
        elif st.state == "running":
            problems.append(
                InputMissingError(
                    f"{spec.are} incomplete: {st.label} did not finish: rerun {spec.run_command(um, given=st.current.get('given'))} to resume it"
                )
            )
        elif st.removed:
            problems.append(
                InputMissingError(
                    f"{spec.are} incomplete: files were removed since {st.label} ran: rerun {spec.run_command(um, given=st.current.get('given'))} "
                    "to remake them"
                )
            )
    return problems


def check_upstream(deps: tuple[Dep, ...], settings: Settings, tree: DataTree, model: str | None, reader: str) -> None:
    """Refuse to read upstream outputs that are incomplete or outdated (see :func:`upstream_problems`)."""
    problems = upstream_problems(deps, settings, tree, model, reader)
    if problems:
        raise problems[0]


def warn_stale_artifacts(
    deps: tuple[Dep, ...], settings: Settings, tree: DataTree, model: str | None, reader: str
) -> None:
    """Say so when a trained bundle a stage reads as it is (an artifact) no longer follows from the current
    settings: the stage goes on with it (a bundle is what it was trained as), but an edit of the training
    settings has not reached it."""
    for dep in deps:
        if not dep.artifact:
            continue
        st = status(dep.stage, settings, tree, model if spec_of(dep.stage).per_model else None)
        if st.state in ("missing", "unrecorded") or not st.changes:
            continue
        log.warning(
            "%s: %s outdated against the current settings (made %s): %s uses it as it is; rerun %s to apply the edit",
            reader, st.spec.are, "; ".join(st.changes), reader.split()[0],
            st.spec.run_command(st.model, True, st.current.get("given")),
        )  # fmt: skip


def outdated(name: str, settings: Settings, tree: DataTree, model: str | None = None) -> bool:
    """Whether a stage's outputs no longer follow from the current settings and inputs, its own or upstream."""
    return bool(why_outdated(name, settings, tree, model))


def why_outdated(name: str, settings: Settings, tree: DataTree, model: str | None = None) -> str:
    """What makes a stage's outputs no longer follow from the current settings and inputs ('' when
    nothing does): its own record's changes, else the first problem of the upstream outputs it read."""
    st = status(name, settings, tree, model)
    if st.stale:
        return st.describe()
    problems = upstream_problems(st.current.get("deps", ()), settings, tree, st.model, reader=st.label)
    return str(problems[0]) if problems else ""


def refuse_leaky_bundle(settings: Settings, tree: DataTree, model: str, split: str) -> None:
    """A bundle trained on an earlier split may have trained on today's val chips: scoring it there would leak."""
    trained = read_record(spec_of("train").record(settings, tree, model))
    made = read_record(spec_of("split").record(settings, tree, None))
    if trained is None or made is None:
        return
    used = trained.get("inputs", {}).get("split", {}).get("run")
    if used != made["run"]:
        raise DataError(
            f"the {model} bundle was trained on an earlier split than the {split} chips of today's split: some may "
            f"have been its training chips. Retrain first: python train/train.py --model {model} --overwrite"
        )


def vanished_upstream(st: Status, settings: Settings, tree: DataTree) -> Status | None:
    """The status of an upstream stage whose outputs the last run read and that are not there now (no record,
    no files: another data root or output folder, or removed): the stage cannot run until they are made. (It
    said "made from a run of predict since removed: add --overwrite", and --overwrite then failed on the missing
    predictions.) None when there is none."""
    read = (st.record or {}).get("inputs", {})
    for dep in st.current.get("deps", ()):
        if dep.artifact or not (read.get(dep.stage) or {}).get("run"):
            continue
        up = status(dep.stage, settings, tree, st.model if spec_of(dep.stage).per_model else None)
        if up.state == "missing":
            return up
    return None


def vanished_words(reader: str, up: Status, command: str | None = None) -> str:
    """What a stage (``reader``) says of the :func:`vanished_upstream` ``up``; ``command`` makes them (default:
    its plain command)."""
    command = command or up.spec.run_command(up.model, given=up.current.get("given"))
    return (
        f"{reader} reads {up.spec.what}, which {'are' if up.spec.plural else 'is'} not there (none made here, or "
        f"removed since): run {command} first"
    )


def refuse_vanished_upstream(st: Status, settings: Settings, tree: DataTree) -> None:
    """Refuse before anything is removed when :func:`vanished_upstream` finds one."""
    up = vanished_upstream(st, settings, tree)
    if up is not None:
        raise InputMissingError(vanished_words(st.label, up))


def begin(
    name: str,
    settings: Settings,
    tree: DataTree,
    *,
    overwrite: bool = False,
    model: str | None = None,
    given: dict[str, Any] | None = None,
) -> StageRun:
    """Decide how a run of stage ``name`` goes, before any work; refuse when it would mix data.

    Raises:
        DataError / InputMissingError: an upstream output is outdated or incomplete.
        OutputExistsError: this stage's outputs were made under other settings or inputs (or
            carry no record) and ``overwrite`` is false; the message names what changed.
    """
    given = {k: Path(v).resolve() for k, v in (given or {}).items() if v is not None}
    st = status(name, settings, tree, model, given=given)
    spec = st.spec
    label = st.label
    if running_elsewhere(st.record):
        record = st.record or {}
        raise OutputExistsError(
            f"{label} is running now (pid {record.get('pid')}, started {record.get('started')}): wait for it to "
            "finish, or stop it, before running it again"
        )
    if st.inputs_error is not None:
        raise st.inputs_error
    if "deps" in st.current:
        refuse_vanished_upstream(st, settings, tree)
        check_upstream(st.current["deps"], settings, tree, st.model, reader=label)
        warn_stale_artifacts(st.current["deps"], settings, tree, st.model, reader=label)
    if st.state == "missing" or overwrite or (st.state == "running" and not st.outputs_present):
        mode: Mode = "fresh"  # (a run that failed before writing anything leaves nothing to mix)
    elif st.state == "unrecorded":
        shown = [str(p) for o in spec.outputs(settings, tree, st.model) for p in o.existing()[:2]][:3]
        raise OutputExistsError(
            f"{label} outputs already exist ({', '.join(shown)}) but carry no record of the settings that made "
            f"them: add --overwrite to redo them"
        )
    elif st.changes:
        raise OutputExistsError(
            f"{spec.were} made {'; '.join(st.changes)}: add --overwrite to redo {'them' if spec.plural else 'it'} "
            f"(python pipeline.py reruns outdated stages)"
        )
    elif st.done:
        mode = "skip"
    else:
        mode = "resume"
    return StageRun(st, mode, settings, tree, given)
