"""What the training test modules share: a callback that kills a run at a given step."""

from __future__ import annotations

from napari_comtip.engine.callbacks import Callback


class CrashAt(Callback):
    """Raises ``RuntimeError("killed")`` in step ``at``'s callback, as a run killed there would stop."""

    def __init__(self, at: int):
        self.at = at

    def on_step(self, step, total, metrics):
        if step == self.at:
            raise RuntimeError("killed")
