"""Classification metrics of the linear-probe tables."""
from __future__ import annotations

import torch


def topk_correct(scores: torch.Tensor, target: torch.Tensor, k: int = 1) -> int:
    """How many rows have ``target`` among their ``k`` highest scores (ties: torch's order)."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return int((top == target[:, None]).any(dim=1).sum())


def tencrop_probs(logits: torch.Tensor, n_crops: int) -> torch.Tensor:
    """Softmax of each crop's logits, averaged over the crops: [B*n, C] -> [B, C]."""
    b = logits.shape[0] // n_crops
    return torch.softmax(logits.float(), dim=1).view(b, n_crops, -1).mean(dim=1)


def accuracy(scores: torch.Tensor, target: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy in percent."""
    return 100.0 * topk_correct(scores, target, k) / max(len(target), 1)
