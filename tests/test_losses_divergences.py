"""Per-position divergences and CE: against the float64 references, properties, a worked example."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses import (
    DIVERGENCES,
    cross_entropy,
    divergence_params,
    forward_kl,
    get_divergence,
    jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
)
from tests.reference import CASE_IDS, CASES, kl, probs, ref_cross_entropy

SHAPE = (3, 47, 123)  # odd on purpose: batch × time × vocab
SYMMETRIC = [c for c in CASES if c.name == "tvd" or (c.name == "jsd" and c.params["beta"] == 0.5)]
MODEST = settings(max_examples=25, deadline=None)


def logits_pair(shape=SHAPE, scale=3.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(shape, generator=g)).to(dtype)
    teacher = (scale * torch.randn(shape, generator=g)).to(dtype)
    return student, teacher


def value_and_grad(fn, student, teacher, weights, **kwargs):
    """fn's per-position values and d(Σ weights·values)/d student_logits."""
    student = student.detach().clone().requires_grad_()
    values = fn(student, teacher, **kwargs)
    (values * weights.to(values.dtype)).sum().backward()
    return values.detach(), student.grad


# --- registry ---------------------------------------------------------------------------------


def test_every_registered_divergence_has_a_row():
    assert {c.name for c in CASES} == set(DIVERGENCES)
    for case in CASES:
        assert DIVERGENCES[case.name] is case.fn
        assert divergence_params(case.name) == set(case.params)  # the row names every parameter


def test_divergence_params():
    assert divergence_params("forward_kl") == set()
    assert divergence_params("jsd") == {"beta"}
    assert divergence_params("skew_reverse_kl") == {"alpha"}


def test_unknown_divergence_lists_names_and_suggests():
    with pytest.raises(ValueError, match="forward_kl.*Did you mean 'reverse_kl'") as info:
        get_divergence("revers_kl")
    for name in DIVERGENCES:
        assert name in str(info.value)


# --- against the float64 references -----------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference_float32(case, temperature):
    student, teacher = logits_pair()
    weights = torch.rand(SHAPE[:-1], generator=torch.Generator().manual_seed(1))
    values, grad = value_and_grad(case.fn, student, teacher, weights, temperature=temperature, **case.params)
    ref_values, ref_grad = value_and_grad(
        case.reference, student.double(), teacher.double(), weights, temperature=temperature, **case.params
    )
    assert values.dtype == torch.float32 and values.shape == SHAPE[:-1]
    torch.testing.assert_close(values, ref_values.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-4, atol=1e-6 * ref_grad.abs().max().item())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bfloat16_inputs_are_upcast(case):
    """bf16 logits go through float32 math: values match the float64 reference on the same
    (bf16-rounded) logits to float32 precision; the gradient comes back in bf16 (8-bit mantissa)."""
    student, teacher = logits_pair(dtype=torch.bfloat16)
    weights = torch.rand(SHAPE[:-1], generator=torch.Generator().manual_seed(1))
    values, grad = value_and_grad(case.fn, student, teacher, weights, **case.params)
    ref_values, ref_grad = value_and_grad(case.reference, student.double(), teacher.double(), weights, **case.params)
    assert values.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(values, ref_values.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-2 * ref_grad.abs().max().item())


def test_cross_entropy_matches_reference():
    student, _ = logits_pair()
    labels = torch.randint(0, SHAPE[-1], SHAPE[:-1], generator=torch.Generator().manual_seed(2))
    labels[0, :10] = -100
    values = cross_entropy(student, labels)
    assert values.dtype == torch.float32 and values.shape == SHAPE[:-1]
    torch.testing.assert_close(values, ref_cross_entropy(student, labels).float(), rtol=1e-5, atol=1e-6)
    assert (values[0, :10] == 0).all()
    custom = labels.clamp(min=0)
    custom_values = cross_entropy(student, custom, ignore_index=custom[1, 0].item())
    assert (custom_values[custom == custom[1, 0]] == 0).all()


