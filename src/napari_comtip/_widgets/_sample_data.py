"""npe2 sample data: File > Open Sample > the bundled HER2+ breast tumour section.

The section (her2st C2, Andersson et al., Nat. Commun. 12, 6012, 2021) ships with the package,
downsampled so the package stays small, with its spots and measured expression; ``load_sample``
resolves the ``@demo`` alias to it. It opens as the same layers as File > Open of a dataset.
"""

from __future__ import annotations


def demo_sample():
    """Layers of the bundled section: tissue (multiscale RGB) and spots."""
    from ..io import DEMO_ALIAS, load_sample
    from ._layers import sample_layers

    return sample_layers(load_sample(DEMO_ALIAS))


__all__ = ["demo_sample"]
