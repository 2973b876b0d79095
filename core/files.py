"""Files written whole or not at all: every output of the pipeline goes through :func:`atomic_path`;
and :func:`human_size`, how messages say a size in bytes.

Kept apart from the raster code: seventeen modules write through it, most of them no raster.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def _new_file_beside(path: Path) -> Path:
    """Create an empty, uniquely named hidden file in ``path``'s folder and return its path.

    Not ``tempfile.mkstemp``: its files are private (0600) and the rename would hand that to
    every output; mode 0o666 lets the umask decide, as for any file a program creates.
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only on success.

    The temporary file lives in the same folder so that ``os.replace`` is an atomic rename.
    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_file_beside(path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        # Also removes GDAL's side files (.aux.xml) written next to the temporary file.
        for leftover in (tmp_path, tmp_path.with_name(tmp_path.name + ".aux.xml")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def human_size(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
