"""The expression-only term (model.w_text_ssl): reading expression without images, the training
set's expression-only spots, the two sentence views of a batch, the loss, and a run with it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from _model_common import GENES, micro_model, one_thread  # noqa: F401
from napari_comtip.constants import Key
from napari_comtip.engine import run_config as RC
from napari_comtip.engine.batches import BatchSet
from napari_comtip.engine.data import build_training_set, expression_only_set, lognorm_matrix
from napari_comtip.engine.distributed import Dist
from napari_comtip.engine.run_config import DataConfig
from napari_comtip.errors import ConfigError, InputError
from napari_comtip.io.expression_only import read_expression_only


@pytest.fixture(scope="module")
def counts_only_two(shared_data, tmp_path_factory):
    """Two real image-less her2st sections (B1, C1) copied into a legacy ST folder without ST-imgs."""
    src = shared_data / "her2st_counts_only"
    if not src.is_dir():
        pytest.skip("her2st_counts_only not found")
    dst = tmp_path_factory.mktemp("counts_only")
    for sub in ("ST-cnts", "ST-spotfiles"):
        (dst / sub).mkdir()
    for s in ("B1", "C1"):
        shutil.copy2(src / "ST-cnts" / f"{s}.tsv.gz", dst / "ST-cnts")
        shutil.copy2(src / "ST-spotfiles" / f"{s}_selection.tsv", dst / "ST-spotfiles")
    return dst


@pytest.fixture(scope="module")
def demo():
    from napari_comtip.io import load_sample

    s = load_sample("@demo")
    ts = build_training_set([s], DataConfig(n_hvg=30, n_mean=10, unlabelled=False), patch_um=175.0, img_size=32)
    return s, ts


def test_a_legacy_folder_without_images_reads_every_section_as_counts(counts_only_two):
    got = read_expression_only(counts_only_two)
    assert [n for n, _ in got] == ["B1", "C1"]
    for _, ad in got:
        assert ad.n_obs > 100 and ad.n_vars > 10_000
        counts = ad.layers[Key.COUNTS]
        assert np.allclose(counts.data, np.round(counts.data)) and counts.data.min() > 0
        assert "ERBB2" in set(map(str, ad.var_names))


def test_an_h5ad_of_counts_is_read_and_bad_inputs_are_one_line(tmp_path, demo):
    import anndata

    s, _ = demo
    ad = anndata.AnnData(X=s.expression.layers[Key.COUNTS].copy(), var=s.expression.var[[]].copy())
    ad.obs_names = [str(i) for i in s.expression.obs_names]
    ad.write_h5ad(tmp_path / "c.h5ad")
    ((name, got),) = read_expression_only(tmp_path / "c.h5ad")
    assert name == "c" and got.n_obs == s.expression.n_obs
    np.testing.assert_allclose(got.layers[Key.LOGNORM].toarray(), s.expression.layers[Key.LOGNORM].toarray(), atol=1e-5)
    with pytest.raises(InputError, match="not found") as e:
        read_expression_only(tmp_path / "missing")
    assert "\n" not in str(e.value)
    bad = ad.copy()
    bad.X = bad.X.toarray()
    bad.X[0, 0] = np.nan
    bad.write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(InputError) as e:
        read_expression_only(tmp_path / "nan.h5ad")
    assert "nan.h5ad" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "junk.h5ad").write_text("not an h5ad")
    with pytest.raises(InputError, match="cannot read"):
        read_expression_only(tmp_path / "junk.h5ad")


def test_the_training_set_maps_expression_only_spots_to_its_panel(counts_only_two, demo):
    _, ts = demo
    lib = np.log1p(np.asarray(demo[0].expression.X.sum(axis=1)).ravel())
    cfg = DataConfig(expression_only=[str(counts_only_two)], min_shared_genes=0.5)
    expr, libz, names = expression_only_set(cfg, ts.panel, lib)
    ads = dict(read_expression_only(counts_only_two))
    assert names == [f"{counts_only_two}:B1", f"{counts_only_two}:C1"]
    assert expr.shape == (sum(a.n_obs for a in ads.values()), len(ts.panel)) and libz.shape == (len(expr),)
    j = ts.panel.index("ERBB2") if "ERBB2" in ts.panel else 0
    b1 = ads["B1"]
    col = list(map(str, b1.var_names)).index(ts.panel[j])
    np.testing.assert_allclose(expr[: b1.n_obs, j], lognorm_matrix(b1)[:, col], atol=1e-6)
    # standardised with the training spots' depth, not their own: a section of deeper spots sits above 0
    own = np.log1p(np.asarray(b1.X.sum(axis=1)).ravel())
    np.testing.assert_allclose(libz[: b1.n_obs], (own - lib.mean()) / lib.std(), rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="shares only"):
        expression_only_set(DataConfig(expression_only=[str(counts_only_two)]), ["NOT_A_GENE", "ALSO_NOT"], lib)


def _batches(ts, **model):
    model = {"text": {"value_transform": "spot_rank"}, **model}
    cfg = RC.run_config_from_dict({"preset": "micro", "model": model,
                                  "data": {"n_hvg": 30, "n_mean": 10, "unlabelled": False, "expression_only_batch": 24},
                                  "training": {"batch_size": 16}})
    return BatchSet(ts, cfg, 0, 2, Dist(), lambda x, g: x.float())


def test_two_views_of_the_same_spots_and_the_main_batch_unchanged(demo):
    _, ts = demo
    off = _batches(ts, text={"value_transform": "spot_rank", "library_token": True})
    on = _batches(ts, text={"value_transform": "spot_rank", "library_token": True}, w_text_ssl=1.0)
    a, b = off[1], on[1]
    assert a[6] == ()
    for x, y in zip(a[:6], b[:6]):  # turning the term on draws after the batch: same images and sentences
        torch.testing.assert_close(x, y)
    gi_a, v_a, m_a, gi_b, v_b, m_b = b[6]
    assert gi_a.shape[0] == gi_b.shape[0] == 24
    assert not torch.equal(gi_a, gi_b) or not torch.equal(v_a, v_b)  # independent draws
    # the two views are of the same spots: each named gene's value (a within-spot rank) agrees
    # between views wherever both name it, and the library token (the last position) is identical
    assert torch.equal(v_a[:, -1], v_b[:, -1]) and bool((gi_a[:, -1] == len(ts.panel)).all())
    for i in range(24):
        da = dict(zip(gi_a[i][m_a[i]].tolist(), v_a[i][m_a[i]].tolist()))
        db = dict(zip(gi_b[i][m_b[i]].tolist(), v_b[i][m_b[i]].tolist()))
        assert all(abs(da[g] - db[g]) < 1e-6 for g in set(da) & set(db))


def test_shared_views_name_one_gene_set_per_view_for_every_spot(demo):
    _, ts = demo
    b = _batches(ts, w_text_ssl=1.0)
    b.cfg.data.expression_only_sampler = "shared"
    gi_a, v_a, m_a, gi_b, v_b, m_b = b.ssl_views(torch.Generator().manual_seed(3))
    assert bool((gi_a == gi_a[0]).all()) and bool((gi_b == gi_b[0]).all())  # one set per view
    assert not torch.equal(v_a, v_a[:1].expand_as(v_a))  # the spots differ by their values
    with pytest.raises(ConfigError, match="expression_only_sampler"):
        RC.run_config_from_dict({"data": {"expression_only_sampler": "spot"}})


def test_the_term_teaches_the_text_side_to_match_two_subsets_of_a_spot(demo):
    """The loss itself: trained alone for 60 steps on the demo's spots, it falls well below chance."""
    from napari_comtip.model.text_ssl import text_ssl_loss

    _, ts = demo
    batches = _batches(ts, w_text_ssl=1.0)
    torch.manual_seed(0)
    m = micro_model(ts.panel).train()
    opt = torch.optim.AdamW(m.text.parameters(), lr=3e-3)
    first = last = None
    for step in range(60):
        views = batches.ssl_views(torch.Generator().manual_seed(step))
        loss = text_ssl_loss(m, views)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss) if first is None else first
        last = float(loss)
    assert first > 0.9 * np.log(24)  # starts near chance (ln 24 = 3.18)
    assert last < 0.6 * first


