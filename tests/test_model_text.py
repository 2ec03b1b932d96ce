"""Gene-Text Encoder: offline name embeddings, set semantics, variable gene subsets, modes, PAAT negatives."""

from __future__ import annotations

import os

import pytest
import torch

from napari_comtip.errors import ConfigError
from napari_comtip.model import embed_gene_names, get_preset, permute_values, sample_gene_subsets
from napari_comtip.model.text import GeneTextEncoder, _cache_dir

from _model_common import GENES, one_thread  # noqa: F401  (one_thread is autouse)


@pytest.fixture(scope="module")
def names():
    """Real all-MiniLM-L6-v2 embeddings of the panel (offline; cached on disk after the first call)."""
    return embed_gene_names(GENES)


def _encoder(names, **upd):
    cfg = get_preset("micro").replace(**upd) if upd else get_preset("micro")
    torch.manual_seed(0)
    return GeneTextEncoder(cfg, len(GENES), names if cfg.text.mode != "values" else None).eval()


# ----------------------------------------------------------------------------- name embeddings
def test_text_model_loads_offline_and_embeddings_are_cached(names):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert names.shape == (len(GENES), 384) and names.dtype == torch.float32
    assert torch.allclose(names.norm(dim=1), torch.ones(len(GENES)), atol=1e-5)
    # lexical neighbours are close, co-expressed but differently spelled genes are not (documented)
    cos = names @ names.t()
    assert cos[0, 1] > 0.7 > cos[2, 3]
    files = list(_cache_dir().glob("*.pt"))
    assert files, "embeddings were not cached"
    # the second call reads the cache: it works even with the text model made unavailable
    from napari_comtip.model import text as text_mod

    saved = dict(text_mod._TEXT_MODELS)
    text_mod._TEXT_MODELS.clear()
    orig = text_mod.load_text_model
    text_mod.load_text_model = lambda *a, **k: (_ for _ in ()).throw(AssertionError("text model loaded again"))
    try:
        again = embed_gene_names(GENES)
    finally:
        text_mod.load_text_model = orig
        text_mod._TEXT_MODELS.update(saved)
    assert torch.equal(again, names)
    # another panel is another cache entry, consistent with the first
    sub = embed_gene_names(GENES[:3])
    assert torch.allclose(sub, names[:3], atol=1e-5)


def test_missing_text_model_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="text model folder"):
        embed_gene_names(["A"], tmp_path / "nope")


# ----------------------------------------------------------------------------- encoder
def test_shapes_norm_and_single_gene_sentences(names):
    enc = _encoder(names)
    gi = torch.tensor([[0, 3, 5], [2, 0, 0]])
    v = torch.tensor([[1.0, 0.0, 2.5], [3.0, 0.0, 0.0]])
    m = torch.tensor([[True, True, True], [True, False, False]])
    out = enc(gi, v, m)
    assert out.shape == (2, 32)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    single = enc(torch.tensor([[2]]), torch.tensor([[3.0]]), torch.tensor([[True]]))
    assert torch.allclose(single, out[1:], atol=1e-5)  # padding does not matter


def test_padding_content_is_ignored_and_order_does_not_matter(names):
    enc = _encoder(names)
    gi = torch.tensor([[1, 4, 6, 7]])
    v = torch.tensor([[0.5, 2.0, 0.0, 1.0]])
    m = torch.tensor([[True, True, True, False]])
    a = enc(gi, v, m)
    b = enc(torch.tensor([[1, 4, 6, 2]]), torch.tensor([[0.5, 2.0, 0.0, 9.0]]), m)
    assert torch.allclose(a, b, atol=1e-5)
    perm = torch.tensor([2, 0, 1, 3])
    c = enc(gi[:, perm], v[:, perm], m[:, perm])
    assert torch.allclose(a, c, atol=1e-5)  # a set: no positional order
    d = enc(gi, torch.tensor([[2.0, 0.5, 0.0, 1.0]]), m)  # values swapped between genes
    assert not torch.allclose(a, d, atol=1e-3)  # ... is another sentence


def test_all_spots_in_one_pass_match_one_by_one(names):
    enc = _encoder(names)
    expr = torch.rand(5, len(GENES)) * 3
    cfg = get_preset("micro").replace(**{"text.subset_sizes": "spot"})
    gi, v, m = sample_gene_subsets(expr, cfg, torch.Generator().manual_seed(0))
    assert not m.all()  # padded: spots of different sizes in one tensor
    batch = enc(gi, v, m)
    for i in range(5):
        k = int(m[i].sum())
        one = enc(gi[i : i + 1, :k], v[i : i + 1, :k], m[i : i + 1, :k])
        assert torch.allclose(one, batch[i : i + 1], atol=1e-5)


def test_empty_mask_row_is_refused(names):
    enc = _encoder(names)
    with pytest.raises(ValueError, match="at least one"):
        enc(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool))


