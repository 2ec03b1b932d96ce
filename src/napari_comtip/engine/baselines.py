"""A non-learned floor: colour-texture features of each spot patch + ridge regression.

This reproduces the floor of ``/work/shared/reference/peers.md`` (measured there at PCC
0.061 / HEG-50 0.150 / HVG-50 0.260 on two patient-C sections). Features per patch (uint8 RGB):

* RGB and HSV channel means and standard deviations (12);
* 8-bin histograms of R, G, B, H, S, V (48);
* darkness: fraction of pixels with value below 0.3, 0.45 and 0.6 (nuclei / dense stroma),
  and of near-white pixels (value > 0.85 and saturation < 0.1: glass, fat) (4);
* gradients: Sobel magnitude of the grey image, mean / std / 90th percentile, at full and at
  half resolution (6).

(computed by :func:`napari_comtip.model.colour.colour_texture`, which the probe's optional
colour features share).

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


def colour_texture_features(patches: np.ndarray, batch: int = 128) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 70) float32 features (see the module docstring and
    :mod:`napari_comtip.model.colour`, their one definition)."""
    import torch

    from ..model.colour import N_COLOUR_FEATURES, colour_texture

    patches = np.asarray(patches)
    out = [colour_texture(torch.from_numpy(np.ascontiguousarray(patches[s:s + batch])).float() / 255.0).numpy()
           for s in range(0, len(patches), batch)]
    return np.concatenate(out, 0).astype(np.float32) if out else np.zeros((0, N_COLOUR_FEATURES), np.float32)


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
