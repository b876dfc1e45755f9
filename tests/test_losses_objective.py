"""kd_loss: sums and a count over supervised positions, weights, τ², masking."""

import pytest
import torch

from distill.losses import LossParts, kd_loss
from tests.reference import CASE_IDS, CASES, ref_forward_kl, ref_kd_loss

B, T, V = 3, 17, 29


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(B, T, V, generator=g)
    teacher = 2 * torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :5] = -100
    labels[2, -3:] = -100
    return student, teacher, labels


@pytest.mark.parametrize("scale_by_tau2", [True, False])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference_sums(case, scale_by_tau2):
    student, teacher, labels = batch()
    settings = dict(temperature=2.0, scale_by_tau2=scale_by_tau2, kd_weight=0.7, ce_weight=0.4)
    parts = kd_loss(student, teacher, labels, divergence=case.name, **settings, **case.params)
    loss, kd, ce, count = ref_kd_loss(student, teacher, labels, case.reference, **settings, **case.params)
    assert isinstance(parts, LossParts)
    assert parts.num_supervised.dtype == torch.int64 and parts.num_supervised.item() == count.item() == B * T - 8
    torch.testing.assert_close(parts.kd, kd.float())
    torch.testing.assert_close(parts.ce, ce.float())
    torch.testing.assert_close(parts.loss, loss.float())
    s = 4.0 if scale_by_tau2 else 1.0
    torch.testing.assert_close(parts.loss, 0.7 * s * parts.kd + 0.4 * parts.ce)


def test_returns_sums_not_means():
    """Two halves of a batch add up to the whole: what grad accumulation relies on."""
    student, teacher, labels = batch()
    whole = kd_loss(student, teacher, labels, ce_weight=0.5)
    halves = [kd_loss(student[i], teacher[i], labels[i], ce_weight=0.5) for i in ([0], [1, 2])]
    for field in ("loss", "kd", "ce", "num_supervised"):
        torch.testing.assert_close(getattr(whole, field), sum(getattr(h, field) for h in halves))


def test_gradient_matches_reference():
    student, teacher, labels = batch()
    student = student.requires_grad_()
    kd_loss(student, teacher, labels, temperature=1.5, ce_weight=0.3).loss.backward()
    reference = student.detach().double().requires_grad_()
    ref_kd_loss(reference, teacher.double(), labels, ref_forward_kl, temperature=1.5, ce_weight=0.3)[0].backward()
    torch.testing.assert_close(student.grad, reference.grad.float(), rtol=1e-4, atol=1e-6)
    assert (student.grad[0, :5] == 0).all()  # ignored positions get no gradient


def test_all_masked_gives_zeros_not_nan():
    student, teacher, labels = batch()
    student = student.requires_grad_()
    parts = kd_loss(student, teacher, torch.full_like(labels, -100), divergence="jsd", ce_weight=1.0)
    for value in (parts.loss, parts.kd, parts.ce, parts.num_supervised):
        assert value.item() == 0
    parts.loss.backward()
    assert (student.grad == 0).all()


def test_supervised_only_without_teacher():
    student, _, labels = batch()
    parts = kd_loss(student, None, labels, kd_weight=0.0, ce_weight=1.0)
    assert parts.kd.item() == 0
    torch.testing.assert_close(parts.loss, parts.ce)
    with pytest.raises(ValueError, match="kd_weight"):
        kd_loss(student, None, labels)


def test_zero_weight_term_is_logged_but_not_trained():
    student, teacher, labels = batch()
    student = student.requires_grad_()
    parts = kd_loss(student, teacher, labels, kd_weight=0.0, ce_weight=1.0)
    assert parts.kd.item() > 0  # still reported
    torch.testing.assert_close(parts.loss, parts.ce)
    (grad,) = torch.autograd.grad(parts.loss, student)
    (ce_only,) = torch.autograd.grad(kd_loss(student, None, labels, kd_weight=0.0, ce_weight=1.0).loss, student)
    torch.testing.assert_close(grad, ce_only)


def test_kd_and_ce_are_detached_loss_is_not():
    student, teacher, labels = batch()
    parts = kd_loss(student.requires_grad_(), teacher, labels, ce_weight=0.5)
    assert parts.loss.requires_grad
    assert not parts.kd.requires_grad and not parts.ce.requires_grad


def test_custom_ignore_index():
    student, teacher, labels = batch()
    labels = labels.clamp(min=0)
    parts = kd_loss(student, teacher, labels, ignore_index=int(labels[0, 0]))
    assert parts.num_supervised.item() == (labels != labels[0, 0]).sum().item()


def test_unknown_divergence():
    student, teacher, labels = batch()
    with pytest.raises(ValueError, match="unknown divergence"):
        kd_loss(student, teacher, labels, divergence="kl")
