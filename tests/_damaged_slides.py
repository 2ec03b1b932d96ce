"""Damaged pyramidal TIFFs for the reliability tests: truncated, and with one undecodable tile."""

from __future__ import annotations

from pathlib import Path

#: The corrupted tile of ``corrupt.ome.tif`` (level 0, (row, col)): off the centre (where the
#: up-front probe reads) so that the failure comes while reading.
BAD_TILE = (2, 3)


def make_damaged_slides(folder: Path) -> dict[str, Path]:
    """``full`` (a JPEG-tiled pyramidal OME-TIFF), ``truncated`` (its first 60 % of bytes) and
    ``corrupt`` (full length, the JPEG stream of tile :data:`BAD_TILE` of level 0 overwritten)."""
    import tifffile
    from test_io_image import make_blob_rgb, make_ome_tiff

    folder.mkdir(parents=True, exist_ok=True)
    full = make_ome_tiff(folder / "full.ome.tif", make_blob_rgb(2048, 2048), compression="jpeg")
    data = full.read_bytes()
    truncated = folder / "truncated.ome.tif"
    truncated.write_bytes(data[: int(len(data) * 0.6)])
    with tifffile.TiffFile(full) as tf:
        page = tf.series[0].levels[0].pages[0]
        ntx = -(-int(page.imagewidth) // int(page.tilewidth))
        i = BAD_TILE[0] * ntx + BAD_TILE[1]
        off, cnt = int(page.dataoffsets[i]), int(page.databytecounts[i])
    damaged = bytearray(data)
    filler = (b"\xff\xd9" * cnt)[: cnt - 40]  # end-of-image markers where the scan data was
    damaged[off + 20: off + cnt - 20] = filler
    assert len(damaged) == len(data)
    corrupt = folder / "corrupt.ome.tif"
    corrupt.write_bytes(bytes(damaged))
    return {"full": full, "truncated": truncated, "corrupt": corrupt}
