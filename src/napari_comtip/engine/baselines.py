"""A non-learned floor: colour-texture features of each spot patch + ridge regression.

This reproduces the floor of ``/work/shared/reference/peers.md`` (measured there at PCC
0.061 / HEG-50 0.150 / HVG-50 0.260 on two patient-C sections). Features per patch (uint8 RGB):

* RGB and HSV channel means and standard deviations (12);
* 8-bin histograms of R, G, B, H, S, V (48);
* darkness: fraction of pixels with value below 0.3, 0.45 and 0.6 (nuclei / dense stroma),
  and of near-white pixels (value > 0.85 and saturation < 0.1: glass, fat) (4);
* gradients: Sobel magnitude of the grey image, mean / std / 90th percentile, at full and at
  half resolution (6).

Features are standardised on the training spots; the ridge penalty is chosen by exact
leave-one-out on the training spots only, from a fixed grid (the learned probe's rule). Its
uncertainty is the learned probe's: the ridge's predictive standard deviation with each gene's
leave-one-out residual variance and its variance model (:mod:`engine.ridge_spread`).
"""

from __future__ import annotations

import numpy as np

from ..constants import Default
from .predictors import loo_ridge_alpha
from .ridge_spread import loo_gene_mse, predictive_std, ridge_cov, variance_head

ALPHAS = Default.PROBE_ALPHAS  # the probe's grid: the two differ only in their features


def _rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """(..., 3) float in [0, 1] -> HSV in [0, 1]."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx = x.max(-1)
    mn = x.min(-1)
    d = mx - mn
    s = np.where(mx > 0, d / np.maximum(mx, 1e-8), 0.0)
    dd = np.maximum(d, 1e-8)
    h = np.where(mx == r, ((g - b) / dd) % 6, np.where(mx == g, (b - r) / dd + 2, (r - g) / dd + 4))
    h = np.where(d > 0, h / 6.0, 0.0)
    return np.stack([h, s, mx], -1)


def _sobel_mag(grey: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of a (B, H, W) image (valid region)."""
    g = grey
    gx = (g[:, :-2, 2:] + 2 * g[:, 1:-1, 2:] + g[:, 2:, 2:]) - (g[:, :-2, :-2] + 2 * g[:, 1:-1, :-2] + g[:, 2:, :-2])
    gy = (g[:, 2:, :-2] + 2 * g[:, 2:, 1:-1] + g[:, 2:, 2:]) - (g[:, :-2, :-2] + 2 * g[:, :-2, 1:-1] + g[:, :-2, 2:])
    return np.sqrt(gx * gx + gy * gy)


def colour_texture_features(patches: np.ndarray, batch: int = 128) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 70) float32 features (see module docstring)."""
    patches = np.asarray(patches)
    out = []
    for s in range(0, len(patches), batch):
        x = patches[s:s + batch].astype(np.float32) / 255.0
        B = x.shape[0]
        hsv = _rgb_to_hsv(x)
        feats = [x.reshape(B, -1, 3).mean(1), x.reshape(B, -1, 3).std(1),
                 hsv.reshape(B, -1, 3).mean(1), hsv.reshape(B, -1, 3).std(1)]
        for arr in (x, hsv):
            flat = arr.reshape(B, -1, 3)
            for c in range(3):
                idx = np.clip((flat[:, :, c] * 8).astype(np.int64), 0, 7)
                h = np.zeros((B, 8), dtype=np.float32)
                np.add.at(h, (np.repeat(np.arange(B), idx.shape[1]), idx.ravel()), 1.0)
                feats.append(h / idx.shape[1])
        v = hsv[..., 2].reshape(B, -1)
        sat = hsv[..., 1].reshape(B, -1)
        feats.append(np.stack([(v < 0.3).mean(1), (v < 0.45).mean(1), (v < 0.6).mean(1),
                               ((v > 0.85) & (sat < 0.1)).mean(1)], 1))
        grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        for g in (grey, grey[:, ::2, ::2]):
            m = _sobel_mag(g).reshape(B, -1)
            feats.append(np.stack([m.mean(1), m.std(1), np.percentile(m, 90, axis=1)], 1))
        out.append(np.concatenate(feats, 1).astype(np.float32))
    return np.concatenate(out, 0) if out else np.zeros((0, 70), np.float32)


class RidgeFloor:
    """Standardise features, ridge regression to every gene, alpha by exact leave-one-out
    (:func:`engine.predictors.loo_ridge_alpha`, the learned probe's rule)."""

    def __init__(self, alphas=ALPHAS):
        self.alphas = tuple(alphas)
        self.alpha_: float | None = None

    def fit(self, X: np.ndarray, Y: np.ndarray) -> "RidgeFloor":
        X = np.asarray(X, np.float64)
        Y = np.asarray(Y, np.float64)
        self.mu_ = X.mean(0)
        self.sd_ = X.std(0)
        self.sd_[self.sd_ < 1e-8] = 1.0
        Z = (X - self.mu_) / self.sd_
        self.ymu_ = Y.mean(0)
        Yc = Y - self.ymu_
        U, s, Vt = np.linalg.svd(Z, full_matrices=False)
        self.alpha_, self.scores_ = loo_ridge_alpha(Z, Yc, self.alphas, svd=(U, s))
        UtY = U.T @ Yc
        d = s / (s * s + self.alpha_)
        self.coef_ = Vt.T @ (d[:, None] * UtY)
        self.cov_ = ridge_cov(s, Vt, self.alpha_)
        self.resid_var_ = loo_gene_mse(U, s, Yc, self.alpha_, uty=UtY)
        self.var_w_, self.var_b_, self.var_c_ = variance_head(U, s, Vt, Yc - Z @ self.coef_, self.resid_var_)
        self.n_ = len(X)
        return self

    def predict(self, X: np.ndarray, return_std: bool = False):
        """(N, G) predictions; with ``return_std`` also their predictive standard deviation."""
        Z = (np.asarray(X, np.float64) - self.mu_) / self.sd_
        pred = (Z @ self.coef_ + self.ymu_).astype(np.float32)
        if not return_std:
            return pred
        return pred, predictive_std(Z, self.cov_, self.resid_var_, self.n_, self.var_w_, self.var_b_, self.var_c_)


__all__ = ["colour_texture_features", "RidgeFloor", "ALPHAS"]
