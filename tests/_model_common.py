"""What the model-layer test modules share: a small real gene panel and one torch thread.

Import the fixtures into a test module (``from _model_common import GENES, one_thread``) to use
them there; ``one_thread`` is autouse, so importing it applies it to every test of that module.
"""

from __future__ import annotations

import pytest
import torch

GENES = ["KRT8", "KRT18", "CD74", "HLA-DRA", "COL1A1", "ERBB2", "PIP", "MGP"]


@pytest.fixture(autouse=True)
def one_thread():
    """Model tests are timed on one thread: small models run faster without a thread pool."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
