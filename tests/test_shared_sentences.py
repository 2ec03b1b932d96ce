"""data.sentence_sampler shared: one gene set per batch, sentences that differ only by their values."""

from __future__ import annotations

import torch

from napari_comtip.engine.batches import expressed_sentences, shared_sentences
from napari_comtip.model.presets import get_preset


def test_a_batch_shares_its_genes_and_keeps_each_spots_values():
    t = get_preset("micro").text
    g = torch.Generator().manual_seed(0)
    expr = torch.rand(16, 40) * (torch.rand(16, 40) > 0.5)
    for _ in range(20):
        idx, vals, mask = shared_sentences(expr, t, 10.0, g)
        assert (idx == idx[:1]).all() and mask.all()
        assert len(set(idx[0].tolist())) == idx.shape[1]  # without replacement
        assert t.min_genes <= idx.shape[1] <= t.max_genes
        torch.testing.assert_close(vals, expr.gather(1, idx))
    # the per-spot sampler does not share (so the check above can fail)
    idx, _, _ = expressed_sentences(expr, t, 10.0, g)
    assert not (idx == idx[:1]).all()


def test_shared_draws_favour_genes_detected_in_the_batch():
    t = get_preset("micro").text.__class__(min_genes=1, max_genes=1, p_single=0.0)
    expr = torch.zeros(8, 20)
    expr[:, 3] = 1.0  # detected in every spot: weight 10, the 19 others weight 1
    g = torch.Generator().manual_seed(0)
    hits = sum(int(shared_sentences(expr, t, 10.0, g)[0][0, 0]) == 3 for _ in range(400))
    assert 0.25 < hits / 400 < 0.55  # expected 10 / 29 = 0.34
