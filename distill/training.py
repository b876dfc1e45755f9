"""`distill train`: one training loop for every kind of token-level distillation, on Accelerate.

Reads top to bottom: build the pieces from the config, resume if the output directory holds a
checkpoint, then loop: fetch the optimizer step's micro-batches, count their supervised tokens
across all processes, and divide each micro-batch's loss *sum* by that one global count (the only
place anything is normalized, see LOSSES.md), step, log, evaluate, checkpoint.

The batch order is a pure function of (seed, epoch, step), so resuming needs only the step count,
and one process with micro-batch 8 sees exactly the examples that two processes with 4 each see.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from distill.batches import StepBatches, step_batches, step_source
from distill.build import (fetch, has_accelerator, has_plain_lm_head, load_run_tokenizer, load_teacher, shared_vocab,
                           training_data_args)
from distill.config import Config, load_config, save_config
from distill.data import data_format, load_tokenized
from distill.data.formats import PROMPT_FORMATS
from distill.errors import UserError
from distill.export import qat
from distill.export.torchao_build import is_torchao_folder
from distill.features import (FeatureSettings, LayerTaps, check_attentions, check_relation_widths,
                              feature_projections, feature_settings, per_position_terms, use_eager_attention)
from distill import faults, sharding, zero3
from distill.generation import NonFiniteGuard, SamplingSettings, sample
from distill.losses import (DEFAULT_CHUNK_SIZE, LossParts, chunk_slices, chunked_kd_loss, cross_entropy, forward_kl,
                            get_divergence, kd_loss, slice_vocab, sparse_kd_loss, tau2_scale)
from distill.losses.cross_tokenizer import cross_tokenizer_divergence
from distill.losses.policy import chunked_token_logprobs, sampled_kd_loss, token_logprobs
from distill import models
from distill.teachers import CacheTeacher, LiveTeacher, TeacherSignal
from distill.teachers.cross import Aligner, CrossTokenizerTeacher

log = logging.getLogger(__name__)
SAMPLED_OBJECTIVE = "sampled_reverse_kl"  # loss.divergence: the policy-gradient objective (losses/policy.py)

# Settings that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"max_steps", "schedule_steps", "epochs", "eval_every", "eval_at_start", "save_every", "log_every",
                     "keep_checkpoints", "progress", "tracker", "nonfinite", "max_skipped_steps", "log_samples"}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, `docker stop`, `kill`): handled like Ctrl-C, a checkpoint is saved."""


def sigterm_as_interrupt():
    """From now on SIGTERM raises ``Terminated`` in the main thread, as Ctrl-C raises KeyboardInterrupt;
    returns the function that puts the previous handler back."""
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)


class NonFiniteError(UserError):
    """A NaN or inf in the teacher's targets, the student's loss or the gradients (train.nonfinite)."""


# ---------------------------------------------------------------------------------------------
# Small pieces the loop is built from


class Backbone(nn.Module):
    """Wraps a causal LM so its forward returns final hidden states (the LM head is fused into the
    chunked loss) or, with ``logits=True``, ordinary logits (the dense path).

    With ``features`` (loss.features), it also holds what is trained with the student and never
    saved with it (the hidden-state projections) and hooks on the student's layers; a forward given
    ``teacher_features`` (the teacher's, from ``LayerTaps``) and ``positions`` (B, T) bool returns
    (output, {term: sum over those positions}), so every trained parameter is used inside one
    forward (what DDP needs).

    A forward given ``objective`` returns ``objective(self)``: whatever reads the LM head's weight
    directly (the chunked loss, evaluation's scores) runs inside the root's forward, where ZeRO-3
    has that weight gathered (distill/zero3.py); ``objective`` calls ``_run``, not the module."""

    def __init__(self, model: nn.Module, features: Optional[FeatureSettings] = None, teacher_width: int = 0):
        super().__init__()
        self.model = model
        self.features = features if features is not None and features.any else None
        if self.features is not None:
            self.projections = feature_projections(self.features, model.config.hidden_size, teacher_width)
            self.taps = LayerTaps(model, self.features, side="student", relation_layer=-1)

    def _run(self, input_ids, attention_mask, logits: bool):
        if logits:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, d)

    def forward(self, input_ids=None, attention_mask=None, logits: bool = False,
                teacher_features: Optional[dict] = None, positions: Optional[Tensor] = None, objective=None):
        if objective is not None:
            return objective(self)
        if teacher_features is None or self.features is None:
            return self._run(input_ids, attention_mask, logits)
        with self.taps.recording() as seen:
            out = self._run(input_ids, attention_mask, logits)
        mine = LayerTaps.grouped(seen)
        if self.features.attentions:
            check_attentions(mine["attentions"], "the student")
        per = per_position_terms(self.features, self.projections, mine, teacher_features, attention_mask.bool(),
                                 causal=True)  # (B, T) each
        return out, {k: v[positions].sum() for k, v in per.items()}


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup, then cosine / linear decay to ``min_ratio`` or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def batch_indices(step: int, micro: int, *, n: int, batch_size: int, accum: int, world: int, rank: int,
                  seed: int) -> list[int]:
    """Dataset indices of micro-batch ``micro`` of optimizer step ``step`` on process ``rank``.

    Each epoch is a seeded permutation cut into global batches of ``batch_size * accum * world``
    examples (the incomplete last one is dropped); micro-batch m takes the m-th slice of that, and
    each process its own part of the slice.
    """
    global_batch = batch_size * accum * world
    per_epoch = n // global_batch
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    start = k * global_batch + (micro * world + rank) * batch_size
    return order[start:start + batch_size].tolist()


def build_optimizer(parameters, t, max_steps: int):
    """(optimizer, LR scheduler) of train.* (``t``); no weight decay on biases and norms."""
    params = [p for p in parameters if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if t.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps)
    else:
        optimizer = torch.optim.SGD(groups, lr=t.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_lambda(
        step, warmup=t.warmup_steps, total=t.schedule_steps or max_steps, schedule=t.schedule, min_ratio=t.min_lr_ratio))
    return optimizer, scheduler


@dataclass
class LossSettings:
    divergence: str
    divergence_kwargs: dict
    temperature: float
    scale_by_tau2: bool
    kd_weight: float
    ce_weight: float
    chunk_size: int  # 0: dense
    vocab_size: int
    compile: bool = False  # the chunked loss's per-chunk objective under torch.compile
    sparse_mode: str = "tail"  # teacher targets from a cache: tail bucket or renormalized
    discount: float = 0.0  # sampled_reverse_kl: discount of the advantage over the rest of the completion
    cross: Optional[dict] = None  # a teacher with another tokenizer: exact_weight, uld_weight, uld_tokens
    features: Optional[FeatureSettings] = None  # loss.features: hidden-state / attention / relation terms

    @property
    def want(self) -> str:
        """What the loss asks the teacher for (see distill.teachers)."""
        if self.cross is not None:
            return "aligned"
        return "token_logprobs" if self.divergence == SAMPLED_OBJECTIVE else "hidden" if self.chunk_size else "logits"


