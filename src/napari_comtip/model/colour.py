"""Colour-texture statistics of H&E patches: the colour-texture floor's 70 features, in torch.

One definition for two users: the non-learned floor (``engine/baselines.py``, on 224 px patches,
peers.md) and the probe's optional morphology prior (``vision.colour_features``: the same
statistics of the encoder's own input patch appended to its pooled features, docs/model.md).
Per patch (RGB in [0, 1]):

* RGB and HSV channel means and standard deviations (12);
* 8-bin histograms of R, G, B, H, S, V (48);
* darkness: fraction of pixels with value below 0.3, 0.45 and 0.6 (nuclei / dense stroma),
  and of near-white pixels (value > 0.85 and saturation < 0.1: glass, fat) (4);
* gradients: Sobel magnitude of the grey image, mean / std / 90th percentile, at full and at
  half resolution (6).
"""

from __future__ import annotations

import torch

N_COLOUR_FEATURES = 70
_GREY = (0.299, 0.587, 0.114)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(..., 3) float in [0, 1] -> HSV in [0, 1]."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx = x.amax(-1)
    mn = x.amin(-1)
    d = mx - mn
    s = torch.where(mx > 0, d / mx.clamp_min(1e-8), torch.zeros_like(mx))
    dd = d.clamp_min(1e-8)
    h = torch.where(mx == r, torch.remainder((g - b) / dd, 6.0),
                    torch.where(mx == g, (b - r) / dd + 2, (r - g) / dd + 4))
    h = torch.where(d > 0, h / 6.0, torch.zeros_like(h))
    return torch.stack([h, s, mx], -1)


def _sobel_mag(g: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of a (B, H, W) image (valid region)."""
    gx = (g[:, :-2, 2:] + 2 * g[:, 1:-1, 2:] + g[:, 2:, 2:]) - (g[:, :-2, :-2] + 2 * g[:, 1:-1, :-2] + g[:, 2:, :-2])
    gy = (g[:, 2:, :-2] + 2 * g[:, 2:, 1:-1] + g[:, 2:, 2:]) - (g[:, :-2, :-2] + 2 * g[:, :-2, 1:-1] + g[:, :-2, 2:])
    return torch.sqrt(gx * gx + gy * gy)


def row_quantile(v: torch.Tensor, q: "float | torch.Tensor") -> torch.Tensor:
    """``torch.quantile(v, q, dim=1)`` of a (B, P) tensor, in row chunks under torch's input limit
    (2**24 elements), so large batches of large patches work: (B,) for a float q, (len(q), B) else."""
    rows = max(1, (1 << 24) // max(1, v.shape[1]) - 1)
    if v.shape[0] <= rows:
        return torch.quantile(v, q, dim=1)
    return torch.cat([torch.quantile(v[s:s + rows], q, dim=1) for s in range(0, v.shape[0], rows)], -1)


def _hist8(v: torch.Tensor) -> torch.Tensor:
    """(B, P) values in [0, 1] -> (B, 8) bin fractions (bin = floor(8 v), clipped to 0..7)."""
    idx = (v * 8).long().clamp(0, 7)
    counts = torch.zeros(v.shape[0], 8, dtype=v.dtype, device=v.device).scatter_add_(1, idx, torch.ones_like(v))
    return counts / v.shape[1]


@torch.no_grad()
def colour_texture(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) float RGB in [0, 1] -> (B, 70) float32 statistics (see the module docstring);
    in float32 even inside the encoder's CUDA autocast, so a GPU reads the statistics a CPU fitted."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _colour_texture(x.float())


def _colour_texture(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    if b == 0:
        return x.new_zeros((0, N_COLOUR_FEATURES))
    hsv = rgb_to_hsv(x)
    rgb_f, hsv_f = x.reshape(b, -1, 3), hsv.reshape(b, -1, 3)
    feats = [rgb_f.mean(1), rgb_f.std(1, unbiased=False), hsv_f.mean(1), hsv_f.std(1, unbiased=False)]
    for flat in (rgb_f, hsv_f):
        for c in range(3):
            feats.append(_hist8(flat[:, :, c]))
    v, sat = hsv_f[:, :, 2], hsv_f[:, :, 1]
    feats.append(torch.stack([(v < 0.3).float().mean(1), (v < 0.45).float().mean(1), (v < 0.6).float().mean(1),
                              ((v > 0.85) & (sat < 0.1)).float().mean(1)], 1))
    grey = x @ torch.tensor(_GREY, dtype=x.dtype, device=x.device)
    for g in (grey, grey[:, ::2, ::2]):
        m = _sobel_mag(g).reshape(b, -1)
        feats.append(torch.stack([m.mean(1), m.std(1, unbiased=False), row_quantile(m, 0.9)], 1))
    return torch.cat(feats, 1)


__all__ = ["N_COLOUR_FEATURES", "colour_texture", "rgb_to_hsv", "row_quantile"]
