"""text.sparse_pathway: the sentence as a dense panel vector through an MLP, beside the set transformer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_comtip.engine.predictors import zero_shot
from napari_comtip.errors import ConfigError
from napari_comtip.model import embed_gene_names, get_preset
from napari_comtip.model.text import GeneTextEncoder

from _model_common import GENES, one_thread, train_on_demo  # noqa: F401  (one_thread is autouse)


@pytest.fixture(scope="module")
def names():
    return embed_gene_names(GENES)


def _encoder(names, on: bool = True):
    cfg = get_preset("micro").replace(**{"text.sparse_pathway": on})
    torch.manual_seed(0)
    return GeneTextEncoder(cfg, len(GENES), names).eval()


def test_the_state_is_the_mlp_of_the_dense_sentence_whatever_its_order_and_padding(names):
    enc = _encoder(names)
    idx, vals = torch.tensor([[3, 1, 6]]), torch.tensor([[0.4, 0.9, 0.2]])
    mask = torch.ones_like(idx, dtype=torch.bool)
    dense = torch.zeros(1, 2 * len(GENES))
    dense[0, [3, 1, 6]] = torch.tensor([0.4, 0.9, 0.2])
    dense[0, [len(GENES) + 3, len(GENES) + 1, len(GENES) + 6]] = 1.0
    state = enc.sparse_part(idx, vals, mask)
    torch.testing.assert_close(state, enc.sparse_mlp(dense))
    # another order, or padding (a masked slot pointing at a real gene), gives the same state and embedding
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(enc.sparse_part(idx[:, perm], vals[:, perm], mask), state)
    pad_i, pad_v = torch.tensor([[3, 1, 6, 2]]), torch.tensor([[0.4, 0.9, 0.2, 5.0]])
    pad_m = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(enc.sparse_part(pad_i, pad_v, pad_m), state)
    torch.testing.assert_close(enc(pad_i, pad_v, pad_m), enc(idx, vals, mask), atol=1e-5, rtol=0)


def test_it_binds_each_value_to_its_gene_and_changes_the_embedding(names):
    """Swapping two genes' values changes the sparse state (each input position is one gene); the
    encoder without the pathway has none, and its embedding differs from the one with it."""
    enc = _encoder(names)
    idx, mask = torch.tensor([[0, 5]]), torch.ones(1, 2, dtype=torch.bool)
    a = enc.sparse_part(idx, torch.tensor([[0.9, 0.1]]), mask)
    b = enc.sparse_part(idx, torch.tensor([[0.1, 0.9]]), mask)
    assert (a - b).abs().max() > 1e-3
    plain = _encoder(names, on=False)
    assert plain.sparse_part(idx, torch.tensor([[0.9, 0.1]]), mask) is None
    assert "sparse_mlp.0.weight" in enc.state_dict() and "sparse_mlp.0.weight" not in plain.state_dict()
    # the same seed builds the same set-transformer weights before the pathway's: only the pathway differs
    missing = plain.load_state_dict(enc.state_dict(), strict=False)
    assert not missing.missing_keys and all(k.startswith("sparse_mlp.") for k in missing.unexpected_keys)
    vals = torch.tensor([[0.9, 0.1]])
    assert not torch.allclose(enc(idx, vals, mask), plain(idx, vals, mask))


def test_it_must_be_a_boolean_and_needs_names_plus_values():
    with pytest.raises(ConfigError):
        get_preset("micro").replace(**{"text.sparse_pathway": "maybe"})
    with pytest.raises(ConfigError, match="sparse_pathway"):
        get_preset("micro").replace(**{"text.sparse_pathway": True, "text.mode": "values"})


def test_values_mode_reads_the_same_dense_vector_and_padding_never_overwrites_a_gene(names):
    """The BLEEP-style ``values`` mode reads its input through the same scatter: a padded slot that
    points at a named gene (index 0 here) leaves that gene's value and flag as they are."""
    from napari_comtip.model.text import dense_sentence

    cfg = get_preset("micro").replace(**{"text.mode": "values"})
    torch.manual_seed(0)
    enc = GeneTextEncoder(cfg, len(GENES), names).eval()
    idx, vals = torch.tensor([[0, 4, 0, 0]]), torch.tensor([[0.7, 0.3, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False, False]])
    d = dense_sentence(idx, vals, mask, len(GENES))
    assert float(d[0, 0]) == pytest.approx(0.7) and float(d[0, len(GENES)]) == 1.0 and float(d.sum()) == pytest.approx(3.0)
    torch.testing.assert_close(enc(idx, vals, mask), enc(idx[:, :2], vals[:, :2], mask[:, :2]))


def test_every_loss_term_reaches_it(names):
    """InfoNCE, PAAT's permuted-value negatives and the FGSM consistency term all train the pathway
    (the FGSM step perturbs only the value embeddings; the pathway's state enters it unperturbed)."""
    from napari_comtip.model.factory import build_model
    from napari_comtip.model.sentences import sample_gene_subsets

    cfg = get_preset("micro").replace(**{"text.sparse_pathway": True, "paat.adversarial": True,
                                         "text.subset_sizes": "spot", "text.min_genes": 2, "text.p_single": 0.0})
    torch.manual_seed(0)
    m = build_model(cfg, GENES, name_embeddings=names).train()
    g = torch.Generator().manual_seed(0)
    x = m.preprocess(torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=g))
    gi, v, mk = sample_gene_subsets(torch.rand(8, len(GENES), generator=g) * 3, cfg, g)
    out = m(x, gi, v, mk, g)
    for term in ("infonce", "paat_hard", "paat_adv"):
        m.zero_grad()
        out[term].backward(retain_graph=True)
        grad = m.text.sparse_mlp[0].weight.grad
        assert grad is not None and float(grad.abs().sum()) > 0, term


def test_training_with_it_stores_it_and_zero_shot_reads_it(tmp_path):
    m, _, _ = train_on_demo(tmp_path, {"sparse_pathway": True})
    assert m.config.text.sparse_pathway and m.text.sparse_mlp is not None
    pred, sd = zero_shot(m, torch.randn(5, m.embed_dim), [0, 1, 2], return_std=True)
    assert pred.shape == (5, 3) and np.isfinite(pred).all() and (sd >= 0).all()
    # zero-shot's one-gene sentences go through the pathway: without it the embeddings differ
    one = (torch.tensor([[0]]), torch.tensor([[0.5]]), torch.ones(1, 1, dtype=torch.bool))
    with torch.no_grad():
        with_it = m.encode_genes(*one)
        sparse_mlp, m.text.sparse_mlp = m.text.sparse_mlp, None
        without = m.encode_genes(*one)
        m.text.sparse_mlp = sparse_mlp
    assert not torch.allclose(with_it, without)
