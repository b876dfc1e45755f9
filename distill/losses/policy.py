"""The sampled-token objective: reverse KL graded on the student's own sampled tokens.

For a completion y sampled from the student q, the teacher p grades each token by its
log-probability alone. The per-token estimate of the reverse KL is

    r_t = log q(y_t | y_<t) − log p(y_t | y_<t)          (E_{y_t ~ q}[r_t] = KL(q‖p) at step t)

and the objective is a policy-gradient (REINFORCE) update that treats the advantage as a constant:

    A_t = Σ_{s ≥ t, same completion} γ^{s−t} · r_s      (detached; γ = ``discount``)
    ∇ = Σ_t A_t · ∇ log q(y_t)

With γ = 0 (the default) A_t = r_t: the single-step estimate, whose expectation over y_t ~ q is
exactly ∇ KL(q_t‖p_t) (the ``E_q[∇ log q] = 0`` baseline term drops out). γ = 1 is the gradient of
the sequence-level KL(q(y)‖p(y)) (MiniLLM's return over the rest of the completion, without its
other terms). It needs only ``log p(y_t)`` from the teacher, so it works with a teacher that returns
log-probabilities of given tokens and nothing else (an HTTP endpoint).

Its *value* per position is r_t (a number to log that estimates the reverse KL), and its gradient is
A_t ∇ log q(y_t): ``r.detach() + A · (log q − log q.detach())``. Only valid when y was sampled from
q at temperature 1 (the loop checks: generation.lmbda = 1, loss.temperature = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from distill.losses.chunked import chunk_slices
from distill.losses.objective import LossParts


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[token] per row, float32. Shapes: logits (N, V), tokens (N,) -> (N,)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None].clamp_min(0)).squeeze(-1)


def chunked_token_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, *, bias: Tensor | None = None,
                           vocab_size: int | None = None, chunk_size: int = 256) -> Tensor:
    """``token_logprobs(hidden @ weight.T + bias, tokens)`` one chunk of rows at a time, with gradients,
    never holding more than ``chunk_size`` rows of logits (each chunk is recomputed in backward).

    Shapes: hidden (N, d), weight (V, d), bias (V,), tokens (N,) -> (N,) float32.
    """
    vocab_size = vocab_size or weight.shape[0]

    def chunk(h: Tensor, y: Tensor) -> Tensor:
        return token_logprobs(F.linear(h, weight[:vocab_size], None if bias is None else bias[:vocab_size]), y)

    parts = [checkpoint(chunk, hidden[rows], tokens[rows], use_reentrant=False)
             for rows in chunk_slices(hidden.shape[0], chunk_size)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def discounted_returns(values: Tensor, segments: Tensor, discount: float) -> Tensor:
    """R_t = Σ_{s ≥ t, segments[s] == segments[t]} discount^(s−t) · values[s].

    ``segments`` (N,) names each position's completion; positions of one completion are contiguous
    and in order. Shapes: values (N,), segments (N,) int -> (N,). float64 inside.
    """
    if values.numel() == 0 or discount == 0.0:
        return values.clone()
    _, ids, counts = torch.unique_consecutive(segments, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts  # (S,)
    pos = torch.arange(values.numel(), device=values.device) - starts[ids]  # (N,) position in its completion
    width = int(counts.max())
    table = values.new_zeros((counts.numel(), width), dtype=torch.float64)  # (S, L)
    table[ids, pos] = values.double()
    offsets = torch.arange(width, device=values.device, dtype=torch.float64)
    gap = offsets[None, :] - offsets[:, None]  # (L, L): s − t
    weights = torch.where(gap >= 0, torch.as_tensor(discount, dtype=torch.float64) ** gap.clamp_min(0), 0.0)
    returns = table @ weights.T  # (S, L): R[t] = Σ_s w[t, s] v[s]
    return returns[ids, pos].to(values.dtype)


def sampled_token_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, segments: Tensor | None = None, *,
                     discount: float = 0.0) -> Tensor:
    """Per-position value r_t = log q(y_t) − log p(y_t), with the policy-gradient gradient A_t ∇ log q
    (see the module docstring). The teacher side never gets a gradient.

    Shapes: student_logprobs (N,) (carries the gradient), teacher_logprobs (N,), segments (N,) -> (N,) float32.
    """
    estimate = (student_logprobs.float() - teacher_logprobs.float()).detach()  # (N,)
    if discount and segments is None:
        raise ValueError("a discount needs segments (which completion each position belongs to)")
    advantage = discounted_returns(estimate, segments, discount) if discount else estimate
    return estimate + advantage * (student_logprobs.float() - student_logprobs.float().detach())


def sampled_kd_loss(student_logprobs: Tensor, teacher_logprobs: Tensor | None, *, segments: Tensor | None = None,
                    discount: float = 0.0, kd_weight: float = 1.0, ce_weight: float = 0.0) -> LossParts:
    """The summed objective on sampled tokens: ``kd_weight · Σ sampled_token_kl + ce_weight · Σ −log q``.

    Every row is a supervised position (the caller selects them). ``kd`` is Σ r_t, the summed
    reverse-KL estimate; ``ce`` is Σ −log q(y_t) (temperature 1). Sums, never means.

    Shapes: student_logprobs, teacher_logprobs, segments: (N,) -> LossParts of scalars.
    """
    zero = torch.zeros((), dtype=torch.float32, device=student_logprobs.device)
    ce = -student_logprobs.float().sum()
    kd = zero
    if teacher_logprobs is not None:
        kd = sampled_token_kl(student_logprobs, teacher_logprobs, segments, discount=discount).sum()
    elif kd_weight != 0:
        raise ValueError("teacher_logprobs is None but kd_weight != 0")
    loss = zero
    if kd_weight != 0:
        loss = loss + kd_weight * kd
    if ce_weight != 0:
        loss = loss + ce_weight * ce
    count = torch.as_tensor(student_logprobs.numel(), device=student_logprobs.device)
    return LossParts(loss=loss, kd=kd.detach(), ce=ce.detach(), num_supervised=count)