def micro_batch_loss(student: nn.Module, teacher, batch: dict, s: LossSettings, examples: Optional[list[int]] = None,
                     taps: Optional[LayerTaps] = None, inside: bool = False):
    """(LossParts (sums), teacher_ok) for one micro-batch. ``teacher`` (a ``distill.teachers`` source,
    or None for CE alone) says what it says about the supervised positions; ``examples`` are the rows'
    training-example indices (a cache looks targets up by them). ``teacher_ok`` is a 0-dim bool tensor
    saying the teacher's signal is finite, or None without a teacher. With ``s.features``, ``taps``
    (hooks on the live teacher's model) give the teacher's features, and the feature terms, summed
    over the positions that predict a supervised token, are added with their weights. With ``inside``
    (ZeRO-3), the objective runs inside the student's forward (``Backbone(objective=...)``)."""
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    mask = labels != -100
    tokens = labels[mask]  # (N,)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    asked = inputs | ({"teacher_rows": batch["teacher_rows"]} if "teacher_rows" in batch else {})
    features = s.features is not None and teacher is not None
    with taps.recording() if features else contextlib.nullcontext({}) as seen:
        signal: Optional[TeacherSignal] = (teacher.signal(asked, mask, examples, want=s.want, tokens=tokens)
                                           if teacher is not None else None)
    teacher_features = LayerTaps.grouped(seen) if features else None
    teacher_ok = signal.ok if signal is not None else None
    sums: dict = {}  # the feature terms' sums, when the student's forward computes them
    if inside:  # (no feature terms under ZeRO-3)
        def run(bb: nn.Module) -> tuple:  # a tuple of tensors: what ZeRO-3's backward hooks can find
            parts = _objective(lambda logits=False: bb._run(inputs["input_ids"], inputs["attention_mask"], logits),
                               head_of(bb), signal, mask, tokens, s)
            return tuple(getattr(parts, f.name) for f in dataclasses.fields(parts))
        return LossParts(*student(objective=run)), teacher_ok
    if teacher_features is None:
        def forward(logits: bool = False) -> Tensor:
            return student(**inputs, logits=logits)
    else:
        if s.features.attentions:
            check_attentions(teacher_features["attentions"], "the teacher")
        positions = torch.nn.functional.pad(mask, (0, 1))  # (B, T): the positions that predict a supervised token

        def forward(logits: bool = False) -> Tensor:
            out, terms = student(**inputs, logits=logits, teacher_features=teacher_features, positions=positions)
            sums.update(terms)
            return out
    parts = _objective(forward, head_of(student), signal, mask, tokens, s)
    if sums:
        weights = s.features.weights()
        parts = dataclasses.replace(parts, loss=parts.loss + sum(weights[k] * v for k, v in sums.items()),
                                    features={k: v.detach() for k, v in sums.items()})
    return parts, teacher_ok


def head_of(student: nn.Module) -> nn.Module:
    return _unwrap(student).model.get_output_embeddings()


def _objective(forward, head: nn.Module, signal: Optional[TeacherSignal], mask: Tensor, tokens: Tensor,
               s: LossSettings) -> LossParts:
    """The token-level objective of one micro-batch (sums), given the teacher's signal; ``forward(logits)``
    runs the student (final hidden states, or logits)."""
    if s.cross is not None:
        return cross_tokenizer_micro_batch(forward(), head, tokens, mask, signal, s)
    if s.divergence == SAMPLED_OBJECTIVE:  # only log q(y_t) of the sampled tokens is needed
        if s.chunk_size:
            logq = chunked_token_logprobs(forward()[:, :-1][mask], head.weight, tokens, bias=head.bias,
                                          vocab_size=s.vocab_size, chunk_size=s.chunk_size)  # (N,)
        else:
            logq = token_logprobs(slice_vocab(forward(True)[:, :-1][mask], s.vocab_size), tokens)
        rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]  # (N,) completion ids
        return sampled_kd_loss(logq, signal.token_logprobs if signal is not None else None, segments=rows,
                               discount=s.discount, kd_weight=s.kd_weight, ce_weight=s.ce_weight)
    common = dict(divergence=s.divergence, temperature=s.temperature, scale_by_tau2=s.scale_by_tau2,
                  kd_weight=s.kd_weight, ce_weight=s.ce_weight, **s.divergence_kwargs)
    if s.chunk_size:
        hidden = forward()[:, :-1][mask]  # (N, d): supervised positions only
        teacher_args = signal.chunked_kwargs() if signal is not None else {}
        if signal is not None and signal.targets is not None:
            teacher_args["sparse_mode"] = s.sparse_mode
        return chunked_kd_loss(hidden, head.weight, tokens, student_bias=head.bias, vocab_size=s.vocab_size,
                               chunk_size=s.chunk_size, compiled=s.compile, **teacher_args, **common)
    # Dense: full logits, but the loss only on the supervised rows (no work on prompts or padding).
    logits = slice_vocab(forward(True)[:, :-1][mask], s.vocab_size)  # (N, V)
    if signal is not None and signal.targets is not None:
        return sparse_kd_loss(logits, signal.targets, tokens, mode=s.sparse_mode, temperature=s.temperature,
                              scale_by_tau2=s.scale_by_tau2, kd_weight=s.kd_weight, ce_weight=s.ce_weight)
    return kd_loss(logits, signal.logits if signal is not None else None, tokens, **common)


