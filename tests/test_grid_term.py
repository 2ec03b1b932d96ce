"""The value-grid term (``w_grid``, model/grid_term.py): the zero-shot readout trained directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_comtip.engine.predictors import zero_shot, zero_shot_sentence_embeddings
from napari_comtip.engine.run_folder import read_metrics
from napari_comtip.errors import ConfigError
from napari_comtip.model import embed_gene_names, get_preset
from napari_comtip.model.factory import build_model
from napari_comtip.model.grid_term import draw_grid_genes, soft_targets, value_grid_loss, value_sentence_embeddings

from _model_common import GENES, one_thread, train_on_demo  # noqa: F401  (one_thread is autouse)


@pytest.fixture(scope="module")
def names():
    return embed_gene_names(GENES)


def _model(names, **over):
    cfg = get_preset("micro").replace(**{"w_grid": 1.0, **over})
    torch.manual_seed(0)
    return build_model(cfg, GENES, name_embeddings=names)


def test_soft_labels_sum_to_one_and_peak_at_the_spots_value():
    grid = torch.linspace(0, 4, 9).expand(2, 9)  # two genes, step 0.5
    true = torch.tensor([[1.0, 3.4], [0.0, 4.0]])
    t = soft_targets(true, grid, 1.0)
    torch.testing.assert_close(t.sum(-1), torch.ones(2, 2))
    assert t.argmax(-1).tolist() == [[2, 7], [0, 8]]
    hard = soft_targets(true, grid, 0.0)
    assert hard.sum().item() == 4 and hard.argmax(-1).tolist() == [[2, 7], [0, 8]]
    wide = soft_targets(true, grid, 3.0)
    assert float(wide.max()) < float(t.max())  # a wider label is flatter


def test_it_draws_only_genes_that_vary_in_the_batch():
    x = torch.zeros(16, 6)
    x[:, 1] = torch.arange(16.0)
    x[:, 4] = torch.arange(16.0) % 2
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        got = draw_grid_genes(x, 3, g)
        assert sorted(got.tolist()) == [1, 4]  # fewer than asked: only two genes vary
    assert draw_grid_genes(torch.ones(8, 6), 3, g).numel() == 0
    assert draw_grid_genes(torch.ones(1, 6), 3, g).numel() == 0  # one spot: nothing varies


def test_training_and_prediction_read_the_same_sentences(names):
    m = _model(names).eval()
    gi = torch.tensor([0, 5])
    grid = m.value_grid(gi)
    a = value_sentence_embeddings(m, gi, grid, chunk=7)
    b = zero_shot_sentence_embeddings(m, gi, grid, chunk=1000)
    torch.testing.assert_close(a, b)
    assert a.shape == (2, m.config.zero_shot.grid, m.embed_dim) and not b.requires_grad


def test_the_term_reaches_both_towers_and_is_in_the_total(names):
    m = _model(names).train()
    g = torch.Generator().manual_seed(0)
    x = m.preprocess(torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=g))
    expr = torch.rand(8, len(GENES), generator=g) * 3
    gi, v, mk = m.sample_text(expr, g)
    out = m(x, gi, v, mk, g, profile=expr)
    c = m.config
    assert float(out["grid"].detach()) > 0
    total = out["infonce"] + c.w_mfm * out["mfm"] + c.w_paat * out["paat"] + c.w_grid * out["grid"]
    torch.testing.assert_close(out["loss"], total)
    m.zero_grad()
    out["grid"].backward(retain_graph=True)
    assert float(m.text.gene_emb.weight.grad.abs().sum()) > 0
    assert float(m.image_proj.weight.grad.abs().sum()) > 0
    # without the expression vector the term is 0
    assert float(_model(names).train()(x, gi, v, mk, torch.Generator().manual_seed(0))["grid"]) == 0


def test_fitting_the_term_makes_zero_shot_follow_the_values(names):
    """Image embeddings free to move, the term alone: after fitting, the zero-shot prediction of
    every gene correlates with the values it was fitted on (and not before)."""
    m = _model(names, **{"zero_shot.train_genes": len(GENES)}).train()
    g = torch.Generator().manual_seed(1)
    n = 48
    expr = torch.rand(n, len(GENES), generator=g) * 3
    m.observe_values(torch.arange(len(GENES)).expand(n, -1), expr, torch.ones_like(expr, dtype=torch.bool))
    img = torch.nn.Parameter(torch.randn(n, m.embed_dim, generator=g))

    def pcc():
        pred = zero_shot(m, F.normalize(img.detach(), dim=-1))
        return np.array([np.corrcoef(pred[:, j], expr[:, j].numpy())[0, 1] for j in range(len(GENES))])

    before = pcc()
    opt = torch.optim.Adam([img, *m.text.parameters(), m.logit_scale], lr=1e-2)
    for _ in range(120):
        opt.zero_grad()
        loss = value_grid_loss(m, F.normalize(img, dim=-1), expr, m.scale(), g)
        loss.backward()
        opt.step()
    m.train()
    after = pcc()
    assert np.nanmean(np.abs(before)) < 0.4
    assert after.min() > 0.6, after


def test_it_needs_names_plus_values_and_a_positive_weight():
    with pytest.raises(ConfigError, match="w_grid"):
        get_preset("micro").replace(**{"w_grid": 1.0, "text.mode": "names"})
    with pytest.raises(ConfigError, match="w_grid"):
        get_preset("micro").replace(**{"w_grid": -1.0})
    with pytest.raises(ConfigError, match="train_genes"):
        get_preset("micro").replace(**{"zero_shot.train_genes": 0})


def test_training_with_it_logs_the_term(tmp_path):
    m, _, _ = train_on_demo(tmp_path, {"value_transform": "spot_rank"}, {"w_grid": 1.0})
    assert m.config.w_grid == 1.0
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 3 and all(r["grid"] > 0 for r in rows) and all(r["profile"] == 0 for r in rows)
    pred = zero_shot(m, torch.randn(4, m.embed_dim), [0, 1])
    assert pred.shape == (4, 2) and np.isfinite(pred).all()
