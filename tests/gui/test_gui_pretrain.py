"""The Pretrain CoMTIP widget: a launcher over the real ``comtip pretrain`` subprocess."""

from __future__ import annotations

import sys

import pytest

from napari_comtip._widgets.pretrain import PretrainWidget, build_command, parse_progress, shown_command
from napari_comtip.model.presets import preset_names
from napari_comtip._widgets._loss_plot import read_metrics_rows

pytestmark = pytest.mark.gui

HEADER = "step,epoch,loss,infonce,mfm,paat,lr,samples_per_s,elapsed_s,img_emb_std,i2t_acc\n"


def test_command_line():
    cmd = build_command(config="tiny.yaml", data=["/d/her2st", "/d/x.h5ad"], samples=["B4", "C2"], out="/runs/a",
                        epochs=3, max_steps=10, device="cpu")
    assert cmd[:4] == [sys.executable, "-m", "napari_comtip", "pretrain"]
    assert cmd[4:] == ["--config", "tiny.yaml", "--data", "/d/her2st", "--data", "/d/x.h5ad", "--sample", "B4",
                       "--sample", "C2", "--out", "/runs/a", "--epochs", "3", "--max-steps", "10", "--device", "cpu"]
    by_name = build_command(preset="base", data=["/d/my data"], out="/runs/b")
    assert by_name[4:] == ["--preset", "base", "--data", "/d/my data", "--out", "/runs/b"]
    assert shown_command(by_name) == "comtip pretrain --preset base --data '/d/my data' --out /runs/b"
    with pytest.raises(ValueError):
        build_command(preset="tiny", config="x.yaml", data=[], out="/r")
    resumed = build_command(config="/runs/a/config.yaml", data=["/d/her2st"], out="/runs/a", epochs=3, resume=True)
    assert "--resume" in resumed and "--epochs" not in resumed  # a resumed run keeps its own plan
    assert parse_progress("pretrain:  40%|####      | 4/10 [00:02<00:03]\rpretrain:  50%|#####     | 5/10") == (5, 10)
    assert parse_progress("loading samples") is None


def test_metrics_are_read_while_the_file_grows(tmp_path, make_napari_viewer):
    f = tmp_path / "metrics.csv"
    f.write_text(HEADER + "1,0,4.0,3.0,0.5,0.5,1e-4,50,1.0,0.1,0.1\n2,0,3.5,2.8,0.4,0.3,2e-4,52,2.0,0.1,0.2\n3,0,3.")
    rows = read_metrics_rows(f)
    assert [r["step"] for r in rows] == [1.0, 2.0]  # the half-written line is not a row yet
    widget = PretrainWidget(make_napari_viewer())
    widget.out_edit.setText(str(tmp_path))
    widget.poll()
    assert widget.plot.series("loss") == [4.0, 3.5] and widget.plot.series("paat") == [0.5, 0.3]


def test_failed_run_shows_the_cli_error(make_napari_viewer, qtbot, tmp_path, notifications):
    widget = PretrainWidget(make_napari_viewer())
    assert not widget.start()  # nothing to train on yet
    assert "add at least one dataset" in notifications[-1][1]
    widget.add_data(tmp_path / "no-such-dataset")
    widget.out_edit.setText(str(tmp_path / "run"))
    assert widget.start()
    assert widget.command_edit.text().startswith("comtip pretrain --preset tiny --data ")
    assert widget.command[3:6] == ["pretrain", "--preset", "tiny"]
    assert "--epochs" not in widget.command  # epochs come from the preset unless set here
    qtbot.waitUntil(lambda: widget.process is None, timeout=120_000)
    errors = [m for sev, m in notifications if sev == "error"]
    assert errors and "no-such-dataset" in errors[-1] and "Traceback" not in errors[-1]
    assert widget.status_label.text().startswith("failed")
    assert widget.start_button.isEnabled() and not widget.use_button.isEnabled()


