"""Distillation between a teacher and a student that do not share a vocabulary (LOSSES.md, "Cross-tokenizer").

Both tokenizers read the same text. Positions are aligned by **byte offsets**, never by decoded
strings: a byte where both tokenizations end a token is a common boundary, and the tokens between
two consecutive common boundaries form one *span* (one token on each side, or several on the side
that split the text finer). A span's first prediction on each side is conditioned on the same text
(every byte before the span), so the two next-token distributions there describe the same event
"what text comes next", each in its own vocabulary.

Per span, two terms (weights chosen by the caller; GOLD's hybrid uses both):

- **exact-match** (``exact_match_divergence``, ``span_divergence``): on a 1:1 span, any registered
  divergence between the two distributions over the tokens whose byte strings exist in both
  vocabularies (the *shared* tokens, paired), renormalised over them (default), or with one bucket
  for the rest of each side's mass (``mode="rest_bucket"``: infinite KL where one vocabulary lies
  inside the other, whose bucket is then empty). With identical tokenizers every token is shared
  and either is the ordinary token-level divergence. On a merged span (one side split it into several tokens) the event compared is
  "the next text is this span": the side that split assigns it the product of its merged tokens'
  probabilities, each conditioned on the text before the span and on its own earlier tokens of
  the span (teacher forcing on its own tokenization); the side with one token, that token's
  probability; the divergence is taken between the two Bernoulli distributions {span, not span}.
- **ULD** (``uld_distance``, Boizard et al. 2024): the L1 distance between the two probability
  vectors sorted in decreasing order, zero-padded to the larger vocabulary, at the span's first
  prediction. It needs no token correspondence. In the hybrid it is taken over the tokens outside
  the shared set only (their probabilities, not renormalised), so the two terms do not count the
  shared mass twice.

Alignment is plain Python over offsets (``byte_ends``, ``align_spans``); the losses are pure tensor
functions returning per-span float32 values, like the rest of ``distill.losses``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from distill.errors import UserError
from distill.losses.divergences import get_divergence


class AlignmentError(UserError, ValueError):
    """A tokenizer cannot be aligned by byte offsets (no offsets, an unknown token encoding)."""


# ---------------------------------------------------------------------------------------------
# Byte offsets and spans
# ---------------------------------------------------------------------------------------------


def char_to_byte(text: str) -> list[int]:
    """``b[i]`` = the UTF-8 byte offset of character ``i`` of ``text`` (``b[len(text)]`` = total bytes)."""
    out = [0] * (len(text) + 1)
    total = 0
    for i, ch in enumerate(text):
        out[i] = total
        total += len(ch.encode("utf-8", "surrogatepass"))
    out[len(text)] = total
    return out


def byte_ends(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """(ids, ends) of ``text`` tokenized without special tokens: ``ends[i]`` is the UTF-8 byte offset
    where token ``i`` ends. Needs a fast tokenizer (offset mapping); refuses others with one line.

    Several tokens of one multibyte character (byte-level BPE, byte fallback) share the character's
    end offset; ``align_spans`` treats only the last of them as ending there.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise AlignmentError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no offset mapping "
            "(it is not a fast tokenizer): cross-tokenizer alignment needs byte offsets; load its tokenizer.json")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    to_byte = char_to_byte(text)
    ends = [to_byte[end] for _, end in enc["offset_mapping"]]
    for i in range(1, len(ends)):  # offsets of stripped whitespace can step back; ends never do in bytes
        ends[i] = max(ends[i], ends[i - 1])
    return list(enc["input_ids"]), ends


@dataclass(frozen=True)
class Span:
    """Tokens ``[t0, t1)`` of the teacher and ``[s0, s1)`` of the student cover the same bytes."""

    t0: int
    t1: int
    s0: int
    s1: int

    @property
    def single(self) -> bool:
        """One token on each side (the exact-match divergence applies to the full distributions)."""
        return self.t1 - self.t0 == 1 and self.s1 - self.s0 == 1


def _boundaries(ends: Sequence[int]) -> list[tuple[int, int]]:
    """(byte, index after the last token ending there) for each distinct end offset, in order."""
    out: list[tuple[int, int]] = []
    for i, e in enumerate(ends):
        if out and out[-1][0] == e:
            out[-1] = (e, i + 1)
        else:
            out.append((e, i + 1))
    return out


