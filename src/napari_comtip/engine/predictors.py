"""The three expression predictors, as pure tensor/numpy math (no file or sample IO).

* :func:`zero_shot` - no head, no reference: score each image embedding against the sentences
  "gene g at value v" for a grid of candidate values v and return the softmax-weighted
  expectation of v.
* :func:`retrieval` - BLEEP-style: the (weighted) mean expression of the k reference spots whose
  image embeddings are most similar.
* :func:`fit_probe` / :func:`probe_predict` - a closed-form ridge regression on frozen image
  features (standardised), fitted on a reference dataset.

All return numpy float32 arrays of shape (N spots, G genes); with ``return_std=True`` they return
``(prediction, uncertainty)``, the uncertainty being the predictor's own spread per spot and gene
in log-normalised units (docs/model.md, "Uncertainty"): the standard deviation of the zero-shot
softmax over the value grid (with the checkpoint's residual spread at the predicted value when
stored), the (weighted) standard deviation of the retrieved neighbours'
values, the ridge's predictive standard deviation (``None`` for a stored probe that predates it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import Default
from ..errors import ConfigError, InputError
from ..model.grid_term import value_sentence_embeddings
from .ridge_spread import loo_gene_mse, predictive_std, ridge_cov, variance_head
from .zero_shot_spread import spread_variance

WEIGHTINGS = ("mean", "inverse_distance", "inverse_square")


def _as_tensor(x, device=None, dtype=torch.float32) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    return x.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------- zero-shot
#: the one-gene sentences "g at v", without gradients (model/grid_term.py: the same ones the
#: value-grid term trains)
zero_shot_sentence_embeddings = torch.no_grad()(value_sentence_embeddings)


def _weights_stamp(model) -> tuple:
    """Changes whenever a text-encoder weight or the value range is modified in place or replaced."""
    ts = list(model.text.parameters()) + list(model.text.buffers()) + [model.value_lo, model.value_hi]
    return tuple((t.data_ptr(), t._version, str(t.device)) for t in ts)


def _sentences(model, gi: torch.Tensor, n_grid: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid values and sentence embeddings, memoised on the (eval-mode) model: prediction in
    chunks of spots then embeds the G x V sentences once, not once per chunk."""
    key = (tuple(gi.tolist()), n_grid, _weights_stamp(model))
    memo = model.__dict__.get("_comtip_zero_shot_memo")
    if memo is not None and memo[0] == key and not model.training:
        return memo[1], memo[2]
    values = model.value_grid(gi, n_grid).float()
    text = zero_shot_sentence_embeddings(model, gi, values, chunk)
    if not model.training:
        model.__dict__["_comtip_zero_shot_memo"] = (key, values, text)
    return values, text


