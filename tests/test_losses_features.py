"""distill.losses.features against plain float64 references written from the definitions (loops,
no shared helpers), on values and gradients, odd shapes and masks; plus properties (identical
inputs give 0, masked positions give 0 and no gradient) and the layer maps."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses.features import (FeatureProjection, attention_kl, check_layer_map, embedding_loss,
                                     hidden_state_loss, pool, relation_kl, rkd_angle, rkd_distance,
                                     similarity_matrix_loss, uniform_layer_map)

B, T, H_S, H_T, D_S, D_T = 3, 7, 4, 6, 20, 36


def attn(shape, seed, mask=None):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(*shape, generator=g, dtype=torch.float64) * 2
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, -1)


def ragged_mask():
    lengths = [7, 4, 1]
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)


def ref_kl_rows(p, q):
    """KL(p‖q) of two lists of probabilities, 0·log 0 = 0."""
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    fn(*tensors).sum().backward()
    return [t.grad for t in tensors]


# --------------------------------------------------------------------------------------------- layer maps


def test_uniform_layer_map_and_explicit_maps():
    assert uniform_layer_map(6, 12) == [1, 3, 5, 7, 9, 11]  # DistilBERT-style: every other layer, ending at the top
    assert uniform_layer_map(4, 12) == [2, 5, 8, 11]
    assert uniform_layer_map(3, 3) == [0, 1, 2]
    assert uniform_layer_map(5, 3) == [0, 1, 1, 2, 2]  # a deeper student shares teacher layers
    for ls, lt in ((1, 1), (2, 7), (7, 2), (12, 24)):
        m = uniform_layer_map(ls, lt)
        assert m[-1] == lt - 1 and m == sorted(m) and all(0 <= x < lt for x in m)
        assert m == [math.ceil((i + 1) * lt / ls) - 1 for i in range(ls)]
    assert check_layer_map([0, -1, 5], 3, 6) == [0, -1, 5]
    with pytest.raises(ValueError, match="3 entries"):
        check_layer_map([0, 1, 2], 2, 6)
    with pytest.raises(ValueError, match="outside"):
        check_layer_map([0, 6], 2, 6)


# --------------------------------------------------------------------------------------------- hidden states


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_matches_reference_through_a_projection(kind):
    g = torch.Generator().manual_seed(0)
    hs, ht = torch.randn(B, T, D_S, generator=g), torch.randn(B, T, D_T, generator=g)
    proj = FeatureProjection(D_S, D_T)
    torch.manual_seed(1)
    proj.linear.weight.data.normal_()
    w = proj.linear.weight.detach().double()

    def ref(h_s, h_t, weight):
        out = torch.zeros(B, T, dtype=torch.float64)
        for b in range(B):
            for t in range(T):
                x = [sum(weight[o, i] * h_s[b, t, i] for i in range(D_S)) for o in range(D_T)]
                y = h_t[b, t]
                if kind == "mse":
                    out[b, t] = sum((x[o] - y[o]) ** 2 for o in range(D_T)) / D_T
                else:
                    dot = sum(x[o] * y[o] for o in range(D_T))
                    nx = torch.sqrt(sum(v * v for v in x))  # torch: the reference's gradient flows through it
                    ny = torch.sqrt(sum(v * v for v in y))
                    out[b, t] = 1 - dot / (nx * ny)
        return out

    got = hidden_state_loss(hs, ht, kind=kind, projection=proj)
    want = ref(hs.double(), ht.double(), w)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # gradients: the student's states and the projection; never the teacher's
    hs_g = hs.clone().requires_grad_(True)
    ht_g = ht.clone().requires_grad_(True)
    hidden_state_loss(hs_g, ht_g, kind=kind, projection=proj).sum().backward()
    assert ht_g.grad is None and proj.linear.weight.grad is not None
    hs64 = hs.double().requires_grad_(True)
    w64 = w.clone().requires_grad_(True)
    ref(hs64, ht.double(), w64).sum().backward()
    torch.testing.assert_close(hs_g.grad.double(), hs64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(proj.linear.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    assert hidden_state_loss(ht, ht, kind=kind).abs().max() < 1e-6  # equal widths: no projection, 0 on itself
    with pytest.raises(ValueError, match="FeatureProjection"):
        hidden_state_loss(hs, ht)


def test_projection_is_identity_for_equal_widths_unless_forced():
    assert FeatureProjection(8, 8).linear is None and FeatureProjection(8, 8, force=True).linear is not None
    x = torch.randn(2, 8)
    assert torch.equal(FeatureProjection(8, 8)(x), x)


# --------------------------------------------------------------------------------------------- attention maps


@pytest.mark.parametrize("heads", ["match", "average"])
def test_attention_kl_matches_reference_with_padding(heads):
    mask = ragged_mask()
    h_s = H_T if heads == "match" else H_S
    s, t = attn((B, h_s, T, T), 0, mask), attn((B, H_T, T, T), 1, mask)

    def ref(q, p):
        out = torch.zeros(B, T, dtype=torch.float64)
        for b in range(B):
            for i in range(T):
                if not mask[b, i]:
                    continue
                if heads == "match":
                    out[b, i] = sum(ref_kl_rows(p[b, h, i].tolist(), q[b, h, i].tolist()) for h in range(H_T)) / H_T
                else:
                    pm = [sum(p[b, h, i, k].item() for h in range(p.shape[1])) / p.shape[1] for k in range(T)]
                    qm = [sum(q[b, h, i, k].item() for h in range(q.shape[1])) / q.shape[1] for k in range(T)]
                    out[b, i] = ref_kl_rows(pm, qm)
        return out

    got = attention_kl(s.float(), t.float(), mask, heads=heads)
    torch.testing.assert_close(got.double(), ref(s, t), rtol=1e-5, atol=1e-6)
    assert (got[~mask] == 0).all()
    assert attention_kl(t.float(), t.float(), mask, heads=heads).abs().max() < 1e-5
    # gradient w.r.t. the student's probabilities: −p/q averaged over heads, 0 at padded queries
    q = s.float().clone().requires_grad_(True)
    attention_kl(q, t.float(), mask, heads=heads).sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad.transpose(1, 2)[~mask] == 0).all()  # padded query rows
    if heads == "match":
        expected = torch.where(mask[:, None, :, None], -t / s.clamp_min(1e-12) / H_T, 0.0)
        expected = torch.where(t > 0, expected, 0.0)
        torch.testing.assert_close(q.grad.double(), expected, rtol=1e-4, atol=1e-5)


def test_attention_kl_refuses_different_head_counts_when_matching():
    with pytest.raises(ValueError, match="average"):
        attention_kl(attn((1, 2, 3, 3), 0), attn((1, 4, 3, 3), 1))


# --------------------------------------------------------------------------------------------- relations


def test_relation_kl_matches_reference_across_widths_and_masks():
    mask = ragged_mask()
    g = torch.Generator().manual_seed(3)
    xs, xt = torch.randn(B, T, D_S, generator=g), torch.randn(B, T, D_T, generator=g)
    A = 4  # 20 / 4 = 5 and 36 / 4 = 9 per relation head

    def ref(x_s, x_t):
        out = torch.zeros(B, T, dtype=torch.float64)
        for b in range(B):
            keys = [k for k in range(T) if mask[b, k]]
            for i in range(T):
                if not mask[b, i]:
                    continue
                total = 0.0
                for a in range(A):
                    rows = []
                    for x in (x_t, x_s):
                        d = x.shape[-1] // A
                        xa = x[b, :, a * d:(a + 1) * d]
                        scores = [sum(xa[i, c] * xa[k, c] for c in range(d)) / math.sqrt(d) for k in keys]
                        top = max(scores)
                        z = sum(math.exp(v - top) for v in scores)
                        rows.append([math.exp(v - top) / z for v in scores])
                    total += ref_kl_rows(rows[0], rows[1])
                out[b, i] = total / A
        return out

    got = relation_kl(xs, xt, mask, relation_heads=A)
    torch.testing.assert_close(got.double(), ref(xs.double(), xt.double()),
                               rtol=1e-4, atol=1e-6)
    assert (got[~mask] == 0).all()
    assert relation_kl(xt, xt, mask, relation_heads=A).abs().max() < 1e-5
    # gradients against autograd through a float64 dense version of the same definition
    def dense64(x_s):
        def rel(x):
            d = x.shape[-1] // A
            xa = x.view(B, T, A, d).transpose(1, 2)
            sc = (xa @ xa.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask[:, None, None, :], float("-inf"))
            return torch.log_softmax(sc, -1)
        lq, lp = rel(x_s), rel(xt.double())
        terms = torch.where(mask[:, None, None, :], lp.exp() * (lp - lq), torch.zeros((), dtype=torch.float64))
        return torch.where(mask, terms.sum(-1).mean(1), torch.zeros((), dtype=torch.float64))

    (g32,) = grads(lambda x: relation_kl(x, xt, mask, relation_heads=A), xs)
    (g64,) = grads(dense64, xs.double())
    assert torch.isfinite(g32).all()
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="relation heads"):
        relation_kl(xs, xt, relation_heads=3)


def test_causal_relation_kl_matches_reference():
    """causal=True: query i relates only to keys j <= i that are real (a decoder's relations)."""
    mask = ragged_mask()
    g = torch.Generator().manual_seed(4)
    xs, xt = torch.randn(B, T, D_S, generator=g), torch.randn(B, T, D_T, generator=g)
    A = 2
    allowed = mask[:, None, :] & torch.ones(T, T, dtype=torch.bool).tril()[None]  # (B, T_q, T_k)

    def dense64(x_s, x_t):
        def rel(x):
            d = x.shape[-1] // A
            xa = x.view(B, T, A, d).transpose(1, 2)
            sc = (xa @ xa.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed[:, None], float("-inf"))
            return torch.log_softmax(sc, -1)
        lq, lp = rel(x_s), rel(x_t)
        terms = torch.where(allowed[:, None], lp.exp() * (lp - lq), torch.zeros((), dtype=torch.float64))
        return torch.where(mask, terms.sum(-1).mean(1), torch.zeros((), dtype=torch.float64))

    got = relation_kl(xs, xt, mask, relation_heads=A, causal=True)
    torch.testing.assert_close(got.double(), dense64(xs.double(), xt.double()), rtol=1e-4, atol=1e-6)
    assert got[:, 0].abs().max() < 1e-6  # the first query sees one key: both relations are 1 there
    # the future of a query changes nothing of its causal relation, and does change the full one
    xs2 = xs.clone()
    xs2[:, -1] += 5.0
    later = relation_kl(xs2, xt, mask, relation_heads=A, causal=True)
    torch.testing.assert_close(later[:, :-1], got[:, :-1])
    assert not torch.allclose(relation_kl(xs2, xt, mask, relation_heads=A)[:, :-1],
                              relation_kl(xs, xt, mask, relation_heads=A)[:, :-1])
    (g32,) = grads(lambda x: relation_kl(x, xt, mask, relation_heads=A, causal=True), xs)
    (g64,) = grads(lambda x: dense64(x, xt.double()), xs.double())
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-6)


