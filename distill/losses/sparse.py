"""Forward KL against sparse teacher targets: top-k (tail bucket or renormalized) and sampled.

A sparse target gives, per position, k token ids, the teacher's log-probabilities of those ids at
the temperature τ_c the targets were made at, and the log of the tail mass r = 1 − Σ_j p_j (see
LOSSES.md, "Sparse teacher targets"). It comes from a top-k cache (``topk_targets``) or from
sampling (``sampled_targets``: ids drawn from p, p̂_j = count_j / S, r = 0: Sparse Logit Sampling,
whose gradient q − p̂ is an unbiased estimate of the dense forward-KL gradient q − p).

Two modes:

- ``"tail"``: forward KL exact on the (k+1)-bucket coarsening of the vocabulary,
  ``Σ_j p_j (log p_j − log q_j) + r (log r − log q_tail)``, q the FULL student softmax at τ, and
  q_tail the student's mass outside the listed ids. q_tail is summed directly over the ids outside
  the list (a log-sum-exp of the masked student logits), not formed as ``1 − Σ_j q_j``: that
  difference cancels catastrophically in float32 when Σ_j q_j → 1, the exact sum does not. Only at
  τ = τ_c (the tail cannot be re-tempered).
- ``"renormalized"``: the teacher renormalized over its listed ids, tail dropped:
  ``Σ_j p̃_j (log p̃_j − log q_j)``, p̃ = softmax_j(log p_j · τ_c / τ), so any τ works.

Slots whose log-probability is −inf are empty (p = 0): they contribute nothing and their ids
belong to the tail bucket (sampled targets pad with them; a teacher's banned tokens give them).
A position whose slots are all empty and whose tail is −inf carries no target and gives 0. All
math is float32 in log space, like ``divergences``.

``sparse_kd_loss`` is ``kd_loss`` for sparse targets (sums and a count); ``chunked_kd_loss`` takes
``teacher_targets=`` and calls it per chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from distill.losses.divergences import _log_probs
from distill.losses.objective import LossParts, combine

SPARSE_MODES = ("tail", "renormalized")


@dataclass
class SparseTargets:
    """The teacher's sparse targets for a set of positions.

    ids: (..., k) int64 token ids; slots with log-probability −inf are empty (their id is ignored).
    logprobs: (..., k) float32, log p of each id at ``temperature``.
    log_tail: (...,) float32, log r of the mass outside the ids; −inf where there is none.
    temperature: τ_c, the temperature the targets were made at.
    """

    ids: Tensor
    logprobs: Tensor
    log_tail: Tensor
    temperature: float = 1.0

    def __getitem__(self, index) -> "SparseTargets":
        return SparseTargets(self.ids[index], self.logprobs[index], self.log_tail[index], self.temperature)

    def to(self, device) -> "SparseTargets":
        return SparseTargets(self.ids.to(device), self.logprobs.to(device), self.log_tail.to(device),
                             self.temperature)

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    @staticmethod
    def empty(shape: tuple, k: int, temperature: float = 1.0, device=None) -> "SparseTargets":
        """Targets that carry nothing (value 0): every slot empty, no tail. Shapes: (*shape, k)."""
        return SparseTargets(torch.zeros(*shape, k, dtype=torch.long, device=device),
                             torch.full((*shape, k), -math.inf, device=device),
                             torch.full(shape, -math.inf, device=device), temperature)


# ---------------------------------------------------------------------------------------------
# Making targets from teacher logits (the cache writer and the tests use these)


def topk_targets(teacher_logits: Tensor, k: int, *, temperature: float = 1.0) -> SparseTargets:
    """The k most probable ids of p = softmax(teacher_logits / τ), their log p, and log r.

    r is summed directly over the ids outside the top k (no 1 − Σ p cancellation), in one pass
    over the vocabulary: exp(z − max) once, the top-k entries zeroed in place, the rest summed; the
    normalizer is that sum plus the top k's.

    Shapes:
        teacher_logits: (..., V), any float dtype;  1 <= k <= V
        returns: ids (..., k) in descending probability, logprobs (..., k), log_tail (...)
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = teacher_logits.float()  # (..., V)
    if temperature != 1.0:
        z = z / temperature
    top, ids = z.topk(k, dim=-1)  # (..., k), descending
    peak = top[..., :1]  # (..., 1): the max, for a stable exp
    e = (z - peak).exp_()  # (..., V)
    rest = e.scatter_(-1, ids, 0.0).sum(-1)  # (...,): the mass outside the top k, summed directly
    log_total = (rest + (top - peak).exp().sum(-1)).log()  # (...): the normalizer, >= 1
    logprobs = top - peak - log_total.unsqueeze(-1)  # (..., k)
    return SparseTargets(ids, logprobs, rest.log() - log_total, temperature)  # log r = −inf when k = V


