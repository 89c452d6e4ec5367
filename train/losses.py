"""Generalised Dice loss of SRCSM §4.2 (background included, squared prediction in the denominator), and
the optional cross-entropy term of ``loss: gdl_ce``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def generalized_dice_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float = 1e-8,
                          weight_eps: float = 1e-4) -> torch.Tensor:
    """``1 − 2·(Σ_l w_l Σ_v g·p + ε)/(Σ_l w_l Σ_v (g + p²) + ε)`` with ``w_l = 1/((Σ_v g)² + 1e-4)``,
    averaged over the batch. Labels absent from a patch get a large weight, pushing their probability
    to 0 (as in the paper)."""
    num_classes = logits.shape[1]
    p = torch.softmax(logits.float(), dim=1)
    g = F.one_hot(labels.long(), num_classes).movedim(-1, 1).to(p.dtype)
    dims = tuple(range(2, p.ndim))
    w = 1.0 / (g.sum(dims) ** 2 + weight_eps)
    num = (w * (g * p).sum(dims)).sum(1)
    den = (w * (g + p * p).sum(dims)).sum(1)
    return (1.0 - 2.0 * (num + eps) / (den + eps)).mean()


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "gdl") -> torch.Tensor:
    """The training objective's data term: ``gdl`` (the paper) or ``gdl_ce`` (GDL + mean voxel-wise
    cross-entropy, whose gradient does not shrink with the size of a structure)."""
    loss = generalized_dice_loss(logits, labels)
    if kind == "gdl_ce":
        loss = loss + F.cross_entropy(logits.float(), labels.long())
    elif kind != "gdl":
        raise ValueError(f"unknown loss {kind!r}; use 'gdl' or 'gdl_ce'")
    return loss


def l2_penalty(kernels: list[torch.Tensor]) -> torch.Tensor:
    return sum((k.float() ** 2).sum() for k in kernels)  # type: ignore[return-value]


def soft_dice_per_class(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Hard Dice per foreground class of an argmax prediction (validation), NaN where absent in both."""
    out = []
    for c in range(1, num_classes):
        p, g = pred == c, labels == c
        denom = p.sum() + g.sum()
        out.append(torch.tensor(float("nan")) if denom == 0 else 2.0 * (p & g).sum().float() / denom.float())
    return torch.stack(out)
