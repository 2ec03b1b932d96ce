"""The per-user cache folder (cached pyramids, embeddings).

Everything the plugin writes outside an explicit output path goes under :func:`cache_dir`:
``platformdirs.user_cache_dir("napari-comtip")`` unless ``$NAPARI_COMTIP_CACHE`` names another
folder. Nothing is ever written next to the user's data.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..constants import CACHE_ENV, Default


def cache_root() -> Path:
    """The cache's root folder (not created)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir(Default.CACHE_APP_NAME, appauthor=False))


def cache_dir(kind: str) -> Path:
    """The cache sub-folder for one kind of artefact (``"pyramids"``, ``"embeddings"``, ...), created."""
    if not kind or "/" in kind or "\\" in kind or kind.startswith("."):
        raise ValueError(f"invalid cache kind {kind!r}")
    d = cache_root() / kind
    d.mkdir(parents=True, exist_ok=True)
    return d


def file_identity(path: str | os.PathLike) -> str:
    """``<absolute path>|<size>|<mtime_ns>``: changes when the file is replaced or edited."""
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}|{st.st_size}|{st.st_mtime_ns}"


def identity_key(identity: str, length: int = 24) -> str:
    """A short, filesystem-safe hash of an identity string (a cache key)."""
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:length]


__all__ = ["cache_root", "cache_dir", "file_identity", "identity_key"]
