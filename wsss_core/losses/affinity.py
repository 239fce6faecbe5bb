"""AffinityNet's loss (PSA, Ahn & Kwak, CVPR 2018): ``L = L_fg+/4 + L_bg+/4 + L−/2``.

Positive pairs (the same class; foreground and background counted apart, since background pairs
far outnumber the rest) are pulled to affinity 1 by ``−log W``, negative pairs (different labels)
to 0 by ``−log(1 − W)``; each term is a mean over its own pairs.
"""

from __future__ import annotations

import torch

EPS = 1e-5  # the authors' guard inside the logs


def affinity_loss(affinity: torch.Tensor, pair_labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The three terms and their weighted sum.

    Args:
        affinity: [B, P, h, w] predicted ``W`` in (0, 1] (:func:`wsss_core.pairs.pair_affinity`).
        pair_labels: ``bg_pos``, ``fg_pos``, ``neg``: bool [B, P, h, w]
            (:func:`wsss_core.refine.affinity_labels.affinity_labels`).

    Returns:
        ``bg_pos``, ``fg_pos``, ``neg`` (each a mean over its pairs; 0 when there are none) and
        ``total`` = bg_pos/4 + fg_pos/4 + neg/2 (scalars).
    """
    w = affinity.float()
    pos, neg = -torch.log(w + EPS), -torch.log(1 + EPS - w)
    terms = {}
    for key, per_pair in (("bg_pos", pos), ("fg_pos", pos), ("neg", neg)):
        m = pair_labels[key].to(w.dtype)
        terms[key] = (per_pair * m).sum() / (m.sum() + EPS)
    terms["total"] = terms["bg_pos"] / 4 + terms["fg_pos"] / 4 + terms["neg"] / 2
    return terms
