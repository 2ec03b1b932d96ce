"""Atomic writers: a temp file in the destination folder, then ``os.replace``.

A result is either written completely or not at all; an existing file is only replaced with
``overwrite=True``; and an input of the result (recorded in ``adata.uns[Key.PROVENANCE]["inputs"]``
or passed as ``protect=``) is never written over, even with ``overwrite=True``.

* :func:`check_writable` is the up-front check (before slow work): the folder exists, a file can
  really be created in it (a probe file, removed at once: ``os.access`` says yes to root on a
  read-only mount) and it has the free space asked for.
* A write that fails for a reason of the disk raises one clean ``OSError(errno, cause, path)``
  naming the file meant (not the temp file, not a library's multi-line message); the CLI prints it
  as one line. A non-``OSError`` from a library while the disk is full (torch's ``unexpected
  pos``) becomes ``ENOSPC`` too.
* :func:`write_prediction` writes the .h5ad and the CSV of a prediction as one unit: both temp
  files first, then both renames; a failure or Ctrl-C at any point leaves both or neither (an
  overwritten pair is restored).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..constants import Key
from ..errors import ComtipError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import anndata
    import pandas as pd


def _protected_paths(adata: Any = None, protect: Iterable[str | os.PathLike] = ()) -> set[Path]:
    paths = [Path(p) for p in protect if p]
    if adata is not None:
        try:
            prov = adata.uns.get(Key.PROVENANCE, {})
            inputs = prov.get("inputs", []) if hasattr(prov, "get") else []
            if isinstance(inputs, str):
                inputs = [inputs]
            paths.extend(Path(str(p)) for p in inputs if p)
        except Exception:  # pragma: no cover - uns of unexpected shape
            pass
    out = set()
    for p in paths:
        try:
            out.add(p.expanduser().resolve())
        except OSError:  # pragma: no cover
            continue
    return out


def _check_target(out: Path, overwrite: bool, protected: set[Path]) -> Path:
    out = Path(out).expanduser()
    resolved = out.resolve()
    if resolved in protected:
        raise InputError("refusing to write over an input of this result", path=out,
                         hint="choose another output path")
    if out.is_dir():
        raise InputError("the output path is a folder", path=out, hint="give a file name, e.g. result.h5ad")
    if out.exists() and not overwrite:
        raise InputError("the output file already exists", path=out,
                         hint="choose another path or pass --overwrite to replace it")
    if not out.parent.exists():
        raise InputError("the output folder does not exist", path=out.parent, hint="create it first")
    return out


#: Below this many free bytes a failed write is taken for a full disk (see :func:`_disk_error`).
_FULL_DISK_BYTES = 1 << 20
#: The least free space the up-front check asks for when the size of the result is not known yet.
MIN_FREE_BYTES = 1 << 20


def _nearest_existing(folder: Path) -> Path:
    folder = Path(folder).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable(folder: str | os.PathLike, need_bytes: int = MIN_FREE_BYTES, *, what: str = "output folder",
                   create: bool = False) -> Path:
    """Raise :class:`InputError` now when a file of ``need_bytes`` could not be written in ``folder``.

    ``create=True``: the folder may not exist yet (it will be made later); its nearest existing
    ancestor is checked instead. Nothing is left behind.
    """
    folder = Path(folder).expanduser()
    probe_dir = _nearest_existing(folder) if create else folder
    if not probe_dir.is_dir():
        if probe_dir.exists():
            raise InputError(f"the {what} is a file", path=probe_dir, hint="give a folder")
        raise InputError(f"the {what} does not exist", path=folder, hint="create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=".comtip-probe-", suffix=".tmp", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"cannot write in the {what} ({exc.strerror or exc})", path=probe_dir,
                         hint="choose a folder you can write, or fix its permissions") from None
    free = shutil.disk_usage(probe_dir).free
    if need_bytes and free < need_bytes:
        raise InputError(f"not enough free space in the {what}: {_size(need_bytes)} needed, {_size(free)} free",
                         path=probe_dir, hint="free some space or choose another folder")
    return folder


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"  # pragma: no cover


def _disk_error(exc: BaseException, out: Path) -> OSError | None:
    """The clean ``OSError(errno, cause, out)`` of a failed write, or None when it is not the disk's fault."""
    if isinstance(exc, ComtipError):  # a user error (e.g. Cancelled) is not the disk's
        return None
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if not code and isinstance(exc, OSError):
        m = re.search(r"errno = (\d+)", str(exc))  # h5py: "file write failed: ..., errno = 28, ..."
        code = int(m.group(1)) if m else None
    if not code:
        try:
            if shutil.disk_usage(out.parent).free < _FULL_DISK_BYTES:
                code = errno.ENOSPC  # e.g. torch's "unexpected pos" when the disk filled up
        except OSError:  # pragma: no cover
            return None
    if not code:
        return None
    return OSError(code, os.strerror(code), str(out))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _new_temp(out: Path, suffix: str = "") -> str:
    """An empty temp file beside ``out`` (named ``.<name>.XXXX.tmp<suffix>``: ``engine.cohort`` cleans them)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=f".tmp{suffix}", dir=out.parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(out)) from exc
    os.close(fd)
    return tmp


def atomic_replace(out: str | os.PathLike, write_fn: Callable[[str], Any], suffix: str = "") -> Path:
    """Write ``out`` atomically: ``write_fn(tmp)`` fills a temp file beside it, then ``os.replace``.

    A failure (or Ctrl-C) leaves neither ``out`` changed nor the temp file behind. The result gets
    the normal permissions of a new file (umask), not ``mkstemp``'s private 0600. This is the one
    place the project writes a file atomically; every writer goes through it.
    """
    out = Path(out)
    tmp = _new_temp(out, suffix)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException as exc:
        clean = _disk_error(exc, out) if isinstance(exc, Exception) else None
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if clean is not None:
            raise clean from exc
        raise
    return out


class _SigintDeferred:
    """Hold back Ctrl-C during a few renames (main thread, POSIX); it is raised right after."""

    def __enter__(self):
        self.mask = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
        if self.mask:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        return self

    def __exit__(self, *exc):
        if self.mask:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        return False


def atomic_replace_all(items: Sequence[tuple[str | os.PathLike, Callable[[str], Any], str]]) -> list[Path]:
    """Write several files as one unit: every ``(out, write_fn, suffix)`` to a temp file, then rename all.

    A failure or Ctrl-C while writing leaves every ``out`` as it was and no temp file; the renames
    run with Ctrl-C held back, and if one of them fails the files already replaced are restored.
    """
    outs = [Path(o) for o, _, _ in items]
    temps: list[str] = []
    try:
        for (_, write_fn, suffix), out in zip(items, outs):
            temps.append(_new_temp(out, suffix))
            try:
                write_fn(temps[-1])
            except Exception as exc:
                clean = _disk_error(exc, out)
                if clean is not None:
                    raise clean from exc
                raise
            os.chmod(temps[-1], 0o666 & ~_umask())
        with _SigintDeferred():
            _commit(outs, temps)
            temps = []
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return outs


def _commit(outs: list[Path], temps: list[str]) -> None:
    """Rename every temp over its target; on a failure put back what was there before."""
    backups: dict[Path, str] = {}
    done: list[Path] = []
    try:
        for out, tmp in zip(outs, temps):
            if out.exists():
                backups[out] = _new_temp(out, ".bak")
                os.replace(out, backups[out])
            os.replace(tmp, out)
            done.append(out)
    except BaseException:
        for out in done:
            if out not in backups:
                os.unlink(out)
        for out, bak in backups.items():
            os.replace(bak, out)
        raise
    for bak in backups.values():
        with contextlib.suppress(OSError):
            os.unlink(bak)


_atomic = atomic_replace


def write_h5ad_atomic(adata: "anndata.AnnData", out: str | os.PathLike, overwrite: bool = False,
                      *, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``adata`` to ``out`` (.h5ad) atomically; see the module docstring for the rules."""
    out = _check_target(Path(out), overwrite, _protected_paths(adata, protect))
    return _atomic(out, lambda tmp: adata.write_h5ad(tmp), ".h5ad")


