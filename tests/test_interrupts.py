"""Interrupts of a real stage process: SIGINT or SIGTERM to the main process alone ends the run in
seconds with one line; kill -9 leaves no worker behind; a rerun resumes and removes leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_SETTINGS, write_geotiff

REPO = REPO_SETTINGS.parent
SIDE = 1536  # chips of 32 px: 2304 chips, many seconds of work for two workers


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.fixture
def big_mosaic(tmp_path: Path) -> list[str]:
    rng = np.random.default_rng(0)
    write_geotiff(tmp_path / "data" / "mosaic" / "mosaic.tif", array=rng.integers(1, 4000, (3, SIDE, SIDE), np.uint16))
    return [sys.executable, "chip/chip.py", "--settings", str(REPO_SETTINGS), "--quiet",
            "--set", f"data_root={tmp_path / 'data'}", "--set", "chip_args.size=32",
            "--set", "parallel.workers=2"]  # fmt: skip


def start_and_wait_for_workers(cmd: list[str], chips: Path) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_until(lambda: chips.is_dir() and len(list(chips.glob("chip_*.tif"))) > 20, 60), "no chip written"
    workers = children(proc.pid)
    assert len(workers) >= 2  # two workers (and the resource tracker)
    return proc, workers


@pytest.mark.parametrize(
    ("signum", "code", "line"),
    [
        (signal.SIGINT, 130, "interrupted: rerun the same command to resume"),
        (signal.SIGTERM, 143, "terminated: rerun the same command to resume"),
    ],
)
def test_a_signal_to_the_main_process_ends_the_run_in_seconds(big_mosaic, tmp_path, signum, code, line):
    proc, workers = start_and_wait_for_workers(big_mosaic, tmp_path / "data" / "chips")
    sent = time.monotonic()
    os.kill(proc.pid, signum)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 15
    assert proc.returncode == code
    assert err.strip().splitlines() == [line]
    assert wait_until(lambda: not any(alive(w) for w in workers), 10), "a worker outlived its parent"


def test_kill_9_leaves_no_worker_and_the_rerun_resumes_and_cleans_up(big_mosaic, tmp_path):
    chips = tmp_path / "data" / "chips"
    proc, workers = start_and_wait_for_workers(big_mosaic, chips)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert wait_until(lambda: not any(alive(w) for w in workers), 10), "a worker outlived its parent"
    made = len(list(chips.glob("chip_*.tif")))
    assert 0 < made < (SIDE // 32) ** 2
    (chips / ".chip_000001.0badf00d.tmp.tif").write_bytes(b"half a chip")  # as a kill mid-write leaves
    done = subprocess.run(big_mosaic, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(list(chips.glob("chip_*.tif"))) == (SIDE // 32) ** 2
    assert list(chips.glob(".*")) == []
    assert (tmp_path / "data" / "chips.csv").read_text().count("\n") == (SIDE // 32) ** 2 + 1


def test_a_second_run_while_the_first_is_running_is_refused(big_mosaic, tmp_path):
    proc, _ = start_and_wait_for_workers(big_mosaic, tmp_path / "data" / "chips")
    try:
        second = subprocess.run(big_mosaic, cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        os.kill(proc.pid, signal.SIGINT)
        proc.communicate(timeout=30)
    assert second.returncode == 1
    assert second.stderr.startswith(f"error: chip is running now (pid {proc.pid}, started ")
    assert second.stderr.rstrip().endswith("wait for it to finish, or stop it, before running it again")
