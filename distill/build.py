"""Building a run from its config: tokenizer, teacher, shared vocabulary, data arguments, batches.

One home for what ``distill train`` and ``distill cache`` (and later ``generate``) share, so that no
stage reaches into another's module for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from distill import models
from distill.config import Config
from distill.data import collate
from distill.losses import check_tokenizers_compatible, shared_vocab_size


def load_run_tokenizer(config: Config):
    """(name, tokenizer) of the run: student.tokenizer, else student.model, else teacher.model."""
    name = config.student.tokenizer or config.student.model or config.teacher.model
    return name, models.load_tokenizer(name, revision=config.student.revision,
                                       trust_remote_code=config.student.trust_remote_code)


def teacher_dtype(config: Config) -> torch.dtype:
    """teacher.dtype, or with "auto" the student's compute dtype (bf16 / fp16 under that precision)."""
    if config.teacher.dtype != "auto":
        return models.DTYPES[config.teacher.dtype]
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.train.precision, torch.float32)


def load_teacher(config: Config, weights: bool = True) -> nn.Module:
    """The frozen teacher model of teacher.model, its weights checked finite. ``weights=False``: its
    shape only, parameters on the meta device (for a process that receives its shards from process 0)."""
    t = config.teacher
    if not weights:
        return models.freeze(models.empty_causal_lm(t.model, dtype=teacher_dtype(config), revision=t.revision,
                                                    trust_remote_code=t.trust_remote_code))
    teacher = models.load_causal_lm(t.model, dtype=teacher_dtype(config), revision=t.revision,
                                    trust_remote_code=t.trust_remote_code)
    return models.freeze(models.check_finite(teacher, f"the teacher {t.model}"))


def shared_vocab(config: Config, tok_name: str, tokenizer) -> int:
    """The real shared vocabulary of the run's tokenizer and the teacher's (refusing mismatched ones)."""
    if tok_name == config.teacher.model:
        return len(tokenizer)  # padded LM-head rows past it are sliced off
    teacher_tokenizer = models.load_tokenizer(config.teacher.model, revision=config.teacher.revision,
                                              trust_remote_code=config.teacher.trust_remote_code)
    check_tokenizers_compatible(tokenizer, teacher_tokenizer)  # refuses, naming cross-tokenizer mode
    return shared_vocab_size(tokenizer, teacher_tokenizer)


def training_data_args(config: Config, tokenizer, *, teacher_tokenizer=None,
                       teacher_max_length: Optional[int] = None) -> dict:
    """``load_tokenized`` arguments: the one definition of how training (and its cache) sees the data.
    ``teacher_tokenizer``: a teacher on another tokenizer, which reads chat rows in its own template."""
    d = config.data
    extra = (dict(teacher_tokenizer=teacher_tokenizer, teacher_max_length=teacher_max_length)
             if teacher_tokenizer is not None else {})
    return dict(tokenizer=tokenizer, format=d.format, max_length=d.max_length, packing=d.packing,
                text_field=d.text_field, prompt_field=d.prompt_field, completion_field=d.completion_field,
                messages_field=d.messages_field, cache_dir=data_cache_dir(), **extra)


def data_cache_dir() -> Path:
    """Where tokenized datasets are cached: $DISTILL_CACHE/tokenized (default ~/.cache/distill)."""
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill")) / "tokenized"


def has_accelerator() -> bool:
    """A GPU (or other accelerator) is present; otherwise Accelerate runs on the CPU (gloo across processes)."""
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, MPS, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def has_plain_lm_head(model: nn.Module) -> bool:
    """True if logits are exactly ``lm_head(last_hidden_state)`` (no soft-capping or scaling),
    which the chunked loss assumes."""
    cfg = model.config
    scaled = any(getattr(cfg, name, None) not in (None, 1, 1.0)
                 for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"))
    return not scaled and isinstance(model.get_output_embeddings(), nn.Linear)


def fetch(dataset, indices: list[int], pad_token_id: int, device) -> dict:
    """Rows ``indices`` of a tokenized dataset, collated (right padding) and on ``device``."""
    rows = dataset[indices]
    examples = [dict(input_ids=i, labels=l) for i, l in zip(rows["input_ids"], rows["labels"])]
    batch = {k: v.to(device) for k, v in collate(examples, pad_token_id=pad_token_id).items()}
    if "teacher_input_ids" in rows:  # chat rows in a cross-tokenizer teacher's own template: (ids, labels) lists
        batch["teacher_rows"] = list(zip(rows["teacher_input_ids"], rows["teacher_labels"]))
    return batch
