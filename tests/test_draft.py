"""The student as a speculative-decoding draft: acceptance α = Σ min(p, q) = 1 − TVD(p, q)
(Leviathan et al. 2023) and the expected tokens per verification step with γ drafts."""

from __future__ import annotations

import random

import pytest
import torch

from distill.evaluate import draft_acceptance, expected_tokens_per_step


def test_acceptance_equals_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(64, 50, generator=g) * 3, torch.randn(64, 50, generator=g) * 3
    p, q = t.double().softmax(-1), s.double().softmax(-1)
    reference = torch.minimum(p, q).sum(-1)
    assert torch.allclose(draft_acceptance(s, t).double(), reference, atol=1e-6)
    assert torch.allclose(draft_acceptance(t, t), torch.ones(64), atol=1e-6)  # a perfect draft is always accepted


def test_acceptance_matches_a_monte_carlo_speculative_sampling_simulation():
    """Draft x ~ q, accept with probability min(1, p(x)/q(x)): the acceptance rate is α."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 12, generator=g) * 2, torch.randn(4, 12, generator=g) * 2
    p, q = t.double().softmax(-1), s.double().softmax(-1)
    n = 200_000
    for row in range(4):
        x = torch.multinomial(q[row], n, replacement=True, generator=g)
        accept = torch.rand(n, generator=g, dtype=torch.float64) < (p[row, x] / q[row, x]).clamp(max=1.0)
        alpha = float(draft_acceptance(s[row], t[row]))
        sigma = (alpha * (1 - alpha) / n) ** 0.5
        assert abs(accept.double().mean().item() - alpha) < 5 * sigma + 1e-9


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
def test_expected_tokens_per_step_matches_a_simulation(alpha):
    """γ drafts accepted one by one with probability α until the first rejection; the target adds
    one token either way (the correction or the bonus token)."""
    gamma, n, rng = 4, 100_000, random.Random(2)
    total = 0
    for _ in range(n):
        accepted = 0
        while accepted < gamma and rng.random() < alpha:
            accepted += 1
        total += accepted + 1
    assert expected_tokens_per_step(alpha, gamma) == pytest.approx(total / n, rel=0.01)
    assert expected_tokens_per_step(1.0, gamma) == gamma + 1 and expected_tokens_per_step(0.0, gamma) == 1


def test_the_table_shows_expected_tokens_as_a_number_not_a_rate():
    from distill.report import format_value

    assert format_value("draft_expected_tokens", 1.6910673) == "1.69"
    assert format_value("draft_acceptance", 0.416) == "41.6%"
