"""Engines: batched inference, predictors, training, evaluation.

Nothing here imports Qt or napari. Submodules are imported lazily by their users
(``from napari_comtip.engine.predict import predict_sample``) so that importing the package
stays cheap.
"""

from __future__ import annotations

__all__ = ["device", "inference", "predict"]
