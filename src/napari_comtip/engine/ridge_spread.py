"""The predictive spread of a ridge regression (the probe, the probe in context, floor+probe and the
colour-texture floor): how sure the ridge is of each spot's value of each gene.

For standardised features z of a spot, the spread of gene g is

    sd_g(z) = sqrt( s2_g(z) * (1 + 1/n + z' (Z'Z + alpha I)^-1 z) )

* ``z' (Z'Z + alpha I)^-1 z`` (the leverage) is the Bayesian ridge's weight uncertainty: the
  posterior predictive of a Gaussian prior on the weights with precision alpha / s2 (the ridge
  is its mean); ``1/n`` the intercept's. It grows for spots whose features lie far from every
  training spot (other tissue, another stain) and is small (~0.01) inside the training cloud.
* ``s2_g(z)`` is the gene's residual variance, *heteroscedastic*: a second ridge on the same
  features predicts the log squared training residual of each gene (a multiplicative variance
  model, Harvey 1976; its penalty chosen by exact leave-one-out from the probe's grid, so a gene
  whose noise does not depend on the tissue gets a flat model), and its level is set so that its
  mean over the training spots equals the gene's **held-out** residual variance (leave-one-out,
  or the spatial blocks of a probe in context). On her2st leave-one-section-out folds the constant-variance form ranked the
  errors of a gene across spots at chance or below (rho -0.32 to 0.08), the variance model at
  0.20-0.40 (docs/results.md, "Uncertainty"). It is clipped to the range it takes on the
  training spots, so that far-away features cannot make it explode or vanish: there the leverage
  term speaks.
"""

from __future__ import annotations

import numpy as np

from collections.abc import Sequence

from ..constants import Default


def loo_gene_mse(u: np.ndarray, s: np.ndarray, yc: np.ndarray, alpha: float, *, uty: np.ndarray | None = None) -> np.ndarray:
    """Exact leave-one-out mean squared error (G,) of each gene for penalty ``alpha``, from the SVD
    ``(U, S)`` of the standardised features and the centred targets ``yc`` (Allen's PRESS)."""
    yc = np.asarray(yc, np.float64)
    uty = u.T @ yc if uty is None else uty
    d = s * s / (s * s + float(alpha))
    h = (u * u) @ d  # diagonal of the hat matrix
    loo = (yc - u @ (d[:, None] * uty)) / np.maximum(1.0 - h, 1e-6)[:, None]
    return np.mean(loo * loo, axis=0)


def ridge_cov(s: np.ndarray, vt: np.ndarray, alpha: float) -> np.ndarray:
    """(Z'Z + alpha I)^-1 (F, F) from the SVD (S, V') of the standardised training features Z.
    Directions the training spots do not span get the prior's 1 / alpha (alpha 0: floored at 1e-8)."""
    a = max(float(alpha), 1e-8)
    cov = (vt.T * (1.0 / (s * s + a))) @ vt
    if vt.shape[0] < vt.shape[1]:
        cov += (np.eye(vt.shape[1]) - vt.T @ vt) / a
    return cov


def variance_head(u: np.ndarray, s: np.ndarray, vt: np.ndarray, resid: np.ndarray, resid_var: np.ndarray,
                  alphas: Sequence[float] = Default.PROBE_ALPHAS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights (F, G), bias (G,) and clip range (2, G) of the log-variance model (module docstring)
    from the SVD (U, S, V') of the standardised training features and the training residuals (N, G)."""
    r2 = np.asarray(resid, np.float64) ** 2
    lg = np.log(r2 + 0.01 * r2.mean(0) + 1e-12)
    lc = lg - lg.mean(0)
    utl = u.T @ lc
    a = min(alphas, key=lambda x: float(np.mean(loo_gene_mse(u, s, lc, float(x), uty=utl))))
    a = max(float(a), 1e-8)
    w = vt.T @ ((s / (s * s + a))[:, None] * utl)
    fitted = u @ ((s * s / (s * s + a))[:, None] * utl)
    clip = np.stack([fitted.min(0), fitted.max(0)])
    bias = np.log(np.maximum(np.asarray(resid_var, np.float64), 1e-12)) - np.log(np.exp(fitted).mean(0))
    return w, bias, clip


def predictive_std(z: np.ndarray, cov: np.ndarray, resid_var: np.ndarray, n_train: int | None = None,
                   var_weight: np.ndarray | None = None, var_bias: np.ndarray | None = None,
                   var_clip: np.ndarray | None = None) -> np.ndarray:
    """sd (N, G) at standardised features ``z`` (N, F) (module docstring); without ``var_weight``
    (a probe stored with the constant-variance form) ``s2_g = resid_var``."""
    z = np.asarray(z, np.float64)
    lev = np.einsum("nf,nf->n", z @ np.asarray(cov, np.float64), z).clip(min=0.0)
    extra = 1.0 / n_train if n_train else 0.0
    if var_weight is not None and var_bias is not None and var_clip is not None:
        dev = np.clip(z @ np.asarray(var_weight, np.float64), var_clip[0], var_clip[1])
        s2 = np.exp(dev + np.asarray(var_bias, np.float64))
    else:
        s2 = np.asarray(resid_var, np.float64)[None, :]
    return np.sqrt(s2 * (1.0 + extra + lev[:, None])).astype(np.float32)


__all__ = ["loo_gene_mse", "ridge_cov", "variance_head", "predictive_std"]
