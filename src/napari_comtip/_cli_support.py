"""What the command line needs besides its parser: checked numeric options and the last line of defence.

* :func:`int_at_least` / :func:`float_above` are argparse ``type=`` functions, so that
  ``--batch-size 0`` or ``--mpp -1`` is refused by the parser with one line naming the option.
* :func:`run_guarded` runs a subcommand: a :class:`~napari_comtip.errors.ComtipError` prints
  ``error: <message>`` (exit 2); an ``OSError`` from the environment (disk full, read-only folder,
  permission) prints ``error: <path>: <cause>`` (exit 2); any other exception is a bug and prints
  one line ``internal error: ...; details in <log file>`` with the traceback written to that log
  (exit 1). With ``--debug``, ``$COMTIP_DEBUG`` or ``$COMTIP_RAISE`` (the test suite sets it) the
  real exception propagates instead.
* :func:`add_sample_args` / :func:`load_sample_from_args` / :func:`gene_list`: the options every
  sample-reading subcommand shares; :func:`one_line_warnings`: warnings as one line.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from .errors import ComtipError

#: Exit status when stdout was closed by its reader (128 + SIGPIPE, like other Unix tools).
EXIT_BROKEN_PIPE = 141

#: Environment variable that makes :func:`run_guarded` re-raise every exception (set by tests).
RAISE_ENV = "COMTIP_RAISE"
#: Exit status of an error the user can fix, and of a bug.
EXIT_USER, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 1, 130


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def float_above(minimum: float) -> Callable[[str], float]:
    """An argparse type: a finite number > ``minimum``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value > minimum and value < float("inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number > {minimum:g}, got {text}")
        return value

    parse.__name__ = f"float>{minimum:g}"
    return parse


def _log_dir() -> Path:
    from .io.cache import cache_dir

    return cache_dir("logs")


def write_internal_log(exc: BaseException, argv: list[str] | None = None) -> Path | None:
    """Write the traceback of ``exc`` to a new log file; its path, or None when it cannot be written."""
    from . import __version__

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = (f"napari-comtip {__version__}, python {sys.version.split()[0]}\n"
            f"command: comtip {' '.join(argv if argv is not None else sys.argv[1:])}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    try:
        folder = _log_dir()
        path = folder / f"internal-error-{stamp}-{os.getpid()}.log"
        path.write_text(text)
        return path
    except OSError:
        return None


def describe_os_error(exc: OSError) -> str:
    """``<path>: <cause>`` for an OSError (``No space left on device``, ``Read-only file system``...)."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    name = exc.filename if exc.filename is not None else None
    return f"{name}: {cause}" if name else cause


def run_guarded(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                argv: list[str] | None = None) -> int:
    """Run one subcommand with the error policy of the module docstring; the exit status."""
    raise_all = bool(getattr(args, "debug", False) or os.environ.get("COMTIP_DEBUG"))
    try:
        return int(handler(args) or 0)
    except ComtipError as exc:
        if raise_all:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        if raise_all:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of our output went away (`comtip checkpoints | head`): not an error of the
        # user's disk; stop quietly, as Unix tools do (exit 141 = 128 + SIGPIPE)
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if raise_all:
            raise
        print(f"error: {describe_os_error(exc)}. Free space, fix the permissions or choose another path.",
              file=sys.stderr)
        return EXIT_USER
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if raise_all or os.environ.get(RAISE_ENV):
            raise
        log = write_internal_log(exc, argv)
        first = (str(exc).splitlines() or [""])[0][:200]
        where = f"details in {log}" if log else "the log could not be written; rerun with --debug"
        print(f"internal error: {type(exc).__name__}: {first}; {where}", file=sys.stderr)
        return EXIT_INTERNAL


# --------------------------------------------------------------------------- shared options
def add_sample_args(p: argparse.ArgumentParser, *, path_required: bool = True, many: bool = False) -> None:
    """The options every command that reads a sample shares (same meaning everywhere)."""
    if many:
        p.add_argument("path", nargs="*", help="dataset folder, Space Ranger outs/ folder, .h5ad file, HEST sample "
                       "folder or slide file; several, or a folder of them, predict a cohort (--out is then a folder)")
    elif path_required:
        p.add_argument("path", help="dataset folder, Space Ranger outs/ folder, .h5ad file, HEST sample folder or slide file")
    else:
        p.add_argument("path", nargs="?", default=None, help="dataset folder, .h5ad, HEST folder or slide file")
    p.add_argument("--sample", default=None, help="sample/section name inside a multi-sample dataset (e.g. C2 for her2st)")
    p.add_argument("--slide", default=None, help="full-resolution slide to use instead of the one found next to the data")
    p.add_argument("--pitch-um", type=float_above(0), default=None, help="spot pitch in micrometres for a bare slide grid (default: Visium, 100)")
    p.add_argument("--mpp", type=float_above(0), default=None, help="override microns per pixel of the full-resolution image")


def load_sample_from_args(args: argparse.Namespace, progress=None):
    """The sample named by the options of :func:`add_sample_args`."""
    from .io import load_sample

    return load_sample(args.path, sample=args.sample, slide=args.slide, pitch_um=args.pitch_um, mpp=args.mpp,
                       progress=progress)


def gene_list(text: str | None) -> list[str] | None:
    """``--genes A,B`` -> ``["A", "B"]`` (None: the whole panel)."""
    return [g.strip() for g in text.split(",") if g.strip()] if text else None


def one_line_warnings() -> None:
    """Format our warnings (e.g. spots dropped) as one ``warning: ...`` line, without source lines.

    Only the format changes (not ``showwarning``), so callers that record warnings still see them.
    """
    import warnings

    def fmt(message, category, filename, lineno, line=None):
        return f"warning: {message}\n"

    warnings.formatwarning = fmt


__all__ = ["int_at_least", "float_above", "run_guarded", "write_internal_log", "describe_os_error", "RAISE_ENV",
           "add_sample_args", "load_sample_from_args", "gene_list", "one_line_warnings"]
