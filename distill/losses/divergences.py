"""Per-position divergences between teacher and student next-token distributions.

Every divergence has the signature

    f(student_logits, teacher_logits, *, temperature=1.0, <its own parameter>) -> Tensor

takes logits of shape (..., V) in any floating dtype and returns the per-position value of shape
(...), float32. With p = softmax(teacher_logits / τ) and q = softmax(student_logits / τ) (τ applies
to both sides), all arithmetic is float32 in log space (``log_softmax``, ``logaddexp``), so logits
of ±1e4 are fine, and tokens banned with -inf logits are handled exactly: a token banned on both
sides contributes 0 (never NaN); a token only the teacher bans makes ``reverse_kl`` +inf (the true
value of KL(q‖p) there), never NaN. The math follows LOSSES.md; nothing here reduces over
positions or masks labels: that is ``objective.kd_loss``.

Every divergence here is a sum over the vocabulary of terms that depend on (log q_v, log p_v) only.
Each is written once, as its ``*_sum`` form on normalized log-probabilities; the registered function
normalizes the logits and calls it. ``divergence_sum(name)`` hands the same form to the
vocabulary-parallel loss, which normalizes over the whole vocabulary across processes and sums each
process's slice of the terms (``distill.losses.vocab_parallel``).

Adding a divergence: write its ``*_sum`` form and the function, decorate the function with
``@register_divergence("name", sum_form)``, and add one row to the shared table in
``tests/reference.py``. Its keyword-only parameters other than ``temperature`` are what a config may
set for it (``divergence_params``).
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Divergence = Callable[..., Tensor]

DIVERGENCES: dict[str, Divergence] = {}
SUMS: dict[str, Callable[..., Tensor]] = {}


def register_divergence(name: str, sum_form: Callable[..., Tensor]) -> Callable[[Divergence], Divergence]:
    """Decorator: make ``fn`` selectable by ``name`` (in configs, ``kd_loss``, ``chunked_kd_loss``);
    ``sum_form(log_q, log_p, **params)`` is its sum over the last dim from normalized log-probabilities."""

    def register(fn: Divergence) -> Divergence:
        if name in DIVERGENCES:
            raise ValueError(f"divergence {name!r} is already registered")
        DIVERGENCES[name] = fn
        SUMS[name] = sum_form
        return fn

    return register


def get_divergence(name: str) -> Divergence:
    """The divergence registered as ``name``; ValueError listing the valid names otherwise."""
    if name in DIVERGENCES:
        return DIVERGENCES[name]
    close = difflib.get_close_matches(name, DIVERGENCES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown divergence {name!r}; valid: {', '.join(sorted(DIVERGENCES))}.{hint}")


def divergence_sum(name: str) -> Callable[..., Tensor]:
    """``sum_form(log_q, log_p, **params) -> (...)`` of divergence ``name``: Σ over the last dim of its
    terms, from student and teacher log-probabilities already normalized (over the whole vocabulary,
    also when the last dim is one slice of it)."""
    get_divergence(name)  # the same error for an unknown name
    return SUMS[name]


def divergence_params(name: str) -> set[str]:
    """Keyword parameters divergence ``name`` accepts besides ``temperature`` (e.g. {"beta"} for jsd)."""
    signature = inspect.signature(get_divergence(name))
    return {
        p.name
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "temperature"
    }


# ---------------------------------------------------------------------------------------------
# Shared pieces (log space, float32)
# ---------------------------------------------------------------------------------------------


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / τ) in float32."""
    z = logits.float()  # (..., V)
    if temperature != 1.0:
        z = z / temperature
    return torch.log_softmax(z, dim=-1)  # (..., V)


def _log_probs_pair(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(log q, log p): student and teacher log-probabilities at the same temperature τ."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape; slice both to the shared vocabulary first (distill.losses.slice_vocab)"
        )
    return _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a‖b) = Σ a (log a − log b) over the last dim, from log-probabilities.

    Terms with a = 0 (log a = −inf) are 0, in value and gradient, also where log b = −inf too.
    """
    gap = (log_a - log_b).masked_fill_(torch.isneginf(log_a), 0.0)  # (..., V), in place: one tensor fewer
    return (log_a.exp() * gap).sum(-1)  # (...)


def _log_mix(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """log(w·a + (1 − w)·b): the mixture of the probabilities, formed by log-sum-exp (never by
    mixing log-probabilities). Where a and b are both 0 the result is −inf with a zero gradient
    (plain ``logaddexp`` gives a NaN gradient there)."""
    a = log_a + (math.log(weight) if weight > 0 else -math.inf)  # (..., V)
    b = log_b + math.log1p(-weight)  # (..., V)
    both_zero = torch.isneginf(a) & torch.isneginf(b)  # (..., V)
    log_m = torch.logaddexp(a.masked_fill(both_zero, 0.0), b.masked_fill(both_zero, 0.0))  # (..., V)
    return log_m.masked_fill(both_zero, -math.inf)


# ---------------------------------------------------------------------------------------------
# Divergences: the sum forms (log-probabilities in), then the registered functions (logits in)
# ---------------------------------------------------------------------------------------------


def forward_kl_sum(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Σ p (log p − log q) over the last dim."""
    return _kl(log_p, log_q)


