"""The napari side of napari-comtip: the only package that imports Qt, napari or magicgui.

* ``_reader.py``      File > Open of slides and spatial transcriptomics datasets (npe2 reader)
* ``_sample_data.py`` File > Open Sample: the bundled HER2+ section
* ``_layers.py``      SpatialSample / predictions -> napari layer data (no Qt, no napari)
* ``_session.py``     the Predict widget's state: checkpoints, cached embeddings (no Qt)
* ``predict.py``      the "Predict expression" dock widget
* ``_checkpoints.py`` its checkpoint chooser (the bundled checkpoints by name, or a file)
* ``pretrain.py``     the "Pretrain CoMTIP" dock widget (a launcher over ``comtip pretrain``)
* ``_view.py``        ``comtip view``: napari with a slide and the Predict widget, or a screenshot

Modules are imported by napari through ``napari.yaml`` on demand; importing this package
imports nothing heavy.
"""

from ._compat import guard_triton as _guard_triton

_guard_triton()