def test_a_run_with_the_term_logs_it_and_records_its_data(tmp_path, counts_only_two):
    from napari_comtip.engine import training as T
    from napari_comtip.engine.run_folder import read_metrics
    cfg = RC.run_config_from_dict({"preset": "micro", "model": {"w_text_ssl": 1.0},
                                  "data": {"n_hvg": 30, "n_mean": 10, "unlabelled": False,
                                           "expression_only": str(counts_only_two)},  # one path: a list of one
                                  "training": {"epochs": 1, "batch_size": 16, "threads": 1}})
    assert cfg.data.expression_only == [str(counts_only_two)]
    path = T.pretrain(cfg, ["@demo"], tmp_path / "run", max_steps=2, device="cpu")
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert all(float(r["text_ssl"]) > 0 for r in rows)
    info = torch.load(path, weights_only=True, map_location="cpu")["provenance"]  # what the run trained on
    assert info["n_expression_only"] == sum(a.n_obs for _, a in read_expression_only(counts_only_two))
    assert info["expression_only"] == [f"{counts_only_two}:B1", f"{counts_only_two}:C1"]


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="w_text_ssl"):
        RC.run_config_from_dict({"model": {"w_text_ssl": -1}})
    with pytest.raises(ConfigError, match="expression_only_batch"):
        RC.run_config_from_dict({"data": {"expression_only_batch": 0}})
