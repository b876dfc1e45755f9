"""Vocabulary alignment: slicing padded heads, checking two tokenizers agree (tiny, in-process)."""

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from distill.losses import (
    TokenizerMismatchError,
    check_tokenizers_compatible,
    forward_kl,
    shared_vocab_size,
    slice_vocab,
)

WORDS = ["<unk>", "the", "bank", "river", "money", "airplane", "of", "a"]


def tiny_tokenizer(words, added=()):
    model = WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    backend = Tokenizer(model)
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokenizer.add_tokens(list(added))
    return tokenizer


def test_slice_vocab_drops_padded_columns():
    logits = torch.randn(2, 3, 11)
    sliced = slice_vocab(logits, 8)
    assert sliced.shape == (2, 3, 8)
    assert sliced.data_ptr() == logits.data_ptr()  # a view, nothing copied or filled
    torch.testing.assert_close(sliced, logits[..., :8])


def test_zero_filled_padding_would_change_the_divergence():
    """Why the padding is sliced, not zero-filled: a zero logit is real probability mass."""
    student, teacher = torch.randn(4, 8), torch.randn(4, 8)
    zeros = torch.zeros(4, 3)
    padded = forward_kl(torch.cat([student, zeros], -1), torch.cat([teacher, zeros], -1))
    assert not torch.allclose(padded, forward_kl(student, teacher))
    sliced = forward_kl(slice_vocab(torch.cat([student, zeros], -1), 8), slice_vocab(torch.cat([teacher, zeros], -1), 8))
    torch.testing.assert_close(sliced, forward_kl(student, teacher))


@pytest.mark.parametrize("vocab_size", [0, 12])
def test_slice_vocab_out_of_range(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        slice_vocab(torch.randn(2, 11), vocab_size)


def test_same_tokenizer_is_compatible():
    check_tokenizers_compatible(tiny_tokenizer(WORDS), tiny_tokenizer(WORDS))


def test_extra_tokens_past_the_shared_range_are_compatible():
    student, teacher = tiny_tokenizer(WORDS), tiny_tokenizer(WORDS, added=["<think>", "</think>"])
    assert shared_vocab_size(student, teacher) == len(WORDS)
    assert shared_vocab_size(teacher, teacher) == len(WORDS) + 2  # added tokens count
    check_tokenizers_compatible(student, teacher)


def test_same_size_different_mapping_is_refused():
    swapped = WORDS[:2] + [WORDS[3], WORDS[2]] + WORDS[4:]  # same size, same words, two ids swapped
    with pytest.raises(TokenizerMismatchError, match="cross-tokenizer") as info:
        check_tokenizers_compatible(tiny_tokenizer(WORDS), tiny_tokenizer(swapped))
    assert isinstance(info.value, ValueError)
    assert "id 2" in str(info.value)


def test_different_added_tokens_in_shared_range_are_refused():
    student = tiny_tokenizer(WORDS, added=["<a>"])
    teacher = tiny_tokenizer(WORDS, added=["<b>"])
    with pytest.raises(TokenizerMismatchError, match="cross-tokenizer"):
        check_tokenizers_compatible(student, teacher)
