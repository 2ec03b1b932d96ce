"""Image self-distillation against an EMA teacher (``w_image_ssl``, *our decision*; docs/model.md
"Image self-distillation").

The paper's masked branch reconstructs the features of the same network (stop-gradient; no
teacher), and at the CPU recipe's 4 x 4 tokens MFM did not help (docs/results.md). This term is
the other image-only pretext the issue names: BYOL-style self-distillation on the pooled ViT
features. Two views of one tissue patch (the training view and a second, independently augmented
and cropped view, engine/batches.py ``random_crops``) pass through the ViT; the student's
projection and predictor must match the projection of the *other* view by an exponential moving
average (EMA) of the student (the teacher, no gradient), ``2 - 2 cos``, symmetrised. It runs on
the spots of the batch and on the unlabelled tissue patches between and around them
(``data.unlabelled``), so the image side learns from all the tissue of the training slides, not
only from the spots that carry expression.

* :class:`ImageSSLHead` -- the student's projector and predictor (stored in the checkpoint, unused
  at inference);
* :class:`EmaTeacher` -- the teacher's copies of the vision branch and projector, its update and
  its resumable state (held by the training engine, not the checkpoint);
* :func:`image_ssl_loss` -- the symmetrised loss from the two views' pooled student features.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


class ImageSSLHead(nn.Module):
    """BYOL's projector (pooled ViT features -> ``dim``) and predictor (``dim`` -> ``dim``)."""

    def __init__(self, feature_dim: int, dim: int):
        super().__init__()
        self.projector = _mlp(feature_dim, 2 * dim, dim)
        self.predictor = _mlp(dim, 2 * dim, dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(pooled))


class EmaTeacher:
    """The EMA copies of ``model.vision`` and ``model.image_ssl_head.projector``.

    Not an ``nn.Module`` attribute of the model, so DDP, the optimizer and the checkpoint never see
    it; every process updates its own copy from the same (all-reduced) student weights."""

    def __init__(self, model, momentum: float):
        self.momentum = float(momentum)
        self.vision = copy.deepcopy(model.vision)
        self.projector = copy.deepcopy(model.image_ssl_head.projector)
        for p in self.parameters():
            p.requires_grad_(False)
        self.vision.eval()  # no drop-path noise in the targets
        self.projector.train()  # batch statistics in its BatchNorm, as BYOL's target network

    def parameters(self):
        yield from self.vision.parameters()
        yield from self.projector.parameters()

    def _pairs(self, model):
        yield from zip(self.vision.parameters(), model.vision.parameters())
        yield from zip(self.projector.parameters(), model.image_ssl_head.projector.parameters())

    @torch.no_grad()
    def update(self, model) -> None:
        """``teacher = m * teacher + (1 - m) * student`` for every weight (after an optimizer step)."""
        for t, s in self._pairs(model):
            t.mul_(self.momentum).add_(s.detach().to(t.dtype), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised teacher projections of preprocessed images ``x`` (B, 3, H, W)."""
        tokens = self.vision.forward_tokens(x)
        return F.normalize(self.projector(self.vision.pool(tokens).float()), dim=-1)

    def to(self, device) -> EmaTeacher:
        self.vision.to(device)
        self.projector.to(device)
        return self

    def state_dict(self) -> dict:
        return {"vision": self.vision.state_dict(), "projector": self.projector.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.vision.load_state_dict(state["vision"])
        self.projector.load_state_dict(state["projector"])


def _byol(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (2.0 - 2.0 * (F.normalize(p.float(), dim=-1) * z).sum(-1)).mean()


def image_ssl_loss(model, teacher: EmaTeacher, pooled_a: torch.Tensor, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
    """The symmetrised BYOL loss of two views of the same patches: ``pooled_a`` the student's pooled
    features of view a (with gradient; the InfoNCE forward's own for the spots), ``x_a`` / ``x_b``
    the preprocessed views (B, 3, H, W) in the same order. The student encodes view b here."""
    vision, head = model.vision, model.image_ssl_head
    pooled_b = vision.pool(vision.forward_tokens(x_b))
    z_a, z_b = teacher.embed(x_a), teacher.embed(x_b)
    return 0.5 * (_byol(head(pooled_a), z_b) + _byol(head(pooled_b), z_a))


__all__ = ["ImageSSLHead", "EmaTeacher", "image_ssl_loss"]
