"""Live loss curves of a pretraining run (matplotlib in a Qt canvas), drawn from ``metrics.csv``."""

from __future__ import annotations

import contextlib
import csv
import math
import os
from pathlib import Path

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure

CURVES = (("loss", "total"), ("infonce", "InfoNCE"), ("mfm", "MFM"), ("paat", "PAAT"))


def read_metrics_rows(path: str | os.PathLike) -> list[dict[str, float]]:
    """Complete rows of a (possibly still growing) ``metrics.csv``; a half-written last line is skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    rows: list[dict[str, float]] = []
    with open(p, newline="") as f:
        text = f.read()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    for r in csv.DictReader(text.splitlines()):
        if None in r or any(v is None for v in r.values()):
            continue
        try:
            rows.append({k: (float(v) if v != "" else math.nan) for k, v in r.items()})
        except ValueError:
            continue
    return rows


@contextlib.contextmanager
def _silent_if_deleted():
    """Swallow Qt's "wrapped C/C++ object ... has been deleted" RuntimeError, re-raise any other."""
    try:
        yield
    except RuntimeError as exc:
        if "has been deleted" not in str(exc):
            raise


class LossPlot(FigureCanvasQTAgg):
    """Loss terms against the optimizer step."""

    def __init__(self) -> None:
        self.figure = Figure(figsize=(4, 2.6), tight_layout=True)
        super().__init__(self.figure)
        self.ax = self.figure.add_subplot(111)
        self.lines = {}
        for key, label in CURVES:
            (self.lines[key],) = self.ax.plot([], [], label=label, lw=1.2)
        self.ax.set_xlabel("step")
        self.ax.set_ylabel("loss")
        self.ax.legend(loc="upper right", fontsize=7, frameon=False)
        self.n_rows = 0

    def update_rows(self, rows: list[dict[str, float]]) -> None:
        """Redraw when new rows arrived."""
        if len(rows) == self.n_rows:
            return
        self.n_rows = len(rows)
        steps = [r.get("step", i) for i, r in enumerate(rows)]
        for key, _ in CURVES:
            self.lines[key].set_data(steps, [r.get(key, math.nan) for r in rows])
        self.ax.relim()
        self.ax.autoscale_view()
        self.draw_idle()

    def _draw_idle(self) -> None:
        # matplotlib queues this redraw on a zero-delay Qt timer; when the Pretrain dock closes
        # in between, Qt has already deleted the canvas and the queued call would print a
        # "wrapped C/C++ object ... has been deleted" traceback. Nothing is left to draw then.
        with _silent_if_deleted():
            super()._draw_idle()

    def draw(self) -> None:
        # the same race one level down: matplotlib's _draw_idle calls draw() inside its own
        # try/except that prints any exception, so a canvas deleted after the size check would
        # still print the traceback from draw()'s final update()
        with _silent_if_deleted():
            super().draw()

    def series(self, key: str) -> list[float]:
        return list(self.lines[key].get_ydata())


__all__ = ["LossPlot", "read_metrics_rows", "CURVES"]
