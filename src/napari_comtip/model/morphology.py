"""Morphology statistics of H&E patches at full resolution: the probe's optional high-resolution prior.

The encoder of the CPU recipes reads a 155 um patch at 64 or 128 px, where a nucleus is two to
five pixels wide; the colour-texture statistics of that input (model/colour.py) inherit its
resolution. With ``vision.morphology_px`` the patch is read at that side instead (224 px is
0.69 um/px, the peers' crops and the floor's), the ViT still sees it at ``vision.img_size``, and
the probe also reads, per patch (RGB in [0, 1]):

* the 70 colour-texture statistics of model/colour.py at this resolution (the floor's features);
* colour deconvolution into haematoxylin, eosin and DAB optical densities (Ruifrok & Johnston,
  the matrix of ``skimage.color.hed_from_rgb``): H and E mean, std and 10th / 50th / 90th
  percentiles, DAB mean and std (12);
* nuclei, from the haematoxylin density smoothed at 1 um: the patch's Otsu threshold, the
  fraction of nuclear pixels above it, nuclear density (local maxima of the density within 3 um,
  above the threshold, per 0.01 mm2), mean nuclear area (the nuclear fraction's area over that
  count, um2), haematoxylin inside and outside the nuclear mask, eosin outside it, and the
  gradient magnitude of the smoothed density (mean / std / 90th percentile) (10).

92 numbers, every one of them defined in physical units or as a fraction, so a patch read at
another side (``um_per_px``) gives comparable values. Vectorised torch, on the model's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .colour import N_COLOUR_FEATURES, _sobel_mag, colour_texture, row_quantile

N_HED_FEATURES = 12
N_NUCLEAR_FEATURES = 10
N_MORPHOLOGY_FEATURES = N_COLOUR_FEATURES + N_HED_FEATURES + N_NUCLEAR_FEATURES
NUCLEUS_SMOOTH_UM = 1.0  # Gaussian sigma of the haematoxylin density before thresholding
NUCLEUS_RADIUS_UM = 3.0  # two maxima closer than this are one nucleus
_OTSU_BINS = 64
_LOG_ADJUST = math.log(1e-6)  # skimage.color.separate_stains' Beer-Lambert compensation


def _hed_matrix(device, dtype) -> torch.Tensor:
    from skimage.color import hed_from_rgb

    return torch.as_tensor(hed_from_rgb, dtype=dtype, device=device)


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """(..., 3) RGB in [0, 1] -> (..., 3) H, E, DAB densities, as ``skimage.color.rgb2hed``."""
    stains = (torch.log(x.clamp_min(1e-6)) / _LOG_ADJUST) @ _hed_matrix(x.device, x.dtype)
    return stains.clamp_min(0.0)


def _gaussian_blur(img: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """(B, H, W) -> the same, separable Gaussian (reflect padding)."""
    r = max(1, int(math.ceil(3 * sigma_px)))
    t = torch.arange(-r, r + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-0.5 * (t / sigma_px) ** 2)
    k = k / k.sum()
    y = F.pad(img.unsqueeze(1), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y.squeeze(1)


def otsu_threshold(v: torch.Tensor, bins: int = _OTSU_BINS) -> torch.Tensor:
    """Per-row Otsu threshold of (B, P) values (histogram over each row's [min, max])."""
    lo = v.amin(1, keepdim=True)
    hi = v.amax(1, keepdim=True)
    width = (hi - lo).clamp_min(1e-8)
    idx = ((v - lo) / width * bins).long().clamp(0, bins - 1)
    hist = torch.zeros(v.shape[0], bins, dtype=v.dtype, device=v.device).scatter_add_(1, idx, torch.ones_like(v))
    p = hist / v.shape[1]
    centres = (torch.arange(bins, dtype=v.dtype, device=v.device) + 0.5) / bins
    w0 = p.cumsum(1)
    m0 = (p * centres).cumsum(1)
    mt = m0[:, -1:]
    between = (mt * w0 - m0) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    k = between[:, :-1].argmax(1, keepdim=True)  # threshold after bin k
    return (lo + (k.to(v.dtype) + 1) / bins * width).squeeze(1)


def _nuclear(h: torch.Tensor, e: torch.Tensor, um_per_px: float) -> torch.Tensor:
    """(B, H, W) haematoxylin and eosin densities -> (B, 10) nuclear statistics (module docstring)."""
    b = h.shape[0]
    hs = _gaussian_blur(h, NUCLEUS_SMOOTH_UM / um_per_px)
    flat = hs.reshape(b, -1)
    thr = otsu_threshold(flat)
    mask = hs > thr.view(b, 1, 1)
    frac = mask.float().mean((1, 2))
    k = 2 * max(1, int(round(NUCLEUS_RADIUS_UM / um_per_px))) + 1
    # a plateau of equal values (a flat-stained nucleus, an upsampled read) is one maximum, not many:
    # ties are broken by a ramp far below any stain difference
    # (in float64, where a ramp of 1e-9 over the patch still separates neighbours)
    ramp = torch.arange(hs.shape[1] * hs.shape[2], dtype=torch.float64, device=hs.device).view(1, *hs.shape[1:])
    ht = hs.double() + ramp * (1e-9 / ramp.numel())
    y = F.max_pool2d(ht.unsqueeze(1), (1, k), stride=1, padding=(0, k // 2))  # a k x k window, separably
    peaks = (ht == F.max_pool2d(y, (k, 1), stride=1, padding=(k // 2, 0)).squeeze(1)) & mask
    area_um2 = hs.shape[1] * hs.shape[2] * um_per_px ** 2
    count = peaks.float().sum((1, 2))
    density = count / (area_um2 / 1e4)  # per 0.01 mm2
    nuc_area = frac * area_um2 / count.clamp_min(1.0)
    m = mask.float()
    out = 1 - m
    n_out = out.sum((1, 2)).clamp_min(1.0)
    inside = (hs * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(1.0)
    outside = (hs * out).sum((1, 2)) / n_out
    e_out = (e * out).sum((1, 2)) / n_out
    g = _sobel_mag(hs).reshape(b, -1) / um_per_px
    return torch.stack([thr, frac, density, nuc_area, inside, outside, e_out,
                        g.mean(1), g.std(1, unbiased=False), row_quantile(g, 0.9)], 1)


@torch.no_grad()
def morphology_stats(x: torch.Tensor, um_per_px: float) -> torch.Tensor:
    """(B, H, W, 3) float RGB in [0, 1], read at ``um_per_px`` -> (B, 92) float32 statistics."""
    if not (um_per_px > 0 and math.isfinite(um_per_px)):
        raise ValueError(f"um_per_px must be a positive number, got {um_per_px!r}")
    # in float32 even inside the encoder's CUDA autocast: half precision would blur the stain
    # densities' small differences that the threshold and the nuclear maxima read
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _stats(x.float(), um_per_px)


def _stats(x: torch.Tensor, um_per_px: float) -> torch.Tensor:
    b = x.shape[0]
    if b == 0:
        return x.new_zeros((0, N_MORPHOLOGY_FEATURES))
    hed = rgb_to_hed(x)
    q = torch.tensor([0.1, 0.5, 0.9], dtype=x.dtype, device=x.device)
    parts = [colour_texture(x)]
    for c in (0, 1):
        v = hed[..., c].reshape(b, -1)
        parts += [v.mean(1, keepdim=True), v.std(1, unbiased=False, keepdim=True), row_quantile(v, q).T]
    d = hed[..., 2].reshape(b, -1)
    parts += [d.mean(1, keepdim=True), d.std(1, unbiased=False, keepdim=True)]
    parts.append(_nuclear(hed[..., 0], hed[..., 1], um_per_px))
    return torch.cat(parts, 1).float()


__all__ = ["N_MORPHOLOGY_FEATURES", "morphology_stats", "otsu_threshold", "rgb_to_hed"]