# --- temperature ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_temperature_divides_both_sides(case):
    student, teacher = logits_pair(shape=(5, 31))
    at_tau = case.fn(student, teacher, temperature=3.0, **case.params)
    pre_divided = case.fn(student / 3.0, teacher / 3.0, **case.params)
    only_student = case.fn(student / 3.0, teacher, **case.params)
    torch.testing.assert_close(at_tau, pre_divided, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(at_tau, only_student, rtol=1e-3)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_must_be_positive(temperature):
    student, teacher = logits_pair(shape=(2, 5))
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(student, teacher, temperature=temperature)


def test_vocab_mismatch_points_to_slice_vocab():
    with pytest.raises(ValueError, match="slice_vocab"):
        forward_kl(torch.zeros(2, 5), torch.zeros(2, 7))


# --- properties -------------------------------------------------------------------------------

drawn_logits = st.builds(
    lambda seed, rows, vocab, scale: logits_pair(shape=(rows, vocab), scale=scale, seed=seed),
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 6),
    vocab=st.integers(2, 40),
    scale=st.floats(0.01, 30.0),
)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@MODEST
@given(pair=drawn_logits, temperature=st.floats(0.25, 4.0))
def test_identical_inputs_give_zero(case, pair, temperature):
    student, _ = pair
    values = case.fn(student, student.clone(), temperature=temperature, **case.params)
    torch.testing.assert_close(values, torch.zeros_like(values), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@MODEST
@given(pair=drawn_logits)
def test_non_negative(case, pair):
    values = case.fn(*pair, **case.params)
    assert torch.isfinite(values).all()
    assert (values >= -1e-6).all()


@pytest.mark.parametrize("case", SYMMETRIC, ids=[str(c) for c in SYMMETRIC])
@MODEST
@given(pair=drawn_logits)
def test_symmetric(case, pair):
    student, teacher = pair
    torch.testing.assert_close(case.fn(student, teacher, **case.params), case.fn(teacher, student, **case.params))


def test_asymmetric_ones_are_not_symmetric():
    """Guards the symmetry test: it must be able to fail."""
    student, teacher = logits_pair(shape=(4, 9))
    for case in CASES:
        if case not in SYMMETRIC:
            assert not torch.allclose(case.fn(student, teacher, **case.params), case.fn(teacher, student, **case.params))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_huge_logits_are_finite(case):
    student, teacher = logits_pair(shape=(4, 33))
    signs = torch.sign(torch.randn(2, 4, 33, generator=torch.Generator().manual_seed(3)))
    student, teacher = student + 1e4 * signs[0], teacher + 1e4 * signs[1]
    values, grad = value_and_grad(case.fn, student, teacher, torch.ones(4), **case.params)
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_token_banned_on_both_sides_is_the_same_as_absent(case):
    """A -inf logit on both sides contributes exactly nothing: value and gradient finite and equal
    to the divergence over the vocabulary without that token."""
    student, teacher = logits_pair(shape=(4, 33))
    banned = torch.zeros(33, dtype=torch.bool)
    banned[[0, 7, 32]] = True
    student_banned = student.masked_fill(banned, -math.inf)
    teacher_banned = teacher.masked_fill(banned, -math.inf)
    values, grad = value_and_grad(case.fn, student_banned, teacher_banned, torch.ones(4), **case.params)
    kept_values, kept_grad = value_and_grad(case.fn, student[:, ~banned], teacher[:, ~banned], torch.ones(4), **case.params)
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(values, kept_values)
    torch.testing.assert_close(grad[:, ~banned], kept_grad)
    assert (grad[:, banned] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_token_banned_by_teacher_only_gives_no_nan(case):
    """The teacher bans a token the student allows. KL(q‖p) is then truly +inf (reverse_kl);
    everything else (mixtures keep m > 0) stays finite, gradients included."""
    student, teacher = logits_pair(shape=(4, 33))
    teacher = teacher.clone()
    teacher[:, [2, 5]] = -math.inf
    values, grad = value_and_grad(case.fn, student, teacher, torch.ones(4), **case.params)
    assert not torch.isnan(values).any()
    if case.name == "reverse_kl":
        assert torch.isposinf(values).all()
    else:
        assert torch.isfinite(values).all() and torch.isfinite(grad).all()


# --- jsd's β, skew's α ------------------------------------------------------------------------


def test_jsd_tends_to_beta_times_forward_kl_as_beta_goes_to_zero():
    """JSD_β = β·KL(p‖q) + O(β²): no jump at the ends, it goes to 0 smoothly."""
    student, teacher = logits_pair(shape=(6, 50), scale=1.0)
    full_kl = forward_kl(student, teacher)
    for beta in [1e-2, 1e-3]:
        ratio = jsd(student, teacher, beta=beta) / (beta * full_kl)
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=20 * beta)
    values = [jsd(student, teacher, beta=beta) for beta in [0.1, 1e-2, 1e-3, 1e-5]]
    assert all((later < earlier).all() for earlier, later in zip(values, values[1:]))
    assert (values[-1] < 1e-4 * full_kl + 1e-6).all()
    # and at the other end, ≈ (1 − β)·KL(q‖p)
    beta = 1 - 1e-3
    ratio = jsd(student, teacher, beta=beta) / ((1 - beta) * reverse_kl(student, teacher))
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=2e-2)


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.5, 1.5])
def test_jsd_beta_outside_open_interval_is_an_error_naming_the_kls(beta):
    student, teacher = logits_pair(shape=(2, 5))
    with pytest.raises(ValueError) as info:
        jsd(student, teacher, beta=beta)
    assert "forward_kl" in str(info.value) and "reverse_kl" in str(info.value)


