"""Shared fixtures. Nothing here may reach the network: model hubs are switched off."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No downloads at run time, ever: set before anything imports transformers/huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# A bug inside a CLI command must reach the test as its real exception, not as "internal error".
os.environ.setdefault("COMTIP_RAISE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    env = os.environ.get("COMTIP_SHARED_DATA")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "data"


SHARED_DATA = _shared_data_dir()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep pyramids/embeddings of the test run out of the user's cache folder."""
    old = os.environ.get("NAPARI_COMTIP_CACHE")
    os.environ["NAPARI_COMTIP_CACHE"] = str(tmp_path_factory.mktemp("comtip-cache"))
    yield
    if old is None:
        os.environ.pop("NAPARI_COMTIP_CACHE", None)
    else:
        os.environ["NAPARI_COMTIP_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    """The CI machine has 2 cores; do not oversubscribe them."""
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder not found at {SHARED_DATA} (set COMTIP_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def her2st_dir(shared_data) -> Path:
    return shared_data / "her2st"


@pytest.fixture(scope="session")
def visium_tiny_dir(shared_data) -> Path:
    return shared_data / "visium_tiny"
