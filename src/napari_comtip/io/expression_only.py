"""Expression without images: spots whose counts can train the gene sentences but not the image side.

``data.expression_only`` (training) names data sets of this kind, e.g. the 24 her2st sections of
``../shared/data/her2st_counts_only`` whose H&E images are not available. :func:`read_expression_only`
returns one ``(name, AnnData)`` per section, each AnnData in the IO layer's standard form
(``make_expression``: raw counts in ``layers["counts"]``, log-normalised ``X``), from

* a legacy ST folder (``ST-cnts/`` + ``ST-spotfiles/``; ``ST-imgs/`` may be absent): every section;
* an ``.h5ad`` file of counts (``layers["counts"]``, else ``raw.X``, else ``X``, as the h5ad
  reader takes them; spots as observations);
* any other input :func:`napari_comtip.io.load_sample` reads (its image is opened but not used).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..constants import Key
from ..errors import InputError


def read_expression_only(path: str | os.PathLike) -> list[tuple[str, "anndata.AnnData"]]:  # noqa: F821
    """Every section of ``path`` as ``(name, AnnData)`` (see the module docstring)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError("expression-only data not found", path=p,
                         hint="data.expression_only lists folders or .h5ad files of counts; fix the path")
    from .legacy_st import is_legacy_st, list_samples, read_legacy_st_expression

    if is_legacy_st(p):
        names = list_samples(p)
        if not names:
            raise InputError("no section has both a counts file and a spot selection file", path=p,
                             hint="expected ST-cnts/<S>.tsv.gz and ST-spotfiles/<S>_selection.tsv")
        return [(n, read_legacy_st_expression(p, n)) for n in names]
    if p.is_file() and p.suffix.lower() == ".h5ad":
        return [(p.stem, _read_counts_h5ad(p))]
    from . import list_samples as samples_of, load_sample

    out = []
    for name in samples_of(p) or [None]:
        s = load_sample(p, sample=name)
        if s.expression is None or s.expression.n_obs == 0:
            raise InputError(f"sample {s.name!r} has no expression data", path=p,
                             hint="data.expression_only needs spots with counts; drop this entry")
        out.append((s.name, s.expression))
    return out


def _read_counts_h5ad(path: Path):
    """The counts of an ``.h5ad`` by the h5ad reader's rule (io/h5ad.py), without its spot geometry."""
    import pandas as pd

    from .expression import make_expression
    from .h5ad import anndata_counts, open_anndata

    ad = open_anndata(path)
    if ad.n_obs == 0 or ad.n_vars == 0:
        raise InputError("the AnnData file holds no counts", path=path,
                         hint="expected spots x genes raw counts in X or layers['counts']")
    x, genes, gene_ids = anndata_counts(ad, path, {})
    ids = [str(i) for i in ad.obs_names]
    zeros = np.zeros(len(ids))  # no coordinates are needed: these spots have no image
    spots = pd.DataFrame({Key.ROW: zeros, Key.COL: zeros}, index=pd.Index(ids))
    return make_expression(x, ids, genes, spots, path=path, gene_ids=gene_ids)


__all__ = ["read_expression_only"]