def test_an_all_masked_row_gives_zero_not_nan():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    x = torch.randn(2, 3, 8, requires_grad=True)
    out = relation_kl(x, torch.randn(2, 3, 8), mask, relation_heads=2)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------- examples


def test_pooling():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(pool(h, mask), torch.tensor([[1.0, 2.0], [6.0, 7.0]]))
    torch.testing.assert_close(pool(h, mask, pooling="cls"), h[:, 0])
    torch.testing.assert_close(pool(h), h.mean(1))


def test_embedding_and_similarity_matrix_losses_match_references():
    g = torch.Generator().manual_seed(4)
    es, et = torch.randn(9, D_S, generator=g), torch.randn(9, D_T, generator=g)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    s, t = es.double().tolist(), et.double().tolist()
    want = [sum((cos(s[i], s[j]) - cos(t[i], t[j])) ** 2 for j in range(9)) / 9 for i in range(9)]
    torch.testing.assert_close(similarity_matrix_loss(es, et).double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    assert similarity_matrix_loss(et, et).abs().max() < 1e-6
    assert embedding_loss(et, et).abs().max() < 1e-6 and embedding_loss(et, et, kind="mse").abs().max() == 0
    proj = FeatureProjection(D_S, D_T)
    got = embedding_loss(es, et, projection=proj)
    x = proj(es).double().tolist()
    torch.testing.assert_close(got.double(), torch.tensor([1 - cos(x[i], t[i]) for i in range(9)],
                                                          dtype=torch.float64), rtol=1e-5, atol=1e-6)


def _huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def test_rkd_distance_and_angle_match_references():
    g = torch.Generator().manual_seed(5)
    n = 6
    es, et = torch.randn(n, D_S, generator=g), torch.randn(n, D_T, generator=g) * 3

    def dist(e):
        d = [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mu for v in row] for row in d]

    s, t = es.double().tolist(), et.double().tolist()
    ds, dt = dist(s), dist(t)
    want = [sum(_huber(ds[i][j] - dt[i][j]) for j in range(n) if j != i) / (n - 1) for i in range(n)]
    torch.testing.assert_close(rkd_distance(es, et).double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)

    def angle(e, i, j, k):
        u = [a - b for a, b in zip(e[i], e[j])]
        v = [a - b for a, b in zip(e[k], e[j])]
        return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))

    want = [sum(_huber(angle(s, i, j, k) - angle(t, i, j, k)) for i in range(n) for k in range(n)
                if i != j and k != j) / (n - 1) ** 2 for j in range(n)]
    torch.testing.assert_close(rkd_angle(es, et).double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    # scale invariance (distances are normalized by their mean) and zero on itself
    assert rkd_distance(et * 7.0, et).abs().max() < 1e-5 and rkd_angle(et * 0.1, et).abs().max() < 1e-5
    # gradients against float64 autograd of the same definitions, through the student's embeddings
    def dist64(x):
        d = torch.cdist(x, x)
        off = ~torch.eye(n, dtype=torch.bool)
        d = d / d[off].mean()
        with torch.no_grad():
            tt = torch.cdist(et.double(), et.double())
            tt = tt / tt[off].mean()
        return (torch.nn.functional.smooth_l1_loss(d, tt, reduction="none") * off).sum(-1) / (n - 1)

    (g32,) = grads(lambda x: rkd_distance(x, et), es)
    (g64,) = grads(dist64, es.double())
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-6)
    (ga,) = grads(lambda x: rkd_angle(x, et), es)
    assert torch.isfinite(ga).all() and ga.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 3"):
        rkd_angle(es[:2], et[:2])
