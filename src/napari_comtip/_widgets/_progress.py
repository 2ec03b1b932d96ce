"""The napari side of :mod:`napari_comtip.progress`: progress carried to the GUI thread, and notifications.

Engine functions run in a ``thread_worker`` and report ``progress(done, total, message)`` from
that thread; :class:`ProgressRelay` turns each call into a Qt signal, which Qt delivers on the
GUI thread (where the progress bar may be touched). Cancellation is a
:class:`napari_comtip.progress.CancelToken` set by the Cancel button.
"""

from __future__ import annotations

from typing import Callable

from qtpy.QtCore import QObject, Signal

from ..progress import Progress


class ProgressRelay(QObject):
    """Carries ``progress(done, total, message)`` from a worker thread to the GUI thread
    (``total`` is sent as -1 when unknown)."""

    progress = Signal(int, int, str)

    def callback(self, message: Callable[[int, int | None, str | None], str] | None = None) -> Progress:
        """A :data:`~napari_comtip.progress.Progress` callable that emits :attr:`progress`;
        ``message(done, total, message)`` may reword the message."""

        def emit(done: int, total: int | None = None, msg: str | None = None) -> None:
            text = message(done, total, msg) if message is not None else (msg or "")
            self.progress.emit(int(done), -1 if total is None else int(total), text)

        return emit


def notify_error(msg: str) -> None:
    from napari.utils.notifications import show_error

    show_error(msg)


def notify_warning(msg: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(msg)


def notify_info(msg: str) -> None:
    from napari.utils.notifications import show_info

    show_info(msg)


__all__ = ["ProgressRelay", "notify_error", "notify_warning", "notify_info"]
