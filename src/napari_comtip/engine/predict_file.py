"""The atomic writer of ``comtip predict``: :func:`predict_to_file` runs
:func:`engine.predict.predict_sample` and writes the result (temporary file + rename); an existing
output is refused without ``overwrite=True``, and an input file is never written over.
:func:`check_outputs` runs the same checks up front, before any slow work."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..constants import Default, Key
from ..errors import InputError
from ..io.writers import check_writable
from ..progress import Cancel, Progress
from .predict import predict_sample

if TYPE_CHECKING:  # pragma: no cover
    import anndata

    from ..io.record import SpatialSample
    from .inference import Embeddings


def check_outputs(out: str | os.PathLike, csv: str | os.PathLike | None = None, overwrite: bool = False,
                  protected: Sequence[str] = ()) -> None:
    """Raise :class:`InputError` now if ``out``/``csv`` could not be written later (before slow work).

    The same check as the writers' (:mod:`io.writers`), which run it again when they write.
    """
    from ..io.writers import _check_target, _protected_paths

    guard = _protected_paths(None, protected)
    out = _check_target(Path(out), overwrite, guard)
    if out.suffix.lower() != ".h5ad":
        raise InputError("the output must be an .h5ad file", path=out,
                         hint="name it e.g. prediction.h5ad (use --csv for a table)")
    if csv is not None:
        csv_path = _check_target(Path(csv), overwrite, guard)
        if csv_path.resolve() == out.resolve():
            raise InputError("--csv and --out name the same file", path=csv_path, hint="give the CSV its own name")
        check_writable(csv_path.parent)
    check_writable(out.parent)  # a real probe file and some free space (io/writers.py)


def predict_to_file(
    sample: "SpatialSample | str | os.PathLike",
    out: str | os.PathLike,
    checkpoint: Any = None,
    mode: str = Default.PREDICT_MODE,
    genes: Sequence[str] | str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    reference: Any = None,
    reference_samples: Sequence[str] | None = None,
    csv: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    embeddings: "Embeddings | None" = None,
    **kwargs: Any,
) -> "anndata.AnnData":
    """:func:`predict_sample`, then write ``out`` (.h5ad) and optionally ``csv``, atomically.

    The output paths are checked before any work: an existing file is refused without
    ``overwrite`` and an input of the prediction (slide, counts, checkpoint, reference) is never
    a valid output.
    """
    from ..io.writers import write_prediction
    from ..model.bundled import resolve_checkpoint
    from ..model.checkpoint import Checkpoint

    if isinstance(sample, (str, os.PathLike)):
        from ..io import load_sample

        sample = load_sample(sample)
    protected = [str(p) for p in sample.provenance.get("inputs", [])]
    protected.append(str(checkpoint.path if isinstance(checkpoint, Checkpoint) else resolve_checkpoint(checkpoint)))
    check_outputs(out, csv, overwrite, protected)
    csv_path = Path(csv).expanduser() if csv is not None else None

    adata = predict_sample(sample, checkpoint=checkpoint, mode=mode, genes=genes, device=device,
                           batch_size=batch_size, reference=reference, reference_samples=reference_samples,
                           progress=progress, cancel=cancel, embeddings=embeddings, **kwargs)
    prov_inputs = list(adata.uns[Key.PROVENANCE].get("inputs", []))
    write_prediction(adata, out, csv_path, overwrite=overwrite, protect=prov_inputs)  # both or neither
    return adata


__all__ = ["predict_to_file", "check_outputs"]