def sampled_targets(teacher_logits: Tensor, samples: int, *, temperature: float = 1.0,
                    generator: Optional[torch.Generator] = None) -> SparseTargets:
    """``samples`` ids drawn from p = softmax(teacher_logits / τ) with replacement, as ids + counts.

    Slot j holds an id and log(count / samples); repeated draws leave empty slots (−inf) holding a
    duplicate id. The tail is empty (r = 0). The sampling runs on the generator's device.

    Shapes:
        teacher_logits: (..., V), any float dtype
        returns: ids (..., samples) ascending, logprobs (..., samples), log_tail (...)
    """
    log_p = _log_probs(teacher_logits, temperature)  # (..., V)
    lead, vocab = log_p.shape[:-1], log_p.shape[-1]
    device = generator.device if generator is not None else log_p.device
    probs = log_p.reshape(-1, vocab).exp().to(device)  # (M, V)
    draws = torch.multinomial(probs, samples, replacement=True, generator=generator).sort(-1).values  # (M, S)
    first = torch.ones_like(draws, dtype=torch.bool)  # (M, S): the first slot of each distinct id
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    counts = (draws.unsqueeze(-1) == draws.unsqueeze(-2)).sum(-1)  # (M, S)
    logprobs = torch.where(first, (counts.float() / samples).log(), -math.inf)  # (M, S)
    return SparseTargets(draws.reshape(*lead, samples).to(log_p.device),
                         logprobs.reshape(*lead, samples).to(log_p.device),
                         torch.full(lead, -math.inf, device=log_p.device), temperature)


# ---------------------------------------------------------------------------------------------
# The divergence


def sparse_forward_kl(
    student_logits: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    target_log_tail: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    target_temperature: Optional[float] = None,
    mode: str = "tail",
) -> Tensor:
    """Forward KL(p‖q) against a sparse teacher target, per position (see the module docstring).

    ``target_temperature`` is τ_c (default: ``temperature``); ``mode="tail"`` needs
    ``target_log_tail`` and τ = τ_c, ``mode="renormalized"`` ignores the tail and re-tempers.
    With k = V and an empty tail both modes equal the dense ``forward_kl``.

    Shapes:
        student_logits: (..., V), any float dtype
        target_ids: (..., k) int64;  target_logprobs: (..., k);  target_log_tail: (...)
        returns: (...), float32
    """
    if mode not in SPARSE_MODES:
        raise ValueError(f"unknown sparse mode {mode!r}; valid: {', '.join(SPARSE_MODES)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    target_temperature = temperature if target_temperature is None else target_temperature
    if target_ids.shape != target_logprobs.shape or target_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"target ids {tuple(target_ids.shape)} and log-probabilities {tuple(target_logprobs.shape)} "
                         f"must be (..., k) with ... = {tuple(student_logits.shape[:-1])}")
    log_p = target_logprobs.float()  # (..., k)
    empty = torch.isneginf(log_p)  # (..., k)
    nothing = empty.all(-1)  # (...): no listed id
    if mode == "tail":
        if target_log_tail is None:
            raise ValueError("mode 'tail' needs target_log_tail (log of the teacher's mass outside the ids)")
        if not math.isclose(target_temperature, temperature, rel_tol=1e-6):
            raise ValueError(f"targets made at temperature {target_temperature} cannot be used at {temperature} "
                             "with their tail (the tail cannot be re-tempered); use mode 'renormalized'")
    else:
        scaled = (log_p * (target_temperature / temperature)).masked_fill(nothing.unsqueeze(-1), 0.0)  # (..., k)
        log_p = torch.log_softmax(scaled, dim=-1).masked_fill(empty, -math.inf)  # (..., k): p̃ over the ids

    log_q_all = _log_probs(student_logits, temperature)  # (..., V)
    log_q = log_q_all.gather(-1, target_ids)  # (..., k)
    gap = (log_p - log_q).masked_fill(empty, 0.0)  # (..., k): empty slots give 0, in value and gradient
    value = (log_p.exp() * gap).sum(-1)  # (...)
    if mode == "tail":
        log_r = target_log_tail.float()  # (...)
        has_tail = ~torch.isneginf(log_r)  # (...)
        log_q_tail = _LogMassOutside.apply(log_q_all, _listed(target_ids, empty, log_q_all.shape[-1]))  # (...)
        safe_log_r = torch.where(has_tail, log_r, 0.0)  # (...)
        tail = torch.where(has_tail, safe_log_r.exp() * (safe_log_r - log_q_tail), 0.0)  # (...)
        value = value + tail  # +inf where the teacher has tail mass and the student's tail is empty: its true value
    return value