@pytest.mark.parametrize(
    "upd",
    [
        {},
        {"text.mode": "names"},
        {"text.mode": "values"},
        {"text.value_encoding": "binned"},
        {"text.combination": "concat", "text.pool": "mean"},
        {"text.use_name_embedding": False},
    ],
    ids=["names+values", "names", "values", "binned", "concat-mean", "no-name-emb"],
)
def test_every_mode_is_trainable(names, upd):
    enc = _encoder(names, **upd).train()
    expr = torch.rand(6, len(GENES)) * 3
    cfg = get_preset("micro").replace(**upd)
    gi, v, m = sample_gene_subsets(expr, cfg, torch.Generator().manual_seed(1))
    out = enc(gi, v, m)
    assert out.shape == (6, 32) and torch.isfinite(out).all()
    (out[:, 0].sum() - out[:, 1].sum()).backward()
    missing = [n for n, p in enc.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []


def test_names_mode_uses_top_k_names_and_ignores_values_beyond_ranking(names):
    enc = _encoder(names, **{"text.mode": "names", "text.top_k": 2})
    gi = torch.tensor([[0, 1, 2, 3]])
    m = torch.ones(1, 4, dtype=torch.bool)
    a = enc(gi, torch.tensor([[5.0, 0.1, 3.0, 0.2]]), m)
    b = enc(gi, torch.tensor([[9.0, 0.0, 1.0, 0.5]]), m)  # same top-2 genes (0, 2)
    c = enc(gi, torch.tensor([[0.0, 5.0, 0.1, 3.0]]), m)  # top-2 genes (1, 3)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)


def test_values_mode_is_an_mlp_of_the_expression_vector(names):
    enc = _encoder(names, **{"text.mode": "values"})
    assert not hasattr(enc, "name_emb")
    full = enc(torch.arange(8).unsqueeze(0), torch.arange(8.0).unsqueeze(0), torch.ones(1, 8, dtype=torch.bool))
    shuffled = torch.tensor([[7, 6, 5, 4, 3, 2, 1, 0]])
    same = enc(shuffled, 7 - torch.arange(8.0).unsqueeze(0), torch.ones(1, 8, dtype=torch.bool))
    assert torch.allclose(full, same, atol=1e-5)  # the gene, not the slot, decides


# ----------------------------------------------------------------------------- sampling, PAAT
def test_sample_gene_subsets_sizes_and_values():
    batch_cfg = get_preset("micro").replace(**{"text.min_genes": 1, "text.max_genes": 6})
    assert batch_cfg.text.subset_sizes == "batch"
    expr = torch.rand(400, 8)
    seen = set()
    for seed in range(20):
        gi, v, m = sample_gene_subsets(expr, batch_cfg, torch.Generator().manual_seed(seed))
        assert m.all() and torch.equal(v, expr.gather(1, gi))  # one size per batch: no padding
        seen.add(gi.shape[1])
    assert 1 in seen and len(seen) >= 3 and max(seen) <= 6

    cfg = batch_cfg.replace(**{"text.p_single": 0.3, "text.subset_sizes": "spot"})
    gi, v, m = sample_gene_subsets(expr, cfg, torch.Generator().manual_seed(0))
    sizes = m.sum(1)
    assert sizes.min() == 1 and sizes.max() <= 6 and gi.shape[1] == int(sizes.max())
    assert (sizes == 1).float().mean() > 0.3  # p_single plus the log-uniform draws
    assert torch.equal(v, expr.gather(1, gi))
    for row in gi:
        assert len(set(row.tolist())) == len(row)  # no gene twice in a sentence
    gi2, _, _ = sample_gene_subsets(expr, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(gi, gi2)  # reproducible with a generator

    # expressed genes are preferred: 2 of 8 genes expressed, subsets of 2
    sparse = torch.zeros(2000, 8)
    sparse[:, :2] = 1.0
    two = cfg.replace(**{"text.min_genes": 2, "text.max_genes": 2, "text.p_single": 0.0})
    for weight, lo, hi in ((1.0, 0.15, 0.35), (10.0, 0.6, 0.9)):
        gi, v, m = sample_gene_subsets(sparse, two.replace(**{"text.expressed_weight": weight}), torch.Generator().manual_seed(0))
        frac = (v > 0).float().mean()  # uniform: 2/8 of the drawn genes are expressed
        assert lo < frac < hi, (weight, float(frac))

    names_cfg = cfg.replace(**{"text.mode": "names", "text.top_k": 3})
    gi, v, m = sample_gene_subsets(expr, names_cfg)
    assert torch.equal(v, expr.topk(3, 1).values)
    values_cfg = cfg.replace(**{"text.mode": "values"})
    gi, v, m = sample_gene_subsets(expr, values_cfg)
    assert m.all() and torch.equal(v, expr)


def test_paat_negatives_keep_genes_and_values_but_change_the_pairing():
    torch.manual_seed(0)
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0], [0.5, 1.5, 9.0, 9.0, 9.0], [7.0, 8.0, 8.0, 8.0, 8.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    neg, differs = permute_values(values, mask, n=6, generator=torch.Generator().manual_seed(0))
    assert neg.shape == (3, 6, 5) and differs.shape == (3, 6)
    for b in range(3):
        for j in range(6):
            valid = mask[b]
            # same multiset of values at the valid positions
            assert torch.equal(neg[b, j][valid].sort().values, values[b][valid].sort().values)
            # padding untouched
            assert torch.equal(neg[b, j][~valid], values[b][~valid])
            assert bool(differs[b, j]) == (not torch.equal(neg[b, j], values[b]))
    assert differs[0].all() or differs[0].sum() >= 5  # 4 distinct values: almost always a new pairing
    assert differs[1].sum() >= 1  # two genes: swapping is the only new pairing
    assert not differs[2].any()  # a single gene cannot be re-paired


def test_any_local_hugging_face_folder_works(names, tmp_path):
    """text.model_path: another folder (here: links to the bundled model's files) is its own cache entry."""
    from napari_comtip.model.text import default_text_model_path

    src = default_text_model_path()
    dst = tmp_path / "my-text-model"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    before = set(_cache_dir().glob("*.pt"))
    emb = embed_gene_names(GENES, dst)
    assert torch.allclose(emb, names, atol=1e-5)
    assert len(set(_cache_dir().glob("*.pt")) - before) == 1
    cfg = get_preset("micro").replace(**{"text.model_path": str(dst)})
    from napari_comtip.model import build_model

    model = build_model(cfg, GENES)
    assert torch.allclose(model.text.name_emb, names, atol=1e-5)
