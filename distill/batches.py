"""Where the student's batches come from: the dataset, or completions sampled in the loop.

Off-policy, a micro-batch is the dataset's examples at ``batch_indices`` (a pure function of seed,
step, micro-batch and rank). On-policy (GKD, Agarwal et al. 2023), the same examples give their
*prompts* and the completions are sampled now, by the current student (``"student"``) or by the
teacher (``"teacher"``: sequence-level KD inside the loop). Which one an optimizer step uses is a
pure function of (seed, step): with probability ``lmbda`` the student samples, else the teacher
if ``seq_kd``, else the data. Row j of example e at step s is sampled with its own seed
``row_seed(seed, s, e, j)``, so a resumed run, or a run on more processes, samples exactly what the
original run did. Either way a batch has the same shape: ``input_ids``, ``attention_mask`` and
``labels`` (B, T), -100 on unsupervised positions: the prompt, and the padding after an EOS.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from distill.build import fetch
from distill.data import IGNORE_INDEX, collate
from distill.generation import Completion, row_seed

SOURCES = ("data", "student", "teacher")


def step_source(step: int, *, seed: int, lmbda: float, seq_kd: bool) -> str:
    """Who writes the completions of optimizer step ``step`` (0-based): "student", "teacher" or "data".
    A pure function of its arguments: every process and every resumption agrees."""
    if lmbda >= 1.0 or (lmbda > 0.0 and random.Random(row_seed(seed, step, -1)).random() < lmbda):
        return "student"
    return "teacher" if seq_kd else "data"


def prompt_of(input_ids: Sequence[int], labels: Sequence[int]) -> list[int]:
    """The prompt of a tokenized example: its tokens before the last supervised span (the last
    assistant turn of a chat, the completion of a prompt/completion pair), or all of them when
    nothing is supervised (prompt-only data)."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1  # trailing unsupervised tokens (none in our formats, but a template may add some)
    if end == 0:
        return list(input_ids)
    while end > 0 and labels[end - 1] != IGNORE_INDEX:
        end -= 1
    return list(input_ids[:end])


def sampled_example(prompt: Sequence[int], completion: Completion, eos_token_id: int) -> dict:
    """``prompt + completion (+ EOS if it was sampled)``, only the completion and its EOS supervised."""
    tail = list(completion.ids) + ([eos_token_id] if completion.ended else [])
    return dict(input_ids=list(prompt) + tail, labels=[IGNORE_INDEX] * len(prompt) + tail)


@dataclass
class StepBatches:
    """The micro-batches of one optimizer step on this process, and how they were made."""

    batches: list[dict]
    examples: list[list[int]]  # training-example indices of each micro-batch (the prompts' when sampled)
    source: str  # "data", "student" or "teacher"
    generated_tokens: int = 0  # sampled tokens on this process, EOS included
    generation_s: float = 0.0
    samples: list[dict] = field(default_factory=list)  # one record per sampled row, for samples.jsonl


Generate = Callable[[list[list[int]], list[int]], list[Completion]]  # (prompts, seeds) -> completions
# (the teacher's own prompt ids, the sampled completion ids, ended) -> the teacher's (ids, labels) of the row
TeacherRow = Callable[[list[int], list[int], bool], tuple[list[int], list[int]]]


def sampled_batches(rows: list[dict], examples: list[list[int]], *, step: int, seed: int, num_generations: int,
                    generate: Generate, eos_token_id: int, pad_token_id: int, device,
                    teacher_row: Optional[TeacherRow] = None) -> tuple[list[dict], dict]:
    """Micro-batches of sampled completions for the prompts of ``rows`` (one dict of ``input_ids`` /
    ``labels`` lists per micro-batch) of training examples ``examples``: ``num_generations`` rows per
    prompt, all sampled in one ``generate`` call so the step's sampling is batched. Rows that carry
    a cross-tokenizer teacher's own rendering (``teacher_input_ids`` / ``teacher_labels``, chat data)
    get ``teacher_rows`` too: its own prompt with the completion in its tokens (``teacher_row``).
    Returns (collated micro-batches, {"tokens", "seconds", "records"})."""
    prompts, seeds, owners, t_prompts = [], [], [], []
    for m, (batch_rows, indices) in enumerate(zip(rows, examples)):
        paired = teacher_row is not None and "teacher_input_ids" in batch_rows
        for r, (ids, labels, example) in enumerate(zip(batch_rows["input_ids"], batch_rows["labels"], indices)):
            prompt = prompt_of(ids, labels)
            t_prompt = prompt_of(batch_rows["teacher_input_ids"][r], batch_rows["teacher_labels"][r]) if paired else None
            for j in range(num_generations):
                prompts.append(prompt)
                seeds.append(row_seed(seed, step, example, j))
                owners.append((m, example, j))
                t_prompts.append(t_prompt)
    tic = time.perf_counter()
    completions = generate(prompts, seeds)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - tic
    per_batch: list[list[dict]] = [[] for _ in rows]
    t_rows: list[list[tuple]] = [[] for _ in rows]
    records = []
    for prompt, completion, row_seed_value, (m, example, j), t_prompt in zip(prompts, completions, seeds, owners,
                                                                              t_prompts):
        per_batch[m].append(sampled_example(prompt, completion, eos_token_id))
        if t_prompt is not None:
            t_rows[m].append(teacher_row(t_prompt, list(completion.ids), completion.ended))
        records.append({"example": example, "generation": j, "seed": row_seed_value, "ended": completion.ended,
                        "prompt_ids": list(prompt), "completion_ids": list(completion.ids)})
    batches = [{k: v.to(device) for k, v in collate(b, pad_token_id=pad_token_id).items()} for b in per_batch]
    for batch, paired in zip(batches, t_rows):
        if paired:
            batch["teacher_rows"] = paired
    tokens = sum(len(c.ids) + c.ended for c in completions)
    return batches, {"tokens": tokens, "seconds": seconds, "records": records}


def step_batches(dataset, indices: list[list[int]], *, step: int, source: str, seed: int, num_generations: int,
                 pad_token_id: int, eos_token_id: int, device, generate: Optional[Generate] = None,
                 teacher_row: Optional[TeacherRow] = None) -> StepBatches:
    """The micro-batches of optimizer step ``step`` for the examples ``indices`` (one list per
    micro-batch): the data as it is, or (source "student" / "teacher") sampled completions of its
    prompts with ``generate``."""
    if source == "data":
        return StepBatches([fetch(dataset, i, pad_token_id, device) for i in indices], indices, source)
    rows = [dataset[i] for i in indices]
    if generate is None:
        raise ValueError(f"source {source!r} needs a generate function")
    batches, made = sampled_batches(rows, indices, step=step, seed=seed, num_generations=num_generations,
                                    generate=generate, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                    device=device, teacher_row=teacher_row)
    return StepBatches(batches, indices, source, made["tokens"], made["seconds"], made["records"])
