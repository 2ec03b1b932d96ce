"""Atomic writers: a temp file in the destination folder, then ``os.replace``.

A result is either written completely or not at all; an existing file is only replaced with
``overwrite=True``; and an input of the result (recorded in ``adata.uns[Key.PROVENANCE]["inputs"]``
or passed as ``protect=``) is never written over, even with ``overwrite=True``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..constants import Key
from ..errors import InputError

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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_replace(out: str | os.PathLike, write_fn: Callable[[str], Any], suffix: str = "") -> Path:
    """Write ``out`` atomically: ``write_fn(tmp)`` fills a temp file beside it, then ``os.replace``.

    A failure (or Ctrl-C) leaves neither ``out`` changed nor the temp file behind. The result gets
    the normal permissions of a new file (umask), not ``mkstemp``'s private 0600. This is the one
    place the project writes a file atomically; every writer goes through it.
    """
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=f".tmp{suffix}", dir=out.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return out


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


__all__ = ["write_h5ad_atomic", "write_csv_atomic"]
