"""The one place for AnnData key names and tunable constants.

Import names from here instead of writing string literals: ``from napari_comtip.constants
import Key, Default``. A reader, the model, the engines and the widgets all agree on these.
"""

from __future__ import annotations

from typing import Final


class Key:
    """Key names used in AnnData objects and spot tables."""

    # AnnData layers / obsm / uns
    LOGNORM: Final = "lognorm"  # layer: library-size normalised (TARGET_SUM) then log1p
    COUNTS: Final = "counts"  # layer: raw UMI counts (X also holds them on read)
    SPATIAL: Final = "spatial"  # obsm: spot centres (x, y) in full-resolution pixels; uns: scanpy image dict
    UNCERTAINTY: Final = "uncertainty"  # layer of a prediction: per spot and gene, how unsure the predictor is (its own spread, log-normalised units)
    EMBEDDING: Final = "X_comtip"  # obsm: image embeddings in the shared space
    GENE_IDS: Final = "gene_ids"  # var: feature id(s) of a gene, ";"-joined when duplicated symbols were summed
    N_FEATURES: Final = "n_features"  # var: how many features (matrix columns) were summed into the gene
    PROVENANCE: Final = "comtip"  # uns: provenance of a prediction (checkpoint, predictor, device, versions)

    # spot table columns (pandas DataFrame indexed by spot id)
    ROW: Final = "row"  # spot centre, full-resolution pixel row (y)
    COL: Final = "col"  # spot centre, full-resolution pixel column (x)
    DIAMETER: Final = "diameter_px"  # spot diameter in full-resolution pixels
    ARRAY_ROW: Final = "array_row"  # array (grid) coordinates when the platform has them
    ARRAY_COL: Final = "array_col"
    IN_TISSUE: Final = "in_tissue"

    # napari layer metadata (set by the reader / widgets in ``_widgets/``)
    LAYER_SAMPLE: Final = "comtip_sample"  # the SpatialSample a layer was made from
    LAYER_ROLE: Final = "comtip_role"  # tissue | spots | predicted | measured | heatmap-predicted | ...
    LAYER_SOURCE: Final = "comtip_source"  # slide file of an image opened without its resolution


