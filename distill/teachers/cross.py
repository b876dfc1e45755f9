"""A live teacher with its own tokenizer: each student row's text re-tokenized for the teacher and
aligned with the student's tokens by byte offsets (``distill.losses.cross_tokenizer``).

The text of a student row is the bytes its tokens stand for (``token_bytes``: exact for byte-level
BPE and SentencePiece-style tokenizers, so the student's ids are never re-derived from a decode).
The teacher's byte ends come from its offsets, refined to exact byte positions when its tokens spell
the text (byte-level BPE), so even the pieces of one multibyte character align one to one.
Special tokens split a row into segments: a student EOS becomes the teacher's EOS (the pair is in
the shared vocabulary; a packed row's leading EOS too, unless the teacher's tokenizer puts a BOS
first), a leading BOS is the student's first predictor, and the teacher gets its own BOS when its
tokenizer adds one. Each segment's text is tokenized by the teacher with offsets, and
the spans between common byte boundaries are the aligned positions. A span is trained on when all
its student tokens are supervised and both sides have a token before it to predict it from.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from distill.build import has_plain_lm_head
from distill.data.formats import special_prefix
from distill.losses import chunk_slices, slice_vocab
from distill.losses.cross_tokenizer import (AlignmentError, _decoder_kinds, align_spans, byte_ends, shared_token_ids,
                                            token_bytes)
from distill.losses.policy import token_logprobs
from distill.teachers.base import TeacherSignal, finite


@dataclass
class BatchAlignment:
    """Aligned spans of a student micro-batch and its teacher re-tokenization (N spans, trained ones only).

    Flat indices address positions of the (B, T) student and (B, T_t) teacher batches, row-major;
    position ``i`` predicts token ``i + 1``.

    teacher_inputs: ``input_ids`` and ``attention_mask`` (B, T_t), right-padded.
    s_first, t_first: (N,) the position whose prediction is the span's first token, each side.
    single: (N,) one token on each side.
    s_pos, s_tok, s_span: (M_s,) for every student token of a merged span: the position predicting
        it, the token, and the span's index (for the product of its probabilities); t_* likewise.
    span_tokens: (N,) number of student tokens in each span.
    """

    teacher_inputs: dict
    s_first: Tensor
    t_first: Tensor
    single: Tensor
    s_pos: Tensor
    s_tok: Tensor
    s_span: Tensor
    t_pos: Tensor
    t_tok: Tensor
    t_span: Tensor
    span_tokens: Tensor

    @property
    def num_spans(self) -> int:
        return int(self.s_first.numel())


def lossless(tokenizer, role: str) -> None:
    """Refuse a tokenizer whose tokens do not spell out the text (WordPiece drops whitespace)."""
    kinds = _decoder_kinds(tokenizer)
    if "WordPiece" in kinds and "ByteLevel" not in kinds:
        raise AlignmentError(f"the {role} tokenizer is WordPiece, which drops the whitespace between words: the text "
                             "of a row cannot be recovered from its tokens for the other tokenizer to read")


class Aligner:
    """Re-tokenizes student rows for the teacher and aligns them (plain Python, on the CPU)."""

    def __init__(self, teacher_tokenizer, student_tokenizer, *, max_teacher_length: Optional[int] = None):
        lossless(student_tokenizer, "student")
        lossless(teacher_tokenizer, "teacher")
        byte_ends(teacher_tokenizer, "check")  # refuses a tokenizer without offsets, with one line
        self.teacher_tokenizer, self.student_tokenizer = teacher_tokenizer, student_tokenizer
        self.max_teacher_length = max_teacher_length  # the teacher's positions; a longer row is cut (its spans dropped)
        self.student_bytes = token_bytes(student_tokenizer)
        self.teacher_bytes = token_bytes(teacher_tokenizer)
        self.teacher_ids, self.student_ids = shared_token_ids(teacher_tokenizer, student_tokenizer)
        self.teacher_prefix = special_prefix(teacher_tokenizer)  # what the teacher saw before text in training
        self.teacher_eos = teacher_tokenizer.eos_token_id
        self.student_eos = student_tokenizer.eos_token_id
        self.teacher_pad = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else (
            self.teacher_eos if self.teacher_eos is not None else 0)

    def row(self, ids: Sequence[int]) -> tuple[list[int], list[tuple[int, int, int, int]]]:
        """(teacher ids, spans as (t0, t1, s0, s1) row indices) for one unpadded student row."""
        teacher: list[int] = list(self.teacher_prefix)
        spans: list[tuple[int, int, int, int]] = []
        i = 0
        while i < len(ids):
            if self.student_bytes[ids[i]] is None:  # a special token
                # an EOS maps to the teacher's; a leading one too when the teacher puts no BOS first
                if ids[i] == self.student_eos and self.teacher_eos is not None and (i > 0 or not teacher):
                    prev_aligned = (spans and spans[-1][1] == len(teacher) and spans[-1][3] == i)
                    if prev_aligned:
                        spans.append((len(teacher), len(teacher) + 1, i, i + 1))
                    teacher.append(self.teacher_eos)
                i += 1
                continue
            j = i
            while j < len(ids) and self.student_bytes[ids[j]] is not None:
                j += 1
            # A packed row can start inside a character: skip the tokens before the first character start.
            while i < j and self.student_bytes[ids[i]][:1] and (self.student_bytes[ids[i]][0] & 0xC0) == 0x80:
                i += 1
            s_ends, total = [], 0
            for k in range(i, j):
                total += len(self.student_bytes[ids[k]])
                s_ends.append(total)
            data = b"".join(self.student_bytes[k] for k in ids[i:j])
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as error:  # a row cut inside a character: align the valid prefix
                text = data[:error.start].decode("utf-8")
            t_ids, t_ends = byte_ends(self.teacher_tokenizer, text)
            spelled = [self.teacher_bytes[t] for t in t_ids]
            if None not in spelled and b"".join(spelled) == text.encode("utf-8"):
                # the teacher's tokens spell the text: exact byte ends, also between the pieces of a character
                t_ends = list(itertools.accumulate(len(b) for b in spelled))
            base = len(teacher)
            for span in align_spans(t_ends, s_ends):
                spans.append((base + span.t0, base + span.t1, i + span.s0, i + span.s1))
            teacher.extend(t_ids)
            i = j
        return teacher, spans

    def chat_row(self, ids: Sequence[int], labels: Sequence[int], t_ids: Sequence[int],
                 t_labels: Sequence[int]) -> tuple[list[int], list[tuple[int, int, int, int]]]:
        """(teacher ids, spans) for a conversation rendered by each side's own chat template.

        The k-th supervised run of the student row (an assistant turn: its text, then its end marker)
        pairs with the k-th of the teacher's. Within a pair, the turn's text (the tokens before the first
        special token) is aligned by bytes, after the leading whitespace each template puts there and up
        to the longest common prefix (a run cut by truncation keeps its common part). A turn whose texts
        differ otherwise is not aligned. The end markers are not compared (CE trains the student's),
        except an EOS on both sides right after a fully aligned text (the pair is shared)."""
        runs = lambda lab: [(a, b) for a, b in _runs(lab) if a >= 1]  # noqa: E731
        spans: list[tuple[int, int, int, int]] = []
        for (a0, a1), (b0, b1) in zip(runs(labels), runs(t_labels)):
            a2, b2 = a0, b0
            while a2 < a1 and self.student_bytes[ids[a2]] is not None:
                a2 += 1
            while b2 < b1 and self.teacher_bytes[t_ids[b2]] is not None:
                b2 += 1
            s_pieces = [self.student_bytes[t] for t in ids[a0:a2]]
            t_pieces = [self.teacher_bytes[t] for t in t_ids[b0:b2]]
            local = align_texts(t_pieces, s_pieces)
            spans += [(b0 + t0, b0 + t1, a0 + s0, a0 + s1) for t0, t1, s0, s1 in local]
            whole = (local and local[-1][1] == len(t_pieces) and local[-1][3] == len(s_pieces)) or (
                not s_pieces and not t_pieces)
            if (whole and a2 < a1 and b2 < b1 and ids[a2] == self.student_eos and t_ids[b2] == self.teacher_eos):
                spans.append((b2, b2 + 1, a2, a2 + 1))
        return list(t_ids), spans

    def sampled_row(self, teacher_prompt: Sequence[int], completion: Sequence[int],
                    ended: bool) -> tuple[list[int], list[int]]:
        """The teacher's (ids, labels) of a student sample on a chat prompt: its own rendering of the
        prompt, then the completion's text (its bytes up to the first special token, cut at the last
        whole character) in its tokens, and its EOS when the student ended; capped at its positions."""
        pieces = []
        for t in completion:
            if self.student_bytes[t] is None:
                break
            pieces.append(self.student_bytes[t])
        data = b"".join(pieces)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            text = data[:error.start].decode("utf-8")
        tail = list(self.teacher_tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
        if ended and self.teacher_eos is not None:
            tail.append(self.teacher_eos)
        ids, labels = list(teacher_prompt) + tail, [-100] * len(teacher_prompt) + tail
        cap = self.max_teacher_length or len(ids)
        return ids[:cap], labels[:cap]

    def batch(self, input_ids: Tensor, attention_mask: Tensor, mask: Tensor,
              teacher_rows: Optional[Sequence[tuple[Sequence[int], Sequence[int]]]] = None) -> BatchAlignment:
        """The alignment of a student micro-batch; ``mask`` (B, T−1): position t predicts token t+1 and is
        supervised. Spans that are not fully supervised, or have no earlier token on a side, are left out.
        ``teacher_rows``: per row, the teacher's own (ids, labels) of the same conversation (chat data,
        ``chat_row``); without them the teacher re-tokenizes each row's text (``row``)."""
        B, T = input_ids.shape
        lengths = attention_mask.sum(1).tolist()
        ids_rows = input_ids.tolist()
        sup = mask.tolist()
        if teacher_rows is not None:
            rows = [self.chat_row(ids_rows[b][:lengths[b]], [-100] + [ids_rows[b][j + 1] if sup[b][j] else -100
                                                                       for j in range(lengths[b] - 1)],
                                  *teacher_rows[b]) for b in range(B)]
        else:
            rows = [self.row(ids_rows[b][:lengths[b]]) for b in range(B)]
        if self.max_teacher_length is not None:
            cap = self.max_teacher_length
            rows = [(t[:cap], [span for span in spans if span[1] <= cap]) for t, spans in rows]
        T_t = max([len(t) for t, _ in rows] + [1])
        t_input = torch.full((B, T_t), self.teacher_pad, dtype=torch.long)
        t_attn = torch.zeros((B, T_t), dtype=torch.long)
        s_first, t_first, single, counts = [], [], [], []
        merged = {"s_pos": [], "s_tok": [], "s_span": [], "t_pos": [], "t_tok": [], "t_span": []}
        for b, (t_ids, spans) in enumerate(rows):
            if t_ids:
                t_input[b, :len(t_ids)] = torch.tensor(t_ids)
                t_attn[b, :len(t_ids)] = 1
            for t0, t1, s0, s1 in spans:
                if t0 < 1 or s0 < 1 or not all(sup[b][j - 1] for j in range(s0, s1)):
                    continue
                n = len(s_first)
                s_first.append(b * T + s0 - 1)
                t_first.append(b * T_t + t0 - 1)
                single.append(t1 - t0 == 1 and s1 - s0 == 1)
                counts.append(s1 - s0)
                if not single[-1]:
                    for j in range(s0, s1):
                        merged["s_pos"].append(b * T + j - 1)
                        merged["s_tok"].append(ids_rows[b][j])
                        merged["s_span"].append(n)
                    for j in range(t0, t1):
                        merged["t_pos"].append(b * T_t + j - 1)
                        merged["t_tok"].append(t_ids[j])
                        merged["t_span"].append(n)
        device = input_ids.device
        long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        return BatchAlignment(
            teacher_inputs=dict(input_ids=t_input.to(device), attention_mask=t_attn.to(device)),
            s_first=long(s_first), t_first=long(t_first), single=torch.tensor(single, dtype=torch.bool, device=device),
            span_tokens=long(counts), **{k: long(v) for k, v in merged.items()})


