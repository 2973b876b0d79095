"""Map work over tiles: inline, or in local worker processes.

The tile stages (chip, mask, flatten, predict) describe their work as small, picklable
items (a path and a window, not arrays) and a module-level function that reads its inputs
and writes its outputs itself, atomically. :func:`map_tasks` runs them and returns the
results in input order, so outputs do not depend on the number of workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

from core.cli import progress
from core.errors import PipelineError
from core.settings import ParallelArgs

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def worker_count(parallel: ParallelArgs) -> int:
    """Local worker processes: ``parallel.workers``, default the number of usable cores."""
    if parallel.workers is not None:
        return parallel.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def map_tasks(
    func: Callable[[T], R],
    items: Sequence[T] | Iterable[T],
    parallel: ParallelArgs,
    *,
    desc: str = "",
    unit: str = "tile",
) -> list[R]:
    """Run ``func`` on every item and return the results in input order.

    Args:
        func: a module-level function (it is pickled to worker processes).
        items: small picklable work items.
        parallel: the ``parallel`` settings section.
        desc: progress bar label.
        unit: progress bar unit.
    """
    items = list(items)
    if parallel.scheduler:
        raise PipelineError(
            f"parallel.scheduler is {parallel.scheduler!r}, but running on a Dask cluster is not available in this "
            "version: leave parallel.scheduler empty to use local worker processes"
        )
    workers = min(worker_count(parallel), len(items)) if items else 1
    if workers <= 1:
        return [func(item) for item in progress(items, desc=desc, unit=unit)]
    results: list[Any] = [None] * len(items)
    # spawn, not fork: the parent may hold GDAL handles or threads that a fork would copy.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(func, item): i for i, item in enumerate(items)}
        try:
            for future in progress(as_completed(futures), total=len(futures), desc=desc, unit=unit):
                results[futures[future]] = future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results
