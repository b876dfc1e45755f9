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


# ---------------------------------------------------------------------------------------------
# Measured: HF assisted generation with the model as the teacher's draft (distill.speculative)


@pytest.fixture(scope="module")
def spec_models(workspace):
    from distill.models import load_causal_lm, load_tokenizer
    from tests.helpers import make_llama

    teacher_dir = workspace / "teacher_run" / "student"
    tok = load_tokenizer(str(teacher_dir))
    make_llama(workspace / "spec_draft", vocab_size=len(tok), layers=1, hidden=32, seed=11)
    teacher = load_causal_lm(str(teacher_dir)).eval()
    draft = load_causal_lm(str(workspace / "spec_draft")).eval()
    prompts = [tok(text, add_special_tokens=False)["input_ids"][:8] for text in
               ("the big dog sees the cat", "a cat sees the fish near the river", "the fish", "a dog and a cat")]
    return tok, teacher, draft, prompts


def _measure(tok, target, draft, prompts, seed=0, max_new_tokens=24):
    from distill.speculative import measure_assisted

    return measure_assisted(target, draft, prompts, max_new_tokens=max_new_tokens, vocab_size=len(tok),
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, device="cpu", gamma=4,
                            seed=seed)


@pytest.mark.parametrize("drafted, kept, expected", [
    ([5, 6, 7, 8], [5, 6, 9], (2, 3)),  # two accepted, the third rejected and corrected to 9
    ([5, 6, 7, 8], [5, 6, 7, 8, 1], (4, 4)),  # all accepted, 1 is the bonus token: nothing rejected
    ([5, 6, 7, 8], [9], (0, 1)),  # the first rejected
    ([5, 0, 7, 8], [5, 0], (2, 2)),  # cut after an accepted EOS (0): the rest was never judged
    ([5, 6, 7, 8], [5, 0], (1, 2)),  # the second rejected, corrected to EOS
    ([], [3], (0, 0)),  # nothing drafted
])
def test_judged_drafts_counts_up_to_the_first_rejection(drafted, kept, expected):
    from distill.speculative import judged_drafts

    assert judged_drafts(drafted, kept) == expected


@pytest.mark.slow
def test_a_perfect_draft_is_always_accepted(spec_models):
    tok, teacher, _, prompts = spec_models
    r = _measure(tok, teacher, teacher, prompts)
    assert r["spec_judged_drafts"] > 0
    assert r["spec_acceptance_measured"] == 1.0 and r["spec_acceptance_expected"] == pytest.approx(1.0, abs=1e-6)
    assert 4.0 <= r["spec_tokens_per_step"] <= 5.0  # γ + 1 per step but for the last, shorter ones


@pytest.mark.slow
def test_measured_acceptance_of_a_poor_draft_agrees_with_alpha_on_its_positions(spec_models):
    """The random draft is accepted less often than not; on every seed the measured rate is within
    sampling error (|z| < 4) of the α the two models give on the judged positions, and over the
    seeds pooled the z-scores are centered."""
    tok, teacher, draft, prompts = spec_models
    zs = []
    for seed in range(3):
        r = _measure(tok, teacher, draft, prompts, seed=seed, max_new_tokens=48)
        assert r["spec_judged_drafts"] >= 40
        assert 0.0 < r["spec_acceptance_measured"] < 0.9
        assert abs(r["spec_acceptance_z"]) < 4, r
        zs.append(r["spec_acceptance_z"])
    assert abs(sum(zs) / 3 ** 0.5) < 4
    assert r["spec_teacher_tokens_per_s"] > 0 and r["spec_speedup"] > 0


@pytest.mark.slow
def test_eval_measures_each_student_as_the_teachers_draft(workspace, spec_models, tmp_path):
    from distill.evaluate import SPEC_KEYS, evaluate_models
    from distill.report import write_report

    teacher = str(workspace / "teacher_run" / "student")
    args = dict(teacher=teacher, max_length=32, num_prompts=3, max_new_tokens=8, batch_size=4, progress=False)
    results = evaluate_models({"self": teacher, "draft": str(workspace / "spec_draft")},
                              str(workspace / "eval.jsonl"), draft_prompts=2, **args)
    models = results["models"]
    assert all(models["teacher"][k] is None for k in SPEC_KEYS)  # the teacher is not its own draft here
    assert models["self"]["spec_acceptance_measured"] == 1.0
    draft = models["draft"]
    assert all(draft[k] is not None for k in SPEC_KEYS), draft
    assert results["settings"]["draft_prompts"] == 2
    _, html = write_report(results, tmp_path)
    assert "measured acceptance" in html.read_text()

    off = evaluate_models({"draft": str(workspace / "spec_draft")}, str(workspace / "eval.jsonl"), draft_prompts=0,
                          **args)
    assert all(off["models"]["draft"][k] is None for k in SPEC_KEYS)
