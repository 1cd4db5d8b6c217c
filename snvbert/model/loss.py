"""Focal loss over the masked sites only, normalised per masked site."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def focal_loss(
    logits: Tensor, targets: Tensor, mask: Tensor, gamma: float, alpha: float | None = None
) -> Tensor:
    """Mean focal loss over the sites where ``mask`` is True.

    logits, targets, mask: (B, L). Computed from logits (``binary_cross_entropy_with_logits``),
    never from sigmoid-then-log, which loses precision at confident predictions. The sum is
    divided by the number of masked sites, not by the batch size, so training and validation
    losses are on one scale whatever the batch size or mask rate. ``gamma=0, alpha=None`` is
    exactly BCE. ``alpha`` weights ALT targets by alpha and REF targets by 1 - alpha.
    """
    t = targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")  # (B, L) = -log p_t
    loss = ce
    if gamma:
        # 1 - p_t = -expm1(-ce): exact when p_t is close to 1, where 1 - exp(-ce) would cancel.
        loss = (-torch.expm1(-ce)) ** gamma * ce
    if alpha is not None:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    m = mask.to(loss.dtype)
    # An item with no masked site contributes nothing (and no NaN).
    return (loss * m).sum() / m.sum().clamp(min=1)