class Default:
    """Tunable defaults. Every one of them can be overridden by an option or a config key."""

    TARGET_SUM: Final = 1e4  # library size for normalisation before log1p
    GENE_Z_RANGE: Final = (-4.0, 8.0)  # text.value_transform gene_z: clamp (a rare gene's detection is tens of sd)
    VISIUM_PITCH_UM: Final = 100.0  # Visium centre-to-centre distance
    VISIUM_SPOT_UM: Final = 55.0  # Visium spot diameter
    # Space Ranger's spot_diameter_fullres spans a "theoretical 65 um spot" (10x's definition), not the
    # 55 um printed one: 65 um / spot_diameter_fullres is the scale that puts neighbours 100 um apart
    VISIUM_SCALEFACTOR_SPOT_UM: Final = 65.0
    LEGACY_ST_PITCH_UM: Final = 200.0  # legacy ST (her2st) centre-to-centre distance
    LEGACY_ST_SPOT_UM: Final = 100.0  # legacy ST spot diameter
    PATCH_UM: Final = 155.0  # physical side of a spot patch: 224 px at her2st's ~0.69 um/px (the peers' crops), 112 px on @demo
    PAD_VALUE: Final = 255  # patches reaching past the slide edge are padded with white (glass)
    PYRAMID_MIN_SIDE: Final = 4096  # single-level images larger than this get a cached pyramid
    PYRAMID_TILE: Final = 512  # chunk side of cached pyramid levels
    PYRAMID_FACTOR: Final = 2  # downsample between pyramid levels
    PYRAMID_SMALLEST: Final = 512  # stop building levels below this side
    TISSUE_THUMB_SIDE: Final = 2048  # thumbnail side used for tissue detection on bare slides
    # io/ readers: validation tolerances
    SPOTS_OUTSIDE_MAX: Final = 0.05  # refuse a sample when more spot centres than this fraction fall off the image
    SCALE_TOLERANCE: Final = 0.03  # relative disagreement allowed between scale factors and image sizes
    TISSUE_MIN_FRACTION: Final = 0.5  # bare-slide grid: keep a spot when this much of its disc is tissue
    MIN_SHARED_GENES: Final = 0.5  # fraction of the panel a sample must share to be used
    BATCH_SIZE: Final = 64
    CACHE_APP_NAME: Final = "napari-comtip"
    ZERO_SHOT_GRID: Final = 33  # candidate values v for zero-shot prediction
    RETRIEVAL_K: Final = 50  # BLEEP's k
    PREDICT_MODE: Final = "probe"  # default predictor: the best one on held-out sections (docs/results.md)
    PROBE_ALPHA: Final = None  # ridge penalty of the probe; None = chosen from PROBE_ALPHAS by leave-one-out
    PROBE_ALPHAS: Final = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)  # the grid (the same for the ridge floor)
    PROBE_CONTEXT: Final = "neighbours"  # probe input: engine/context.py CONTEXTS (none, section, neighbours)
    # zero-shot input: engine/context.py ZERO_SHOT_CONTEXTS (none, neighbours); the rule of
    # docs/results.md (2026-12-07) made "neighbours" the default
    ZERO_SHOT_CONTEXT: Final = "neighbours"
    # napari display (``_widgets/``)
    HEATMAP_COLORMAP: Final = "inferno"  # colormap of predicted/measured expression
    HEATMAP_PERCENTILES: Final = (1.0, 99.0)  # shared contrast limits of predicted + measured
    HEATMAP_PX_PER_SPOT: Final = 8  # raster heatmap pixels across one spot diameter
    HEATMAP_MAX_SIDE: Final = 2048  # the raster heatmap never gets larger than this per side (16 MB index)
    HEATMAP_TILE_PITCHES: Final = 0.71  # raster fills up to this many spot pitches around a spot
    HEATMAP_OPACITY: Final = 0.55  # the raster heatmap lets the tissue show through
    UNCERTAINTY_COLORMAP: Final = "viridis"  # colormap of a prediction's uncertainty map (not the expression's)
    SPOT_OPACITY: Final = 0.75  # spots coloured by value (drawn over the raster heatmap)
    SIDE_BY_SIDE_GAP: Final = 0.04  # gap between the predicted and measured views (fraction of width)
    READER_MIN_PLAIN_IMAGE_SIDE: Final = 2048  # smaller .jpg/.png files are left to napari's own reader
    PRETRAIN_POLL_MS: Final = 1000  # how often the Pretrain widget re-reads metrics.csv
    # inference engine (engine/inference.py); measured in docs/performance.md
    BATCH_SIZE_CPU: Final = 32  # encoder batch on the CPU (larger batches gain nothing there)
    BATCH_SIZE_CUDA: Final = 256  # encoder batch on a GPU (halved automatically on out-of-memory)
    BATCH_SIZE_MPS: Final = 64
    PREFETCH_BATCHES: Final = 3  # patch batches read ahead of the encoder
    CPU_STREAMS_MAX: Final = 4  # CPU: batches read + encoded side by side, each with threads/streams torch threads
    EMBED_STREAM_BYTES: Final = 16 * 2**20  # embeddings larger than this stream to the on-disk cache (32k spots at 128-d)
    TILE_CACHE_BYTES: Final = 64 * 2**20  # decoded slide tiles kept while reading spot patches
    TILE_CACHE_MIN_BYTES: Final = 16 * 2**20  # per reader process (the budget above is split between them)
    READ_PROCESS_MIN_SPOTS: Final = 50_000  # GPU: read with worker processes from this many spots on
    READ_PROCESSES_MAX: Final = 16  # GPU: at most this many reader processes
    HEAP_TRIM_S: Final = 1.0  # while embedding, return freed heap pages to the OS this often (glibc)
    EMBED_CHUNK_SPOTS: Final = 8192  # spots per chunk when predicting from streamed embeddings


#: The predictors, in the order the widget lists them: ``--mode`` of every command, the Predict
#: widget's drop-down, ``engine.predict.predict_sample`` and the benchmark (docs/model.md).
PREDICT_MODES: Final = ("zero-shot", "retrieval", "probe")

# Environment variable that relocates the per-user cache (pyramids, embeddings).
CACHE_ENV: Final = "NAPARI_COMTIP_CACHE"


class Cohort:
    """Cohort prediction (``engine/cohort.py``): the summary table and its row statuses."""

    SUMMARY: Final = "summary.csv"  # in the output folder, written by rank 0, atomically, as samples finish
    COLUMNS: Final = ("sample", "path", "out", "spots", "genes", "seconds", "status", "error", "rank")
    OK: Final = "ok"  # predicted and written in this run
    SKIPPED: Final = "skipped"  # an existing output matched (checkpoint digest, predictor, genes, spots)
    FAILED: Final = "failed"  # this sample failed; ``error`` says why; the others went on
    PENDING: Final = "pending"  # not finished (yet, or the run was cancelled)
    STATUSES: Final = (OK, SKIPPED, FAILED, PENDING)
