"""The sparse forward KL (top-k with tail / renormalized, sampled) against float64 references."""

import math

import pytest
import torch

from distill.losses import (SparseTargets, chunked_kd_loss, forward_kl, sampled_targets, sparse_forward_kl,
                            sparse_kd_loss, topk_targets)
from tests.reference_sparse import ref_sparse_forward_kl, ref_sparse_kd_loss

B, T, V = 3, 47, 123  # odd shapes


def logits(*shape, seed=0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def values_and_grad(fn, student, *args, **kwargs):
    student = student.detach().clone().requires_grad_()
    value = fn(student, *args, **kwargs)
    (grad,) = torch.autograd.grad(value.sum() / 29, student)  # a scaled incoming gradient, as in training
    return value.detach(), grad


@pytest.mark.parametrize("k", [1, 17, V])
@pytest.mark.parametrize("mode, temperature, target_temperature",
                         [("tail", 1.0, 1.0), ("tail", 2.0, 2.0), ("renormalized", 1.0, 1.0),
                          ("renormalized", 2.0, 0.7)])
def test_values_and_gradients_match_the_reference(k, mode, temperature, target_temperature):
    student, teacher = logits(B, T, V, seed=1), logits(B, T, V, seed=2)
    t = topk_targets(teacher, k, temperature=target_temperature)
    args = (t.ids, t.logprobs, t.log_tail)
    got = values_and_grad(sparse_forward_kl, student, *args, temperature=temperature,
                          target_temperature=target_temperature, mode=mode)
    want = values_and_grad(lambda s, *a: ref_sparse_forward_kl(s, *a, temperature, target_temperature, mode),
                           student.double(), *args)
    torch.testing.assert_close(got[0], want[0].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1].float(), rtol=1e-4, atol=1e-7)


def test_bfloat16_logits_are_upcast():
    student, teacher = logits(B, T, V, seed=3, dtype=torch.bfloat16), logits(B, T, V, seed=4)
    t = topk_targets(teacher, 9)
    got = values_and_grad(sparse_forward_kl, student, t.ids, t.logprobs, t.log_tail)
    want = values_and_grad(lambda s, *a: ref_sparse_forward_kl(s, *a), student.double(), t.ids, t.logprobs, t.log_tail)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("mode", ["tail", "renormalized"])
def test_k_equal_to_vocabulary_is_the_dense_forward_kl(mode):
    student, teacher = logits(B, T, V, seed=5), logits(B, T, V, seed=6)
    t = topk_targets(teacher, V, temperature=1.5)
    assert torch.isneginf(t.log_tail).all()
    got = values_and_grad(sparse_forward_kl, student, t.ids, t.logprobs, t.log_tail, temperature=1.5, mode=mode)
    want = values_and_grad(forward_kl, student, teacher, temperature=1.5)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-7)


def test_hand_computed_value():
    """V = 3, k = 1: p = (0.5 | tail 0.5), q = (0.25, 0.25, 0.5): buckets (0.5, 0.5) vs (0.25, 0.75)."""
    student = torch.tensor([[math.log(0.25), math.log(0.25), math.log(0.5)]])
    ids, logp, tail = torch.tensor([[0]]), torch.tensor([[math.log(0.5)]]), torch.tensor([math.log(0.5)])
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert sparse_forward_kl(student, ids, logp, tail).item() == pytest.approx(want, rel=1e-6)
    assert sparse_forward_kl(student, ids, logp, mode="renormalized").item() == pytest.approx(math.log(4), rel=1e-6)


def test_matching_student_gives_zero_and_topk_targets_sum_to_one():
    teacher = logits(B, T, V, seed=7)
    t = topk_targets(teacher, 11, temperature=2.0)
    total = torch.logaddexp(torch.logsumexp(t.logprobs, -1), t.log_tail).exp()
    torch.testing.assert_close(total, torch.ones_like(total))
    value = sparse_forward_kl(teacher, t.ids, t.logprobs, t.log_tail, temperature=2.0)
    assert value.abs().max() < 1e-5


