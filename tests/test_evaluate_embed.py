"""`distill eval` for sentence encoders: each metric against a plain-Python reference, and which
folders count as encoders and how they pool."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distill.errors import UserError
from distill.evaluate_embed import (fidelity_metrics, is_encoder, knn_accuracy, pair_cosines, pooling_of,
                                    sample_pairs, spearman)


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _ranks(xs):
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return num / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_spearman_is_pearson_of_average_ranks_with_ties():
    a = [3.0, 1.0, 2.0, 2.0, 5.0, 1.0, 4.0]
    b = [2.0, 2.0, 1.0, 3.0, 6.0, 0.0, 4.0]
    assert spearman(torch.tensor(a), torch.tensor(b)) == pytest.approx(_pearson(_ranks(a), _ranks(b)), abs=1e-12)
    assert spearman(torch.tensor(a), torch.tensor(a)) == pytest.approx(1.0)
    assert spearman(torch.tensor(a), -torch.tensor(a)) == pytest.approx(-1.0)
    assert spearman(torch.tensor(a), torch.ones(7)) is None


def test_fidelity_metrics_match_loops():
    g = torch.Generator().manual_seed(0)
    n = 13
    t = torch.randn(n, 6, generator=g, dtype=torch.float64)
    e = t[:, :4] + 0.6 * torch.randn(n, 4, generator=g, dtype=torch.float64)  # another width
    got = fidelity_metrics(e.float(), t.float())
    S = [[_cos(e[i].tolist(), e[j].tolist()) for j in range(n)] for i in range(n)]
    T = [[_cos(t[i].tolist(), t[j].tolist()) for j in range(n)] for i in range(n)]
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    assert got["similarity_mse"] == pytest.approx(sum((S[i][j] - T[i][j]) ** 2 for i, j in pairs) / len(pairs),
                                                  rel=1e-5)
    upper = [(i, j) for i in range(n) for j in range(i + 1, n)]
    assert got["similarity_spearman"] == pytest.approx(
        _pearson(_ranks([S[i][j] for i, j in upper]), _ranks([T[i][j] for i, j in upper])), abs=1e-5)

    def top(M, i, k):
        return sorted((j for j in range(n) if j != i), key=lambda j: -M[i][j])[:k]

    assert got["neighbour_agreement"] == pytest.approx(sum(top(S, i, 1) == top(T, i, 1) for i in range(n)) / n)
    assert got["neighbour_overlap_10"] == pytest.approx(
        sum(len(set(top(S, i, 10)) & set(top(T, i, 10))) / 10 for i in range(n)) / n)
    assert got["cosine_to_teacher"] is None  # widths differ: the training projection is not in the student
    same = fidelity_metrics(t.float(), t.float())
    assert same["cosine_to_teacher"] == pytest.approx(1.0) and same["similarity_mse"] < 1e-10
    assert same["neighbour_agreement"] == 1.0 and same["similarity_spearman"] == pytest.approx(1.0)
    with pytest.raises(UserError, match="at least 2"):
        fidelity_metrics(t[:1].float(), t[:1].float())


def test_knn_accuracy_is_a_cosine_weighted_vote_of_the_k_nearest_others():
    g = torch.Generator().manual_seed(1)
    n, k = 30, 5
    labels = torch.randint(0, 3, (n,), generator=g)
    e = torch.randn(n, 8, generator=g) + 4.0 * torch.nn.functional.one_hot(labels, 8).float()
    correct = 0
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: -_cos(e[i].tolist(), e[j].tolist()))[:k]
        votes = [0.0, 0.0, 0.0]
        for j in others:
            votes[int(labels[j])] += max(_cos(e[i].tolist(), e[j].tolist()), 0.0) + 1e-12
        correct += max(range(3), key=lambda c: (votes[c], -c)) == int(labels[i])
    assert knn_accuracy(e, labels, k=k) == pytest.approx(correct / n)
    assert knn_accuracy(e, labels, k=k) > 0.6  # the classes are separable: a metric that cannot fail would not see it


def test_which_folders_are_encoders_and_how_they_pool(tmp_path):
    st = tmp_path / "st"
    (st / "1_Pooling").mkdir(parents=True)
    (st / "modules.json").write_text("[]")
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    bare, lm, nothing = tmp_path / "bare", tmp_path / "lm", tmp_path / "nothing"
    for folder, arch in ((bare, "BertModel"), (lm, "LlamaForCausalLM")):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": [arch]}))
    nothing.mkdir()
    assert is_encoder(str(st)) and is_encoder(str(bare))
    assert not is_encoder(str(lm)) and not is_encoder(str(nothing))
    assert pooling_of(str(st)) == "cls" and pooling_of(str(bare)) == "mean"
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": False,
                                                              "pooling_mode_mean_tokens": False,
                                                              "pooling_mode_max_tokens": True}))
    with pytest.raises(UserError, match="mean and CLS"):
        pooling_of(str(st))


def test_the_reports_pair_sample_is_pairs_of_distinct_examples_and_their_cosines():
    i, j = sample_pairs(5, 2000)  # few: all 10 pairs
    assert sorted(zip(i.tolist(), j.tolist())) == [(a, b) for a in range(5) for b in range(a + 1, 5)]
    i, j = sample_pairs(1000, 300)
    assert len(i) == 300 and bool((i < j).all()) and int(j.max()) < 1000 and int(i.min()) >= 0
    assert len(set(zip(i.tolist(), j.tolist()))) > 250  # drawn, not one pair repeated
    e = torch.randn(1000, 7, generator=torch.Generator().manual_seed(2))
    got = pair_cosines(e, i[:20], j[:20])
    for k in range(20):
        assert float(got[k]) == pytest.approx(_cos(e[int(i[k])].tolist(), e[int(j[k])].tolist()), abs=1e-9)
