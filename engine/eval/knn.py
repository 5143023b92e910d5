"""Weighted k-nearest-neighbour classifier on frozen features (Wu et al. 2018; as in DINO's eval)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.eval.metrics import mean_average_precision, topk_accuracy


@torch.no_grad()
def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class votes (N_test, C): each of the k most cosine-similar train samples votes exp(sim / T).

    train_feats: (N_train, D), train_labels: (N_train,) long, or (N_train, C) multi-hot (each
    neighbour then votes for all its classes), test_feats: (N_test, D).
    Chunked over test samples so memory stays O(chunk * N_train).
    """
    multilabel = train_labels.ndim == 2
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    k = min(k, train.shape[0])
    out = torch.empty(test.shape[0], num_classes)
    for s in range(0, test.shape[0], chunk):
        sim = test[s : s + chunk] @ train.T  # (n, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        if multilabel:
            out[s : s + chunk] = torch.einsum("nk,nkc->nc", weights, train_labels[top_idx].float())
        else:
            votes = torch.zeros(sim.shape[0], num_classes)
            votes.scatter_add_(1, train_labels[top_idx], weights)
            out[s : s + chunk] = votes
    return out


def knn_eval(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) of the weighted kNN classifier; mAP (%) for multi-hot labels."""
    scores = knn_scores(train_feats, train_labels, test_feats, num_classes, k, temperature)
    if train_labels.ndim == 2:
        return {"mAP": mean_average_precision(scores, test_labels)}
    return topk_accuracy(scores, test_labels)
