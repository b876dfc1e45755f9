"""Plain float64 references for the sparse (top-k / sampled) forward KL, from LOSSES.md.

Probability space, no tricks: q_tail is 1 − Σ of the student's probabilities of the listed ids.
"""

from __future__ import annotations

import torch

from tests.reference import probs, ref_cross_entropy


def ref_sparse_forward_kl(student_logits, ids, logprobs, log_tail=None, temperature=1.0, target_temperature=None,
                          mode="tail"):
    """Σ_j p_j (log p_j − log q_j) [+ r (log r − log q_tail)], float64; p_j = 0 slots contribute 0.

    ``mode``: "tail", "renormalized", or "top-k part" (the first sum alone, for tests that build the tail)."""
    q = probs(student_logits, temperature)  # (..., V)
    p = logprobs.double().exp()  # (..., k)
    if mode == "renormalized":
        tc = temperature if target_temperature is None else target_temperature
        p = p ** (tc / temperature)
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    q_j = q.gather(-1, ids)
    value = torch.where(p > 0, p * (p.log() - q_j.log()), 0.0).sum(-1)
    if mode == "tail":
        r = log_tail.double().exp()
        listed = torch.zeros_like(q).scatter_add(-1, ids, (p > 0).double()) > 0  # (..., V)
        q_tail = torch.where(r > 0, 1 - (q * listed).sum(-1), 1.0)  # (where r = 0 the term is 0)
        value = value + torch.where(r > 0, r * (r.log() - q_tail.log()), 0.0)
    return value


def ref_sparse_kd_loss(student_logits, ids, logprobs, log_tail, labels, *, temperature=1.0, scale_by_tau2=True,
                       kd_weight=1.0, ce_weight=0.0, mode="tail", target_temperature=None, ignore_index=-100):
    """(loss, kd, ce, count) as sums over supervised positions, float64."""
    keep = labels != ignore_index
    per = ref_sparse_forward_kl(student_logits, ids, logprobs, log_tail, temperature, target_temperature, mode)
    kd = torch.where(keep, per, 0.0).sum()
    ce = ref_cross_entropy(student_logits, labels, ignore_index).sum()
    scale = temperature**2 if scale_by_tau2 else 1.0
    return kd_weight * scale * kd + ce_weight * ce, kd, ce, keep.sum()