def reverse_kl_sum(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Σ q (log q − log p) over the last dim."""
    return _kl(log_q, log_p)


def jsd_sum(log_q: Tensor, log_p: Tensor, *, beta: float = 0.5) -> Tensor:
    """Σ over the last dim of β·p (log p − log m) + (1−β)·q (log q − log m), m = β·p + (1−β)·q."""
    if not 0.0 < beta < 1.0:
        raise ValueError(
            f"jsd needs 0 < beta < 1, got beta={beta}. jsd tends to 0 at both ends; it does not become a KL "
            "there. For KL(p‖q) use divergence 'forward_kl', for KL(q‖p) use 'reverse_kl'."
        )
    log_m = _log_mix(log_p, log_q, beta)  # (..., V)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _check_skew(alpha: float) -> None:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew divergences need 0 <= alpha < 1, got alpha={alpha}")


def skew_kl_sum(log_q: Tensor, log_p: Tensor, *, alpha: float = 0.1) -> Tensor:
    """Σ p (log p − log(α·p + (1−α)·q)) over the last dim."""
    _check_skew(alpha)
    return _kl(log_p, _log_mix(log_p, log_q, alpha))


def skew_reverse_kl_sum(log_q: Tensor, log_p: Tensor, *, alpha: float = 0.1) -> Tensor:
    """Σ q (log q − log(α·q + (1−α)·p)) over the last dim."""
    _check_skew(alpha)
    return _kl(log_q, _log_mix(log_q, log_p, alpha))


def tvd_sum(log_q: Tensor, log_p: Tensor) -> Tensor:
    """½ Σ |p − q| over the last dim."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


@register_divergence("forward_kl", forward_kl_sum)
def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """KL(p‖q) = Σ p (log p − log q): mode-covering (Hinton et al. 2015).

    The full KL, teacher entropy included, so it is 0 at a perfect match.

    Shapes:
        student_logits, teacher_logits: (..., V), any float dtype
        returns: (...), float32
    """
    return forward_kl_sum(*_log_probs_pair(student_logits, teacher_logits, temperature))


@register_divergence("reverse_kl", reverse_kl_sum)
def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """KL(q‖p) = Σ q (log q − log p): mode-seeking (MiniLLM, Gu et al. 2023).

    +inf where the teacher bans (−inf logit) a token the student allows: that is its true value.

    Shapes:
        student_logits, teacher_logits: (..., V), any float dtype
        returns: (...), float32
    """
    return reverse_kl_sum(*_log_probs_pair(student_logits, teacher_logits, temperature))


@register_divergence("jsd", jsd_sum)
def jsd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, beta: float = 0.5) -> Tensor:
    """Generalized Jensen-Shannon: β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q (GKD, Agarwal et al. 2023).

    Defined for 0 < β < 1 only; β = 0.5 is the usual JSD. It tends to 0 at both ends (≈ β·KL(p‖q)
    as β → 0), so the endpoints are not mapped to a KL: they are a ValueError.

    Shapes:
        student_logits, teacher_logits: (..., V), any float dtype
        returns: (...), float32
    """
    return jsd_sum(*_log_probs_pair(student_logits, teacher_logits, temperature), beta=beta)


@register_divergence("skew_kl", skew_kl_sum)
def skew_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, alpha: float = 0.1) -> Tensor:
    """Skew KL: KL(p ‖ α·p + (1−α)·q), 0 ≤ α < 1 (DistiLLM, Ko et al. 2024). α = 0 is forward_kl.

    Shapes:
        student_logits, teacher_logits: (..., V), any float dtype
        returns: (...), float32
    """
    return skew_kl_sum(*_log_probs_pair(student_logits, teacher_logits, temperature), alpha=alpha)


@register_divergence("skew_reverse_kl", skew_reverse_kl_sum)
def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, alpha: float = 0.1
) -> Tensor:
    """Skew reverse KL: KL(q ‖ α·q + (1−α)·p), 0 ≤ α < 1 (DistiLLM). α = 0 is reverse_kl.

    Shapes:
        student_logits, teacher_logits: (..., V), any float dtype
        returns: (...), float32
    """
    return skew_reverse_kl_sum(*_log_probs_pair(student_logits, teacher_logits, temperature), alpha=alpha)


@register_divergence("tvd", tvd_sum)
def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Total variation distance ½ Σ |p − q|: bounded in [0, 1], symmetric.

    Shapes:
        student_logits, teacher_logits: (..., V), any float dtype
        returns: (...), float32
    """
    return tvd_sum(*_log_probs_pair(student_logits, teacher_logits, temperature))


# ---------------------------------------------------------------------------------------------
# Hard-label cross-entropy (not a divergence: it compares with the data, not the teacher)
# ---------------------------------------------------------------------------------------------


def cross_entropy(student_logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """−log softmax(student_logits)[label], per position, at temperature 1; 0 where label == ignore_index.

    ``labels`` are aligned with the logits (a causal LM's caller has already shifted them).

    Shapes:
        student_logits: (..., V), any float dtype
        labels: (...), integer
        returns: (...), float32
    """
    vocab = student_logits.shape[-1]
    per_position = F.cross_entropy(
        student_logits.float().reshape(-1, vocab),  # (M, V)
        labels.reshape(-1),  # (M,)
        ignore_index=ignore_index,
        reduction="none",
    )  # (M,)
    return per_position.reshape(labels.shape)
