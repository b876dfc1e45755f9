"""Classifier metrics of `distill eval` against plain-Python references."""

import math
import random

import pytest
import torch

from distill.evaluate_classify import classification_metrics, confusion_matrix, per_class_scores


def _reference(pred, true, probs, teacher, names):
    c = len(names)
    conf = [[sum(1 for p, t in zip(pred, true) if t == i and p == j) for j in range(c)] for i in range(c)]
    scores = {}
    for k in range(c):
        tp = conf[k][k]
        predicted = sum(conf[i][k] for i in range(c))
        support = sum(conf[k])
        prec = tp / predicted if predicted else 0.0
        rec = tp / support if support else 0.0
        scores[names[k]] = {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
                            "support": support}
    # ECE, 15 bins ((m-1)/M, m/M]
    bins = [[0, 0.0, 0.0] for _ in range(15)]
    for row, p, t in zip(probs, pred, true):
        top = max(row)
        b = max(0, min(14, math.ceil(top * 15) - 1))
        bins[b][0] += 1
        bins[b][1] += top
        bins[b][2] += p == t
    ece = sum(abs(h - cf) for _, cf, h in bins) / len(true)
    kl = sum(sum(tq * math.log(tq / sq) for tq, sq in zip(trow, srow)) for trow, srow in zip(teacher, probs)) / len(true)
    return conf, scores, ece, kl


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_classification_metrics_match_plain_python(classes):
    g = torch.Generator().manual_seed(classes)
    n = 97
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64) * 2
    t_logits = torch.randn(n, classes, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, classes, (n,), generator=g)
    if classes == 5:
        labels[labels == 4] = 0  # a class with no example: recall 0, not NaN
    names = [f"c{i}" for i in range(classes)]
    m = classification_metrics(logits, labels, names, teacher_logits=t_logits)
    probs = torch.softmax(logits, -1).tolist()
    t_probs = torch.softmax(t_logits, -1).tolist()
    pred = logits.argmax(-1).tolist()
    conf, scores, ece, kl = _reference(pred, labels.tolist(), probs, t_probs, names)
    assert m["confusion"] == conf
    for k in names:
        for key in ("precision", "recall", "f1"):
            assert m["per_class"][k][key] == pytest.approx(scores[k][key], abs=1e-12)
        assert m["per_class"][k]["support"] == scores[k]["support"]
    assert m["macro_f1"] == pytest.approx(sum(s["f1"] for s in scores.values()) / classes, abs=1e-12)
    assert m["accuracy"] == pytest.approx(sum(p == t for p, t in zip(pred, labels.tolist())) / n)
    assert m["ece"] == pytest.approx(ece, abs=1e-12)
    assert m["forward_kl"] == pytest.approx(kl, rel=1e-9)
    assert m["teacher_agreement"] == pytest.approx(sum(a == b for a, b in zip(pred, t_logits.argmax(-1).tolist())) / n)
    ce = -sum(math.log(probs[i][t]) for i, t in enumerate(labels.tolist())) / n
    assert m["eval_ce"] == pytest.approx(ce, rel=1e-9)
    assert sum(b["count"] for b in m["reliability"]) == n


def test_confusion_rows_are_the_truth_and_columns_the_prediction():
    c = confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([0, 1, 1]), 2)
    assert c.tolist() == [[0, 1], [1, 1]]
    s = per_class_scores(c, ["a", "b"])
    assert s["b"]["precision"] == pytest.approx(0.5) and s["a"]["recall"] == 0.0


def test_a_perfect_confident_classifier_has_no_calibration_error():
    rng = random.Random(0)
    labels = torch.tensor([rng.randrange(3) for _ in range(20)])
    logits = torch.nn.functional.one_hot(labels, 3).double() * 50
    m = classification_metrics(logits, labels, ["x", "y", "z"])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["ece"] == pytest.approx(0.0, abs=1e-12)
