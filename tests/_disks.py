"""Real read-only and full file systems for the output tests: small tmpfs mounts.

Import the fixtures into a test module (``from _disks import readonly_dir, small_disk``).
``mount`` needs root (or CAP_SYS_ADMIN); where it is not permitted the tests that need a real
read-only or full file system are skipped with that reason (``chmod`` would not stop root, and
a write fault injected in Python would not reach the C writers of h5py and torch). The mount is
always undone, also when the test fails.
"""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)


@contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    """Mount a tmpfs of ``size`` (e.g. ``"2m"``) on ``path``, optionally read-only; skip if not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    try:
        res = _run("mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode})")
    try:
        yield path
    finally:
        _run("umount", "-l", str(path))


def fill(folder: Path, leave_bytes: int) -> Path:
    """Fill the file system of ``folder`` up to ``leave_bytes`` free with one filler file."""
    import shutil

    filler = folder / "filler.bin"
    free = shutil.disk_usage(folder).free
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave_bytes))
    return filler


@pytest.fixture()
def readonly_dir(tmp_path):
    """A folder on a read-only file system (EROFS, even for root)."""
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as p:
        yield p


@pytest.fixture()
def small_disk(tmp_path):
    """An empty 4 MiB file system (fill it with :func:`fill`)."""
    with tmpfs(tmp_path / "small", "4m") as p:
        yield p
