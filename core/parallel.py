"""Map work over tiles: inline, in local worker processes, or on a Dask cluster.

The tile stages (chip, mask, flatten, predict) describe their work as small, picklable
items (a path and a window, not arrays) and a module-level function that reads its inputs
and writes its outputs itself, atomically. :func:`map_tasks` runs them and returns the
results in input order, so outputs do not depend on the backend or the number of workers:

- ``parallel.scheduler`` empty: ``parallel.workers`` local processes (spawned), or inline
  for one worker or one item;
- ``parallel.scheduler`` the address of a Dask distributed scheduler (``tcp://host:8786``):
  the same items as Dask tasks on that cluster. A worker lost mid-run has its tasks run
  again elsewhere (Dask reschedules them; an output is replaced atomically, so a second
  write of the same file is harmless); an unexpected exception inside a task is retried
  ``TASK_RETRIES`` times, while a :class:`PipelineError` (bad input: retrying cannot help)
  comes back at once, with the same message as a local run.

Workers that hold expensive state across tasks (predict's loaded model) keep it with
:func:`worker_cached`, once per process, whatever the backend.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import CancelledError, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from core.errors import PipelineError
from core.settings import ParallelArgs

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Seconds to reach the scheduler before giving up with a message.
CONNECT_TIMEOUT = 5.0
#: Seconds to wait for a first worker when the scheduler has none.
WORKER_TIMEOUT = 60.0
#: Extra attempts of a task that raised an unexpected exception (a flaky network file system).
#: Tasks on a worker that died are rescheduled by Dask itself (``distributed.scheduler.allowed-failures``).
TASK_RETRIES = 2


def worker_count(parallel: ParallelArgs) -> int:
    """Local worker processes: ``parallel.workers``, default the number of usable cores."""
    if parallel.workers is not None:
        return parallel.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


#: A progress bar around an iterable, called as ``progress(iterable, total=, desc=, unit=)``:
#: the stages pass ``core.cli.progress``, which knows whether bars are on (--quiet, a terminal).
Progress = Callable[..., Iterable[Any]]


def _no_bar(iterable: Iterable[T], **_: Any) -> Iterable[T]:
    return iterable


def map_tasks(
    func: Callable[[T], R],
    items: Sequence[T] | Iterable[T],
    parallel: ParallelArgs,
    *,
    desc: str = "",
    unit: str = "tile",
    progress: Progress = _no_bar,
) -> list[R]:
    """Run ``func`` on every item and return the results in input order.

    Args:
        func: a module-level function (it is pickled to worker processes).
        items: small picklable work items.
        parallel: the ``parallel`` settings section.
        desc: progress bar label.
        unit: progress bar unit.
        progress: the progress bar, e.g. ``core.cli.progress``; none by default.
    """
    items = list(items)
    if parallel.scheduler:
        return _map_dask(func, items, parallel.scheduler, desc=desc, unit=unit, progress=progress)
    workers = min(worker_count(parallel), len(items)) if items else 1
    if workers <= 1:
        return [func(item) for item in progress(items, desc=desc, unit=unit)]
    results: list[Any] = [None] * len(items)
    # spawn, not fork: the parent may hold GDAL handles or threads that a fork would copy.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_worker_start, initargs=(os.getpid(),)
    )
    try:
        futures = {pool.submit(func, item): i for i, item in enumerate(items)}
        for future in progress(as_completed(futures), total=len(futures), desc=desc, unit=unit):
            results[futures[future]] = future.result()
    except BaseException:
        # An error or an interrupt (Ctrl-C, SIGTERM): stop at once. Waiting for the workers to
        # finish the queued work would take as long as the run.
        _stop(pool)
        raise
    pool.shutdown(wait=True)
    return results


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the worker processes now."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(timeout=5)


#: Seconds between a worker's checks that its parent is alive.
PARENT_POLL = 0.5


def _worker_start(parent: int) -> None:
    """In each local worker: leave Ctrl-C to the parent (it stops the workers), and exit when the
    parent dies (kill -9, out of memory), so no worker outlives the run it belongs to."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(Exception):  # Linux: the kernel kills us when the parent dies
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:  # elsewhere, and as a second guard: poll
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(PARENT_POLL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# --- state kept in a worker process -------------------------------------------------------------

_cache_lock = threading.Lock()
_cache: dict[Hashable, Any] = {}


def worker_cached(key: Hashable, make: Callable[[], R]) -> R:
    """``make()`` once per process and ``key``; later calls with the same key reuse it.

    For state every task of a run needs and that is slow to build, such as a loaded model:
    a local worker process or a Dask worker builds it for its first task only. Only the
    latest key is kept, so a long-lived Dask worker that is handed a new model drops the old
    one. Thread-safe: a Dask worker with several threads builds it once.
    """
    with _cache_lock:
        if key not in _cache:
            _cache.clear()
            _cache[key] = make()
        return _cache[key]


# --- Dask ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Failed:
    """A task's PipelineError, returned rather than raised so that Dask does not retry it."""

    error: PipelineError


def _run_task(func: Callable[[T], R], item: T) -> R | _Failed:
    try:
        return func(item)
    except PipelineError as exc:
        return _Failed(exc)


def connect_scheduler(address: str) -> Client:
    """A client of the Dask scheduler at ``address`` with at least one worker, or a PipelineError."""
    from distributed import Client
    from distributed.comm import get_address_host_port

    try:
        get_address_host_port(address)
    except ValueError as exc:
        # Checked before Client(): a client half-made from a bad address stalls the exit by 10 s.
        raise PipelineError(
            f"parallel.scheduler={address!r} is not a Dask scheduler address ({exc}): use tcp://HOST:PORT "
            "(dask scheduler listens on port 8786), or leave it empty to run locally"
        ) from exc
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise PipelineError(
            f"cannot reach the Dask scheduler at {address} (parallel.scheduler): no answer within "
            f"{CONNECT_TIMEOUT:g} s. Start one with `dask scheduler` and workers with `dask worker {address}`, "
            "check the host and port, or leave parallel.scheduler empty to run locally"
        ) from exc
    try:
        client.wait_for_workers(1, timeout=WORKER_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        client.close()
        raise PipelineError(
            f"the Dask scheduler at {address} has had no worker for {WORKER_TIMEOUT:g} s: start workers with "
            f"`dask worker {address}` from this repository's environment"
        ) from exc
    return client


def _map_dask(
    func: Callable[[T], R], items: list[T], address: str, *, desc: str, unit: str, progress: Progress
) -> list[R]:
    """Run the items as tasks on the cluster at ``address``; results in input order."""
    from distributed import KilledWorker
    from distributed import as_completed as dask_completed

    if not items:
        return []
    client = connect_scheduler(address)
    try:
        run = uuid.uuid4().hex[:8]
        name = desc or getattr(func, "__name__", "task")
        futures = client.map(
            functools.partial(_run_task, func),
            items,
            key=[f"{name}-{run}-{i}" for i in range(len(items))],
            retries=TASK_RETRIES,
            pure=False,
        )
        position = {future.key: i for i, future in enumerate(futures)}
        results: list[Any] = [None] * len(items)
        try:
            # with_results: results are fetched as tasks finish, concurrently, not one round trip each.
            completed = dask_completed(futures, loop=client.loop, with_results=True)
            for future, outcome in progress(completed, total=len(futures), desc=desc, unit=unit):
                if isinstance(outcome, CancelledError | _Failed):
                    raise outcome.error if isinstance(outcome, _Failed) else outcome
                results[position[future.key]] = outcome
                future.release()  # the result is here: the worker may forget it
        except KilledWorker as exc:
            raise PipelineError(
                f"task {exc.task} was tried {exc.allowed_failures + 1} times and each time its worker died (the last "
                f"was {exc.last_worker.address}): check the workers' logs (out of memory?) and their memory "
                "limit (dask worker --memory-limit); finished outputs are kept, rerun the same command to resume"
            ) from exc
        except CancelledError as exc:
            raise PipelineError(
                f"the {name} tasks were cancelled on the Dask scheduler at {address} (was it stopped or "
                "restarted?): finished outputs are kept, rerun the same command to resume"
            ) from exc
        except ModuleNotFoundError as exc:
            raise PipelineError(
                f"the Dask workers at {address} cannot import {exc.name!r}: start them from this repository's "
                "environment (.venv/bin/dask worker ...) after running ./setup.sh there"
            ) from exc
        finally:
            pending = [f for f in futures if not f.done()]
            if pending:  # after an error: free the cluster; a lost scheduler cannot be told
                with contextlib.suppress(Exception):
                    client.cancel(pending)
    finally:
        client.close()
    return results
