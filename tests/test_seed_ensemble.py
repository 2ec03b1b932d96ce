"""scripts/seed_ensemble.py: the mean of several fold models' predictions, scored through the user path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("seed_ensemble", REPO / "scripts" / "seed_ensemble.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_an_ensemble_of_one_model_twice_is_that_model_and_other_panels_are_refused():
    from napari_comtip.engine.evaluation import evaluate_predictions
    from napari_comtip.engine.predict import predict_sample
    from napari_comtip.io import load_sample

    mod = _script()
    sample = load_sample("@demo")
    out = mod.score_section(sample, ["comtip-tiny-her2st", "comtip-tiny-her2st"], modes=("probe",))
    single = evaluate_predictions(predict_sample(sample, checkpoint="comtip-tiny-her2st", mode="probe", device="cpu"),
                                  sample.expression)
    r = out["probe"]
    assert len(r["seeds"]) == 2
    for k in ("pcc_heg50", "pcc_hvg50", "mse"):
        np.testing.assert_allclose(r["ensemble"][k], single[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["seeds"][1][k], single[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit, match="different gene panels"):
        mod.score_section(sample, ["comtip-tiny-her2st", "comtip-tiny-mouse-brain"], modes=("probe",))
