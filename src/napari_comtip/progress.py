"""Progress and cancellation: the one definition every layer uses (docs/architecture.md).

A long function takes ``progress: Progress | None`` and ``cancel: Cancel | None``:

* ``progress(done, total, message)`` after each unit of work (``total`` None when unknown);
* ``cancel()`` returns True once the user asked to stop; the function then raises
  :class:`~napari_comtip.errors.Cancelled` at its next batch boundary.

Adapters: :func:`tqdm_progress` (a terminal bar, for the CLI) and :class:`CancelToken` (a
thread-safe flag the caller sets). The napari adapter (a Qt signal carrying progress to the GUI
thread) lives in ``_widgets/_progress.py``, the only place that may import Qt.
"""

from __future__ import annotations

import sys
import threading
from typing import Callable

#: ``progress(done, total, message)``.
Progress = Callable[[int, "int | None", "str | None"], None]
#: ``cancel() -> bool``: True once the work should stop.
Cancel = Callable[[], bool]


class CancelToken:
    """A :data:`Cancel` callable set from another thread (a Cancel button, a signal handler)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        """Ask the work to stop."""
        self._event.set()

    def clear(self) -> None:
        """Ready for the next run."""
        self._event.clear()

    def __call__(self) -> bool:
        return self._event.is_set()


class TqdmProgress:
    """A :data:`Progress` callable that drives a tqdm bar on stderr (created at the first call).

    ``close_when_done``: close the bar once ``done`` reaches ``total`` (a later call opens a new
    one, so the same callable serves several passes); :meth:`close` ends it in any case.
    """

    def __init__(self, desc: str, *, unit: str = "it", leave: bool = False, position: int | None = None,
                 close_when_done: bool = True) -> None:
        self.desc, self.unit, self.leave, self.position = desc, unit, leave, position
        self.close_when_done = close_when_done
        self.bar = None

    def __call__(self, done: int, total: int | None = None, message: str | None = None) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, leave=self.leave,
                            disable=None, position=self.position)
        b = self.bar
        if total is not None and b.total != total:
            b.total = total
        b.n = done
        if message:
            b.set_postfix_str(message, refresh=False)
        b.refresh()
        if self.close_when_done and total is not None and done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def tqdm_progress(desc: str, **kwargs) -> TqdmProgress:
    """A terminal progress bar as a :data:`Progress` callback (see :class:`TqdmProgress`)."""
    return TqdmProgress(desc, **kwargs)


__all__ = ["Progress", "Cancel", "CancelToken", "TqdmProgress", "tqdm_progress"]