def cross_tokenizer_micro_batch(hidden: Tensor, head: nn.Module, tokens: Tensor, mask: Tensor,
                                signal: Optional[TeacherSignal], s: LossSettings) -> LossParts:
    """The objective against a teacher with another tokenizer: KD over the aligned spans (sums), CE over
    every supervised student token. ``hidden`` (B, T, d) is the student's last hidden state."""
    flat = hidden.flatten(0, 1)  # (B*T, d)
    chunk = s.chunk_size or DEFAULT_CHUNK_SIZE
    logq = chunked_token_logprobs(hidden[:, :-1][mask], head.weight, tokens, bias=head.bias,
                                  vocab_size=s.vocab_size, chunk_size=chunk)  # (N_sup,)
    ce = -logq.sum()
    kd = ce.new_zeros(())
    if signal is not None:
        t = signal.aligned
        a = t.alignment
        if s.temperature == 1.0:  # a merged span's tokens are all supervised: their log-probs are CE's, reused
            T = hidden.shape[1]
            row_of = torch.cumsum(mask.flatten(), 0) - 1  # (B*(T-1),) index in logq of each supervised position
            lp = logq[row_of[(a.s_pos // T) * (T - 1) + a.s_pos % T]]  # (M_s,)
        else:
            scale = 1.0 / s.temperature
            lp = chunked_token_logprobs(flat[a.s_pos] * scale, head.weight, a.s_tok, bias=None if head.bias is None
                                        else head.bias * scale, vocab_size=s.vocab_size, chunk_size=chunk)  # at τ
        span_lp = lp.new_zeros(a.num_spans).index_add(0, a.s_span, lp)  # (N,)
        x = s.cross

        def spans(h: Tensor, s_lp: Tensor, rows: slice) -> Tensor:  # one chunk of spans; recomputed in backward
            logits = slice_vocab(head(h), s.vocab_size)  # (n, V_s): the spans' first predictions
            with torch.no_grad():
                t_logits = t.logits(rows)  # (n, V_t)
            exact, uld = cross_tokenizer_divergence(
                logits, t_logits, s_lp, t.span_logprob[rows], a.single[rows], x["student_ids"], x["teacher_ids"],
                divergence=s.divergence, temperature=s.temperature, exact_weight=x["exact_weight"],
                uld_weight=x["uld_weight"], uld_tokens=x["uld_tokens"], exact_mode=x["exact_mode"],
                uld_top_k=x["uld_top_k"], **s.divergence_kwargs)
            return x["exact_weight"] * exact.sum() + x["uld_weight"] * uld.sum()

        for rows in chunk_slices(a.num_spans, chunk):
            kd = kd + checkpoint(spans, flat[a.s_first[rows]], span_lp[rows], rows, use_reentrant=False)
    loss = ce.new_zeros(())
    if s.kd_weight:
        loss = loss + s.kd_weight * tau2_scale(s.temperature, s.scale_by_tau2) * kd
    if s.ce_weight:
        loss = loss + s.ce_weight * ce
    return LossParts(loss=loss, kd=kd.detach(), ce=ce.detach(), num_supervised=mask.sum())


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") else module


@torch.no_grad()
def evaluate(student: nn.Module, teacher: Optional[nn.Module], dataset, *, batch_size: int, pad_token_id: int,
             s: LossSettings, accelerator: Accelerator, aligned_teacher: Optional[CrossTokenizerTeacher] = None) -> dict:
    """Student CE / perplexity on held-out data and, with a teacher, fidelity to it: forward KL and
    the training divergence at temperature 1, and top-1 agreement. Sums are reduced over processes.
    Positions where the student's or the teacher's logits are non-finite are left out of every sum
    and counted in ``eval/nonfinite_positions`` (present only when there are any). With
    ``aligned_teacher`` (another tokenizer), fidelity on the aligned spans (``aligned_fidelity``)."""
    if aligned_teacher is not None:
        result = evaluate(student, None, dataset, batch_size=batch_size, pad_token_id=pad_token_id, s=s,
                          accelerator=accelerator)
        return {**result, **aligned_fidelity(student, aligned_teacher, dataset, batch_size=batch_size,
                                             pad_token_id=pad_token_id, s=s, accelerator=accelerator)}
    student.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    div_name = "reverse_kl" if s.divergence == SAMPLED_OBJECTIVE else s.divergence  # what the sampled one estimates
    div = get_divergence(div_name)
    sums = torch.zeros(6, dtype=torch.float64, device=accelerator.device)  # ce, n, fkl, div, agree, non-finite
    backbone = _unwrap(student)  # DDP's module (its forward would broadcast buffers), the FSDP2 root, ZeRO-3's module
    t_head = teacher.get_output_embeddings() if teacher is not None else None
    indices = list(range(rank, len(dataset), world))
    # Every process runs the same number of batches: a sharded forward is a collective, so a process
    # whose rows ran out runs its first row again and counts nothing of it.
    for start in range(0, -(-len(dataset) // world), batch_size):  # ceil(len / world) rows on the busiest
        rows_here = indices[start:start + batch_size]
        batch = fetch(dataset, rows_here or indices[:1] or [0], pad_token_id, accelerator.device)
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        with accelerator.autocast():
            t_hidden = (teacher.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                        .last_hidden_state[:, :-1][mask] if teacher is not None else None)

        def score(bb: nn.Module) -> Tensor:  # inside the student's forward (ZeRO-3 has its head whole there)
            with accelerator.autocast():
                hidden = bb._run(batch["input_ids"], batch["attention_mask"], False)[:, :-1][mask]  # (N, d)
            add = torch.zeros_like(sums)
            if not rows_here:
                return add
            head = bb.model.get_output_embeddings()
            targets = labels[mask]
            for rows in chunk_slices(targets.numel(), s.chunk_size or DEFAULT_CHUNK_SIZE):  # never all (N, V) logits
                with accelerator.autocast():
                    logits = slice_vocab(head(hidden[rows]), s.vocab_size).float()  # (n, V)
                ok = torch.isfinite(logits.sum(-1, dtype=torch.float64))  # (n,): one pass; NaN/inf propagate
                if teacher is not None:
                    with accelerator.autocast():
                        t_logits = slice_vocab(t_head(t_hidden[rows]), s.vocab_size).float()  # (n, V)
                    ok &= torch.isfinite(t_logits.sum(-1, dtype=torch.float64))
                add[0] += torch.where(ok, cross_entropy(logits, targets[rows]), 0.0).double().sum()
                add[1] += ok.sum()
                add[5] += (~ok).sum()
                if teacher is not None:
                    add[2] += torch.where(ok, forward_kl(logits, t_logits), 0.0).double().sum()
                    add[3] += torch.where(ok, div(logits, t_logits, **s.divergence_kwargs), 0.0).double().sum()
                    add[4] += ((logits.argmax(-1) == t_logits.argmax(-1)) & ok).double().sum()
            return add

        sums += backbone(objective=score)
    student.train()
    ce, n, fkl, dv, agree, bad = accelerator.reduce(sums, reduction="sum").tolist()
    per = (lambda x: x / n) if n else (lambda x: None)  # no finite position: no number to report
    result = {"eval/ce": per(ce), "eval/ppl": math.exp(min(ce / n, 50.0)) if n else None, "eval/tokens": int(n)}
    if teacher is not None:
        result.update({"eval/forward_kl": per(fkl), f"eval/{div_name}": per(dv), "eval/top1_agreement": per(agree)})
    if bad:
        result["eval/nonfinite_positions"] = int(bad)
    return result


@torch.no_grad()
def aligned_fidelity(student: nn.Module, teacher: CrossTokenizerTeacher, dataset, *, batch_size: int,
                     pad_token_id: int, s: LossSettings, accelerator: Accelerator) -> dict:
    """Fidelity to a teacher with another tokenizer, per aligned span at temperature 1: the exact-match
    forward KL (shared tokens + rest buckets on 1:1 spans, the span's probability on merged ones), ULD
    on all tokens, top-1 agreement on 1:1 spans (both argmax tokens shared and the same text), and the
    share of supervised student tokens that lie in aligned spans."""
    student.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    sums = torch.zeros(6, dtype=torch.float64, device=accelerator.device)  # kl, uld, agree, spans, single, tokens
    n_sup = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    head = _unwrap(student).model.get_output_embeddings()
    s_ids, t_ids = s.cross["student_ids"], s.cross["teacher_ids"]
    to_teacher = torch.full((s.vocab_size,), -1, dtype=torch.long, device=accelerator.device)
    to_teacher[s_ids] = t_ids
    tau, teacher.temperature = teacher.temperature, 1.0
    indices = list(range(rank, len(dataset), world))
    try:
        for start in range(0, len(indices), batch_size):
            batch = fetch(dataset, indices[start:start + batch_size], pad_token_id, accelerator.device)
            inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            mask = batch["labels"][:, 1:] != -100
            with accelerator.autocast():
                signal = teacher.signal(inputs | ({"teacher_rows": batch["teacher_rows"]} if "teacher_rows" in batch
                                                  else {}), mask, want="aligned")
                hidden = _unwrap(student).model.base_model(**inputs).last_hidden_state.flatten(0, 1)
            a = signal.aligned.alignment
            t_logits = signal.aligned.logits().float()  # (N, V_t)
            logits = slice_vocab(head(hidden[a.s_first]), s.vocab_size).float()  # (N, V_s)
            lp = token_logprobs(slice_vocab(head(hidden[a.s_pos]), s.vocab_size), a.s_tok)
            span_lp = lp.new_zeros(a.num_spans).index_add(0, a.s_span, lp)
            kl, _ = cross_tokenizer_divergence(logits, t_logits, span_lp, signal.aligned.span_logprob,
                                               a.single, s_ids, t_ids, divergence="forward_kl", uld_weight=0.0)
            _, uld = cross_tokenizer_divergence(logits, t_logits, span_lp, signal.aligned.span_logprob,
                                                a.single, s_ids, t_ids, exact_weight=0.0, uld_tokens="all")
            agree = (to_teacher[logits.argmax(-1)] == t_logits.argmax(-1)) & a.single
            sums += torch.stack([kl.double().sum(), uld.double().sum(), agree.double().sum(),
                                 torch.tensor(float(a.num_spans), device=sums.device), a.single.double().sum(),
                                 a.span_tokens.double().sum()])
            n_sup += mask.sum()
    finally:
        teacher.temperature = tau
        student.train()
    kl, uld, agree, spans, single, tokens = accelerator.reduce(sums, reduction="sum").tolist()
    n_sup = accelerator.reduce(n_sup, reduction="sum").item()
    return {"eval/aligned_forward_kl": kl / spans if spans else None, "eval/aligned_uld": uld / spans if spans else None,
            "eval/aligned_top1_agreement": agree / single if single else None,
            "eval/aligned_token_share": tokens / n_sup if n_sup else None, "eval/aligned_spans": int(spans)}


# ---------------------------------------------------------------------------------------------
# Checkpoints, metrics and the student: written to a temporary name and renamed when complete.
# A checkpoint is complete once its last file, trainer_state.json, is written (after every process
# has saved its part), and counts once it is renamed to step-N; a folder is removed by renaming it
# to .trash-* first. So a kill at any moment leaves whole checkpoints, never a half folder named
# step-N, plus leftovers that `clean_leftovers` removes or (a complete temporary one) renames in.


def checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    done = [p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()] if root.is_dir() else []
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def clean_leftovers(out: Path, keep: int) -> None:
    """Finish or undo what a killed run left: a complete temporary checkpoint is renamed into place,
    incomplete and trashed ones and a temporary student are removed, and checkpoints past the newest
    ``keep`` are discarded."""
    for tmp in (out / "checkpoints").glob(".tmp-step-*"):
        final = tmp.with_name(tmp.name[len(".tmp-"):])
        if (tmp / "trainer_state.json").is_file() and not final.exists():
            os.replace(tmp, final)  # killed between removing the oldest checkpoint and renaming this one in
    for leftover in [*(out / "checkpoints").glob(".tmp-step-*"), *(out / "checkpoints").glob(".trash-*"),
                     out / ".tmp-student", out / ".trash-student"]:
        shutil.rmtree(leftover, ignore_errors=True)
    for old in checkpoints(out)[:-keep]:
        _discard(old)


def _discard(path: Path) -> None:
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)  # atomic: the folder stops counting before any file of it is deleted
    shutil.rmtree(trash)


def write_failure(what: str, path: Path, error: Exception) -> Optional[UserError]:
    """A UserError for a write that failed because of the disk (full, read-only, over a file-size
    limit, permissions), or None for any other exception (a bug, which keeps its traceback)."""
    if not isinstance(error, OSError):
        text = str(error)  # safetensors and torch.save report I/O failures in their own exception types
        if not any(hint in text for hint in ("os error", "Errno", "write failed", "No space", "too large",
                                             "Read-only", "Permission denied")):
            return None
    reason = getattr(error, "strerror", None) or " ".join(str(error).split())[:200]
    return UserError(f"could not write {what} to {path}: {reason}")


def save_checkpoint(accelerator: Accelerator, out: Path, state: dict, keep: int,
                    shards: Optional[Callable[[Path], None]] = None) -> Path:
    """Checkpoint ``state`` (trainer_state.json) with what Accelerate saves (model, optimizer, scheduler,
    RNG states) and, under FSDP2 / ZeRO-3, what ``shards(folder)`` writes: each process's part of the
    model and optimizer (``sharded/``, ``zero3/``)."""
    final = out / "checkpoints" / f"step-{state['step']:08d}"
    tmp = out / "checkpoints" / f".tmp-step-{state['step']:08d}"
    previous = checkpoints(out)
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # model, optimizer, scheduler, RNG states of every process
        if shards is not None:
            shards(tmp)  # every process writes its shards
        faults.point("checkpoint")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(state))  # the completion marker, last
            # Never more than `keep` step-N folders: the oldest goes before the new one comes in, as long
            # as a whole one stays (keep >= 2); with keep 1 the old one goes only after the new one is in.
            done = [p for p in previous if p != final]
            for old in done[:max(0, len(done) - keep + 1)] if keep > 1 else []:
                _discard(old)
            faults.point("rotate")
            if final.exists():
                _discard(final)
            os.replace(tmp, final)
            for old in checkpoints(out)[:-keep]:
                _discard(old)
    except Exception as e:
        failure = write_failure(f"checkpoint {final.name}", final.parent, e)
        if failure is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous checkpoint {previous[-1].name} is intact" if previous else "no checkpoint was saved yet"
        raise UserError(f"{failure}; {kept}. Free space (or fix the folder's permissions) and run the same "
                        "command again to resume") from None
    accelerator.wait_for_everyone()
    return final


def save_student(model: nn.Module, tokenizer, out: Path, name: str = "student", state_dict: Optional[dict] = None) -> Path:
    """The student in standard Hugging Face format in ``out/name``, written whole or not at all
    (``state_dict``: its weights, when ``model``'s own are shards)."""
    final, tmp = out / name, out / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    models.align_special_tokens(model, tokenizer)  # config.json and generation_config.json: the tokenizer's ids
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
        faults.point("student")
        tokenizer.save_pretrained(tmp)
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
    except Exception as e:
        failure = write_failure("the student", final, e)
        if failure is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{failure}; the last checkpoint holds the trained weights: free space and run the same "
                        "command again to write it") from None
    return final


def save_qat_student(model: nn.Module, tokenizer, out: Path, *, group_size: int, keep_float: bool) -> Path:
    """A QAT run's student: the float master in ``out/student-float``, and from it the torchao int4
    build (the quantizer the loss saw) in ``out/student``, checked against the master."""
    from distill.export.torchao_build import export_torchao

    master = save_student(qat.to_float(model), tokenizer, out, name="student-float")
    try:
        summary = export_torchao(master, out / "student", "int4", group_size=group_size, progress=False)
    except OSError as e:
        failure = write_failure("the int4 student", out / "student", e)
        if failure is None:
            raise
        raise UserError(f"{failure}; the float master is in {master}: free space and run the same command again "
                        "to write it") from None
    check = summary["check"]
    log.info("the student is the int4 build of its float master (group %d): mean |Δ log p| %.4f, top-1 agreement "
             "%.1f%%", group_size, check["mean_abs_dlogp"], 100 * check["top1_agreement"])
    if not keep_float:
        _discard(master)
    return out / "student"


class MetricsLog:
    """metrics.jsonl: one JSON object per line. On resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        if not (self.enabled and self.path.exists()):
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut by a kill
                pass
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write_many(self, records: list[dict]) -> None:
        for record in records:
            self.write(record)

    def write(self, record: dict) -> None:
        if self.enabled:
            line = json.dumps(record) + "\n"
            with self.path.open("a") as f:
                faults.point("metrics", before=lambda: (f.write(line[:len(line) // 2]), f.flush()))
                f.write(line)
                f.flush()


# ---------------------------------------------------------------------------------------------
# The run


def check_memory(config: Config, processes: int, tokenizer, strategy: str = "ddp") -> None:
    """Refuse a run whose memory plan (distill/plan.py) exceeds the memory it has, before weights load.
    A plan that cannot be made (an architecture the fake build does not support) only warns."""
    from distill.plan import MemoryPlanError, check_fits

    try:
        check_fits(config, processes, processes_here=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), tokenizer=tokenizer,
                   strategy=strategy)
    except MemoryPlanError:
        raise
    except UserError:  # a missing model or a bad config: the loaders below say so, once
        return
    except Exception as e:  # noqa: BLE001 - the check is advice; the run itself reports real problems
        log.warning("no memory plan for this run (%s: %s); set train.memory_gb=0 to skip it",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")


def sharded_sizes(how: str, student_bytes: tuple[int, int], teacher: Optional[nn.Module], world: int,
                  checkpointing: bool) -> str:
    """One line: the parameter bytes this process holds of each sharded model, of their whole size."""
    held = [("student", *student_bytes)]
    if teacher is not None:
        held.append(("teacher", *sharding.local_bytes(teacher)))
    return (f"{how} over {world} processes, parameter bytes per process: "
            + "; ".join(f"{name} {here:,} of {whole:,}" for name, here, whole in held)
            + f" (activation checkpointing {'on' if checkpointing else 'off'})")


def train(config, overrides: Optional[list[str]] = None) -> dict:
    """Train a student as ``config`` says (a Config, dict or YAML path) and return the final metrics.

    Re-running on an output directory that holds a checkpoint resumes from it.
    """
    config: Config = load_config(config, overrides)
    if config.task in ("classification", "embedding"):  # encoders and classifiers: distill/classify.py
        from distill.classify import train_classifier

        return train_classifier(config)
    t, L = config.train, config.loss
    out = Path(t.output_dir)
    # ddp; fsdp2: the student and the teacher sharded (distill/sharding.py); zero3: the student under
    # DeepSpeed ZeRO-3, the teacher sharded as under fsdp2 (distill/zero3.py).
    strategy = sharding.mode(t.sharding)
    sharded, zeroed = strategy == "fsdp2", strategy == "zero3"
    if (sharded or zeroed) and (why := sharding.unsupported(config)):
        raise UserError(f"train.sharding={strategy} does not support {why} yet: use train.sharding=ddp")
    # Under ZeRO-3 Accelerate starts the processes as for DDP; distill builds DeepSpeed's engine itself.
    with zero3.hidden_from_accelerate() if zeroed else contextlib.nullcontext():
        accelerator = Accelerator(cpu=not has_accelerator(),  # on a CPU-only machine: gloo across processes
                                  mixed_precision={"fp32": "no"}.get(t.precision, t.precision),
                                  log_with=None if t.tracker == "none" else t.tracker, project_dir=str(out))
    tok_name, tokenizer = load_run_tokenizer(config)
    fsdp = sharding.settings(t.precision) if sharded else None
    ds_config = zero3.ds_config(t, accelerator.num_processes) if zeroed else None
    if zeroed:
        zero3.import_deepspeed(accelerator.device)  # a missing DeepSpeed: said now, before any weights load
    check_memory(config, accelerator.num_processes, tokenizer, strategy)
    main = accelerator.is_main_process
    if main and out.is_dir():
        clean_leftovers(out, t.keep_checkpoints)
    accelerator.wait_for_everyone()
    resume_from = checkpoints(out)[-1] if checkpoints(out) else None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            _check_same_run(out / "config.yaml", config)
        save_config(config, out / "config.yaml")
    set_seed(t.seed)

    # Teacher, student.
    from_cache = config.teacher.source == "cache"  # targets from `distill cache`: no teacher model in memory
    # Under FSDP2 with several processes, process 0 alone reads the weights and the others build the
    # models on the meta device and receive their shards (sharding.first_loads, shard_teacher/_student);
    # a student made from the teacher's layers is then meta wherever the teacher is.
    # (Under ZeRO-3 the teacher is read so too, unless the student is made from its layers: DeepSpeed
    # partitions a student every process holds whole.)
    first_reads = sharded and accelerator.num_processes > 1
    teacher_first = first_reads or (zeroed and accelerator.num_processes > 1
                                    and not config.student.init_from_teacher_layers)
    teacher = None  # with kd_weight 0 a named teacher is still loaded: for layer init and eval fidelity
    if config.teacher.model and (not from_cache or config.student.init_from_teacher_layers):
        if teacher_first:
            teacher = sharding.first_loads(lambda weights: load_teacher(config, weights=weights))
        else:
            teacher = load_teacher(config)
    cross = L.cross_tokenizer
    teacher_tokenizer = tokenizer
    if cross is not None:  # the teacher reads each row's text with its own tokenizer (distill/teachers/cross.py)
        teacher_tokenizer = models.load_tokenizer(config.teacher.model, revision=config.teacher.revision,
                                                  trust_remote_code=config.teacher.trust_remote_code)
        aligner = Aligner(teacher_tokenizer, tokenizer, max_teacher_length=getattr(
            teacher.config, "max_position_embeddings", None) if teacher is not None else None)
        vocab_size = len(tokenizer)
    else:
        vocab_size = shared_vocab(config, tok_name, tokenizer) if teacher is not None else len(tokenizer)
    if config.student.model and t.qat is not None and is_torchao_folder(config.student.model):
        raise UserError(f"student.model {config.student.model} is already a quantized torchao build: train.qat "
                        "starts from float weights (a QAT run keeps them in RUN/student-float)")
    if config.student.model:
        where = dict(revision=config.student.revision, trust_remote_code=config.student.trust_remote_code)

        def load_student(weights: bool = True):
            if not weights:  # its shape: process 0 sends the shards (sharding.shard_student)
                return models.empty_causal_lm(config.student.model, **where)
            return models.check_finite(models.load_causal_lm(config.student.model, **where),
                                       f"the student {config.student.model}")

        student = sharding.first_loads(load_student) if first_reads else load_student()
    elif config.student.config is not None:
        student = models.student_from_config(config.student.config, vocab_size=len(tokenizer))
    else:
        student = models.student_from_teacher_layers(teacher, config.student.init_from_teacher_layers).float()
    # Every model this run writes or samples from carries the tokenizer's BOS / EOS / pad ids.
    fixed = models.align_special_tokens(student, tokenizer)
    if fixed and config.student.model and accelerator.is_main_process:
        log.warning("the student's config disagrees with the tokenizer (%s): the saved student carries the "
                    "tokenizer's ids", "; ".join(fixed))
    if teacher is not None:
        fixed = models.align_special_tokens(teacher, teacher_tokenizer)
        if fixed and accelerator.is_main_process:
            log.warning("the teacher's config disagrees with the tokenizer (%s): distill uses the tokenizer's ids",
                        "; ".join(fixed))
    if from_cache:
        teacher = None  # it only gave the student its layers
    if t.qat is not None:  # the loss sees int4 weights; the optimizer updates their float masters
        qat.prepare(student, t.qat.bits, t.qat.group_size)
    checkpointing = t.gradient_checkpointing or (sharded and fsdp.checkpointing)
    if checkpointing:  # each decoder layer keeps its input and recomputes the rest in backward
        models.enable_checkpointing(student)
    for m, tok in ((student, tokenizer), (teacher, teacher_tokenizer)):
        rows = m.get_output_embeddings().weight.shape[0] if m is not None else None
        if rows is not None and rows < len(tok) and (cross is not None or rows < vocab_size):
            raise UserError(f"the tokenizer has {len(tok) if cross is not None else vocab_size} tokens but "
                            f"a model's vocabulary has only {rows} rows")
    chunked = L.chunk_size > 0 and all(has_plain_lm_head(m) for m in (student, teacher) if m is not None)
    settings = LossSettings(
        divergence=L.divergence,
        divergence_kwargs={k: v for k, v in (("beta", L.beta), ("alpha", L.alpha)) if v is not None},
        temperature=L.temperature, scale_by_tau2=L.scale_by_tau2, kd_weight=L.kd_weight, ce_weight=L.ce_weight,
        chunk_size=L.chunk_size if chunked else 0, vocab_size=vocab_size, compile=L.compile and chunked,
        sparse_mode=L.sparse_mode or "tail",
        discount=L.discount or 0.0,
        cross=None if cross is None else dict(
            exact_weight=cross.exact_weight, uld_weight=cross.uld_weight, uld_tokens=cross.uld_tokens,
            exact_mode=cross.exact_mode, uld_top_k=cross.uld_top_k,
            teacher_ids=torch.tensor(aligner.teacher_ids), student_ids=torch.tensor(aligner.student_ids)))

    # Feature terms (loss.features): hooks on both models' layers, projections trained beside the student.
    features = feature_settings(config, student, teacher) if L.features is not None else None
    if features is not None and not features.any:  # every weight 0
        features = None
    teacher_taps = None
    if features is not None:
        if features.attentions:
            use_eager_attention(student, "the student")
            use_eager_attention(teacher, "the teacher")
        if features.relations:
            check_relation_widths(features, student, teacher)
        teacher_taps = LayerTaps(teacher, features, side="teacher", relation_layer=features.relation_layer)
        settings.features = features

    # Data, tokenized once and cached.
    d = config.data
    data_args = training_data_args(config, tokenizer, **(dict(  # chat rows: the teacher reads its own template
        teacher_tokenizer=teacher_tokenizer, teacher_max_length=aligner.max_teacher_length) if cross is not None else {}))
    with accelerator.main_process_first():
        train_set = load_tokenized(d.train, split=d.train_split, max_examples=d.max_train_examples, **data_args)
        eval_set = (load_tokenized(d.eval, split=d.eval_split, max_examples=d.max_eval_examples, **data_args)
                    if d.eval else None)
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = t.batch_size * t.grad_accum_steps * world
    if len(train_set) < global_batch:
        raise UserError(f"data.train has {len(train_set)} examples after tokenization, fewer than one global batch "
                        f"({t.batch_size} x {t.grad_accum_steps} accumulation x {world} processes = {global_batch})")
    steps_per_epoch = len(train_set) // global_batch
    g = config.generation
    if g.lmbda > 0 or g.seq_kd:
        check_on_policy_data(config, data_format(train_set), student, teacher)
    elif data_format(train_set) == "prompt":
        raise UserError("data.train is prompt-only data: it has nothing to train on unless completions are sampled "
                        "(set generation.lmbda > 0 or generation.seq_kd=true)")
    # The teacher's signal, from the model or the cache (distill/teachers); None: CE alone.
    teacher_source = None
    if from_cache:
        teacher_source = CacheTeacher(open_teacher_cache(config, tokenizer, train_set, vocab_size), accelerator.device)
    elif teacher is not None and cross is not None:
        teacher_source = CrossTokenizerTeacher(teacher, aligner, len(teacher_tokenizer), temperature=L.temperature,
                                               chunk_size=settings.chunk_size or DEFAULT_CHUNK_SIZE)
    elif teacher is not None:
        teacher_source = LiveTeacher(teacher, vocab_size, chunk_size=settings.chunk_size or DEFAULT_CHUNK_SIZE)
    loss_teacher = teacher_source if L.kd_weight > 0 or features is not None else None
    max_steps = t.max_steps or max(1, int(t.epochs * steps_per_epoch))

    backbone = Backbone(student, features, teacher_width=teacher.config.hidden_size if features is not None else 0)
    if teacher is not None and not (sharded or zeroed):
        teacher.to(accelerator.device)
    if sharded or zeroed:
        device_mesh = sharding.mesh(accelerator.device, world)
        if teacher is not None:
            sharding.shard_teacher(teacher, device_mesh)
    if sharded:  # sharded in place: the optimizer is built over the shards, checkpoints are sharded state dicts
        model = sharding.shard_student(backbone, student, fsdp, device_mesh)
        optimizer, scheduler = build_optimizer(model.parameters(), t, max_steps)
        shards = lambda folder: sharding.save(model, optimizer, folder / "sharded")  # noqa: E731
        accelerator.print(sharded_sizes("FSDP2", sharding.local_bytes(model), teacher, world, checkpointing))
    elif zeroed:  # the engine partitions the student and owns the step; the scheduler is ours
        optimizer, scheduler = build_optimizer(backbone.parameters(), t, max_steps)
        model = zero3.initialize(backbone, optimizer, ds_config, accelerator.device)
        optimizer = zero3.Steps(model)
        shards = lambda folder: zero3.save(model, folder / "zero3")  # noqa: E731
        accelerator.print(sharded_sizes("ZeRO-3", zero3.local_bytes(model.module), teacher, world, checkpointing))
        accelerator.print(zero3.describe(ds_config))
    else:
        optimizer, scheduler = build_optimizer(backbone.parameters(), t, max_steps)  # the student and its projections
        model, optimizer = accelerator.prepare(backbone, optimizer)
        shards = None
    # The scheduler is stepped by hand (a prepared one steps once per process) but checkpointed.
    accelerator.register_for_checkpointing(scheduler)
    if cross is not None:
        settings.cross.update(teacher_ids=settings.cross["teacher_ids"].to(accelerator.device),
                              student_ids=settings.cross["student_ids"].to(accelerator.device))

    # Sampling in the loop (on-policy / sequence-level KD): from the live weights, seeded per row.
    sampling = SamplingSettings(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                                top_p=g.top_p)

    def generate_with(source: str):
        policy = _unwrap(model).model if source == "student" else teacher
        # Under FSDP2 the student samples with its units gathered once, and every process decodes
        # until all processes' rows have ended (each sharded forward is a collective). Under ZeRO-3
        # the gathered student's forwards are local; the teacher is sharded as under FSDP2.
        collective = sharded or (zeroed and source == "teacher")
        done = (lambda d: sharding.everyone_done(d, accelerator.device)) if collective else None

        def run(prompts, seeds):
            if source == "student" and (sharded or zeroed):
                gather = sharding.gathered(model, fsdp) if sharded else zero3.gathered(model)
            else:
                gather = contextlib.nullcontext()
            with gather:  # a non-finite row is sampled uniformly; train.nonfinite then decides
                return sample(policy, prompts, settings=sampling, seeds=seeds, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, batch_size=g.batch_size,
                              autocast=accelerator.autocast, guard=NonFiniteGuard(), everyone_done=done)
        return run

    # Resume.
    metrics = MetricsLog(out / "metrics.jsonl", enabled=main)
    samples_log = MetricsLog(out / "samples.jsonl", enabled=main and g.log_samples > 0)
    state = {"step": 0, "sharding": strategy, "window": [0.0, 0.0, 0.0, 0.0, 0.0],  # loss, kd, ce, tokens, steps
             "skipped_steps": 0, "consecutive_skips": 0,  # steps dropped for non-finite values (train.nonfinite)
             "window_generated": 0, "window_sources": {},  # sampled tokens and steps by source since last log
             "window_features": {k: 0.0 for k, w in (features.weights() if features else {}).items() if w > 0}}
    if resume_from is not None:
        saved = json.loads((resume_from / "trainer_state.json").read_text())
        if saved.get("sharding", "ddp") != strategy:
            raise UserError(f"{resume_from} was saved by a {saved.get('sharding', 'ddp')} run and this one is {strategy}: "
                            f"resume it with train.sharding={saved.get('sharding', 'ddp')} (the same launch config)")
        accelerator.load_state(str(resume_from))  # with FSDP2: the scheduler and the RNG states
        if sharded:
            sharding.load(model, optimizer, resume_from / "sharded")
        elif zeroed:
            zero3.load(model, resume_from / "zero3")
        state = {**state, **saved}
        metrics.truncate_after(state["step"])
        samples_log.truncate_after(state["step"])
        accelerator.print(f"resuming from {resume_from} (step {state['step']} of {max_steps})")
    if main and t.tracker != "none":
        accelerator.init_trackers("distill", config={k: v for k, v in _flat(config.to_dict()).items()
                                                      if isinstance(v, (int, float, str, bool))})

    # The loop.
    model.train()
    progress = tqdm(total=max_steps, initial=state["step"], disable=not (main and t.progress), unit="step",
                    dynamic_ncols=True)
    eval_result: dict = {}
    eval_args = dict(batch_size=t.eval_batch_size or t.batch_size, pad_token_id=tokenizer.pad_token_id,
                     s=settings, accelerator=accelerator)
    if cross is not None:  # fidelity on the aligned spans, not id by id
        eval_args["aligned_teacher"], teacher_for_eval = teacher_source, None
    else:
        teacher_for_eval = teacher
    if eval_set is not None and t.eval_at_start and state["step"] == 0:
        metrics.write({"step": 0, **evaluate(model, teacher_for_eval, eval_set, **eval_args)})
    tic, tokens_seen = time.perf_counter(), 0
    timing = {"generation": 0.0, "step": 0.0}  # this process's seconds since the last log (not checkpointed)
    with checkpoint_on_interrupt(accelerator, out, state, t.keep_checkpoints, progress, shards):
        while state["step"] < max_steps:
            step = state["step"]
            indices = [batch_indices(step, m, n=len(train_set), batch_size=t.batch_size, accum=t.grad_accum_steps,
                                     world=world, rank=rank, seed=t.seed) for m in range(t.grad_accum_steps)]
            source = step_source(step, seed=t.seed, lmbda=g.lmbda, seq_kd=g.seq_kd)
            made: StepBatches = step_batches(
                train_set, indices, step=step, source=source, seed=t.seed, num_generations=g.num_generations,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, device=accelerator.device,
                generate=generate_with(source) if source != "data" else None,
                teacher_row=aligner.sampled_row if cross is not None else None)
            batches = made.batches
            step_tic = time.perf_counter()
            local = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
            n_global = accelerator.reduce(local.to(accelerator.device), reduction="sum").item()
            feature_names = list(state["window_features"])
            # loss, kd, ce, generated, then the feature terms
            step_sums = torch.zeros(4 + len(feature_names), dtype=torch.float64, device=accelerator.device)
            step_sums[3] = made.generated_tokens
            # 1 where a micro-batch's teacher signal / student loss is non-finite; checked once per step.
            bad = torch.zeros(world, len(batches), 2, dtype=torch.float64, device=accelerator.device)
            for m, batch in enumerate(batches):
                # DDP and FSDP2 average gradients over processes, so multiply by world to divide by n_global
                # once. FSDP2 reduce-scatters every micro-batch's gradients (no_sync would keep them whole).
                # ZeRO-3 reduce-scatters every micro-batch's gradients into its partitions; its step is
                # taken once, after the last (the boundary), by settle_step.
                sync = (accelerator.no_sync(model) if m < len(batches) - 1 and not (sharded or zeroed)
                        else contextlib.nullcontext())
                if zeroed:
                    model.set_gradient_accumulation_boundary(m == len(batches) - 1)
                with sync:
                    with accelerator.autocast():
                        parts, teacher_ok = micro_batch_loss(model, loss_teacher, batch, settings,
                                                             made.examples[m] if source == "data" else None,
                                                             taps=teacher_taps, inside=zeroed)
                    if zeroed:
                        model.backward(parts.loss * (world / max(n_global, 1)), scale_wrt_gas=False)
                    else:
                        accelerator.backward(parts.loss * (world / max(n_global, 1)))
                if teacher_ok is not None:
                    bad[rank, m, 0] = (~teacher_ok).double()
                bad[rank, m, 1] = (~torch.isfinite(parts.loss.detach())).double()
                step_sums[:3] += torch.stack([parts.loss.detach(), parts.kd, parts.ce]).double()
                for i, name in enumerate(feature_names):
                    step_sums[4 + i] += parts.features[name].double()
            clip = t.max_grad_norm or float("inf")
            if zeroed:  # the engine clips (gradient_clipping) in its step; the norm is read before it
                grad_norm = zero3.grad_norm(model)
            elif sharded:
                grad_norm = sharding.clip_grad_norm(model.parameters(), clip)
            else:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
            # fp16's loss scaler finds and skips overflowing gradients itself: not an error.
            grad_bad = (~torch.isfinite(grad_norm)).double().view(1) * (accelerator.scaler is None) / world
            reduced = accelerator.reduce(torch.cat([step_sums, grad_bad, bad.flatten()]), reduction="sum").tolist()
            k = len(step_sums)
            problem = nonfinite_problem(reduced[k] > 0, torch.tensor(reduced[k + 1:]).view(world, len(batches), 2),
                                        lambda r, m: batch_indices(step, m, n=len(train_set), batch_size=t.batch_size,
                                                                   accum=t.grad_accum_steps, world=world, rank=r,
                                                                   seed=t.seed))
            lr = scheduler.get_last_lr()[0]
            settle_step(problem, step=step, state=state, optimizer=optimizer, scheduler=scheduler,
                        accelerator=accelerator, progress=progress, out=out, t=t)
            optimizer.zero_grad(set_to_none=True)
            timing["generation"] += made.generation_s
            timing["step"] += time.perf_counter() - step_tic
            if made.samples and g.log_samples:
                samples_log.write_many(sample_records(made, step + 1, g.log_samples, tokenizer))

            state["step"] = step = step + 1
            if problem is None:
                state["window"] = [w + v for w, v in zip(state["window"], [*reduced[:3], n_global, 1])]
                for i, name in enumerate(feature_names):
                    state["window_features"][name] += reduced[4 + i]
            if source != "data":
                state["window_generated"] += int(reduced[3])
                state["window_sources"][source] = state["window_sources"].get(source, 0) + 1
            tokens_seen += sum(b["attention_mask"].sum().item() for b in batches) * world
            progress.update(1)
            if step % t.log_every == 0 or step == max_steps:
                loss_sum, kd_sum, ce_sum, n_tok, n_steps = state["window"]
                elapsed = time.perf_counter() - tic
                per = (lambda x: x / n_tok) if n_tok else (lambda x: None)  # None: every step of the window skipped
                record = {"step": step, "loss": per(loss_sum), "kd": per(kd_sum),
                          "kd_scaled": per(kd_sum * (L.temperature ** 2 if L.scale_by_tau2 else 1.0)),
                          "ce": per(ce_sum), **{name: per(v) for name, v in state["window_features"].items()},
                          "lr": lr, "grad_norm": _number(grad_norm),
                          "supervised_tokens": int(n_tok), "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                          "skipped_steps": state["skipped_steps"]}
                if g.lmbda > 0 or g.seq_kd:  # steps by who wrote their completions, and what was sampled
                    record.update({f"steps_{k}": state["window_sources"].get(k, 0)
                                   for k in ("student",) + (("teacher",) if g.seq_kd else ())},
                                  generated_tokens=state["window_generated"])
                    record["time/generated_tokens_per_s"] = (state["window_generated"] / world / timing["generation"]
                                                             if timing["generation"] else None)
                teacher_s = teacher_source.seconds if teacher_source is not None else 0.0
                align_s = getattr(teacher_source, "align_seconds", 0.0)  # cross-tokenizer: re-tokenize + align (CPU)
                if isinstance(teacher_source, CrossTokenizerTeacher):
                    record["time/align_s"], teacher_source.align_seconds = align_s, 0.0
                record.update({"time/wall_s": elapsed, "time/generation_s": timing["generation"],
                               "time/teacher_s": teacher_s,
                               "time/student_s": max(0.0, timing["step"] - teacher_s - align_s)})
                metrics.write(record)
                accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
                progress.set_postfix(loss=_show(record["loss"]), tok_s=f"{record['tokens_per_s']:.0f}")
                state["window"] = [0.0, 0.0, 0.0, 0.0, 0.0]
                state["window_features"] = {name: 0.0 for name in state["window_features"]}
                state["window_generated"], state["window_sources"] = 0, {}
                tic, tokens_seen = time.perf_counter(), 0
                timing = {"generation": 0.0, "step": 0.0}
                if teacher_source is not None:
                    teacher_source.seconds = 0.0
            if eval_set is not None and ((t.eval_every and step % t.eval_every == 0) or step == max_steps):
                eval_result = evaluate(model, teacher_for_eval, eval_set, **eval_args)
                metrics.write({"step": step, **eval_result})
                accelerator.log(eval_result, step=step)
                if main:
                    progress.write(f"step {step}: " + ", ".join(f"{k[5:]} {_show(v)}" for k, v in eval_result.items()))
            faults.point("step")
            if (t.save_every and step % t.save_every == 0) or step == max_steps:
                save_checkpoint(accelerator, out, state, t.keep_checkpoints, shards)
    progress.close()

    # The student in standard Hugging Face format, written whole or not at all.
    final = out / "student"
    if sharded or zeroed:  # gathered on process 0 (every process takes part)
        whole = (sharding.full_state_dict(model, prefix="model.") if sharded
                 else zero3.full_state_dict(model.module, prefix="model."))
        if main:
            save_student(student, tokenizer, out, state_dict=whole)
    elif main and t.qat is not None:
        save_qat_student(accelerator.unwrap_model(model).model, tokenizer, out, group_size=t.qat.group_size,
                         keep_float=t.qat.keep_float)
    elif main:
        save_student(accelerator.unwrap_model(model).model, tokenizer, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": state["step"], "output_dir": str(out), "student": str(final), **eval_result}


def settle_step(problem: Optional[str], *, step: int, state: dict, optimizer, scheduler, accelerator: Accelerator,
                progress, out: Path, t) -> None:
    """Take the optimizer step, or, when ``problem`` (from ``nonfinite_problem``) says the step was
    non-finite, drop it: nothing of it reaches the parameters, the optimizer state or the schedule.
    ``train.nonfinite=stop`` then raises NonFiniteError; ``skip`` counts it and raises only after
    ``train.max_skipped_steps`` in a row. ``state`` (checkpointed) keeps the counts."""
    if problem is None:
        optimizer.step()
        scheduler.step()
        state["consecutive_skips"] = 0
        return
    state["consecutive_skips"] += 1
    where = f"step {step + 1}: {problem}"
    if t.nonfinite == "stop":
        progress.close()
        raise NonFiniteError(f"{where}; {_nothing_saved(out)}; set train.nonfinite=skip to skip such "
                             "steps, and run the same command again to resume")
    if state["consecutive_skips"] >= t.max_skipped_steps:
        progress.close()
        raise NonFiniteError(f"{state['consecutive_skips']} optimizer steps in a row were non-finite "
                             f"(train.max_skipped_steps={t.max_skipped_steps}), the last at {where}; "
                             f"{_nothing_saved(out)}")
    state["skipped_steps"] += 1
    if accelerator.scaler is not None:
        accelerator.scaler.update()  # its unscale of this step must be closed
    if accelerator.is_main_process:
        progress.write(f"skipped {where}")


@contextlib.contextmanager
def checkpoint_on_interrupt(accelerator: Accelerator, out: Path, state: dict, keep: int, progress, shards=None):
    """Around a training loop: Ctrl-C or SIGTERM (preemption) saves a checkpoint of the last finished
    step (unless it is saved already), says how to resume, and re-raises."""
    restore_sigterm = sigterm_as_interrupt()
    try:
        yield
    except KeyboardInterrupt:
        progress.close()
        if state["step"] > 0 and not (out / "checkpoints" / f"step-{state['step']:08d}").exists():
            path = save_checkpoint(accelerator, out, state, keep, shards)
            accelerator.print(f"\ninterrupted: saved {path}; run the same command again to resume")
        raise
    finally:
        restore_sigterm()


def nonfinite_problem(grad_bad: bool, bad, indices_of) -> Optional[str]:
    """What went non-finite in one optimizer step, or None: ``bad`` (world, micro-batches, 2) flags the
    teacher's signal and the student's loss of each micro-batch; ``indices_of(rank, micro)`` gives its
    dataset indices (the batch order is a pure function, so any process can name any micro-batch)."""
    for column, what, hint in ((0, "non-finite teacher targets", "the teacher's outputs on these examples are "
                                "NaN or inf (float16 overflows easily: try teacher.dtype=bfloat16)"),
                               (1, "non-finite student loss", "the student's weights or activations overflowed "
                                "(lower train.lr, keep train.max_grad_norm on, prefer bf16 to fp16)")):
        flagged = [(r, m) for r in range(bad.shape[0]) for m in range(bad.shape[1]) if bad[r, m, column] > 0]
        if flagged:
            examples = sorted(i for r, m in flagged for i in indices_of(r, m))
            shown = ", ".join(map(str, examples[:8])) + (", ..." if len(examples) > 8 else "")
            micro = ", ".join(str(m + 1) for m in sorted({m for _, m in flagged}))
            return f"{what} in micro-batch {micro} of {bad.shape[1]} (training examples {shown}): {hint}"
    if grad_bad:
        return ("non-finite gradients (the loss is finite but its gradient norm is NaN or inf): lower train.lr "
                "or keep train.max_grad_norm on")
    return None


def _nothing_saved(out: Path) -> str:
    done = checkpoints(out)
    newest = f"the newest checkpoint is {done[-1].name}" if done else "no checkpoint was saved"
    return f"nothing was saved from this step ({newest}, no student/ was written)"


def _number(x) -> Optional[float]:
    value = float(x)
    return value if math.isfinite(value) else None  # metrics.jsonl stays strict JSON


def _show(value) -> str:
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def check_on_policy_data(config: Config, fmt: Optional[str], student: nn.Module, teacher: Optional[nn.Module]) -> None:
    """Refuse, with a line that says why, data and models that sampling in the loop cannot work with."""
    g, d = config.generation, config.data
    what = "generation.lmbda > 0" if g.lmbda > 0 else "generation.seq_kd"
    if fmt not in PROMPT_FORMATS:
        raise UserError(f"{what} samples completions of prompts, but data.train is {fmt or 'unknown-format'} data, "
                        "which has no prompts: use prompt_completion, chat or prompt-only data (format: prompt)")
    if fmt == "prompt" and g.lmbda < 1 and not g.seq_kd:
        raise UserError(f"prompt-only data has no completions for the off-policy steps of generation.lmbda="
                        f"{g.lmbda}: set generation.lmbda=1 or generation.seq_kd=true, or give prompt_completion "
                        "or chat data")
    positions = min(getattr(m.config, "max_position_embeddings", None) or (1 << 30)
                    for m in (student, teacher) if m is not None)
    if d.max_length + g.max_new_tokens > positions:
        raise UserError(f"data.max_length ({d.max_length}) + generation.max_new_tokens ({g.max_new_tokens}) is more "
                        f"than the models' {positions} positions: lower one of them")


def sample_records(made: StepBatches, step: int, count: int, tokenizer) -> list[dict]:
    """samples.jsonl lines for the first ``count`` sampled rows of a step: ids (exact) and text (to read)."""
    return [{"step": step, "source": made.source, **r, "prompt": tokenizer.decode(r["prompt_ids"]),
             "completion": tokenizer.decode(r["completion_ids"])} for r in made.samples[:count]]


def open_teacher_cache(config: Config, tokenizer, train_set, vocab_size: int):
    """The verified cache in cache.dir, refused unless it matches this run's tokenizer, data and loss."""
    from distill.cache import TeacherCache, data_fingerprint
    from distill.data import tokenizer_fingerprint

    cache = TeacherCache(config.cache.dir)
    cache.check(tokenizer_sha256=tokenizer_fingerprint(tokenizer), data_fingerprint=data_fingerprint(train_set),
                num_examples=len(train_set))
    L = config.loss
    if not math.isclose(L.temperature, cache.temperature, rel_tol=1e-6) and (
            cache.mode == "sampled" or (L.sparse_mode or "tail") == "tail"):
        fix = ("" if cache.mode == "sampled" else "use loss.sparse_mode=renormalized (the tail cannot be "
               "re-tempered), or ")
        raise UserError(f"loss.temperature={L.temperature} differs from the {cache.mode} cache's temperature "
                        f"{cache.temperature}; {fix}rebuild the cache with cache.temperature={L.temperature}")
    if cache.vocab_size > vocab_size:
        raise UserError(f"the teacher cache has a {cache.vocab_size}-token vocabulary, the run {vocab_size}")
    return cache


def _check_same_run(saved: Path, config: Config) -> None:
    if not saved.exists():
        return
    old = _flat(load_config(saved).to_dict())
    new = _flat(config.to_dict())
    changed = sorted(k for k in set(old) | set(new)
                     if old.get(k) != new.get(k) and k.split(".")[-1] not in RESUMABLE_CHANGES)
    if changed:
        raise UserError(f"{saved.parent} holds a run with a different config ({', '.join(changed[:4])} changed); "
                        "use a new train.output_dir, or delete that directory to start over")


def _flat(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict) and not k == "config":
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat

