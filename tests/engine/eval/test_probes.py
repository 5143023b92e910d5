import torch

from engine.eval.knn import knn_eval
from engine.eval.linear_probe import linear_probe
from engine.eval.metrics import average_precision, mean_average_precision, topk_accuracy


def _clusters(n_per_class=40, classes=5, dim=16, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = centers[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 1])  # hit@1; miss@2; hit@2 only
    acc = topk_accuracy(logits, labels, ks=(1, 2))
    assert abs(acc["top1"] - 100 / 3) < 1e-4
    assert abs(acc["top2"] - 200 / 3) < 1e-4


def test_average_precision_matches_hand_computation():
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.1]])
    targets = torch.tensor([[1], [0], [1], [0]])
    # precision at the positives: 1/1, 2/3 -> AP = (1 + 2/3) / 2
    assert abs(average_precision(scores, targets)[0].item() - (1 + 2 / 3) / 2) < 1e-6
    assert (
        abs(
            mean_average_precision(torch.cat([scores, scores], 1), torch.cat([targets, targets], 1))
            - 100 * (1 + 2 / 3) / 2
        )
        < 1e-4
    )


def test_knn_separable_reaches_100():
    tr_f, tr_l = _clusters(seed=0)
    te_f, te_l = _clusters(n_per_class=10, seed=0)
    te_f = te_f + 0.05 * torch.randn_like(te_f)
    assert knn_eval(tr_f, tr_l, te_f, te_l, num_classes=5)["top1"] == 100.0


def test_knn_random_labels_near_chance():
    tr_f, _ = _clusters(seed=1)
    g = torch.Generator().manual_seed(3)
    tr_l = torch.randint(0, 5, (len(tr_f),), generator=g)
    te_f, _ = _clusters(n_per_class=40, seed=2)
    te_l = torch.randint(0, 5, (len(te_f),), generator=g)
    assert knn_eval(tr_f, tr_l, te_f, te_l, num_classes=5)["top1"] < 45.0


def test_linear_probe_separable_and_picks_on_val():
    tr_f, tr_l = _clusters(seed=0)
    va_f, va_l = _clusters(n_per_class=10, seed=0)
    va_f = va_f + 0.1 * torch.randn_like(va_f)
    res = linear_probe(tr_f, tr_l, va_f, va_l, num_classes=5, test_feats=va_f, test_labels=va_l, epochs=20)
    assert res.val["top1"] == 100.0 and res.test["top1"] == 100.0
    assert res.sweep[res.best_lr] == max(res.sweep.values())


def test_linear_probe_multilabel_map():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 8, generator=g)
    targets = torch.stack([feats[:, 0] > 0, feats[:, 1] > 0.5, feats[:, 2] < 0], 1).long()
    res = linear_probe(
        feats[:200], targets[:200], feats[200:], targets[200:], num_classes=3, multilabel=True, epochs=30
    )
    assert res.val["mAP"] > 95.0
