"""Batching tokenized examples: right padding and the attention mask."""

from __future__ import annotations

import torch

from distill.data.formats import IGNORE_INDEX


def collate(
    examples: list[dict], *, pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` with ``pad_token_id`` and ``labels`` with -100.

    Shapes: each example's ``input_ids`` and ``labels`` are (T_i,); returns ``input_ids``,
    ``labels`` and ``attention_mask`` (1 on real tokens, 0 on padding), all int64 (B, T) with
    T = max T_i, rounded up to a multiple of ``pad_to_multiple_of`` when given.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    lengths = [len(example["input_ids"]) for example in examples]
    for example, length in zip(examples, lengths):
        if len(example["labels"]) != length:
            raise ValueError(
                f"input_ids and labels differ in length ({length} vs {len(example['labels'])})"
            )
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)  # (B, T)
    for row, (example, length) in enumerate(zip(examples, lengths)):
        input_ids[row, :length] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        labels[row, :length] = torch.as_tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
