"""Vocabulary alignment between teacher and student (LOSSES.md, "Vocabulary alignment").

Models often pad their LM head past the tokenizer (e.g. 151,936 rows for a 151,665-token
tokenizer). The padded columns are sliced off both sides, never zero-filled: a zero logit would
give a token that does not exist real probability mass. White-box distillation also needs both
tokenizers to map the shared id range to the same tokens; otherwise it refuses and points to
cross-tokenizer mode.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from distill.errors import UserError


class TokenizerMismatchError(UserError, ValueError):
    """Teacher and student tokenizers disagree on the shared vocabulary."""


def slice_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """The first ``vocab_size`` columns of ``logits`` (a view): drops padded LM-head columns.

    Shapes:
        logits: (..., V_padded) with V_padded >= vocab_size
        returns: (..., vocab_size)
    """
    if not 0 < vocab_size <= logits.shape[-1]:
        raise ValueError(
            f"vocab_size={vocab_size} must be in (0, {logits.shape[-1]}]: the logits have {logits.shape[-1]} columns"
        )
    return logits[..., :vocab_size]


def shared_vocab_size(student_tokenizer: Any, teacher_tokenizer: Any) -> int:
    """Size of the vocabulary both tokenizers have: min of ``len(tokenizer)`` (added tokens included)."""
    return min(len(student_tokenizer), len(teacher_tokenizer))


def _id_to_token(tokenizer: Any) -> dict[int, str]:
    return {index: token for token, index in tokenizer.get_vocab().items()}


def check_tokenizers_compatible(student_tokenizer: Any, teacher_tokenizer: Any) -> None:
    """Raise TokenizerMismatchError unless both tokenizers map every id in the shared range to the
    same token (compares the mappings, not only the sizes). Works with any tokenizer that has
    ``get_vocab()`` and ``len()`` (Hugging Face tokenizers do)."""
    shared = shared_vocab_size(student_tokenizer, teacher_tokenizer)
    student_tokens, teacher_tokens = _id_to_token(student_tokenizer), _id_to_token(teacher_tokenizer)
    mismatched = [i for i in range(shared) if student_tokens.get(i) != teacher_tokens.get(i)]
    if mismatched:
        first = mismatched[0]
        raise TokenizerMismatchError(
            f"student and teacher tokenizers differ on {len(mismatched)} of the {shared} shared token ids "
            f"(first: id {first} is {student_tokens.get(first)!r} for the student, "
            f"{teacher_tokens.get(first)!r} for the teacher). White-box distillation compares logits id by id "
            "and needs the same vocabulary; for models with different tokenizers use cross-tokenizer mode "
            "(loss.cross_tokenizer: {exact_weight: 1, uld_weight: 1})."
        )