def test_the_widget_offers_every_packaged_preset(make_napari_viewer, tmp_path):
    widget = PretrainWidget(make_napari_viewer())
    items = [widget.preset_box.itemText(i) for i in range(widget.preset_box.count())]
    assert items[:-1] == list(preset_names()) and items[0] == "tiny" and items[-1].startswith("YAML")
    assert "GPU" in widget.preset_box.itemData(items.index("base"), 3)  # 3 = tooltip role: the preset's purpose
    widget.add_data(tmp_path / "data")
    widget.out_edit.setText(str(tmp_path / "run"))
    widget.preset_box.setCurrentText("base")
    assert widget._recipe_for(resume=False) == {"preset": "base"}
    widget.set_config(tmp_path / "mine.yaml")
    assert widget._recipe_for(resume=False) == {"config": str(tmp_path / "mine.yaml")}


def test_cancel_terminates_the_process(make_napari_viewer, qtbot, tmp_path, small_her2st, notifications):
    widget = PretrainWidget(make_napari_viewer())
    widget.add_data(small_her2st)
    widget.out_edit.setText(str(tmp_path / "run"))
    assert widget.start()
    proc = widget.process
    qtbot.waitUntil(lambda: proc.processId() > 0, timeout=30_000)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.process is None, timeout=30_000)
    assert "cancelled" in widget.status_label.text()
    assert not [m for sev, m in notifications if sev == "error"]


@pytest.mark.slow
def test_train_cancel_resume_and_use_in_predict(make_napari_viewer, qtbot, tmp_path, small_her2st, artefact_dir):
    """A real (very short) run: cancel after its first checkpoint, resume, then load it into Predict."""
    cfg = tmp_path / "short.yaml"
    cfg.write_text("preset: tiny\ntraining:\n  epochs: 1\n  batch_size: 16\n  checkpoint_every: 2\n  warmup_steps: 1\n")
    viewer = make_napari_viewer()
    widget = PretrainWidget(viewer)
    widget.add_data(small_her2st)
    widget.samples_edit.setText("C3")
    widget.set_config(cfg)
    widget.max_steps_spin.setValue(6)
    out = tmp_path / "run"
    widget.out_edit.setText(str(out))
    assert widget.start()
    qtbot.waitUntil(lambda: any((out / "checkpoints").glob("step-*.pt")) if (out / "checkpoints").is_dir() else False,
                    timeout=600_000)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.process is None, timeout=60_000)
    assert widget.final_checkpoint() is None
    assert widget.start(resume=True)
    assert "--resume" in widget.command and str(out / "config.yaml") in widget.command
    qtbot.waitUntil(lambda: widget.process is None, timeout=600_000)
    assert widget.final_checkpoint() is not None, widget.output[-2000:]
    rows = read_metrics_rows(out / "metrics.csv")
    assert rows and int(rows[-1]["step"]) == 6
    assert widget.plot.n_rows == len(rows)
    widget.resize(520, 900)
    widget.grab().save(str(artefact_dir / "pretrain-widget.png"))
    predict = widget.use_in_predict()
    assert predict.checkpoint() == str(out / "model.pt")


def test_a_redraw_of_a_deleted_loss_plot_is_silent(qtbot, monkeypatch, capsys):
    """matplotlib's queued redraw prints any exception of draw(); a canvas that Qt deleted in
    between must not print a 'has been deleted' traceback, and other errors still surface."""
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg

    from napari_comtip._widgets._loss_plot import LossPlot

    plot = LossPlot()
    qtbot.addWidget(plot)
    plot.update_rows([{"step": 1, "loss": 4.0, "infonce": 4.0}])

    def deleted(self):
        raise RuntimeError("wrapped C/C++ object of type LossPlot has been deleted")

    monkeypatch.setattr(FigureCanvasQTAgg, "draw", deleted)
    plot.draw()  # silent
    plot._draw_pending = True
    plot._draw_idle()  # the queued path: nothing printed
    assert "Traceback" not in capsys.readouterr().err

    def other(self):
        raise RuntimeError("something else")

    monkeypatch.setattr(FigureCanvasQTAgg, "draw", other)
    with pytest.raises(RuntimeError, match="something else"):
        plot.draw()
