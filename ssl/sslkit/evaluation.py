"""Frozen-feature evaluation: weighted kNN (DINO protocol: cosine similarity, k=20, T=0.07)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(embed: Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for batch in loader:
        f = embed(batch["images"].to(device))  # (B, C)
        feats.append(F.normalize(f.float(), dim=1).cpu())
        labels.append(batch["labels"])
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_classify(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024) -> dict[str, float]:
    """Weighted kNN on L2-normalized features. Returns top-1 / top-5 accuracy in percent."""
    num_classes = int(num_classes or int(max(train_y.max(), test_y.max())) + 1)
    k = min(k, train_f.shape[0])
    top1 = top5 = 0
    for i in range(0, test_f.shape[0], chunk):
        sim = test_f[i:i + chunk] @ train_f.T  # (b, N) cosine similarities
        w, idx = sim.topk(k, dim=1)  # (b, k)
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_y[idx], (w / temperature).exp())
        pred = votes.topk(min(5, num_classes), dim=1).indices  # (b, 5)
        y = test_y[i:i + chunk]
        top1 += (pred[:, 0] == y).sum().item()
        top5 += (pred == y[:, None]).any(dim=1).sum().item()
    n = test_f.shape[0]
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}