@torch.no_grad()
def zero_shot(
    model,
    image_emb,
    gene_indices: Sequence[int | str] | torch.Tensor | None = None,
    grid: int | None = None,
    temperature: float | None = None,
    *,
    chunk: int | None = None,
    spot_chunk: int = 4096,
    return_std: bool = False,
    spread: dict | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Zero-shot expression (N, G') of genes ``gene_indices`` (panel indices or symbols; None = all).

    For each gene g, sentences "g at v" for ``grid`` values v evenly spanning the gene's training
    range (``model.value_grid``) are embedded in one batched ``encode_genes`` pass (chunked);
    similarities s_iv = <image_i, text_gv> become p_iv = softmax_v(s_iv / T) and the prediction
    is sum_v p_iv * v. T defaults to the model's learned CLIP temperature (1 / logit_scale),
    the temperature its similarities were trained with. ``return_std``: also the standard
    deviation of v under p_i (the softmax's spread), through the same calibration line (|b| sd);
    with ``spread`` (a checkpoint's ``zero_shot_spread`` entry, engine/zero_shot_spread.py) the
    residual variance of zero-shot on labelled spots at the predicted value is added to its square.
    """
    if not model.text.encodes_values:
        raise ConfigError(
            f"zero-shot prediction needs a model whose text encoder reads expression values; this one has text.mode={model.config.text.mode!r}",
            hint="use --mode retrieval or --mode probe with this checkpoint",
        )
    cfg = model.config.zero_shot
    if gene_indices is None:
        gi = torch.arange(model.n_genes)
    elif isinstance(gene_indices, torch.Tensor):
        gi = gene_indices.long().cpu()
    else:
        gi = model.gene_index(list(gene_indices))
    n_grid = int(grid or cfg.grid)
    if n_grid < 2:
        raise ConfigError(f"zero-shot grid must have at least 2 values, got {n_grid}")
    temp = float(temperature) if temperature is not None else (cfg.temperature or model.temperature())
    if not temp > 0:
        raise ConfigError(f"zero-shot temperature must be > 0, got {temp}")
    was_training = model.training
    model.eval()
    try:
        values, text = _sentences(model, gi, n_grid, int(chunk or cfg.chunk))  # (G', V), (G', V, D)
    finally:
        model.train(was_training)
    img = _as_tensor(image_emb, device=text.device)
    if img.ndim != 2 or img.shape[1] != text.shape[-1]:
        raise InputError(f"image embeddings have shape {tuple(img.shape)}, expected (N, {text.shape[-1]})")
    img = F.normalize(img, dim=-1)
    out = np.empty((img.shape[0], gi.numel()), dtype=np.float32)
    sd = np.empty_like(out) if return_std else None
    flat = text.reshape(-1, text.shape[-1])  # (G' V, D)
    vals = values.to(text.device)
    for s in range(0, img.shape[0], spot_chunk):
        sim = (img[s : s + spot_chunk] @ flat.t()).view(-1, gi.numel(), n_grid)  # (n, G', V)
        p = torch.softmax(sim / temp, dim=-1)
        mu = (p * vals).sum(-1)
        out[s : s + spot_chunk] = mu.cpu().numpy()
        if sd is not None:
            var = (p * (vals - mu.unsqueeze(-1)) ** 2).sum(-1)
            sd[s : s + spot_chunk] = var.clamp_min(0.0).sqrt().cpu().numpy()
    cal = getattr(model, "value_cal", None)
    if cal is not None:  # expected within-spot value -> log-normalised units (per-gene line, training spots)
        c = cal[:, gi].float().cpu().numpy()
        out = c[0] + c[1] * out
        if sd is not None:
            sd = np.abs(c[1]) * sd
    if sd is not None and spread is not None:
        sd = np.sqrt(sd.astype(np.float64) ** 2 + spread_variance(spread, out, gi.numpy()))
    if sd is not None:
        return out.astype(np.float32), sd.astype(np.float32)
    return out.astype(np.float32)


# ---------------------------------------------------------------------------- retrieval
@torch.no_grad()
def retrieval(
    image_emb,
    bank_emb,
    bank_expr,
    k: int = Default.RETRIEVAL_K,
    weighting: str = "mean",
    *,
    chunk: int = 2048,
    device: str | torch.device | None = None,
    return_std: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """BLEEP-style prediction (N, G): aggregate the expression of the k most cosine-similar bank spots.

    ``weighting``: ``mean`` (BLEEP), ``inverse_distance`` (1/d) or ``inverse_square`` (1/d^2,
    mclSTExp), with d the Euclidean distance between L2-normalised embeddings. ``return_std``:
    also the standard deviation of the k neighbours' values around the prediction, with the
    same weights (the population form: a spot whose neighbours all agree gets 0).
    """
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"retrieval weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    q = F.normalize(_as_tensor(image_emb, device), dim=-1)
    b = F.normalize(_as_tensor(bank_emb, q.device), dim=-1)
    y = _as_tensor(bank_expr, q.device)
    if q.ndim != 2 or b.ndim != 2 or q.shape[1] != b.shape[1]:
        raise InputError(f"embedding shapes do not match: query {tuple(q.shape)}, bank {tuple(b.shape)}")
    if y.shape[0] != b.shape[0]:
        raise InputError(f"bank has {b.shape[0]} embeddings but {y.shape[0]} expression rows")
    if b.shape[0] == 0:
        raise InputError("the retrieval reference bank is empty")
    k = max(1, min(int(k), b.shape[0]))
    out = np.empty((q.shape[0], y.shape[1]), dtype=np.float32)
    sd = np.empty_like(out) if return_std else None
    for s in range(0, q.shape[0], chunk):
        sim = q[s : s + chunk] @ b.t()
        top, idx = sim.topk(k, dim=1)
        neigh = y[idx]  # (n, k, G)
        if weighting == "mean":
            w = torch.full(top.shape, 1.0 / k, dtype=neigh.dtype, device=neigh.device)
        else:
            d = (2.0 - 2.0 * top).clamp_min(0.0)  # squared distance of unit vectors
            w = 1.0 / (d.sqrt() + 1e-6) if weighting == "inverse_distance" else 1.0 / (d + 1e-6)
            w = w / w.sum(1, keepdim=True)
        pred = (w.unsqueeze(-1) * neigh).sum(1)
        out[s : s + chunk] = pred.cpu().numpy()
        if sd is not None:
            var = (w.unsqueeze(-1) * (neigh - pred.unsqueeze(1)) ** 2).sum(1)
            sd[s : s + chunk] = var.clamp_min(0.0).sqrt().cpu().numpy()
    return (out, sd) if sd is not None else out


# ---------------------------------------------------------------------------- ridge probe
@dataclass
class Probe:
    """A ridge regression on standardised frozen image features: y = ((x - mean) / std) @ W + b."""

    weight: np.ndarray  # (F, G) float32
    bias: np.ndarray  # (G,)
    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,)
    alpha: float
    genes: list[str] | None = None
    alpha_scores: dict[float, float] | None = None  # LOO error per candidate alpha (when chosen automatically)
    # the predictive spread (engine/ridge_spread.py); None in probes stored before it existed
    cov: np.ndarray | None = None  # (F, F) (Z^T Z + alpha I)^-1 of the standardised training features Z
    resid_var: np.ndarray | None = None  # (G,) each gene's held-out residual variance at the chosen alpha
    n_train: int | None = None  # training spots (the intercept's share of the spread, 1 / n)
    resid_rule: str | None = None  # how resid_var was measured
    var_weight: np.ndarray | None = None  # (F, G) the log-variance model (its mean: log resid_var)
    var_bias: np.ndarray | None = None  # (G,)
    var_clip: np.ndarray | None = None  # (2, G) its range on the training spots

    @property
    def has_spread(self) -> bool:
        return self.cov is not None and self.resid_var is not None

    def set_resid_var(self, resid_var: np.ndarray, rule: str) -> None:
        """Another held-out residual variance (e.g. of spatial blocks): the variance model keeps its shape."""
        new = np.asarray(resid_var, np.float64)
        if self.var_bias is not None and self.resid_var is not None:
            ratio = np.maximum(new, 1e-12) / np.maximum(np.asarray(self.resid_var, np.float64), 1e-12)
            self.var_bias = (self.var_bias + np.log(ratio)).astype(np.float32)
        self.resid_var = new.astype(np.float32)
        self.resid_rule = rule

    def to_dict(self) -> dict:
        """Tensors and primitives (can be stored in a checkpoint's ``probe`` entry)."""
        spread = {} if not self.has_spread else {
            "cov": torch.from_numpy(np.ascontiguousarray(self.cov, np.float32)),
            "resid_var": torch.from_numpy(np.ascontiguousarray(self.resid_var, np.float32)),
            "n_train": int(self.n_train or 0), "resid_rule": str(self.resid_rule or ""),
            **({} if self.var_weight is None else {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k), np.float32))
                                                   for k in ("var_weight", "var_bias", "var_clip")}),
        }
        return {**spread,
            "weight": torch.from_numpy(self.weight),
            "bias": torch.from_numpy(self.bias),
            "mean": torch.from_numpy(self.mean),
            "std": torch.from_numpy(self.std),
            "alpha": float(self.alpha),
            "genes": None if self.genes is None else list(self.genes),
            "alpha_rule": getattr(self, "alpha_rule", None) or ("leave-one-out" if self.alpha_scores else "given"),
            "alpha_scores": {str(k): float(v) for k, v in (self.alpha_scores or {}).items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Probe:
        def arr(x):
            return (x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float32)

        has = d.get("cov") is not None and d.get("resid_var") is not None
        return cls(arr(d["weight"]), arr(d["bias"]), arr(d["mean"]), arr(d["std"]), float(d["alpha"]), d.get("genes"),
                   cov=arr(d["cov"]) if has else None, resid_var=arr(d["resid_var"]) if has else None,
                   n_train=int(d.get("n_train") or 0) or None, resid_rule=d.get("resid_rule") or None,
                   **{k: arr(d[k]) if has and d.get("var_weight") is not None else None
                      for k in ("var_weight", "var_bias", "var_clip")})


def loo_ridge_alpha(xs: np.ndarray, yc: np.ndarray, alphas: Sequence[float] = Default.PROBE_ALPHAS,
                   *, svd: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, dict[float, float]]:
    """The ridge penalty with the smallest exact leave-one-out error on the reference spots.

    ``xs``: standardised features (N, F); ``yc``: centred targets (N, G). One SVD gives every
    alpha's hat-matrix diagonal, hence the leave-one-out residuals in closed form (Allen's PRESS),
    averaged over spots and genes. The probe and the colour-texture floor
    (:class:`engine.baselines.RidgeFloor`) choose their penalty with this one rule, so the two
    differ only in their features. ``svd``: ``(U, S)`` of ``xs`` when the caller has it already.
    Returns ``(alpha, {alpha: LOO mean squared error})``.
    """
    u, s = svd if svd is not None else np.linalg.svd(np.asarray(xs, np.float64), full_matrices=False)[:2]
    uty = u.T @ np.asarray(yc, np.float64)
    scores = {float(a): float(np.mean(loo_gene_mse(u, s, yc, float(a), uty=uty))) for a in alphas}
    best = min(scores, key=lambda k: scores[k])
    return best, scores


def fit_probe(features, expr, alpha: float | None = Default.PROBE_ALPHA, genes: Sequence[str] | None = None) -> Probe:
    """Closed-form ridge regression (float64) of ``expr`` (N, G) on standardised ``features`` (N, F).

    ``alpha=None``: the penalty is chosen from ``Default.PROBE_ALPHAS`` by exact leave-one-out on
    these spots (:func:`loo_ridge_alpha`; the per-alpha errors are kept in ``Probe.alpha_scores``).

    The primal solve (F x F) is used when N >= F, the dual (N x N) otherwise; both give the same
    solution. The intercept is not penalised (targets are centred).
    """
    x = np.asarray(features.cpu().numpy() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    y = np.asarray(expr.cpu().numpy() if isinstance(expr, torch.Tensor) else expr, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise InputError(f"probe needs features (N, F) and expression (N, G) with the same N, got {x.shape} and {y.shape}")
    if x.shape[0] < 2:
        raise InputError(f"probe needs at least 2 reference spots, got {x.shape[0]}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InputError("probe features or expression contain NaN or infinite values")
    if alpha is not None and alpha < 0:
        raise ConfigError(f"probe alpha must be >= 0, got {alpha}")
    mean = x.mean(0)
    std = x.std(0)
    std = np.where(std < 1e-8, 1.0, std)
    xs = (x - mean) / std
    y_mean = y.mean(0)
    yc = y - y_mean
    scores = None
    u, sv, vt = np.linalg.svd(xs, full_matrices=False)
    if alpha is None:
        alpha, scores = loo_ridge_alpha(xs, yc, svd=(u, sv))
    n, f = xs.shape
    if n >= f:
        a = xs.T @ xs + alpha * np.eye(f)
        w = _solve(a, xs.T @ yc)
    else:
        a = xs @ xs.T + alpha * np.eye(n)
        w = xs.T @ _solve(a, yc)
    resid_var = loo_gene_mse(u, sv, yc, alpha)
    var_w, var_b, var_c = variance_head(u, sv, vt, yc - xs @ w, resid_var)
    return Probe(
        weight=w.astype(np.float32),
        bias=y_mean.astype(np.float32),
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
        alpha=float(alpha),
        genes=None if genes is None else [str(g) for g in genes],
        alpha_scores=scores,
        cov=ridge_cov(sv, vt, alpha).astype(np.float32),
        resid_var=resid_var.astype(np.float32),
        n_train=int(n),
        resid_rule="leave-one-out",
        var_weight=var_w.astype(np.float32),
        var_bias=var_b.astype(np.float32),
        var_clip=var_c.astype(np.float32),
    )


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:  # singular with alpha = 0: least-squares solution
        return np.linalg.lstsq(a, b, rcond=None)[0]


def probe_predict(probe: Probe | dict, features, return_std: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray | None]:
    """Apply a fitted probe to features (N, F) -> (N, G) float32.

    ``return_std``: also its predictive standard deviation (:func:`engine.ridge_spread.predictive_std`), or
    ``None`` for a probe stored without the state it needs (``Probe.has_spread``)."""
    if isinstance(probe, dict):
        probe = Probe.from_dict(probe)
    x = np.asarray(features.cpu().numpy() if isinstance(features, torch.Tensor) else features, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != probe.weight.shape[0]:
        raise InputError(f"features have shape {x.shape}, the probe expects (N, {probe.weight.shape[0]})")
    z = (x - probe.mean) / probe.std
    pred = (z @ probe.weight + probe.bias).astype(np.float32)
    if not return_std:
        return pred
    if not probe.has_spread:
        return pred, None
    return pred, predictive_std(z, probe.cov, probe.resid_var, probe.n_train, probe.var_weight, probe.var_bias,
                                probe.var_clip)


__all__ = ["Probe", "fit_probe", "loo_gene_mse", "loo_ridge_alpha", "probe_predict", "retrieval", "zero_shot",
           "zero_shot_sentence_embeddings"]
