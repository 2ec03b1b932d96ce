"""The expression-only term (``w_text_ssl``, *our decision*; docs/model.md "Expression-only term").

A gene sentence holds a few drawn genes of a spot (a log-uniform 1-32 of about 1,000 in ``tiny``),
and the sentence InfoNCE against images stays near chance: from a few hundred spots the text
encoder does not learn what a spot's genes say about each other. Expression without images is far
more plentiful (24 her2st sections, about 10,400 spots, in ``../shared/data/her2st_counts_only``),
so this term trains the text side on it alone: two sentences drawn independently from one spot's
expression (engine/batches.py ``BatchSet.ssl_views``) must find each other among the batch's spots,
a symmetric InfoNCE at the model's temperature (SimCLR on gene subsets). For a one-gene view
"g at v" it asks the sentence to point at the spots where g is at v, which is the question
zero-shot asks of an image.
"""

from __future__ import annotations

import torch

from .comtip import clip_loss


def text_ssl_loss(model, views: tuple) -> torch.Tensor:
    """InfoNCE between the two views ``(gene_idx, values, mask) * 2`` of the same spots."""
    gi_a, v_a, m_a, gi_b, v_b, m_b = views
    a = model.encode_genes(gi_a, v_a, m_a)
    b = model.encode_genes(gi_b, v_b, m_b)
    return clip_loss(a, b, model.scale())


__all__ = ["text_ssl_loss"]
