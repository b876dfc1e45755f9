"""The distillation objective: a divergence and hard-label CE, summed over supervised positions.

    loss = kd_weight · s(τ) · Σ_t D(p_t, q_t)  +  ce_weight · Σ_t CE(y_t, softmax(z_s,t))

with s(τ) = τ² (Hinton's correction) unless turned off, t over positions whose label is not
``ignore_index``. Everything returned is a SUM, with the count beside it: the training loop divides
once by the number of supervised positions in the whole optimizer step (all micro-batches, all
processes), see LOSSES.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from distill.losses.divergences import cross_entropy, get_divergence


@dataclass
class LossParts:
    """Sums over the supervised positions of one batch (never means). All scalars.

    loss: kd_weight · s(τ) · kd + ce_weight · ce, float32; the one that carries the gradient.
    kd: raw divergence sum (no τ², no weight), float32, detached (for logging).
    ce: hard-label cross-entropy sum, float32, detached (for logging).
    num_supervised: number of positions with label != ignore_index, int64.
    features: feature terms' sums by name (hidden, attention, relation: unweighted, detached), when
        the training loop adds them (``loss`` then includes their weighted sums); else None.
    """

    loss: Tensor
    kd: Tensor
    ce: Tensor
    num_supervised: Tensor
    features: Optional[dict] = None


def tau2_scale(temperature: float, scale_by_tau2: bool) -> float:
    """s(τ): τ² when ``scale_by_tau2`` (soft-target gradients shrink as 1/τ²), else 1."""
    return temperature**2 if scale_by_tau2 else 1.0


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    scale_by_tau2: bool = True,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    **divergence_kwargs: float,
) -> LossParts:
    """Summed distillation objective over the positions where ``labels != ignore_index``.

    ``labels`` are aligned with the logits (for a causal LM the caller has already shifted them);
    only their mask and, for CE, their values are used. ``teacher_logits`` may be None when
    ``kd_weight == 0`` (pure supervised training); ``kd`` is then 0. A term whose weight is 0 is
    still computed for logging when its inputs are there, without a gradient. A batch with no
    supervised position gives zeros, never NaN.

    Shapes:
        student_logits: (..., V), any float dtype (math in float32)
        teacher_logits: (..., V) or None
        labels: (...), integer
        returns: LossParts of scalars
    """
    divergence_fn = get_divergence(divergence)
    divergence_of = None
    if teacher_logits is not None:
        def divergence_of(logits):
            return divergence_fn(logits, teacher_logits, temperature=temperature, **divergence_kwargs)
    elif kd_weight != 0:
        raise ValueError("teacher_logits is None but kd_weight != 0; pass the teacher's logits or set kd_weight=0")
    return combine(student_logits, labels, divergence_of, temperature=temperature, scale_by_tau2=scale_by_tau2,
                   kd_weight=kd_weight, ce_weight=ce_weight, ignore_index=ignore_index)


def combine(
    student_logits: Tensor,
    labels: Tensor,
    divergence_of: Callable[[Tensor], Tensor] | None,
    *,
    temperature: float,
    scale_by_tau2: bool,
    kd_weight: float,
    ce_weight: float,
    ignore_index: int = -100,
) -> LossParts:
    """The objective from a per-position divergence: ``divergence_of(student_logits) -> (...)``
    (None: no teacher signal, kd = 0). Shared by ``kd_loss`` and the sparse-target loss.

    Shapes:
        student_logits: (..., V);  labels: (...);  returns: LossParts of scalars
    """
    mask = labels != ignore_index  # (...)
    zero = torch.zeros((), dtype=torch.float32, device=student_logits.device)
    grad_on = torch.is_grad_enabled()

    # CE first: when it is only logged, its (..., V) temporaries are gone before the divergence's.
    with torch.set_grad_enabled(grad_on and ce_weight != 0):
        ce = cross_entropy(student_logits, labels, ignore_index=ignore_index).sum()  # 0 at ignored positions

    kd = zero
    if divergence_of is not None:
        with torch.set_grad_enabled(grad_on and kd_weight != 0):
            kd = torch.where(mask, divergence_of(student_logits), 0.0).sum()

    loss = weighted(kd, ce, kd_weight=kd_weight, ce_weight=ce_weight, temperature=temperature,
                    scale_by_tau2=scale_by_tau2)
    return LossParts(loss=loss, kd=kd.detach(), ce=ce.detach(), num_supervised=mask.sum())


def weighted(kd: Tensor, ce: Tensor, *, kd_weight: float, ce_weight: float, temperature: float,
             scale_by_tau2: bool) -> Tensor:
    """kd_weight · s(τ) · kd + ce_weight · ce. Weight-0 terms are left out rather than multiplied by 0,
    so an inf there cannot make a NaN (a float32 zero when both are)."""
    loss = kd.new_zeros((), dtype=torch.float32)
    if kd_weight != 0:
        loss = loss + kd_weight * tau2_scale(temperature, scale_by_tau2) * kd
    if ce_weight != 0:
        loss = loss + ce_weight * ce
    return loss
