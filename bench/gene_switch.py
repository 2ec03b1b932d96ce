"""Benchmark 5: gene switch latency in the widget path.

A real napari ``Viewer(show=False)`` with the plugin's Predict widget holds a finished prediction
(made through the widget's own session, i.e. ``predict_sample`` on cached embeddings) for a grid
of 5,000 spots on the demo slide. Timed: from choosing a gene (``PredictWidget.show_gene``, what
the gene box calls) until the Points layer carries the new colours and Qt has processed the
resulting events; with the raster heatmap on (the widget's default) and off. Reference in the
same run: the bare napari update of a 5,000-point Points layer (new feature column as face
colour) without any plugin code. A second row set uses the real demo section (187 spots) with
its measured expression shown side by side.

Target: under 100 ms for 5,000 spots. Needs a display: runs itself under ``xvfb-run`` when
``$DISPLAY`` is unset.

    python bench/gene_switch.py --quick
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time

import _common


def _ensure_display() -> None:
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("COMTIP_NO_XVFB"):
        xvfb = shutil.which("xvfb-run")
        if xvfb is None:
            raise SystemExit("no $DISPLAY and no xvfb-run: install xvfb (apt-get install xvfb xauth)")
        env = dict(os.environ, COMTIP_NO_XVFB="1")
        env.pop("QT_QPA_PLATFORM", None)
        cmd = [xvfb, "-a", "-s", "-screen 0 1280x1024x24", sys.executable, *sys.argv]
        raise SystemExit(subprocess.call(cmd, env=env))


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--spots", type=int, default=5000)
    p.add_argument("--switches", type=int, default=None, help="gene switches per measurement (default 10 quick, 30)")
    args = p.parse_args(argv)
    _ensure_display()
    _common.setup_threads(args)

    import numpy as np
    import pandas as pd

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_comtip._widgets.predict import PredictWidget
    from napari_comtip.constants import Key
    from napari_comtip.io import load_sample
    from napari_comtip.io.record import SpatialSample

    switches = args.switches or (10 if args.quick else 30)
    ckpt = _common.bench_checkpoint(args)
    demo = load_sample("@demo")
    # a hexagonal grid of args.spots spots over the demo slide
    H, W = demo.height, demo.width
    pitch = np.sqrt(H * W * np.sqrt(3) / 2 / args.spots) * 0.98
    rows = np.arange(pitch / 2, H - pitch / 2, pitch * np.sqrt(3) / 2)
    pts = [(r, c + (i % 2) * pitch / 2) for i, r in enumerate(rows) for c in np.arange(pitch / 2, W - pitch, pitch)]
    rc = np.array(pts[: args.spots])
    spots = pd.DataFrame({Key.ROW: rc[:, 0], Key.COL: rc[:, 1], Key.DIAMETER: pitch * 0.55},
                         index=[f"g{i}" for i in range(len(rc))])
    grid = SpatialSample(name="demo-grid", image=demo.image, mpp=demo.mpp, mpp_source=demo.mpp_source, spots=spots)

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=False)
    widget = PredictWidget(viewer)

    def measure(sample, heatmap: bool) -> tuple[list[float], int]:
        t = time.perf_counter()
        pred = widget.session.predict(sample, ckpt, mode="retrieval", device=args.device)
        setup = time.perf_counter() - t
        widget.display.heatmap = heatmap
        widget.set_prediction(pred)
        app.processEvents()
        genes = pred.genes
        times = []
        for k in range(switches + 1):
            gene = genes[(7 * k + 3) % len(genes)]
            t = time.perf_counter()
            view = widget.show_gene(gene)
            app.processEvents()
            dt = time.perf_counter() - t
            assert view is not None and view.gene == gene
            lyr = widget.display.layer("predicted")
            assert lyr is not None and len(lyr.data) == sample.n_spots
            if k:  # the first switch after building the layers is a warm-up
                times.append(dt * 1e3)
        return times, setup

    # bare napari reference: recolour a Points layer of the same size by a new feature column
    rng = np.random.default_rng(0)
    feats = pd.DataFrame({f"gene{j}": rng.random(len(rc)) for j in range(switches + 1)})
    ref_layer = viewer.add_points(rc, features=feats[["gene0"]], face_color="gene0", face_colormap="inferno",
                                  size=pitch * 0.55, name="bare napari reference")
    app.processEvents()
    bare = []
    for j in range(1, switches + 1):
        col = f"gene{j}"
        t = time.perf_counter()
        ref_layer.features = feats[[col]]
        ref_layer.face_color = col
        ref_layer.face_contrast_limits = (0.0, 1.0)
        ref_layer.refresh_colors(update_color_mapping=False)
        app.processEvents()
        bare.append((time.perf_counter() - t) * 1e3)
    viewer.layers.remove(ref_layer)

    with_heat, setup_s = measure(grid, heatmap=True)
    no_heat, _ = measure(grid, heatmap=False)
    demo_heat, _ = measure(demo, heatmap=True)
    viewer.close()

    def stats(x):
        return statistics.median(x), max(x)

    rows = [
        [f"widget show_gene, {len(rc):,} spots, points + heatmap", *stats(with_heat)],
        [f"widget show_gene, {len(rc):,} spots, points only", *stats(no_heat)],
        [f"widget show_gene, demo {demo.n_spots} spots, predicted + measured", *stats(demo_heat)],
        [f"bare napari Points recolour, {len(rc):,} points", *stats(bare)],
    ]
    print(f"checkpoint {ckpt.name}; prediction for the grid took {setup_s:.1f} s (encoder + predictor, once); "
          f"{switches} switches per row after one warm-up")
    print(_common.table(["path", "median ms", "max ms"], rows))
    med = statistics.median(with_heat)
    print(f"gene switch with the widget's defaults: {med:.0f} ms median (target < 100 ms): "
          f"{'met' if med < 100 else 'MISSED'}")
    _common.emit({"benchmark": "gene_switch", "spots": int(len(rc)), "widget_ms_median": med,
                  "widget_ms_max": max(with_heat), "widget_points_only_ms_median": statistics.median(no_heat),
                  "demo_measured_ms_median": statistics.median(demo_heat), "bare_napari_ms_median": statistics.median(bare),
                  "target_met": med < 100, "machine": _common.machine()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
