"""The Predict widget's state, without Qt: the loaded checkpoint and cached embeddings.

One :class:`PredictSession` lives per widget. It runs the encoder once per embedding signature
(``engine/embedding_cache.py``: slide, spot grid, µm per pixel, model weights, patch size, input
size, padding, precision; the key of the disk cache too) and keeps the image embeddings (with
the pooled features the probe needs) in memory, so choosing another predictor re-runs only the
predictor and choosing another gene re-runs nothing. The prediction itself is the same engine
call as ``comtip predict`` (:func:`napari_comtip.engine.predict.predict_sample`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..constants import Default

if TYPE_CHECKING:  # pragma: no cover
    import anndata

    from ..engine.inference import Embeddings
    from ..io.record import SpatialSample


@dataclass
class Prediction:
    """The result of one Run: predicted expression of every spot for the checkpoint's panel."""

    adata: "anndata.AnnData"
    sample: "SpatialSample"
    mode: str
    checkpoint: str
    device: str
    encoder_ran: bool
    seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what the engine warned about (shown in the widget)

    @property
    def genes(self) -> list[str]:
        return [str(g) for g in self.adata.var_names]


class PredictSession:
    """Checkpoint and embeddings kept between Runs of the Predict widget."""

    def __init__(self) -> None:
        self._embeddings: dict[str, "Embeddings"] = {}
        self.encoder_runs = 0  # times the encoder actually ran (not served from a cache)

    @staticmethod
    def checkpoint(path: str | os.PathLike | None):
        """The loaded checkpoint for ``path`` (None: the bundled one), kept in memory by the engine."""
        from ..engine.predict_inputs import get_checkpoint

        return get_checkpoint(None if not path else os.fspath(path))

    @staticmethod
    def embedding_key(sample: "SpatialSample", model, device: str = "auto") -> str:
        """The engine's embedding signature key (the disk cache's too): everything the embeddings depend on."""
        from ..engine.device import resolve_device
        from ..engine.embedding_cache import embedding_signature, signature_key
        from ..engine.inference import precision_for

        return signature_key(embedding_signature(sample, model, precision=precision_for(resolve_device(device))))

    def embeddings(self, sample: "SpatialSample", model, *, device: str = "auto", batch_size: int | None = None,
                   progress: Callable | None = None,
                   cancel: Callable[[], bool] | None = None) -> tuple["Embeddings", bool]:
        """(embeddings with pooled features, whether the encoder ran for them now)."""
        from ..engine.inference import embed_sample

        key = self.embedding_key(sample, model, device)
        hit = self._embeddings.get(key)
        if hit is not None:
            return hit, False
        emb = embed_sample(sample, model, device=device, batch_size=batch_size, progress=progress,
                           cancel=cancel, features=True)
        ran = not emb.cached
        self.encoder_runs += int(ran)
        self._embeddings[key] = emb
        return emb, ran

    def predict(self, sample: "SpatialSample", checkpoint: str | os.PathLike | None = None, *,
                mode: str = Default.PREDICT_MODE, device: str = "auto", batch_size: int | None = None,
                progress: Callable | None = None, cancel: Callable[[], bool] | None = None) -> Prediction:
        """Predict the whole panel for every spot."""
        import warnings

        from ..constants import Key
        from ..engine.predict import predict_sample

        t0 = time.perf_counter()
        ck = self.checkpoint(checkpoint)
        emb, ran = self.embeddings(sample, ck.model, device=device, batch_size=batch_size,
                                   progress=progress, cancel=cancel)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            adata = predict_sample(sample, checkpoint=ck, mode=mode, device=device, batch_size=batch_size,
                                   progress=progress, cancel=cancel, embeddings=emb)
        notes = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))
        prov = dict(adata.uns.get(Key.PROVENANCE, {}))
        return Prediction(adata=adata, sample=sample, mode=mode, checkpoint=str(prov.get("checkpoint", "")),
                          device=str(prov.get("device", emb.device)), encoder_ran=ran,
                          seconds=time.perf_counter() - t0, provenance=prov, warnings=notes)


__all__ = ["Prediction", "PredictSession"]
