"""napari-comtip: predict spatial gene expression from H&E with CoMTIP.

Layers (each importable without the ones above it):

* :mod:`napari_comtip.io`     - slides, spot grids, expression -> :class:`SpatialSample`
* :mod:`napari_comtip.model`  - the CoMTIP network, presets, checkpoints
* :mod:`napari_comtip.engine` - inference, predictors, training, evaluation
* :mod:`napari_comtip.cli`    - the ``comtip`` command
* :mod:`napari_comtip._widgets` - napari widgets, reader, sample data (the only Qt/napari code)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import ComtipError, InputError, CheckpointError  # noqa: E402

__all__ = ["__version__", "ComtipError", "InputError", "CheckpointError"]
