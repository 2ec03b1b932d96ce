"""Can the text side tell spots apart? A diagnostic of the Gene-Text Encoder, without images.

Both text views of a recipe are fitted, alone, by InfoNCE to a fixed target per spot (a random
projection of its whole log-normalised vector, centred and L2-normalised): the sentence encoder
(``model.text``, reading the recipe's training sentences, ``engine.batches``' sampler) and the
profile head (``model.profile_head``, the whole vector). A text view that cannot fit fixed targets
cannot align with an image either; the profile head fits them within a hundred steps. Chance is
ln(batch) = 4.16. Measured numbers: docs/results.md, round of 2026-12-06.

    python scripts/text_encoder_capacity.py --data ../shared/data/her2st --sample C2 --sample C3 --sample C4 \\
        --set text.min_genes=256 --set text.max_genes=256 --set text.p_single=0
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from napari_comtip.engine.batches import expressed_sentences, shared_sentences
from napari_comtip.engine.data import panel_matrix, select_gene_panel
from napari_comtip.engine.run_config import parse_overrides
from napari_comtip.io import load_sample
from napari_comtip.model.factory import build_model
from napari_comtip.model.presets import get_preset
from napari_comtip.model.config import apply_mapping
from napari_comtip.model.text import dense_sentence


def fit(view, batches, target, steps: int, scale: float, log) -> list[float]:
    """InfoNCE of ``view(batch)`` against ``target[batch]``; the loss every 25 steps."""
    opt = torch.optim.AdamW(view.parameters(), lr=1e-3, weight_decay=0.05)
    losses = []
    for step in range(steps):
        idx, emb = batches(step)
        loss = F.cross_entropy(emb @ target[idx].T * scale, torch.arange(len(idx)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 25 == 0:
            losses.append(loss.item())
            log(step + 1, loss.item())
    return losses


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--sample", action="append", required=True)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config key, e.g. text.pool=mean")
    ap.add_argument("--sampler", choices=("expressed", "shared"), default="expressed")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--profile-sees-sentence", action="store_true",
                    help="the profile head reads only the genes of the sentence (the others at 0): the same information")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    samples = [load_sample(a.data, sample=s) for s in a.sample]
    panel = select_gene_panel([s.expression for s in samples])
    x = torch.tensor(np.concatenate([panel_matrix(s.expression, panel, s.name) for s in samples]), dtype=torch.float32)
    cfg = get_preset(a.preset)
    # --set keys are model keys (text.pool=mean): the CLI's parser, under model.
    apply_mapping(cfg, parse_overrides([f"model.{kv}" for kv in a.set + ["w_profile=1.0"]])["model"], prefix="")
    cfg.validate()
    model = build_model(cfg, panel)
    model.set_gene_stats(x)
    values = model.text_values(x)
    target = F.normalize(x @ torch.randn(x.shape[1], cfg.embed_dim), dim=-1)
    target = F.normalize(target - target.mean(0), dim=-1)
    sampler = expressed_sentences if a.sampler == "expressed" else shared_sentences
    scale = 1.0 / cfg.init_temperature

    def draw(step: int) -> torch.Tensor:  # the same batches for both views
        return torch.randperm(len(x), generator=torch.Generator().manual_seed(step))[: a.batch]

    def sentences(step):
        idx = draw(step)
        gi, gv, gm = sampler(values[idx], cfg.text, 10.0, torch.Generator().manual_seed(step))
        return idx, model.text(gi, gv, gm)

    def profiles(step):
        idx = draw(step)
        if not a.profile_sees_sentence:
            return idx, model.profile_head(x[idx])
        gi, gv, gm = sampler(values[idx], cfg.text, 10.0, torch.Generator().manual_seed(step))
        keep = dense_sentence(gi, gv, gm, x.shape[1])[:, x.shape[1]:]  # the flags of the sentence's genes
        return idx, model.profile_head(x[idx] * keep)

    print(f"{len(x)} spots, {len(panel)} genes; chance {np.log(a.batch):.2f}")
    for name, view, batches in (("sentences", model.text, sentences), ("profile", model.profile_head, profiles)):
        fit(view, batches, target, a.steps, scale, lambda s, v, n=name: print(f"{n:10s} step {s:4d}  InfoNCE {v:.3f}", flush=True))


if __name__ == "__main__":
    main()