def _listed(ids: Tensor, empty: Tensor, vocab: int) -> Tensor:
    """(..., V) bool: the ids listed with p > 0. Empty slots write their row's first listed id (or,
    in a row with none, all write False), so no index receives both True and False."""
    first = (~empty).float().argmax(-1, keepdim=True)  # (..., 1): a listed slot where there is one
    index = torch.where(empty, ids.gather(-1, first), ids)  # (..., k)
    src = (~empty).any(-1, keepdim=True).expand_as(ids)  # (..., k)
    return torch.zeros(*ids.shape[:-1], vocab, dtype=torch.bool, device=ids.device).scatter_(-1, index, src)


class _LogMassOutside(torch.autograd.Function):
    """log Σ_{v not listed} q_v from log q (..., V): a log-sum-exp over the unlisted ids, exact also
    when Σ_listed q → 1. Its backward is one pass (q_v / q_tail on unlisted ids, 0 on listed ones),
    where autograd through masking and logsumexp would keep and walk several (..., V) tensors. A row
    with nothing outside gives −inf with a zero gradient."""

    @staticmethod
    def forward(ctx, log_q: Tensor, listed: Tensor) -> Tensor:
        outside = log_q.detach().masked_fill(listed, -math.inf)  # (..., V)
        out = torch.logsumexp(outside, dim=-1)  # (...)
        ctx.save_for_backward(outside, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        outside, out = ctx.saved_tensors
        shift = torch.where(torch.isneginf(out), 0.0, out).unsqueeze(-1)  # (..., 1)
        return (outside - shift).exp_().mul_(grad.unsqueeze(-1)), None  # (..., V)


# ---------------------------------------------------------------------------------------------
# The objective: kd_loss for sparse targets


def sparse_kd_loss(
    student_logits: Tensor,
    targets: Optional[SparseTargets],
    labels: Tensor,
    *,
    temperature: float = 1.0,
    scale_by_tau2: bool = True,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    mode: str = "tail",
    ignore_index: int = -100,
) -> LossParts:
    """``kd_loss`` with ``sparse_forward_kl`` against ``targets``: sums over supervised positions.

    ``targets`` are aligned with the logits' positions (entries at unsupervised positions are
    ignored; ``SparseTargets.empty`` fills them); their ``temperature`` is τ_c. Everything else
    has ``kd_loss``'s meaning: s(τ) = τ² unless turned off, weight-0 terms are only logged, an
    all-unsupervised batch gives zeros.

    Shapes:
        student_logits: (..., V);  targets: ids/logprobs (..., k), log_tail (...);  labels: (...)
        returns: LossParts of scalars
    """
    divergence_of = None
    if targets is not None:
        def divergence_of(logits):
            return sparse_forward_kl(logits, targets.ids, targets.logprobs, targets.log_tail, temperature=temperature,
                                     target_temperature=targets.temperature, mode=mode)  # (...)
    elif kd_weight != 0:
        raise ValueError("targets is None but kd_weight != 0; pass the teacher's targets or set kd_weight=0")
    return combine(student_logits, labels, divergence_of, temperature=temperature, scale_by_tau2=scale_by_tau2,
                   kd_weight=kd_weight, ce_weight=ce_weight, ignore_index=ignore_index)