def _runs(labels: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of supervised tokens (label ≠ -100)."""
    out, start = [], None
    for j, label in enumerate(list(labels) + [-100]):
        if label != -100 and start is None:
            start = j
        elif label == -100 and start is not None:
            out.append((start, j))
            start = None
    return out


def align_texts(teacher_pieces: Sequence[bytes], student_pieces: Sequence[bytes]) -> list[tuple[int, int, int, int]]:
    """Spans (t0, t1, s0, s1) between two tokenizations of (nearly) the same text, given each token's
    bytes: leading whitespace is skipped on each side, the texts are compared up to their longest
    common prefix, and the spans run between the byte positions where both have a token boundary."""
    s_text, t_text = b"".join(student_pieces), b"".join(teacher_pieces)
    s_skip = len(s_text) - len(s_text.lstrip())
    t_skip = len(t_text) - len(t_text.lstrip())
    a, b = s_text[s_skip:], t_text[t_skip:]
    limit = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    s_pos = [p - s_skip for p in itertools.accumulate((len(x) for x in student_pieces), initial=0)]
    t_pos = [p - t_skip for p in itertools.accumulate((len(x) for x in teacher_pieces), initial=0)]
    common = sorted({p for p in s_pos if 0 <= p <= limit} & {p for p in t_pos if 0 <= p <= limit})
    if len(common) < 2:
        return []
    first, last = common[0], common[-1]
    s0, s1 = s_pos.index(first), s_pos.index(last)
    t0, t1 = t_pos.index(first), t_pos.index(last)
    spans = align_spans([p - first for p in t_pos[t0 + 1:t1 + 1]], [p - first for p in s_pos[s0 + 1:s1 + 1]])
    return [(t0 + span.t0, t0 + span.t1, s0 + span.s0, s0 + span.s1) for span in spans]


@dataclass
class AlignedSignal:
    """The teacher at the aligned spans of a micro-batch.

    At each span's first prediction: ``hidden`` (N, d_t) with the LM head ``weight`` (V_t, d_t) and
    ``bias``, so a loss computes the (N, V_t) logits a chunk of spans at a time (``logits(rows)``);
    or, for a head that is not a plain linear layer, the ``full`` logits (N, V_t).
    span_logprob: (N,) log-probability of each span's text at τ (sum over its teacher tokens; 0 on 1:1 spans).
    alignment: the index tensors, for the student side.
    """

    span_logprob: Tensor
    alignment: BatchAlignment
    vocab_size: int
    hidden: Optional[Tensor] = None
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    full: Optional[Tensor] = None

    def logits(self, rows=slice(None)) -> Tensor:
        """Next-token logits (n, V_t) at the first predictions of spans ``rows`` (raw, not tempered)."""
        if self.full is not None:
            return self.full[rows]
        return slice_vocab(torch.nn.functional.linear(self.hidden[rows], self.weight, self.bias), self.vocab_size)


class CrossTokenizerTeacher:
    """A frozen causal LM with its own tokenizer. ``signal(..., want="aligned")`` aligns the batch and
    answers at the aligned spans; every answer runs under ``no_grad``."""

    def __init__(self, model: nn.Module, aligner: Aligner, vocab_size: int, *, temperature: float = 1.0,
                 chunk_size: int = 1024):
        self.model, self.aligner, self.vocab_size = model, aligner, vocab_size
        self.temperature, self.chunk_size = temperature, chunk_size
        self.seconds = 0.0  # teacher forward
        self.align_seconds = 0.0  # re-tokenization and alignment (CPU)

    def _answer(self, a: BatchAlignment) -> tuple[AlignedSignal, Tensor]:
        """(the signal, tempered log-probs of merged spans' teacher tokens (M_t,)): the LM head only on
        the rows needed, a chunk at a time, when it is a plain linear layer."""
        if has_plain_lm_head(self.model):
            hidden = self.model.base_model(**a.teacher_inputs).last_hidden_state.flatten(0, 1)  # (B*T_t, d_t)
            head = self.model.get_output_embeddings()
            rows_of = lambda index: slice_vocab(head(hidden[index]), self.vocab_size)  # noqa: E731
            kept = dict(hidden=hidden[a.t_first], weight=head.weight, bias=head.bias)  # (N, d_t)
        else:  # soft-capped or scaled logits
            logits = self.model(**a.teacher_inputs).logits.flatten(0, 1)  # (B*T_t, V_t)
            rows_of = lambda index: slice_vocab(logits[index], self.vocab_size)  # noqa: E731
            kept = dict(full=rows_of(a.t_first))
        lp = torch.cat([token_logprobs(rows_of(a.t_pos[r]).float() / self.temperature, a.t_tok[r])
                        for r in chunk_slices(a.t_pos.numel(), self.chunk_size)]
                       or [torch.zeros(0, device=a.t_pos.device)])  # (M_t,)
        span_lp = torch.zeros(a.num_spans, dtype=torch.float32, device=lp.device).index_add_(0, a.t_span, lp)
        return AlignedSignal(span_logprob=span_lp, alignment=a, vocab_size=self.vocab_size, **kept), lp

    @torch.no_grad()
    def signal(self, inputs: dict, mask: Tensor, examples: Optional[Sequence[int]] = None, *, want: str = "aligned",
               tokens: Optional[Tensor] = None) -> TeacherSignal:
        if want != "aligned":
            raise ValueError("a teacher with another tokenizer answers only at aligned spans (want='aligned')")
        tic = time.perf_counter()
        a = self.aligner.batch(inputs["input_ids"], inputs["attention_mask"], mask, inputs.get("teacher_rows"))
        self.align_seconds += time.perf_counter() - tic
        tic = time.perf_counter()
        try:
            aligned, lp = self._answer(a)
            first = aligned.hidden if aligned.hidden is not None else aligned.full
            return TeacherSignal(ok=finite(first) & finite(lp), aligned=aligned)
        finally:
            if mask.device.type == "cuda":
                torch.cuda.synchronize(mask.device)
            self.seconds += time.perf_counter() - tic

