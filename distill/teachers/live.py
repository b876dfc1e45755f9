"""The teacher as a model in memory: full distributions, hidden states + head, token log-probs."""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from distill.build import has_plain_lm_head
from distill.losses import DEFAULT_CHUNK_SIZE, chunk_slices, slice_vocab
from distill.losses.policy import token_logprobs
from distill.teachers.base import TeacherSignal, finite


class LiveTeacher:
    """A frozen causal LM (its weights checked finite when it was loaded). Every answer runs under
    ``no_grad``; ``seconds`` accumulates the time spent (synchronized on CUDA)."""

    def __init__(self, model: nn.Module, vocab_size: int, *, chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.model, self.vocab_size, self.chunk_size = model, vocab_size, chunk_size
        self.plain_head = has_plain_lm_head(model)
        self.seconds = 0.0

    @torch.no_grad()
    def signal(self, inputs: dict, mask: Tensor, examples: Optional[Sequence[int]] = None, *, want: str,
               tokens: Optional[Tensor] = None) -> TeacherSignal:
        tic = time.perf_counter()
        try:
            return self._signal(inputs, mask, want, tokens)
        finally:
            if mask.device.type == "cuda":
                torch.cuda.synchronize(mask.device)
            self.seconds += time.perf_counter() - tic

    def _signal(self, inputs, mask, want, tokens) -> TeacherSignal:
        if want == "logits":
            logits = slice_vocab(self.model(**inputs).logits[:, :-1][mask], self.vocab_size)  # (N, V)
            return TeacherSignal(ok=finite(logits), logits=logits)
        if want == "hidden" and self.plain_head:
            hidden = self.model.base_model(**inputs).last_hidden_state[:, :-1][mask]  # (N, d_t)
            head = self.model.get_output_embeddings()  # its weights were checked when it was loaded
            return TeacherSignal(ok=torch.isfinite(hidden).all(), hidden=hidden, weight=head.weight, bias=head.bias)
        if want == "hidden":  # soft-capped or scaled logits: no fused head
            return self._signal(inputs, mask, "logits", tokens)
        if want == "token_logprobs":
            if tokens is None:
                raise ValueError("want='token_logprobs' needs the tokens")
            if not self.plain_head:
                logits = slice_vocab(self.model(**inputs).logits[:, :-1][mask], self.vocab_size)
                values = token_logprobs(logits, tokens)
            else:  # the head a chunk of rows at a time: never all (N, V) logits
                hidden = self.model.base_model(**inputs).last_hidden_state[:, :-1][mask]  # (N, d_t)
                head = self.model.get_output_embeddings()
                values = torch.cat([token_logprobs(slice_vocab(head(hidden[rows]), self.vocab_size), tokens[rows])
                                    for rows in chunk_slices(hidden.shape[0], self.chunk_size)]
                                   or [hidden.new_zeros(0, dtype=torch.float32)])  # (N,)
            return TeacherSignal(ok=finite(values), token_logprobs=values)
        raise ValueError(f"unknown want {want!r}")


class LiveGenerator:
    """A local causal LM that writes text, with the shared sampling code (``distill.generation.sample``:
    KV cache, left padding, EOS per row, a seed per row). ``generate`` answers the same
    ``Request``/``Reply`` shape as ``HTTPTeacher`` (``Request.prompt``: token ids).

    ``stop`` strings are applied to the decoded text (the text ends before the first one, as a
    server's ``stop`` does); ``finish_reason`` is "stop" (EOS or a stop string) or "length".
    ``score``: also set each reply's ``mean_logprob``, the model's mean log p (temperature 1) of the
    sampled tokens (EOS included when sampled), from one more forward over prompt + sample."""

    def __init__(self, model: nn.Module, tokenizer, *, settings, batch_size: int = 8, stop=(), autocast=None,
                 score: bool = False):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.batch_size, self.stop, self.autocast, self.score = batch_size, list(stop), autocast, score
        self.seconds = 0.0
        self.context = getattr(model.config, "max_position_embeddings", None)

    def fits(self, prompt_ids) -> bool:
        """The prompt and ``max_new_tokens`` fit in the model's context."""
        return self.context is None or len(prompt_ids) + self.settings.max_new_tokens <= self.context

    def generate(self, requests, progress=None) -> list:
        from distill.generation import sample
        from distill.teachers.http import Reply

        tic = time.perf_counter()
        # Longest first: rows of similar length share a batch (less padding); each row's sample
        # depends only on its prompt and seed, never on the batch it lands in.
        order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].prompt), i))
        out = [None] * len(requests)
        tok = self.tokenizer
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            done = sample(self.model, [requests[i].prompt for i in rows], settings=self.settings,
                          seeds=[requests[i].seed for i in rows], eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                          batch_size=self.batch_size, autocast=self.autocast)
            means = self._mean_logprobs([requests[i].prompt for i in rows], done) if self.score else [None] * len(rows)
            for i, completion, mean in zip(rows, done, means):
                text = tok.decode(completion.ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                cut = min((p for p in (text.find(s) for s in self.stop) if p >= 0), default=-1)
                if cut >= 0:
                    text = text[:cut]
                finish = "stop" if completion.ended or cut >= 0 else "length"
                out[i] = Reply(text=text, finish_reason=finish, completion_tokens=len(completion.ids), mean_logprob=mean)
                if progress is not None:
                    progress(out[i])
        self.seconds += time.perf_counter() - tic
        return out

    def _mean_logprobs(self, prompts, completions) -> list:
        eos = self.tokenizer.eos_token_id
        examples = [dict(input_ids=list(p) + c.ids + ([eos] if c.ended else []),
                         labels=[-100] * len(p) + c.ids + ([eos] if c.ended else [])) for p, c in zip(prompts, completions)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        was_training = self.model.training
        self.model.eval()
        try:
            rows = completion_logprobs(LiveTeacher(self.model, len(self.tokenizer)), examples, pad_token_id=pad,
                                       batch_size=self.batch_size)
        finally:
            self.model.train(was_training)
        return [row.double().mean().item() if row.numel() else None for row in rows]


def completion_logprobs(teacher: LiveTeacher, examples: list[dict], *, pad_token_id: int,
                        batch_size: int = 8) -> list[Tensor]:
    """Per example (``input_ids``, ``labels`` with -100 on context), the teacher's log p (temperature 1)
    of each supervised token given what precedes it: one (n_i,) float32 tensor per example, in order."""
    from distill.data import collate

    device = teacher.model.get_output_embeddings().weight.device
    out: list[Tensor] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_token_id=pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["labels"][:, 1:]
        mask = labels != -100  # (B, T-1): position t predicts supervised token t+1
        values = teacher.signal({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, mask,
                                want="token_logprobs", tokens=labels[mask]).token_logprobs  # (N,)
        out += list(torch.split(values, mask.sum(1).tolist()))
    return out