def align_spans(teacher_ends: Sequence[int], student_ends: Sequence[int]) -> list[Span]:
    """Spans between consecutive common boundaries of two tokenizations of the same bytes.

    ``*_ends`` are non-decreasing byte end offsets (``byte_ends``). A byte is a boundary of a side
    when a token ends there and the next token ends later (tokens with equal ends, e.g. the pieces
    of one multibyte character, stay together). The first span starts at token 0 on both sides;
    tokens after the last common boundary belong to no span.
    """
    tb, sb = _boundaries(teacher_ends), _boundaries(student_ends)
    spans: list[Span] = []
    i = j = 0
    t_prev = s_prev = 0
    while i < len(tb) and j < len(sb):
        (te, ti), (se, sj) = tb[i], sb[j]
        if te == se:
            if ti > t_prev and sj > s_prev:
                spans.append(Span(t_prev, ti, s_prev, sj))
            t_prev, s_prev = ti, sj
            i += 1
            j += 1
        elif te < se:
            i += 1
        else:
            j += 1
    return spans


# ---------------------------------------------------------------------------------------------
# The vocabulary both sides share
# ---------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE vocabularies use it)."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = visible[:], 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(visible, map(chr, chars)))


def _decoder_kinds(tokenizer: Any) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    stack, kinds = [decoder], set()
    while stack:
        d = stack.pop()
        kinds.add(d.get("type", ""))
        if d.get("type") == "Replace" and "\u2581" in json.dumps(d.get("pattern", {}), ensure_ascii=False):
            kinds.add("Metaspace")
        stack.extend(d.get("decoders") or [])
    return kinds


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each token id stands for in running text (None for special tokens).

    Byte-level BPE (GPT-2, Llama 3, Qwen): the printable-character encoding undone. SentencePiece
    style (``▁`` for a space, ``<0xNN>`` byte fallback): ``▁`` -> space, the byte itself. WordPiece:
    ``##`` continuation marks dropped (its tokens never hold the spaces between words). Any other
    encoding is refused with one line.
    """
    kinds = _decoder_kinds(tokenizer)
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out: list[bytes | None] = [None] * (max(vocab.values()) + 1 if vocab else 0)
    if "ByteLevel" in kinds:
        inverse = {c: b for b, c in _bytes_to_unicode().items()}

        def convert(tok: str) -> bytes | None:
            try:
                return bytes(inverse[c] for c in tok)
            except KeyError:  # an added token written in plain text
                return tok.encode("utf-8")
    elif "Metaspace" in kinds or "ByteFallback" in kinds:
        def convert(tok: str) -> bytes | None:
            if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                return bytes([int(tok[3:5], 16)])
            return tok.replace("\u2581", " ").encode("utf-8")
    elif "WordPiece" in kinds:
        def convert(tok: str) -> bytes | None:
            return (tok[2:] if tok.startswith("##") else tok).encode("utf-8")
    else:
        raise AlignmentError(
            f"cross-tokenizer mode does not know how the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} encodes "
            f"text in its tokens (decoder {sorted(kinds) or 'none'}); supported: byte-level BPE, SentencePiece-style "
            "(\u2581 and <0xNN> byte fallback) and WordPiece")
    for tok, index in vocab.items():
        if index not in special:
            out[index] = convert(tok)
    return out


def shared_token_ids(teacher_tokenizer: Any, student_tokenizer: Any) -> tuple[list[int], list[int]]:
    """(teacher ids, student ids), paired: the tokens whose byte strings exist in both vocabularies,
    plus the EOS tokens of both (the same event: the text ends). Sorted by student id. Where one
    side has several ids with the same bytes (rare: added duplicates), the lowest id is used."""
    t_bytes, s_bytes = token_bytes(teacher_tokenizer), token_bytes(student_tokenizer)
    t_index: dict[bytes, int] = {}
    for i, b in enumerate(t_bytes):
        if b is not None and b not in t_index:
            t_index[b] = i
    pairs: dict[int, int] = {}
    seen: set[bytes] = set()
    for j, b in enumerate(s_bytes):
        if b is not None and b in t_index and b not in seen:
            pairs[j] = t_index[b]
            seen.add(b)
    t_eos, s_eos = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
    if t_eos is not None and s_eos is not None and s_eos not in pairs and t_eos not in pairs.values():
        pairs[s_eos] = t_eos
    s_ids = sorted(pairs)
    return [pairs[j] for j in s_ids], s_ids


# ---------------------------------------------------------------------------------------------
# Losses (per span, float32)
# ---------------------------------------------------------------------------------------------


def coarsen(log_probs: Tensor, ids: Tensor) -> Tensor:
    """The distribution on the tokens ``ids`` plus one bucket for all others, in log space.

    The rest bucket is the log-sum-exp of the other tokens (not log(1 − Σ), which cancels), −inf
    when ``ids`` cover the vocabulary.

    Shapes:
        log_probs: (N, V) normalised log-probabilities;  ids: (S,) distinct;  returns: (N, S + 1)
    """
    rest = log_probs.index_fill(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)  # (N, 1)
    return torch.cat([log_probs.index_select(-1, ids), rest], dim=-1)  # (N, S+1)


EXACT_MODES = ("renormalized", "rest_bucket")


def exact_match_divergence(student_logits: Tensor, teacher_logits: Tensor, student_ids: Tensor, teacher_ids: Tensor,
                           *, divergence: str = "forward_kl", temperature: float = 1.0, mode: str = "renormalized",
                           **divergence_kwargs: float) -> Tensor:
    """``divergence`` between teacher and student on the shared tokens (paired ``teacher_ids[k]`` <->
    ``student_ids[k]``), both at temperature τ.

    ``mode`` "renormalized": each side's distribution restricted to the shared tokens and renormalised
    (always finite). "rest_bucket": the shared tokens plus one bucket with the rest of each side's mass
    (no renormalisation); the two rest buckets stand for different text, and where one side's
    vocabulary lies inside the other's its bucket is empty and KL to it is infinite. With identical
    vocabularies both modes are the ordinary divergence.

    Shapes:
        student_logits: (N, V_s);  teacher_logits: (N, V_t);  *_ids: (S,);  returns: (N,) float32
    """
    if mode not in EXACT_MODES:
        raise ValueError(f"mode must be one of {EXACT_MODES}, got {mode!r}")
    log_q = torch.log_softmax(student_logits.float() / temperature, -1)  # (N, V_s)
    log_p = torch.log_softmax(teacher_logits.float() / temperature, -1)  # (N, V_t)
    if mode == "rest_bucket":
        log_q, log_p = coarsen(log_q, student_ids), coarsen(log_p, teacher_ids)  # (N, S+1)
    else:
        log_q, log_p = log_q.index_select(-1, student_ids), log_p.index_select(-1, teacher_ids)  # (N, S)
    # The divergence normalises its inputs itself (log_softmax): renormalised over S, or already whole.
    return get_divergence(divergence)(log_q, log_p, temperature=1.0, **divergence_kwargs)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable at both ends (Mächler 2012); −inf at x = 0."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def span_divergence(student_span_logprob: Tensor, teacher_span_logprob: Tensor, *, divergence: str = "forward_kl",
                    **divergence_kwargs: float) -> Tensor:
    """``divergence`` between the Bernoulli distributions {span, not span} of the two sides, from each
    side's log-probability of the span's text (sum of its tokens' conditional log-probs).

    Shapes:
        *_span_logprob: (N,);  returns: (N,) float32
    """
    def two(lp: Tensor) -> Tensor:
        lp = lp.float().clamp(max=0.0)
        return torch.stack([lp, log1mexp(lp)], dim=-1)  # (N, 2)

    return get_divergence(divergence)(two(student_span_logprob), two(teacher_span_logprob), temperature=1.0,
                                      **divergence_kwargs)


def uld_distance(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                 student_exclude: Tensor | None = None, teacher_exclude: Tensor | None = None,
                 top_k: int = 0) -> Tensor:
    """ULD: Σ_i |p_(i) − q_(i)| over the probabilities of each side sorted in decreasing order, the
    shorter vector zero-padded. ``*_exclude`` (ids) are left out of that side's vector (the hybrid
    leaves out the shared tokens, which the exact-match term compares id by id).

    ``top_k`` > 0: only the k largest probabilities of each side are sorted (``topk``, several times
    cheaper than a full sort of a large vocabulary) and the rest contribute |tail_p − tail_q|, the
    difference of the remaining masses: a lower bound of the exact value, short of it by at most
    2·min(tail_p, tail_q). ``top_k`` = 0 (or ≥ both vocabularies) is exact.

    Shapes:
        student_logits: (N, V_s);  teacher_logits: (N, V_t);  returns: (N,) float32
    """
    def largest(logits: Tensor, exclude: Tensor | None) -> tuple[Tensor, Tensor]:
        p = torch.softmax(logits.float() / temperature, -1)  # (N, V)
        if exclude is not None and exclude.numel():
            p = p.index_fill(-1, exclude, 0.0)
        if 0 < top_k < p.shape[-1]:
            values = p.topk(top_k, dim=-1).values  # (N, k), decreasing
            return values, (p.sum(-1) - values.sum(-1)).clamp_min(0.0)  # the mass left out
        return p.sort(dim=-1, descending=True).values, p.new_zeros(p.shape[0])

    (q, q_tail), (p, p_tail) = largest(student_logits, student_exclude), largest(teacher_logits, teacher_exclude)
    width = max(q.shape[-1], p.shape[-1])
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    return (p - q).abs().sum(-1) + (p_tail - q_tail).abs()


ULD_TOKENS = ("auto", "all", "unmatched")


def cross_tokenizer_divergence(student_logits: Tensor, teacher_logits: Tensor, student_span_logprob: Tensor,
                               teacher_span_logprob: Tensor, single: Tensor, student_ids: Tensor, teacher_ids: Tensor,
                               *, divergence: str = "forward_kl", temperature: float = 1.0, exact_weight: float = 1.0,
                               uld_weight: float = 1.0, uld_tokens: str = "auto", exact_mode: str = "renormalized",
                               uld_top_k: int = 0, **divergence_kwargs: float) -> tuple[Tensor, Tensor]:
    """(exact-match, ULD) per aligned span, unweighted; the caller sums ``exact_weight·exact + uld_weight·uld``.

    exact: on 1:1 spans (``single``) ``exact_match_divergence`` (``exact_mode``); on merged
    spans ``span_divergence`` of the span log-probabilities (each side's sum over its tokens of the
    span, at τ). A term whose weight is 0 is returned as zeros and costs nothing.
    uld: ``uld_distance`` at the spans' first predictions; ``uld_tokens`` "all" uses every token,
    "unmatched" leaves out the shared ones, "auto" is "unmatched" when ``exact_weight > 0``;
    ``uld_top_k`` as in ``uld_distance`` (0: exact).

    Shapes:
        student_logits: (N, V_s);  teacher_logits: (N, V_t);  *_span_logprob, single: (N,);
        *_ids: (S,) paired shared ids;  returns: two (N,) float32
    """
    if uld_tokens not in ULD_TOKENS:
        raise ValueError(f"uld_tokens must be one of {ULD_TOKENS}, got {uld_tokens!r}")
    n = student_logits.shape[0]
    exact = student_logits.new_zeros(n, dtype=torch.float32)
    uld = student_logits.new_zeros(n, dtype=torch.float32)
    if exact_weight != 0 and n:
        ones = single.nonzero().squeeze(-1)
        many = (~single).nonzero().squeeze(-1)
        exact = exact.index_put((ones,), exact_match_divergence(
            student_logits[ones], teacher_logits[ones], student_ids, teacher_ids, divergence=divergence,
            temperature=temperature, mode=exact_mode, **divergence_kwargs))
        exact = exact.index_put((many,), span_divergence(
            student_span_logprob[many], teacher_span_logprob[many], divergence=divergence, **divergence_kwargs))
    if uld_weight != 0 and n:
        unmatched = uld_tokens == "unmatched" or (uld_tokens == "auto" and exact_weight != 0)
        uld = uld_distance(student_logits, teacher_logits, temperature=temperature,
                           student_exclude=student_ids if unmatched else None,
                           teacher_exclude=teacher_ids if unmatched else None, top_k=uld_top_k)
    return exact, uld