@pytest.mark.parametrize("fn", [skew_kl, skew_reverse_kl])
@pytest.mark.parametrize("alpha", [1.0, -0.1])
def test_skew_alpha_outside_range_is_an_error(fn, alpha):
    student, teacher = logits_pair(shape=(2, 5))
    with pytest.raises(ValueError, match="alpha"):
        fn(student, teacher, alpha=alpha)


def test_skew_at_alpha_zero_is_the_plain_kl():
    student, teacher = logits_pair(shape=(5, 31))
    torch.testing.assert_close(skew_kl(student, teacher, alpha=0.0), forward_kl(student, teacher))
    torch.testing.assert_close(skew_reverse_kl(student, teacher, alpha=0.0), reverse_kl(student, teacher))


# --- a worked example -------------------------------------------------------------------------


def test_reverse_kl_worked_example():
    """Teacher p and student q over {the, bank, river, money, airplane}. Reverse KL is mode-seeking:
    one gradient step moves q's mass off the tokens the teacher finds unlikely (money, airplane)
    onto its modes (bank, river)."""
    p = torch.tensor([0.02, 0.62, 0.30, 0.04, 0.02])
    q = torch.tensor([0.10, 0.25, 0.20, 0.30, 0.15])
    # KL(q‖p) = Σ q log(q/p), term by term:
    #   the      0.10·ln(0.10/0.02) = 0.10·ln 5      =  0.160944
    #   bank     0.25·ln(0.25/0.62) = 0.25·(−0.908259) = −0.227065
    #   river    0.20·ln(0.20/0.30) = 0.20·(−0.405465) = −0.081093
    #   money    0.30·ln(0.30/0.04) = 0.30·ln 7.5    =  0.604471
    #   airplane 0.15·ln(0.15/0.02) = 0.15·ln 7.5    =  0.302235
    #   sum                                          =  0.759492
    by_hand = 0.160944 - 0.227065 - 0.081093 + 0.604471 + 0.302235
    student_logits = q.log().requires_grad_()
    value = reverse_kl(student_logits, p.log())
    assert value.item() == pytest.approx(by_hand, abs=2e-6)
    assert value.item() == pytest.approx(kl(q.double(), p.double()).item(), rel=1e-6)

    value.backward()
    q_after = torch.softmax(student_logits.detach() - 0.5 * student_logits.grad, dim=-1)
    the, bank, river, money, airplane = (q_after - q).tolist()
    assert money < 0 and airplane < 0
    assert bank > 0 and river > 0
    assert probs(student_logits.detach()).float().allclose(q)  # logits = log q really is q
