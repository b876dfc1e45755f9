"""``TeacherSignal``, what a teacher says about N supervised positions, and the ``Teacher`` protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import torch
from torch import Tensor

from distill.losses import SparseTargets

WANTS = ("logits", "hidden", "token_logprobs", "aligned")


def finite(x: Tensor) -> Tensor:
    """0-dim bool, no host sync: ``x`` holds no NaN and no +inf (−inf is log 0: an empty target slot)."""
    return ~(torch.isnan(x) | torch.isposinf(x)).any()


@dataclass
class TeacherSignal:
    """The teacher at the N supervised positions of a micro-batch; exactly one form is set.

    - ``logits`` (N, V): full next-token logits over the shared vocabulary.
    - ``hidden`` (N, d_t) with ``weight`` (V_t, d_t) and ``bias`` (V_t,) or None: final hidden states and
      the LM head, for the loss that fuses the head and never holds all logits.
    - ``targets``: sparse top-k / sampled targets (a cache's), one row per position.
    - ``token_logprobs`` (N,): log p(token) of the given next tokens, at temperature 1.
    - ``aligned``: a teacher with another tokenizer, at the spans aligned with the student's tokens
      (``distill.teachers.cross.AlignedSignal``).

    ``ok`` is a 0-dim bool tensor (no host sync): the signal holds no NaN or +inf.
    """

    ok: Tensor
    logits: Optional[Tensor] = None
    hidden: Optional[Tensor] = None
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    targets: Optional[SparseTargets] = None
    token_logprobs: Optional[Tensor] = None
    aligned: Optional[Any] = None  # teachers.cross.AlignedSignal: a teacher with another tokenizer

    def chunked_kwargs(self) -> dict:
        """The teacher arguments of ``chunked_kd_loss`` for this signal."""
        if self.targets is not None:
            return dict(teacher_targets=self.targets)
        if self.hidden is not None:
            return dict(teacher_hidden=self.hidden, teacher_weight=self.weight, teacher_bias=self.bias)
        if self.logits is not None:
            return dict(teacher_logits=self.logits)
        raise ValueError("this teacher signal holds only token log-probabilities: the loss needs distributions")


class Teacher(Protocol):
    """Anything that answers for the supervised positions of a batch.

    ``inputs``: ``input_ids`` and ``attention_mask`` (B, T); ``mask`` (B, T−1): position t predicts
    token t+1 and is supervised; ``examples``: the training-example index of each row (a cache looks
    targets up by it; None for sampled rows); ``want``: one of ``WANTS`` (a teacher that cannot give
    it raises ValueError, except that sparse targets answer "logits" and "hidden"); ``tokens`` (N,):
    the supervised next tokens (for "token_logprobs").
    """

    seconds: float  # time spent answering, for the loop's time split

    def signal(self, inputs: dict, mask: Tensor, examples: Optional[Sequence[int]], *, want: str,
               tokens: Optional[Tensor] = None) -> TeacherSignal: ...