def write_csv_atomic(df: "pd.DataFrame", out: str | os.PathLike, overwrite: bool = False,
                     *, protect: Iterable[str | os.PathLike] = (), index: bool = True) -> Path:
    """Write a table to ``out`` (.csv) atomically; see the module docstring for the rules."""
    out = _check_target(Path(out), overwrite, _protected_paths(None, protect))
    return _atomic(out, lambda tmp: df.to_csv(tmp, index=index), ".csv")


def estimated_bytes(adata: "anndata.AnnData", csv: bool = False) -> int:
    """A generous estimate of the bytes an .h5ad (and its CSV) of ``adata`` take on disk."""
    import numpy as np

    def nbytes(m) -> int:
        if hasattr(m, "data") and hasattr(m, "indices"):
            return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)
        return int(np.asarray(m).nbytes)

    h5 = nbytes(adata.X) + sum(nbytes(v) for v in adata.layers.values())
    h5 += sum(nbytes(v) for v in adata.obsm.values()) + 64 * (adata.n_obs + adata.n_vars) + (1 << 20)
    cells = adata.n_obs * adata.n_vars * (1 + len(adata.layers))
    return h5 + (cells * 12 + 64 * adata.n_obs if csv else 0)


def write_prediction(adata: "anndata.AnnData", out: str | os.PathLike, csv: str | os.PathLike | None = None,
                     overwrite: bool = False, *, protect: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Write a prediction's .h5ad and, with ``csv``, its CSV table (io/export_csv.py) as one unit.

    Both targets are checked (existing files, inputs, the folder writable with room for the
    estimated size) before a byte is written; then :func:`atomic_replace_all`.
    """
    from .export_csv import write_prediction_csv

    protected = _protected_paths(adata, protect)
    h5 = _check_target(Path(out), overwrite, protected)
    items = [(h5, lambda tmp: adata.write_h5ad(tmp), ".h5ad")]
    if csv is not None:
        table = _check_target(Path(csv), overwrite, protected)
        if table.resolve() == h5.resolve():
            raise InputError("the CSV and the .h5ad name the same file", path=table, hint="give the CSV its own name")
        items.append((table, lambda tmp: write_prediction_csv(adata, tmp), ".csv"))
    need = estimated_bytes(adata, csv=False)
    if csv is not None and Path(csv).expanduser().parent.resolve() != h5.parent.resolve():
        check_writable(Path(csv).expanduser().parent, estimated_bytes(adata, csv=True) - need)
        check_writable(h5.parent, need)
    else:
        check_writable(h5.parent, estimated_bytes(adata, csv=csv is not None))
    return atomic_replace_all(items)


def write_prediction_csv_atomic(adata: "anndata.AnnData", out: str | os.PathLike, overwrite: bool = False,
                                *, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Only the CSV table of a prediction (the Predict widget's Export CSV), atomically."""
    from .export_csv import write_prediction_csv

    out = _check_target(Path(out), overwrite, _protected_paths(adata, protect))
    check_writable(out.parent, estimated_bytes(adata, csv=True) - estimated_bytes(adata))
    return _atomic(out, lambda tmp: write_prediction_csv(adata, tmp), ".csv")


__all__ = ["write_h5ad_atomic", "write_csv_atomic", "write_prediction", "write_prediction_csv_atomic",
           "atomic_replace", "atomic_replace_all", "check_writable", "estimated_bytes", "MIN_FREE_BYTES"]