def test_no_nan_when_the_tail_vanishes_or_the_student_puts_all_mass_on_the_ids():
    teacher = logits(2, V, seed=8)
    t = topk_targets(teacher, 5)
    # Σ_j q_j = 1 − 5e-9 (1 − Σ q_j is noise in float32), then 1 − 1e-33 (0 even in float64)
    for spread in (12.0, 40.0):
        student = torch.full((2, V), -spread).scatter(-1, t.ids, spread)
        outside = student.double().scatter(-1, t.ids, -math.inf)
        log_q_tail = torch.logsumexp(outside, -1) - torch.logsumexp(student.double(), -1)  # exact, float64
        for log_tail in (t.log_tail, torch.full((2,), -200.0), torch.full((2,), -math.inf)):
            value, grad = values_and_grad(sparse_forward_kl, student, t.ids, t.logprobs, log_tail)
            assert torch.isfinite(value).all() and torch.isfinite(grad).all()
            want = ref_sparse_forward_kl(student.double(), t.ids, t.logprobs, None, mode="top-k part")
            r = log_tail.double().exp()
            want = want + torch.where(r > 0, r * (log_tail.double() - log_q_tail), 0.0)
            torch.testing.assert_close(value, want.float(), rtol=1e-4, atol=1e-5)
            if spread == 12.0:
                ref = ref_sparse_forward_kl(student.double(), t.ids, t.logprobs, log_tail)
                torch.testing.assert_close(value, ref.float(), rtol=1e-4, atol=1e-5)


def test_empty_slots_count_as_tail_and_all_empty_gives_zero():
    student = logits(4, V, seed=9)
    ids = torch.tensor([[3, 3, 7], [5, 9, 9], [1, 2, 4], [0, 0, 0]])
    logp = torch.tensor([[math.log(0.6), -math.inf, math.log(0.1)], [math.log(0.2), math.log(0.8), -math.inf],
                         [math.log(0.5), -math.inf, -math.inf], [-math.inf] * 3])
    tail = torch.tensor([math.log(0.3), -math.inf, math.log(0.5), -math.inf])
    got = values_and_grad(sparse_forward_kl, student, ids, logp, tail)
    want = values_and_grad(lambda s, *a: ref_sparse_forward_kl(s, *a), student.double(), ids, logp, tail)
    torch.testing.assert_close(got[0], want[0].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1].float(), rtol=1e-4, atol=1e-7)
    assert got[0][3] == 0 and (got[1][3] == 0).all()


def test_tail_mode_refuses_another_temperature():
    t = topk_targets(logits(2, V, seed=10), 4, temperature=1.0)
    with pytest.raises(ValueError, match="renormalized"):
        sparse_forward_kl(logits(2, V), t.ids, t.logprobs, t.log_tail, temperature=2.0, target_temperature=1.0)
    with pytest.raises(ValueError, match="target_log_tail"):
        sparse_forward_kl(logits(2, V), t.ids, t.logprobs)
    with pytest.raises(ValueError, match="sparse mode"):
        sparse_forward_kl(logits(2, V), t.ids, t.logprobs, t.log_tail, mode="tails")


def test_sampled_targets_are_counts_and_their_gradient_is_unbiased():
    teacher = logits(V, seed=11, scale=1.5)
    rows = 4000
    t = sampled_targets(teacher.expand(rows, V), 16, temperature=1.3, generator=torch.Generator().manual_seed(0))
    counts = (t.logprobs.exp() * 16).round()
    assert (counts.sum(-1) == 16).all() and torch.isneginf(t.log_tail).all()
    assert (t.ids[:, 1:] >= t.ids[:, :-1]).all()
    student = logits(V, seed=12).requires_grad_()
    value = sparse_forward_kl(student.expand(rows, V), t.ids, t.logprobs, t.log_tail, temperature=1.3).sum() / rows
    (grad,) = torch.autograd.grad(value, student)
    (dense,) = torch.autograd.grad(forward_kl(student, teacher, temperature=1.3), student)
    assert (grad - dense).abs().max() < 0.01  # mean of q − p̂ over 4000 draws of 16: std <= 0.003


