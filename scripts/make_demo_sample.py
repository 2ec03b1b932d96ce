#!/usr/bin/env python
"""Build the bundled demo sample (``@demo``) from her2st section C2.

Output: ``src/napari_comtip/sample_data/her2st_C2/`` in the same legacy-ST layout as the source
(so the same reader loads it):

* ``ST-imgs/C/C2/5714_HE_BT_C2.jpg``: the H&E image box-downsampled by 2 and cropped to the
  selected spots' bounding box plus one spot pitch, JPEG quality 90;
* ``ST-spotfiles/C2_selection.tsv``: the selected spots, pixel coordinates mapped into the
  downsampled, cropped image (``(p + 0.5) / 2 - 0.5 - crop offset``);
* ``ST-cnts/C2.tsv.gz``: the counts of those spots, every gene with a non-zero count in C2;
* ``README.txt``: provenance and citation.

Usage: ``python scripts/make_demo_sample.py [--src ../shared/data/her2st] [--out DIR]``
"""

from __future__ import annotations

import argparse
import gzip
import io
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from napari_comtip.io.decode import decode_image  # noqa: E402
from napari_comtip.io.legacy_st import estimate_pitch_px, read_selection, sample_files  # noqa: E402

SECTION = "C2"
FACTOR = 2
QUALITY = 90

README = """\
napari-comtip demo sample: her2st section C2 (downsampled)
===========================================================

What this is
  One tissue section (C2, patient C) of the HER2-positive breast tumour spatial
  transcriptomics study, in the legacy Spatial Transcriptomics (ST) layout the original
  authors publish (counts .tsv.gz + spot selection .tsv + H&E .jpg). Load it with
  `comtip inspect @demo` or `napari_comtip.io.load_sample("@demo")`.

How it was derived (scripts/make_demo_sample.py)
  - H&E image ST-imgs/C/C2/5714_HE_BT_C2.jpg ({src_w} x {src_h} px): box-downsampled by {factor}
    and cropped to the selected spots' bounding box plus one spot pitch
    (crop offset x = {crop_x}, y = {crop_y} px in the downsampled image), saved as JPEG quality {quality};
    now {out_w} x {out_h} px, about {mpp:.2f} um per pixel (derived from the 200 um spot pitch).
  - Spot selection: the {n_spots} selected spots (selected == 1); pixel_x / pixel_y mapped to the
    new image as (p + 0.5) / {factor} - 0.5 - crop offset. x, y, new_x, new_y unchanged.
  - Counts: the same spots, the {n_genes} genes with a non-zero count in this section.

Source and licence
  Andersson A, Larsson L, Stenbeck L, et al. Spatial deconvolution of HER2-positive breast
  cancer delineates tumor-associated cell type interactions. Nature Communications 12, 6012
  (2021). https://doi.org/10.1038/s41467-021-26271-2 . Data: https://github.com/almaan/her2st
  and Zenodo record 3957257. The authors publish the data openly; cite the paper wherever
  this sample, or a model trained on it, is used or shipped.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(REPO.parent / "shared" / "data" / "her2st"))
    ap.add_argument("--out", default=str(REPO / "src" / "napari_comtip" / "sample_data" / f"her2st_{SECTION}"))
    args = ap.parse_args(argv)
    src, out = Path(args.src), Path(args.out)
    files = sample_files(src, SECTION)

    # ---- spots (selected only) and pitch
    sel = pd.read_csv(files["selection"], sep="\t")
    sel = sel[sel["selected"] == 1].copy()
    spots = read_selection(files["selection"])
    pitch_full, _ = estimate_pitch_px(spots)
    pitch = pitch_full / FACTOR

    # ---- image: box-downsample, crop
    rgb = decode_image(files["image"])
    src_h, src_w = rgb.shape[:2]
    small = np.asarray(Image.fromarray(rgb).reduce(FACTOR))
    del rgb
    px = (sel["pixel_x"].to_numpy() + 0.5) / FACTOR - 0.5
    py = (sel["pixel_y"].to_numpy() + 0.5) / FACTOR - 0.5
    x0 = max(0, int(math.floor(px.min() - pitch)))
    y0 = max(0, int(math.floor(py.min() - pitch)))
    x1 = min(small.shape[1], int(math.ceil(px.max() + pitch)) + 1)
    y1 = min(small.shape[0], int(math.ceil(py.max() + pitch)) + 1)
    crop = np.ascontiguousarray(small[y0:y1, x0:x1])
    sel["pixel_x"] = np.round(px - x0, 3)
    sel["pixel_y"] = np.round(py - y0, 3)

    # ---- counts: these spots, genes expressed in the section
    counts = pd.read_csv(files["counts"], sep="\t", index_col=0)
    ids = [f"{int(x)}x{int(y)}" for x, y in zip(sel["x"], sel["y"])]
    section_genes = counts.columns[(counts.to_numpy() != 0).any(axis=0)]
    keep_rows = [i for i in counts.index if i in set(ids)]
    counts = counts.loc[keep_rows, section_genes]

    # ---- write to a temp folder, then swap in
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "ST-imgs" / SECTION[0] / SECTION).mkdir(parents=True)
        (tmp / "ST-spotfiles").mkdir()
        (tmp / "ST-cnts").mkdir()
        Image.fromarray(crop).save(tmp / "ST-imgs" / SECTION[0] / SECTION / files["image"].name,
                                   quality=QUALITY, optimize=True)
        sel.to_csv(tmp / "ST-spotfiles" / f"{SECTION}_selection.tsv", sep="\t", index=False)
        buf = io.StringIO()
        counts.to_csv(buf, sep="\t")
        with gzip.GzipFile(tmp / "ST-cnts" / f"{SECTION}.tsv.gz", "wb", compresslevel=9, mtime=0) as fh:
            fh.write(buf.getvalue().encode())
        mpp = 200.0 / pitch
        (tmp / "README.txt").write_text(README.format(
            src_w=src_w, src_h=src_h, factor=FACTOR, crop_x=x0, crop_y=y0, quality=QUALITY, out_w=crop.shape[1],
            out_h=crop.shape[0], mpp=mpp, n_spots=len(sel), n_genes=counts.shape[1]))
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}: image {crop.shape[1]}x{crop.shape[0]} px, {len(sel)} spots, {counts.shape[1]} genes, "
          f"~{mpp:.3f} um/px, {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
