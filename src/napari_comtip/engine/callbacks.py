"""The callbacks of a pretraining run (:func:`engine.training.pretrain`): the base class the
pretrain widget and the CLI's progress bar subclass, the adapter of ``progress``/``cancel``
callbacks, and the terminal progress bar of ``comtip pretrain``."""

from __future__ import annotations

import sys
from pathlib import Path


class Callback:
    """Override any of these; the pretrain widget and the CLI's progress bar are callbacks."""

    def on_step(self, step: int, total: int, metrics: dict[str, float]) -> None:  # noqa: D401
        pass

    def on_checkpoint(self, path: Path) -> None:
        pass

    def should_stop(self) -> bool:
        return False


class FnCallback(Callback):
    """The ``progress`` / ``cancel`` callbacks of :func:`engine.training.pretrain` as a Callback."""

    def __init__(self, progress=None, cancel=None):
        self.progress, self.cancel = progress, cancel

    def on_step(self, step, total, metrics):
        if self.progress is not None:
            self.progress(step, total, f"loss {metrics['loss']:.4f}")

    def should_stop(self):
        return bool(self.cancel is not None and self.cancel())


class TqdmCallback(Callback):
    """Terminal progress bar with the loss terms and the throughput."""

    def __init__(self, initial: int = 0):
        self.bar = None
        self.initial = initial

    def on_step(self, step, total, metrics):
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, initial=step - 1, desc="pretrain", unit="step", file=sys.stderr,
                            dynamic_ncols=True)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(
            f"loss {metrics['loss']:.3f} nce {metrics['infonce']:.3f} mfm {metrics['mfm']:.3f} "
            f"paat {metrics['paat']:.3f} {metrics['samples_per_s']:.0f} spots/s", refresh=False)

    def on_checkpoint(self, path):
        if self.bar is not None:
            self.bar.write(f"checkpoint {path}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


__all__ = ["Callback", "FnCallback", "TqdmCallback"]
