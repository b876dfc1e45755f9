"""Plain float64 reference implementations, written straight from the formulas in LOSSES.md.

Probability space, no tricks: they are unstable on extreme inputs (±1e4, -inf) and exist
only to be obviously right. The tests compare distill.losses against them; the benchmarks may
reuse them. ``CASES`` is the one shared table of divergences: adding a divergence to the registry
without a row here fails ``test_every_registered_divergence_has_a_row``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from distill.losses import forward_kl, jsd, reverse_kl, skew_kl, skew_reverse_kl, tvd


def probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """softmax(logits / τ) in float64."""
    return torch.softmax(logits.double() / temperature, dim=-1)


def kl(a: Tensor, b: Tensor) -> Tensor:
    """KL(a‖b) = Σ a (log a − log b), probabilities in, summed over the last dim."""
    return (a * (a.log() - b.log())).sum(-1)


def ref_forward_kl(student_logits, teacher_logits, temperature=1.0):
    p, q = probs(teacher_logits, temperature), probs(student_logits, temperature)
    return kl(p, q)


def ref_reverse_kl(student_logits, teacher_logits, temperature=1.0):
    p, q = probs(teacher_logits, temperature), probs(student_logits, temperature)
    return kl(q, p)


def ref_jsd(student_logits, teacher_logits, temperature=1.0, beta=0.5):
    p, q = probs(teacher_logits, temperature), probs(student_logits, temperature)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def ref_skew_kl(student_logits, teacher_logits, temperature=1.0, alpha=0.1):
    p, q = probs(teacher_logits, temperature), probs(student_logits, temperature)
    return kl(p, alpha * p + (1 - alpha) * q)


def ref_skew_reverse_kl(student_logits, teacher_logits, temperature=1.0, alpha=0.1):
    p, q = probs(teacher_logits, temperature), probs(student_logits, temperature)
    return kl(q, alpha * q + (1 - alpha) * p)


def ref_tvd(student_logits, teacher_logits, temperature=1.0):
    p, q = probs(teacher_logits, temperature), probs(student_logits, temperature)
    return 0.5 * (p - q).abs().sum(-1)


def ref_cross_entropy(student_logits, labels, ignore_index=-100):
    """−log softmax(z)[y] per position, 0 where the label is ignored."""
    log_q = probs(student_logits).log()
    keep = labels != ignore_index
    picked = log_q.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, -picked, 0.0)


def ref_kd_loss(
    student_logits,
    teacher_logits,
    labels,
    reference,
    *,
    temperature=1.0,
    scale_by_tau2=True,
    kd_weight=1.0,
    ce_weight=0.0,
    ignore_index=-100,
    **params,
):
    """(loss, kd, ce, count): kd_weight·s(τ)·Σ D + ce_weight·Σ CE over supervised positions, float64."""
    keep = labels != ignore_index
    kd = torch.where(keep, reference(student_logits, teacher_logits, temperature, **params), 0.0).sum()
    ce = ref_cross_entropy(student_logits, labels, ignore_index).sum()
    scale = temperature**2 if scale_by_tau2 else 1.0
    return kd_weight * scale * kd + ce_weight * ce, kd, ce, keep.sum()


@dataclass(frozen=True)
class Case:
    """One row of the shared divergence table: registry name, distill function, reference, parameters."""

    name: str
    fn: Callable[..., Tensor]
    reference: Callable[..., Tensor]
    params: dict = field(default_factory=dict)

    def __str__(self) -> str:  # pytest ids
        return self.name + "".join(f"-{k}={v}" for k, v in self.params.items())


CASES = [
    Case("forward_kl", forward_kl, ref_forward_kl),
    Case("reverse_kl", reverse_kl, ref_reverse_kl),
    Case("jsd", jsd, ref_jsd, {"beta": 0.5}),
    Case("jsd", jsd, ref_jsd, {"beta": 0.1}),
    Case("skew_kl", skew_kl, ref_skew_kl, {"alpha": 0.1}),
    Case("skew_reverse_kl", skew_reverse_kl, ref_skew_reverse_kl, {"alpha": 0.3}),
    Case("tvd", tvd, ref_tvd),
]
CASE_IDS = [str(c) for c in CASES]
