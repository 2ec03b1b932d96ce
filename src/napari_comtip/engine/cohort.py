"""Cohort prediction: many samples, resumable, sharded over torchrun ranks.

:func:`predict_cohort` runs the one-sample path of ``comtip predict``
(:func:`engine.predict_file.predict_to_file`, which writes through ``io.writers``) for each
:class:`~napari_comtip.io.manifest.CohortItem`, so every output is what ``comtip predict`` would
write for that sample alone. Around it:

* **resume**: an existing output is kept (status ``skipped``) when it was written by this package
  with the same checkpoint digest, predictor, genes and spots (ids and coordinates); an output of
  ours that differs is redone; a file that is not ours is only replaced with ``overwrite``;
* **isolation**: a sample that fails (corrupt slide, bad data) gets a ``failed`` row with the
  one-line reason, and the others go on; the caller turns failures into a non-zero exit;
* **scale-out**: under torchrun (``WORLD_SIZE`` > 1) the items, sorted by output path, are dealt
  round robin to the ranks (``items[rank::world]``), each rank on its own GPU (``cuda:LOCAL_RANK``)
  when there are GPUs, gloo on the CPU otherwise. torch.distributed is used only for rank/world
  and for the final gather of the summary rows;
* **summary**: ``summary.csv`` in the output folder (columns ``Cohort.COLUMNS``), rewritten
  atomically by rank 0 after each of its samples (it merges the rows the other ranks leave in
  ``.summary.rank-K.csv`` as they finish) and once more, complete, at the end.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import Cohort, Key
from ..errors import Cancelled, ComtipError, InputError
from ..progress import Cancel, Progress
from ..io.manifest import CohortItem, check_items

log = logging.getLogger(__name__)


@dataclass
class CohortResult:
    """What :func:`predict_cohort` did: one row per item (all ranks on rank 0), and the summary path."""

    rows: list[dict[str, Any]]
    summary: Path
    rank: int = 0
    world: int = 1
    cancelled: bool = False
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return sum(r["status"] == Cohort.FAILED for r in self.rows)


def shard(items: Sequence[CohortItem], rank: int, world: int) -> list[CohortItem]:
    """This rank's items: sorted by output path, then round robin (the same on every rank)."""
    return sorted(items, key=lambda it: str(Path(it.out).resolve()))[rank::world]


def csv_path_for(item: CohortItem) -> Path:
    return Path(item.out).with_suffix(".csv")


# --------------------------------------------------------------------------- resume
def stale_reason(out: Path, sample, *, digest: str, mode: str, genes_requested: str) -> str | None:
    """None when ``out`` already holds this prediction; else why not (``InputError`` if it is not ours)."""
    import anndata

    try:
        ad = anndata.read_h5ad(out, backed="r")
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise InputError(f"the existing output cannot be read ({type(exc).__name__})", path=out,
                         hint="pass --overwrite to replace it, or move it away") from None
    try:
        prov = ad.uns.get(Key.PROVENANCE)
        if not hasattr(prov, "get") or "checkpoint_digest" not in prov:
            raise InputError("the existing output is not a comtip prediction", path=out,
                             hint="pass --overwrite to replace it, or choose another output folder")
        if str(prov.get("checkpoint_digest")) != digest:
            return "another checkpoint"
        if str(prov.get("predictor")) != mode:
            return "another predictor"
        if str(prov.get("genes_requested")) != genes_requested:
            return "other genes"
        if list(map(str, ad.obs_names)) != list(map(str, sample.spot_ids)):
            return "other spots"
        xy = np.asarray(ad.obsm[Key.SPATIAL])
        if xy.shape != (sample.n_spots, 2) or not np.allclose(xy, sample.centers_xy(), rtol=0, atol=1e-6):
            return "other spot coordinates"
        return None
    finally:
        ad.file.close()