SETTINGS = dict(temperature=2.0, kd_weight=0.8, ce_weight=0.3)


def chunk_inputs(n, k, seed=13):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(n, 16, generator=g), torch.randn(V, 16, generator=g) / 2
    bias = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[:10] = -100
    labels[-2] = -100
    return [hidden, weight, bias], labels, topk_targets(torch.randn(n, V, generator=g) * 3, k, temperature=2.0)


@pytest.mark.parametrize("mode", ["tail", "renormalized"])
@pytest.mark.parametrize("n, chunk_size", [(37, 10), (7, 16)])
def test_chunked_equals_dense_and_the_reference(mode, n, chunk_size):
    params, labels, t = chunk_inputs(n, 13)
    params = [p.requires_grad_() for p in params]
    chunked = chunked_kd_loss(params[0], params[1], labels, student_bias=params[2], teacher_targets=t,
                              sparse_mode=mode, chunk_size=chunk_size, **SETTINGS)
    dense = sparse_kd_loss(params[0] @ params[1].T + params[2], t, labels, mode=mode, **SETTINGS)
    ref = ref_sparse_kd_loss((params[0] @ params[1].T + params[2]).double(), t.ids, t.logprobs, t.log_tail, labels,
                             mode=mode, target_temperature=2.0, **SETTINGS)
    grads = [torch.autograd.grad(parts.loss / 29, params) for parts in (chunked, dense)]
    ref_grads = torch.autograd.grad(ref[0] / 29, params)
    for got, want in zip((chunked.loss, chunked.kd, chunked.ce), ref[:3]):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    assert chunked.num_supervised == dense.num_supervised == ref[3]
    for a, b, r in zip(*grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, r.float(), rtol=1e-4, atol=1e-6)


def test_all_masked_gives_zeros_not_nan():
    params, labels, t = chunk_inputs(12, 5)
    params = [p.requires_grad_() for p in params]
    labels[:] = -100
    parts = chunked_kd_loss(params[0], params[1], labels, student_bias=params[2], teacher_targets=t, chunk_size=5,
                            **SETTINGS)
    assert [v.item() for v in (parts.loss, parts.kd, parts.ce, parts.num_supervised)] == [0, 0, 0, 0]
    parts.loss.backward()
    assert all((p.grad == 0).all() for p in params)
    empty = SparseTargets.empty((3, 4), 6)
    parts = sparse_kd_loss(logits(3, 4, V), empty, torch.full((3, 4), -100))
    assert parts.loss == 0 and parts.num_supervised == 0


def test_chunked_sparse_refuses_other_divergences():
    params, labels, t = chunk_inputs(12, 5)
    with pytest.raises(ValueError, match="forward_kl"):
        chunked_kd_loss(params[0], params[1], labels, teacher_targets=t, divergence="jsd", beta=0.5)
    with pytest.raises(ValueError, match="not several"):
        chunked_kd_loss(params[0], params[1], labels, teacher_targets=t, teacher_logits=torch.zeros(12, V))


def test_tail_mass_with_every_id_listed_is_infinite_not_nan():
    """k = V but the target claims tail mass: KL(p‖q) on the buckets is +inf (q_tail = 0), gradient finite."""
    t = topk_targets(logits(2, V, seed=14), V)
    value, grad = values_and_grad(sparse_forward_kl, logits(2, V, seed=15), t.ids, t.logprobs,
                                  torch.full((2,), math.log(0.1)))
    assert torch.isposinf(value).all() and torch.isfinite(grad).all()
