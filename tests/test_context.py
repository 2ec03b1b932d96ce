"""engine/context.py: the probe's spatial-context input."""

import numpy as np
import pytest

from napari_comtip.engine.context import (
    MIN_SECTION_SPOTS,
    NEIGHBOUR_RADII,
    context_features,
    context_features_grouped,
    embedding_context,
    neighbour_mean,
    spot_pitch,
)
from napari_comtip.errors import ConfigError, InputError


def _grid(n=8, pitch=10.0):
    r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return np.stack([r.ravel(), c.ravel()], 1).astype(float) * pitch


def test_pitch_of_a_square_grid():
    assert spot_pitch(_grid(pitch=7.5)) == pytest.approx(7.5)
    assert np.isnan(spot_pitch(np.zeros((1, 2))))


def test_neighbour_mean_matches_a_dense_computation():
    rng = np.random.default_rng(0)
    c = rng.uniform(0, 100, (60, 2))
    f = rng.normal(size=(60, 5))
    got = neighbour_mean(f, c, 20.0)
    d = np.sqrt(((c[:, None] - c[None]) ** 2).sum(-1))
    w = (d <= 20.0).astype(float)
    want = (w @ f) / w.sum(1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_contexts_shapes_and_section_standardisation():
    rng = np.random.default_rng(1)
    c = _grid()
    f = rng.normal(3.0, 2.0, (len(c), 4))
    assert np.array_equal(context_features(f, c, "none"), f.astype(np.float32))
    s = context_features(f, c, "section")
    np.testing.assert_allclose(s.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(s.std(0), 1, atol=1e-5)
    n = context_features(f, c, "neighbours")
    assert n.shape == (len(c), 4 * (1 + len(NEIGHBOUR_RADII)))
    np.testing.assert_allclose(n[:, :4], s, atol=1e-6)
    # a spot in the grid's corner averages itself and its two direct neighbours at 1.6 pitches... and the
    # diagonal one (sqrt(2) = 1.41 < 1.6)
    corner = (s[0] + s[1] + s[8] + s[9]) / 4
    np.testing.assert_allclose(n[0, 4:8], corner, atol=1e-5)


def test_a_stain_offset_between_sections_disappears():
    rng = np.random.default_rng(2)
    c = _grid()
    f = rng.normal(size=(len(c), 3))
    a = context_features_grouped(np.vstack([f, f * 2 + 5]), np.vstack([c, c]), [0] * len(c) + [1] * len(c), "neighbours")
    np.testing.assert_allclose(a[: len(c)], a[len(c):], atol=1e-5)


def test_few_spots_are_not_standardised():
    f = np.arange(12, dtype=float).reshape(4, 3)
    assert len(f) < MIN_SECTION_SPOTS
    np.testing.assert_allclose(context_features(f, _grid(2), "section"), f)


def test_bad_context_and_missing_centres():
    with pytest.raises(ConfigError, match="unknown probe context"):
        context_features(np.zeros((3, 2)), None, "ring")
    with pytest.raises(InputError, match="spot centre"):
        context_features(np.zeros((30, 2)), None, "neighbours")


def test_zero_shot_context_adds_the_neighbourhood_means():
    rng = np.random.default_rng(3)
    c = _grid(pitch=12.0)
    e = rng.normal(size=(len(c), 6)).astype(np.float32)
    np.testing.assert_array_equal(embedding_context(e, c, "none"), e)
    want = e + sum(neighbour_mean(e, c, r * 12.0) for r in NEIGHBOUR_RADII)
    np.testing.assert_allclose(embedding_context(e, c, "neighbours"), want, rtol=1e-5, atol=1e-6)
    # a spot with no other spot within the radii keeps its own direction (zero-shot renormalises)
    far = np.vstack([c, [[1e4, 1e4]]])
    ef = np.vstack([e, rng.normal(size=(1, 6))]).astype(np.float32)
    np.testing.assert_allclose(embedding_context(ef, far, "neighbours")[-1], 3 * ef[-1], rtol=1e-5)
    # one spot, or no centres: read as it is
    np.testing.assert_array_equal(embedding_context(e[:1], c[:1], "neighbours"), e[:1])
    np.testing.assert_array_equal(embedding_context(e, None, "neighbours"), e)
    with pytest.raises(ConfigError, match="zero-shot context"):
        embedding_context(e, c, "section")
    with pytest.raises(InputError, match="spot centre"):
        embedding_context(e, c[:5], "neighbours")
