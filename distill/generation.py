"""Batched sampling with a KV cache, shared by on-policy training, `distill eval` and generation.

``sample`` continues a list of prompts (token ids) with a causal LM:

- **Batched with left padding.** Prompts of different lengths are padded on the left, with the
  attention mask and position ids that make every row see exactly its own tokens (position 0 at its
  first real token), so a row's logits do not depend on what it is batched with.
- **KV cache, no recompute.** One forward over the prompts (prefill, only the last position's
  logits are made), then one token per step through the cache.
- **Stops per row at EOS.** A row that sampled EOS is finished: it takes padding from then on and
  the loop ends when every row is finished (or after ``max_new_tokens``).
- **Seeded per row.** Row i draws its randomness from its own generator, seeded by ``seeds[i]``, by
  the Gumbel-max trick (argmax of logits + Gumbel noise is an exact sample of softmax(logits)). So a
  row's sample depends on its prompt, its seed and the weights, never on the batch it is in, on
  another process, or on a global RNG: on-policy training seeds row by (seed, step, example,
  generation), which makes a resumed run and a run on more processes sample what the original did.
- **Current weights, no dropout, no graph.** The model is put in eval mode (and back) and runs
  under ``torch.no_grad``; it is the caller's live model, never a copy.

The distribution sampled is ``softmax(logits / temperature)`` restricted by ``top_k`` (the k most
likely tokens; 0 = no limit) and then ``top_p`` (the smallest set of most likely tokens whose
probability reaches top_p; 1.0 = no limit), the same rules as Hugging Face's logits warpers.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample: ``max_new_tokens`` per row, at ``temperature`` with ``top_k`` / ``top_p`` filters
    (0 / 1.0 = off). ``ignore_eos``: never sample EOS (exactly ``max_new_tokens`` per row, for timing)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    ignore_eos: bool = False


@dataclass
class Completion:
    """A sampled continuation: ``ids`` before the first EOS (EOS excluded), and whether EOS was sampled."""

    ids: list[int]
    ended: bool


def row_seed(*keys: int) -> int:
    """A 63-bit seed from integers (e.g. seed, step, example index, generation): stable across runs,
    processes and platforms (a hash of their decimal text, not Python's salted ``hash``)."""
    digest = hashlib.blake2b(":".join(str(int(k)) for k in keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class NonFiniteGuard:
    """Counts and repairs score rows with no distribution in them (a NaN, +inf, or nothing above
    -inf): such a row is replaced by zeros (uniform) so that sampling goes on. Rows that are fine pass
    unchanged, so the guard never changes what a healthy model samples. ``fired()``: a row was
    replaced, the samples are not the model's."""

    def __init__(self):
        self.rows: int | Tensor = 0  # replaced rows, on the device until ``fired`` reads it

    def __call__(self, input_ids: Optional[Tensor], scores: Tensor) -> Tensor:
        bad = ~torch.isfinite(scores.amax(-1))  # (B,) amax propagates NaN
        self.rows = self.rows + bad.sum()
        return torch.where(bad[:, None], torch.zeros_like(scores), scores)  # (B, V)

    def fired(self) -> bool:
        return int(self.rows) > 0


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, device) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), both (B, T): rows right-aligned, padding on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (B, T)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``logits / temperature`` with the tokens outside top-k, then outside top-p, set to -inf.

    Top-p keeps the most likely tokens up to and including the one whose cumulative probability
    reaches ``top_p`` (at least one token). Shapes: logits (B, V) -> (B, V) float32.
    """
    scores = logits.float() / temperature  # (B, V)
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)  # (B, V)
        probs = sorted_scores.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def gumbel_sample(scores: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """One token per row of ``scores`` (B, V), an exact sample of softmax(scores[i]) drawn with
    ``generators[i]`` alone. Returns (B,) int64."""
    noise = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in generators])
    gumbel = -torch.log(-torch.log(noise.clamp_min(torch.finfo(noise.dtype).tiny)))  # (B, V)
    return torch.argmax(scores + gumbel, dim=-1)


def _cache_argument(model: nn.Module) -> str:
    """The name a model's forward gives its KV cache (``cache`` in recent Transformers, else
    ``past_key_values``)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def sample(model: nn.Module, prompts: Sequence[Sequence[int]], *, settings: SamplingSettings, seeds: Sequence[int],
           eos_token_id: int, pad_token_id: int, batch_size: Optional[int] = None,
           guard: Optional[NonFiniteGuard] = None, autocast=None,
           everyone_done: Optional[Callable[[bool], bool]] = None) -> list[Completion]:
    """Sample one continuation per prompt (see the module docstring); ``seeds[i]`` seeds row i.

    ``batch_size`` rows go through the model at once (default: all). ``guard`` repairs and counts
    non-finite score rows. ``autocast``: a context-manager factory the forwards run under (e.g.
    ``accelerator.autocast``). ``everyone_done(done)``: whether every process's batch is done, given
    this one's (a sharded model's forwards are collectives: all processes stop at the same token;
    rows that ended are padded). Returns one ``Completion`` per prompt, in order.
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS or EOS as a document start)")
    if settings.max_new_tokens < 1 or settings.temperature <= 0:
        raise ValueError("max_new_tokens must be >= 1 and temperature > 0")
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        out: list[Completion] = []
        step = batch_size or max(1, len(prompts))
        for start in range(0, len(prompts), step):
            out += _sample_batch(model, prompts[start:start + step], seeds[start:start + step], settings,
                                 eos_token_id=eos_token_id, pad_token_id=pad_token_id, guard=guard, autocast=autocast,
                                 everyone_done=everyone_done)
        return out
    finally:
        model.train(was_training)


def _sample_batch(model, prompts, seeds, s: SamplingSettings, *, eos_token_id, pad_token_id, guard, autocast,
                  everyone_done=None):
    device = model.get_output_embeddings().weight.device
    generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
    ids, mask = left_pad(prompts, pad_token_id, device)  # (B, P)
    context = autocast if autocast is not None else contextlib.nullcontext
    # The whole loop in one autocast region (the precision training runs its forwards at).
    with context():
        new = _decode(model, ids, mask, generators, s, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                      guard=guard, everyone_done=everyone_done)
    result = []
    for row in new:
        ended = eos_token_id in row
        result.append(Completion(row[:row.index(eos_token_id)] if ended else row, ended))
    return result


def _decode(model, ids, mask, generators, s: SamplingSettings, *, eos_token_id, pad_token_id, guard,
            everyone_done=None) -> list[list[int]]:
    """The sampled token rows (B, n) for left-padded prompts ``ids`` / ``mask`` (B, P); a row that
    sampled EOS is padded with ``pad_token_id`` after it."""
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, P): 0 at each row's first real token
    cache_arg = _cache_argument(model)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)  # (B,)
    tokens = []
    output = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    for t in range(s.max_new_tokens):
        scores = output.logits[:, -1].float()  # (B, V)
        if guard is not None:
            scores = guard(None, scores)
        elif not bool(torch.isfinite(scores.amax(-1)).all()):  # amax propagates NaN
            raise RuntimeError("the model's next-token scores hold NaN or inf while sampling (pass a "
                               "NonFiniteGuard to replace and count such rows)")
        if s.ignore_eos:
            scores[:, eos_token_id] = float("-inf")
        token = gumbel_sample(filter_logits(scores, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p),
                              generators)  # (B,)
        token = torch.where(finished, pad_token_id, token)
        tokens.append(token)
        finished |= token == eos_token_id
        done = bool(finished.all())
        if t == s.max_new_tokens - 1 or (done if everyone_done is None else everyone_done(done)):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)  # (B, P + t + 1)
        positions = positions[:, -1:] + 1  # (B, 1)
        output = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{cache_arg: _cache_of(output)})
    return torch.stack(tokens, dim=1).tolist()
