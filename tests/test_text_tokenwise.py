"""text.token_mixing False: gene tokens pass the blocks on their own, a sentence is the pool of per-gene terms."""

from __future__ import annotations

import pytest
import torch

from napari_comtip.errors import ConfigError
from napari_comtip.model import embed_gene_names, get_preset
from napari_comtip.model.text import GeneTextEncoder

from _model_common import GENES, one_thread  # noqa: F401  (one_thread is autouse)


@pytest.fixture(scope="module")
def names():
    return embed_gene_names(GENES)


def _encoder(names, mixing: bool):
    cfg = get_preset("micro").replace(**{"text.token_mixing": mixing, "text.pool": "mean"})
    torch.manual_seed(0)
    return GeneTextEncoder(cfg, len(GENES), names).eval()


def _pooled(enc, idx, vals, mask=None):
    """The pooled sentence vector (the input of the encoder's final norm) and the embedding."""
    got = {}
    h = enc.norm.register_forward_hook(lambda m, i, o: got.setdefault("h", i[0].detach()))
    try:
        idx, vals = torch.tensor(idx), torch.tensor(vals)
        emb = enc(idx, vals, torch.ones_like(idx, dtype=torch.bool) if mask is None else torch.tensor(mask))
    finally:
        h.remove()
    return got["h"], emb


def test_tokenwise_sentence_is_the_mean_of_its_gene_terms(names):
    """Swapping partners between two sentences keeps the sum of their pooled vectors only when tokens
    do not attend to each other (and the same check fails for the set transformer, so it can fail)."""
    idx = [[0, 1], [2, 3], [0, 3], [2, 1]]
    vals = [[0.9, 0.2], [0.5, 0.7], [0.9, 0.7], [0.5, 0.2]]
    for mixing, additive in ((False, True), (True, False)):
        h, _ = _pooled(_encoder(names, mixing), idx, vals)
        gap = (h[0] + h[1] - h[2] - h[3]).abs().max().item()
        assert (gap < 1e-5) is additive, (mixing, gap)


def test_tokenwise_one_gene_sentence_is_its_term_and_padding_is_ignored(names):
    enc = _encoder(names, False)
    h_pair, _ = _pooled(enc, [[4, 5]], [[0.3, 0.8]])
    h_a, _ = _pooled(enc, [[4]], [[0.3]])
    h_b, _ = _pooled(enc, [[5]], [[0.8]])
    assert torch.allclose(h_pair, (h_a + h_b) / 2, atol=1e-5)
    _, e_pad = _pooled(enc, [[4, 5, 0]], [[0.3, 0.8, 0.0]], [[True, True, False]])
    _, e = _pooled(enc, [[4, 5]], [[0.3, 0.8]])
    assert torch.allclose(e_pad, e, atol=1e-5)
    assert torch.isfinite(e_pad).all()


def test_token_mixing_must_be_a_boolean():
    with pytest.raises(ConfigError):
        get_preset("micro").replace(**{"text.token_mixing": "sometimes"})


def test_gene_value_direction_starts_as_the_plain_token_and_binds_value_to_gene(names):
    """text.gene_value_direction: zero at initialisation (the same sentence embedding as without),
    then a token's value part depends on its gene: after a step two genes at one value differ in it."""
    cfg = get_preset("micro")
    torch.manual_seed(0)
    plain = GeneTextEncoder(cfg, len(GENES), names).eval()
    torch.manual_seed(0)
    enc = GeneTextEncoder(cfg.replace(**{"text.gene_value_direction": True}), len(GENES), names)
    missing = enc.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["value_dir.weight"] and float(enc.value_dir.weight.abs().sum()) == 0.0
    idx, vals = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    mask = torch.ones_like(idx, dtype=torch.bool)
    assert torch.allclose(enc.eval()(idx, vals, mask), plain(idx, vals, mask), atol=1e-6)
    opt = torch.optim.SGD(enc.parameters(), lr=1.0)
    enc.train()(idx, vals, mask).sum().backward()
    opt.step()
    _, vpart, _ = enc.eval().token_parts(idx, vals, mask)
    _, vplain, _ = plain.token_parts(idx, vals, mask)
    assert not torch.allclose(vpart[0, 0] - vpart[0, 1], torch.zeros_like(vpart[0, 0]), atol=1e-6)
    assert torch.allclose(vplain[0, 0], vplain[0, 1])  # without it, one value is one vector for every gene