# --------------------------------------------------------------------------- summary
def _row(item: CohortItem, rank: int) -> dict[str, Any]:
    return {"sample": item.name, "path": item.path + (f" [{item.sample}]" if item.sample else ""),
            "out": item.out, "spots": "", "genes": "", "seconds": "", "status": Cohort.PENDING, "error": "",
            "rank": rank}


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(Cohort.COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in Cohort.COLUMNS})
    return buf.getvalue()


def _write_text_atomic(path: Path, text: str) -> None:
    from ..io.writers import atomic_replace

    atomic_replace(path, lambda tmp: Path(tmp).write_text(text), ".csv")


def read_summary(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _part_path(out_dir: Path, rank: int) -> Path:
    return out_dir / f".summary.rank-{rank}.csv"


def _merged(rows: list[dict], out_dir: Path, world: int) -> list[dict]:
    """Rank 0's rows with the finished rows the other ranks have left in their part files."""
    if world == 1:
        return rows
    done = {}
    for r in range(1, world):
        p = _part_path(out_dir, r)
        if p.is_file():
            try:
                done.update({d["out"]: d for d in read_summary(p) if d.get("status") != Cohort.PENDING})
            except (OSError, csv.Error):  # being replaced right now: next time
                pass
    return [done.get(r["out"], r) for r in rows]


# --------------------------------------------------------------------------- the engine
def predict_cohort(
    items: Sequence[CohortItem],
    out_dir: str | os.PathLike,
    *,
    checkpoint: Any = None,
    mode: str | None = None,
    genes: Sequence[str] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    reference: Any = None,
    reference_samples: Sequence[str] | None = None,
    csv_tables: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    sample_progress: Callable[[str], Progress | None] | None = None,
    cancel: Cancel | None = None,
    distributed: bool = True,
) -> CohortResult:
    """Predict every item (see the module docstring); rank 0's result holds every rank's rows.

    ``progress(done, total, message)`` counts this rank's samples; ``sample_progress(name)``
    returns the spot-level callback for one sample (or None). ``cancel()`` is checked between
    samples and inside each one; a cancelled run keeps what it finished (rows ``pending``).
    ``distributed=False`` ignores torchrun's environment (the widget).
    """
    from ..constants import Default
    from .device import resolve_device
    from .predict_file import predict_to_file
    from .predict_inputs import get_checkpoint, resolve_genes

    out_dir = Path(out_dir).expanduser()
    check_items(items, out_dir)
    mode = mode or Default.PREDICT_MODE
    dist = _dist_from_env(device) if distributed else None
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    dev = resolve_device(device)
    if world > 1 and dev.type == "cuda":
        import torch

        dev = torch.device("cuda", dist.local_rank)
    ck = get_checkpoint(checkpoint)
    digest = ck.digest
    panel = [str(g) for g in ck.gene_panel]
    gene_names = [panel[i] for i in resolve_genes(genes, panel, ck.label, checkpoint_path=ck.path)] if genes is not None else None
    genes_requested = "all" if gene_names is None else ",".join(gene_names)

    ordered = shard(items, 0, 1)
    owner = {it.out: i % world for i, it in enumerate(ordered)}
    mine = shard(items, rank, world)
    rows = {it.out: _row(it, owner[it.out]) for it in ordered}
    summary = out_dir / Cohort.SUMMARY

    def publish() -> None:
        if rank == 0:
            _write_text_atomic(summary, _csv_text(_merged(list(rows.values()), out_dir, world)))
        else:
            _write_text_atomic(_part_path(out_dir, rank), _csv_text([rows[it.out] for it in mine]))

    publish()
    cancelled = False
    for i, item in enumerate(mine):
        if cancel is not None and cancel():
            cancelled = True
            break
        if progress is not None:
            progress(i, len(mine), item.name)
        row = rows[item.out]
        t0 = time.perf_counter()
        try:
            _one(item, row, ck=ck, digest=digest, mode=mode, genes=gene_names, genes_requested=genes_requested,
                 device=str(dev), batch_size=batch_size, reference=reference, reference_samples=reference_samples,
                 csv_tables=csv_tables, overwrite=overwrite, cancel=cancel, predict_to_file=predict_to_file,
                 progress=sample_progress(item.name) if sample_progress is not None else None)
        except Cancelled:
            cancelled = True
            row["status"] = Cohort.PENDING
            break
        except ComtipError as exc:
            row.update(status=Cohort.FAILED, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - a corrupt slide must fail alone, not end the cohort
            first = (str(exc).strip().splitlines() or [""])[0]
            row.update(status=Cohort.FAILED, error=f"{type(exc).__name__}: {first}"[:500])
            log.debug("sample %s failed", item.name, exc_info=True)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        publish()
    if progress is not None:
        progress(len(mine), len(mine), "done")

    all_rows = list(rows.values())
    if world > 1:
        import torch.distributed as tdist

        gathered: list[Any] = [None] * world
        tdist.all_gather_object(gathered, [rows[it.out] for it in mine])
        done = {r["out"]: r for part in gathered for r in part}
        all_rows = [done.get(r["out"], r) for r in all_rows]
        cancelled = dist.any_true(cancelled)
    if rank == 0:
        _write_text_atomic(summary, _csv_text(all_rows))
        for r in range(1, world):
            _part_path(out_dir, r).unlink(missing_ok=True)
    if dist is not None:
        dist.barrier()
        if dist.initialised_here:
            import torch.distributed as tdist

            tdist.destroy_process_group()
    counts = {s: sum(r["status"] == s for r in all_rows) for s in Cohort.STATUSES}
    return CohortResult(rows=all_rows, summary=summary, rank=rank, world=world, cancelled=cancelled, counts=counts)


def _one(item: CohortItem, row: dict, *, ck, digest, mode, genes, genes_requested, device, batch_size, reference,
         reference_samples, csv_tables, overwrite, cancel, predict_to_file, progress) -> None:
    """Load, check for a matching output, predict and write one item (updates ``row``)."""
    from ..io import load_sample

    out = Path(item.out)
    csv_out = csv_path_for(item) if csv_tables else None
    _remove_leftovers(out, csv_out)
    sample = load_sample(item.path, **item.load_kwargs())
    redo = overwrite
    if out.exists() and not overwrite:
        reason = stale_reason(out, sample, digest=digest, mode=mode, genes_requested=genes_requested)
        if reason is None and (csv_out is None or csv_out.exists()):
            import anndata

            ad = anndata.read_h5ad(out, backed="r")
            row.update(status=Cohort.SKIPPED, spots=ad.n_obs, genes=ad.n_vars, error="")
            ad.file.close()
            return
        log.info("redoing %s: %s", item.name, reason or "its CSV is missing")
        redo = True  # our own output, made with other settings
    adata = predict_to_file(sample, out=out, checkpoint=ck, mode=mode, genes=genes, device=device,
                            batch_size=batch_size, reference=reference, reference_samples=reference_samples,
                            csv=csv_out, overwrite=redo, progress=progress, cancel=cancel)
    row.update(status=Cohort.OK, spots=adata.n_obs, genes=adata.n_vars, error="")


def _remove_leftovers(*outs: Path | None) -> None:
    """Temp files of an earlier run of this item that was killed mid-write (``io.writers`` names them)."""
    for out in outs:
        if out is not None:
            for tmp in out.parent.glob(f".{out.name}.*.tmp*"):
                tmp.unlink(missing_ok=True)


def _dist_from_env(device: str):
    """torchrun's rank and world size (the helper pretraining uses); None outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch

    from .distributed import init_dist

    want_cuda = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
    return init_dist(torch.device("cuda") if want_cuda else torch.device("cpu"))


__all__ = ["predict_cohort", "CohortResult", "shard", "stale_reason", "read_summary", "csv_path_for"]
