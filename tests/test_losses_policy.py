"""The sampled-token objective (losses/policy.py) against float64 REINFORCE references."""

import pytest
import torch

from distill.losses import reverse_kl
from distill.losses.policy import (chunked_token_logprobs, discounted_returns, sampled_kd_loss, sampled_token_kl,
                                   token_logprobs)

SEGMENTS = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 3])  # four completions of 4, 2, 1 and 4 tokens


def reference_returns(values, segments, discount):
    """Python loop, float64: R_t = sum over later positions of the same completion of discount^(s-t) v_s."""
    values, segments = values.double().tolist(), segments.tolist()
    out = [0.0] * len(values)
    running, current = 0.0, None
    for t in reversed(range(len(values))):
        if segments[t] != current:
            running, current = 0.0, segments[t]
        running = values[t] + discount * running
        out[t] = running
    return torch.tensor(out, dtype=torch.float64)


def reference_reinforce_grad(student_logits, teacher_logits, tokens, segments, discount):
    """float64: d/dz of sum_t A_t log q(y_t), A_t the discounted return of log q - log p (constants)."""
    z = student_logits.double().detach().requires_grad_(True)
    logq_all = torch.log_softmax(z, -1)
    logp = torch.log_softmax(teacher_logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    logq = logq_all.gather(-1, tokens[:, None]).squeeze(-1)
    advantage = reference_returns((logq - logp).detach(), segments, discount)
    (advantage * logq).sum().backward()
    return z.grad


@pytest.mark.parametrize("discount", [0.0, 0.5, 1.0])
def test_gradient_equals_the_float64_reinforce_reference(discount):
    torch.manual_seed(0)
    n, vocab = SEGMENTS.numel(), 13
    student = torch.randn(n, vocab) * 2
    teacher = torch.randn(n, vocab) * 2
    tokens = torch.randint(0, vocab, (n,))
    z = student.clone().requires_grad_(True)
    logq = token_logprobs(z, tokens)
    logp = token_logprobs(teacher, tokens)
    values = sampled_token_kl(logq, logp, SEGMENTS, discount=discount)
    torch.testing.assert_close(values, (logq - logp).detach(), rtol=0, atol=0)  # the value is the estimate
    values.sum().backward()
    expected = reference_reinforce_grad(student, teacher, tokens, SEGMENTS, discount)
    torch.testing.assert_close(z.grad.double(), expected, rtol=1e-5, atol=1e-6)
    if discount:  # the discount changes the gradient (the test can tell them apart)
        assert not torch.allclose(z.grad.double(), reference_reinforce_grad(student, teacher, tokens, SEGMENTS, 0.0))


def test_expected_single_step_gradient_is_the_reverse_kl_gradient():
    """Averaged over y ~ q exactly (every token weighted by q(y)), the single-step estimator's gradient
    is the gradient of KL(q||p): REINFORCE is unbiased."""
    torch.manual_seed(1)
    vocab = 7
    student = (torch.randn(1, vocab) * 1.5).double()
    teacher = (torch.randn(1, vocab) * 1.5).double()
    q = torch.softmax(student, -1)[0]
    expected_grad = torch.zeros_like(student)
    for y in range(vocab):
        z = student.clone().requires_grad_(True)
        tokens = torch.tensor([y])
        sampled_token_kl(token_logprobs(z, tokens).double(), token_logprobs(teacher, tokens).double()).sum().backward()
        expected_grad += q[y] * z.grad
    z = student.clone().requires_grad_(True)
    reverse_kl(z, teacher).sum().backward()
    torch.testing.assert_close(expected_grad, z.grad.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("discount", [0.0, 0.3, 1.0])
def test_discounted_returns_match_a_loop(discount):
    values = torch.randn(SEGMENTS.numel(), dtype=torch.float64)
    torch.testing.assert_close(discounted_returns(values, SEGMENTS, discount),
                               reference_returns(values, SEGMENTS, discount))


def test_the_teacher_never_gets_a_gradient_and_a_discount_needs_segments():
    logq = torch.randn(4, requires_grad=True)
    logp = torch.randn(4, requires_grad=True)
    sampled_token_kl(logq, logp).sum().backward()
    assert logp.grad is None and logq.grad is not None
    with pytest.raises(ValueError, match="segments"):
        sampled_token_kl(logq, logp, discount=0.5)


def test_chunked_token_logprobs_equal_the_dense_ones_on_values_and_gradients():
    torch.manual_seed(2)
    n, d, vocab_rows, vocab = 47, 16, 123, 120  # the head is padded past the real vocabulary
    hidden = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab_rows, d, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(vocab_rows, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, vocab, (n,))
    upstream = torch.randn(n, dtype=torch.float64)

    dense = torch.log_softmax(hidden @ weight[:vocab].T + bias[:vocab], -1).gather(-1, tokens[:, None]).squeeze(-1)
    grads = torch.autograd.grad((dense * upstream).sum(), (hidden, weight, bias))
    chunked = chunked_token_logprobs(hidden, weight, tokens, bias=bias, vocab_size=vocab, chunk_size=10)
    chunked_grads = torch.autograd.grad((chunked.double() * upstream).sum(), (hidden, weight, bias))
    torch.testing.assert_close(chunked.double(), dense, rtol=1e-6, atol=1e-6)  # float32 loss math inside
    for a, b in zip(chunked_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sampled_kd_loss_sums_and_weights():
    torch.manual_seed(3)
    logits = torch.randn(6, 9, requires_grad=True)
    tokens = torch.randint(0, 9, (6,))
    logp = torch.log_softmax(torch.randn(6, 9), -1).gather(-1, tokens[:, None]).squeeze(-1)
    logq = token_logprobs(logits, tokens)
    parts = sampled_kd_loss(logq, logp, segments=torch.zeros(6, dtype=torch.long), kd_weight=0.7, ce_weight=0.3)
    assert parts.kd.item() == pytest.approx((logq - logp).sum().item(), rel=1e-6)
    assert parts.ce.item() == pytest.approx(-logq.sum().item(), rel=1e-6)
    assert parts.loss.item() == pytest.approx(0.7 * parts.kd.item() + 0.3 * parts.ce.item(), rel=1e-6)
    assert int(parts.num_supervised) == 6
    empty = sampled_kd_loss(torch.zeros(0), torch.zeros(0))
    assert empty.loss.item() == 0.0 and empty.kd.item() == 0.0  # no position: 0, never NaN
    with pytest.raises(ValueError, match="kd_weight"):
        sampled_kd_loss(logq, None)
