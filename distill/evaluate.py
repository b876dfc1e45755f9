"""`distill eval`: a teacher and its students on one dataset, side by side.

``evaluate_models`` loads every model once and returns a JSON-serializable dict (``report.py``
turns it into ``eval.json`` and ``report.html``). Per model:

- ``params``, ``size_mb`` (bytes of its weight files on disk / 1e6; ``size_bytes`` exact).
- Likelihood on the data (packed text blocks of ``max_length``, every position t predicting token
  t+1, as in training): ``eval_ce`` (nats per supervised token), ``perplexity`` = exp(eval_ce),
  ``top1_accuracy`` (argmax == next token), ``ece`` (see ``expected_calibration_error``).
- Fidelity to the teacher, per supervised token at τ = 1: ``top1_agreement`` (same argmax),
  ``forward_kl`` = KL(p_teacher‖q_model), ``reverse_kl`` = KL(q_model‖p_teacher). None for the
  teacher itself and when no teacher is given.
- Generation, on ``num_prompts`` prompts from the data (``extract_prompts``), one sampled
  completion per prompt (temperature 1.0, top-p 1.0, no top-k, seed ``seed``): ``teacher_nll``
  (``teacher_nll``), ``valid_python`` (``completion_is_valid_python``; None unless the prompts are
  Python functions), ``distinct_1`` / ``distinct_2`` (``distinct_n``), ``completion_tokens``.
- Speed (``speed=True``; measurements, not properties: they depend on the machine and its load):
  ``generate_tokens_per_s_batch1``, ``generate_tokens_per_s_batched`` (``batch_size`` prompts,
  left padding), ``forward_tokens_per_s`` (full-logits forward of ``batch_size`` data blocks),
  each timed after a warm-up.
- As the teacher's draft, measured (``speed=True``, a teacher, an HF model; ``distill.speculative``):
  the teacher samples ``max_new_tokens`` on the first ``draft_prompts`` prompts alone and with the
  model as its assistant (HF assisted generation, speculative sampling, γ = 4 drafts per step):
  ``spec_acceptance_measured`` (accepted / judged drafts), ``spec_acceptance_expected`` (mean α on
  the judged positions), ``spec_acceptance_z``, ``spec_tokens_per_step``, ``spec_teacher_tokens_per_s``,
  ``spec_assisted_tokens_per_s``, ``spec_speedup``.
- Non-finite outputs: ``nonfinite_positions`` (supervised positions of the data where the model's
  logits hold a NaN or an infinity), ``finite`` (False if that count is not 0, or if a NaN or
  infinity came up while sampling), ``status`` ("ok", or a sentence saying what was non-finite and
  what was skipped) and ``nonfinite_metrics`` (the keys that are None because of non-finite
  outputs, the model's own or the teacher's). A model with non-finite outputs on the data gets
  None, never NaN nor a score over NaN rows, for every metric made from its logits (likelihood,
  fidelity), and it is not sampled from (generation and speed metrics None); a non-finite teacher
  makes every model's fidelity metrics and ``teacher_nll`` None. Sampling replaces a row of
  non-finite scores with uniform ones (``NonFiniteGuard``) instead of crashing, and a model for
  which that happened gets None generation metrics (and is not timed).

- Bits per byte, for every model: ``bits_per_byte`` = nats over the predicted tokens ÷ their bytes
  ÷ ln 2, which compares models with different tokenizers (perplexity does not).
- A model on another tokenizer than the teacher's (or, without a teacher, the first model's) is
  scored on the same text: every data block's bytes (the bytes its tokens spell, never a decode)
  re-tokenized by its own tokenizer (``distill.teachers.cross.Aligner``; its BOS first when its
  tokenizer adds one; EOS maps to EOS). Its likelihood metrics are per its own tokens; the id-by-id
  fidelity metrics are None and, against a teacher, ``aligned_forward_kl`` (exact-match KL over the
  shared tokens on 1:1 spans, the span's probability on merged ones, τ = 1), ``aligned_uld``,
  ``aligned_top1_agreement`` (1:1 spans) and ``aligned_token_share`` (its tokens inside aligned
  spans) take their place, as in training's eval. Its prompts are the same text in its own tokens;
  ``teacher_nll`` and ``distinct_n`` read its completions in the teacher's tokens (re-tokenized
  text), so the columns compare. It is not measured as the teacher's draft (speculative decoding
  needs one vocabulary).

All divergence and likelihood math comes from ``distill.losses``; logits are made per chunk of
supervised rows (``chunk_slices``) from the final hidden states, so the full (B, T, V) tensor never
exists for models with a plain LM head.
"""

from __future__ import annotations

import ast
import datetime
import math
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from distill.data import collate, load_tokenized
from distill.errors import UserError
from distill.generation import NonFiniteGuard, SamplingSettings, row_seed, sample
from distill.losses import (DEFAULT_CHUNK_SIZE, TokenizerMismatchError, check_tokenizers_compatible, chunk_slices,
                            cross_entropy, forward_kl, reverse_kl, slice_vocab, tvd)
from distill.teachers import LiveTeacher
from distill.teachers.live import completion_logprobs

ECE_BINS = 15
DRAFT_GAMMA = 4  # draft tokens per verification step for draft_expected_tokens
PROMPT_TOKENS = 32  # document-prefix prompts: this many tokens (half the document if shorter)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

# What each metric means and which direction is better: the report and the CLI table read this.
# direction: "min" (lower is better), "max" (higher is better), None (no better direction).
METRICS: dict[str, tuple[str, Optional[str], str]] = {
    "params": ("parameters", "min", "number of parameters (tied weights counted once)"),
    "size_mb": ("size on disk (MB)", "min", "bytes of the weight files / 1e6"),
    "eval_ce": ("eval cross-entropy", "min", "nats per supervised token on the data"),
    "perplexity": ("perplexity", "min", "exp(eval cross-entropy)"),
    "top1_accuracy": ("next-token top-1 accuracy", "max", "argmax prediction equals the next token"),
    "ece": ("calibration error (ECE)", "min", "expected calibration error of the top-1 prediction, 15 bins"),
    "bits_per_byte": ("bits per byte", "min",
                      "nats over the predicted tokens ÷ their bytes ÷ ln 2: comparable across tokenizers"),
    "top1_agreement": ("top-1 agreement with teacher", "max", "same argmax as the teacher"),
    "forward_kl": ("forward KL to teacher", "min", "KL(p_teacher‖q_model) per token, τ = 1"),
    "reverse_kl": ("reverse KL to teacher", "min", "KL(q_model‖p_teacher) per token, τ = 1"),
    "draft_acceptance": ("draft acceptance α", "max",
                         "mean Σ min(p_teacher, q_model) = 1 − TVD: the chance the teacher accepts this model's "
                         "draft token in speculative sampling"),
    "draft_expected_tokens": (f"tokens per teacher step, γ = {DRAFT_GAMMA}", "max",
                              f"(1 − α^(γ+1)) / (1 − α): expected tokens per teacher forward with {DRAFT_GAMMA} "
                              "draft tokens"),
    "aligned_forward_kl": ("aligned forward KL to teacher", "min",
                           "another tokenizer: exact-match KL(p_teacher‖q_model) per aligned span, τ = 1 (shared "
                           "tokens + a rest bucket on 1:1 spans, the span's probability on merged ones)"),
    "aligned_uld": ("aligned ULD to teacher", "min",
                    "another tokenizer: L1 distance between the sorted probability vectors per aligned span"),
    "aligned_top1_agreement": ("aligned top-1 agreement", "max",
                               "another tokenizer: same argmax token text as the teacher on 1:1 spans"),
    "aligned_token_share": ("aligned token share", "max",
                            "another tokenizer: share of its predicted tokens inside aligned spans"),
    "teacher_nll": ("teacher NLL of generations", "min",
                    "teacher's mean negative log-likelihood per token of the model's own samples"),
    "valid_python": ("valid Python", "max", "fraction of prompt + completion that parse with ast"),
    "distinct_1": ("distinct-1", None, "distinct tokens / tokens over all completions (the teacher's tokens)"),
    "distinct_2": ("distinct-2", None, "distinct token bigrams / bigrams over all completions (the teacher's tokens)"),
    "generate_tokens_per_s_batch1": ("generation tokens/s, batch 1", "max", "sampled tokens per second"),
    "generate_tokens_per_s_batched": ("generation tokens/s, batched", "max", "sampled tokens per second"),
    "forward_tokens_per_s": ("forward tokens/s", "max", "tokens per second through a full forward pass"),
    "spec_acceptance_measured": ("measured acceptance", "max",
                                 f"accepted / judged drafts when the teacher generates with this model as its "
                                 f"assistant (HF assisted generation, speculative sampling, γ = {DRAFT_GAMMA})"),
    "spec_acceptance_expected": ("expected acceptance on those positions", "max",
                                 "mean Σ min(p_teacher, q_model) over the judged draft positions"),
    "spec_acceptance_z": ("measured − expected (z)", None,
                          "standardized difference; within ±3 when the measurement agrees with α"),
    "spec_tokens_per_step": ("tokens per teacher step, measured", "max",
                             "tokens the assisted teacher made per verification forward"),
    "spec_teacher_tokens_per_s": ("teacher alone, tokens/s", "max",
                                  "the teacher sampling alone, HF generate, batch 1 (the baseline of the speedup)"),
    "spec_assisted_tokens_per_s": ("teacher + this draft, tokens/s", "max",
                                   "the teacher sampling with this model as its assistant, batch 1"),
    "spec_speedup": ("speculative speedup", "max", "assisted tokens/s ÷ teacher-alone tokens/s, same prompts and seeds"),
}
LIKELIHOOD_KEYS = ("eval_ce", "perplexity", "top1_accuracy", "ece")
FIDELITY_KEYS = ("top1_agreement", "forward_kl", "reverse_kl", "draft_acceptance", "draft_expected_tokens")
ALIGNED_KEYS = ("aligned_forward_kl", "aligned_uld", "aligned_top1_agreement", "aligned_token_share")
GENERATION_KEYS = ("teacher_nll", "valid_python", "distinct_1", "distinct_2")
SPEED_KEYS = ("generate_tokens_per_s_batch1", "generate_tokens_per_s_batched", "forward_tokens_per_s")
SPEC_KEYS = ("spec_acceptance_measured", "spec_acceptance_expected", "spec_acceptance_z", "spec_tokens_per_step",
             "spec_teacher_tokens_per_s", "spec_assisted_tokens_per_s", "spec_speedup")


# ---------------------------------------------------------------------------------------------
# Metric functions (pure; the tests compare them with plain references)


def calibration_bins(confidence: Tensor, correct: Tensor, num_bins: int = ECE_BINS) -> Tensor:
    """Per-bin sums for the expected calibration error, to be added up over batches.

    Bin m (m = 1..M) holds the predictions with confidence in ((m-1)/M, m/M]; a confidence of
    exactly 0 goes to the first bin.

    Shapes:
        confidence: (N,) top-1 probabilities in [0, 1]
        correct: (N,) bool or 0/1, whether the top-1 prediction was right
        returns: (num_bins, 3) float64: count, sum of confidence, sum of correct
    """
    conf = confidence.detach().double().flatten()  # (N,)
    hit = correct.detach().double().flatten()  # (N,)
    index = (torch.ceil(conf * num_bins).long() - 1).clamp(0, num_bins - 1)  # (N,)
    bins = torch.zeros(num_bins, 3, dtype=torch.float64, device=conf.device)
    bins[:, 0].index_add_(0, index, torch.ones_like(conf))
    bins[:, 1].index_add_(0, index, conf)
    bins[:, 2].index_add_(0, index, hit)
    return bins


def ece_from_bins(bins: Tensor) -> float:
    """ECE = Σ_m (|B_m| / N) · |accuracy(B_m) − mean confidence(B_m)| (Guo et al., 2017), from the
    sums of ``calibration_bins``; 0.0 when there are no predictions."""
    count, conf, hit = bins.double().unbind(-1)
    total = count.sum()
    if total == 0:
        return 0.0
    return float(((hit - conf).abs() / total).sum())  # |B_m|/N · |acc − conf| = |Σhit − Σconf| / N


def expected_calibration_error(confidence: Tensor, correct: Tensor, num_bins: int = ECE_BINS) -> float:
    """Expected calibration error of top-1 predictions with ``num_bins`` equal-width bins.

    0 means that among predictions made with confidence c, a fraction c is right (per bin); a
    model that is always 90% sure and right half the time has ECE 0.4."""
    return ece_from_bins(calibration_bins(confidence, correct, num_bins))


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams / total n-grams, over all sequences (n-grams never cross sequences);
    0.0 when no sequence has n tokens."""
    grams = [tuple(seq[i:i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def completion_is_valid_python(prompt: str, completion: str) -> bool:
    """Whether a function prompt (``def`` line through its docstring) plus a sampled completion is
    valid Python. The rule:

    1. Text = prompt + completion; its first line is the ``def`` line (indentation d). The prompt's
       lines are always kept.
    2. The function ends before the first non-blank line of the completion (a line that starts
       after the prompt) indented at d or less: that line and everything after it are other code,
       and are ignored.
    3. The function's lines, with the ``def`` line's indentation removed where a line starts with
       it, are judged:
       - a function that ended (step 2 found its end) must parse with ``ast.parse``;
       - a function that did not end (the completion ran out of tokens or stopped mid-body) is
         truncated code: it counts as valid if it parses, or if Python's parser calls it an
         *incomplete* but so far error-free program (``codeop.compile_command`` returns None:
         an open bracket, a block header awaiting its body, ...). If not, and the text ends in an
         unfinished line (no final newline), the same test is made without that line.
         (On 300 functions of the eval corpus, their true continuations cut after 64 tokens all
         pass and the same tokens shuffled almost never do; plain ``ast.parse`` after dropping
         the last line rejected 15% of the true continuations.)
    4. The completion must add at least one non-blank line to the body: a function left with only
       its docstring counts as invalid (a model that stops at once must not score).

    Nothing is executed: ``ast.parse`` and ``codeop`` only parse and compile.
    """
    lines = (prompt + completion).split("\n")
    def_line = lines[0]
    indent = def_line[:len(def_line) - len(def_line.lstrip())]
    depth = len(indent.expandtabs())
    first_new = prompt.count("\n") + 1  # index of the first line that starts inside the completion
    end, ended = len(lines), False
    for i in range(first_new, len(lines)):
        line = lines[i]
        if line.strip() and len(line.expandtabs()) - len(line.expandtabs().lstrip()) <= depth:
            end, ended = i, True
            break
    body = lines[:end]
    if not ended and not completion.endswith("\n") and len(body) > first_new:
        candidates = [body, body[:-1]]  # as is, then without its unfinished last line
    else:
        candidates = [body]
    for function in candidates:
        if not any(line.strip() for line in function[first_new:]):
            continue  # nothing added to the body
        source = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in function)
        if _parses(source) or (not ended and _incomplete_but_valid(source)):
            return True
    return False


def _incomplete_but_valid(source: str) -> bool:
    """True if the parser sees no error in ``source`` yet but needs more input to finish it."""
    import codeop
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarnings (invalid escapes) are not errors
        try:
            return codeop.compile_command(source, symbol="exec") is None
        except (SyntaxError, ValueError, OverflowError):
            return False


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompt:
    text: str  # what the model continues (a Python prompt ends right after the docstring)
    ids: list[int]  # token ids given to the model: EOS (the document separator) + the text's tokens
    source: str = ""  # where it came from: "row N, line L" or "row N"


def function_examples(source: str) -> list[tuple[int, str, str]]:
    """(line number, prompt, body) for every function with a docstring and more body in ``source``:
    the prompt is the ``def`` line (decorators excluded) through the closing quotes of the
    docstring, with the original indentation (methods and nested functions included); the body is
    the rest of the function as it stands in the file. [] if the source does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        doc = node.body[0]
        if len(node.body) < 2 or doc.end_lineno is None or node.end_lineno is None:
            continue  # only a docstring: nothing to complete
        last = lines[doc.end_lineno - 1]
        if last[doc.end_col_offset:].strip():  # code after the docstring on its line
            continue
        text = "".join(lines[node.lineno - 1:doc.end_lineno - 1]) + last[:doc.end_col_offset]
        body = last[doc.end_col_offset:] + "".join(lines[doc.end_lineno:node.end_lineno])
        found.append((node.lineno, text, body))
    return sorted(found)


def function_prompts(source: str) -> list[tuple[int, str]]:
    """(line number, prompt) of ``function_examples(source)``."""
    return [(line, text) for line, text, _ in function_examples(source)]


def extract_prompts(texts: Sequence[str], tokenizer, *, num_prompts: int, seed: int,
                    max_prompt_tokens: int) -> tuple[str, list[Prompt]]:
    """Prompts for generation, chosen deterministically from ``texts`` with ``seed``.

    If at least half of the documents parse as Python and they hold functions with docstrings
    (``function_prompts``), mode "python": a seeded sample of those functions (at most
    ``max_prompt_tokens`` tokens each). Otherwise mode "text": the first PROMPT_TOKENS tokens of a
    seeded sample of documents (half the document when it is shorter).
    Returns (mode, prompts); a prompt's ids start with EOS, the separator documents follow in training.
    """
    eos = tokenizer.eos_token_id
    rng = random.Random(seed)
    parsed = sum(1 for t in texts if _parses(t))
    if texts and parsed * 2 >= len(texts):
        candidates = [(row, line, text) for row, doc in enumerate(texts) for line, text in function_prompts(doc)]
        prompts = []
        for row, line, text in rng.sample(candidates, len(candidates)):
            ids = _plain_ids(tokenizer, text)
            if len(ids) + 1 <= max_prompt_tokens:
                prompts.append(Prompt(text, [eos] + ids, f"row {row}, line {line}"))
            if len(prompts) == num_prompts:
                break
        if prompts:
            return "python", prompts
    prompts = []
    for row in rng.sample(range(len(texts)), len(texts)):
        ids = _plain_ids(tokenizer, texts[row])
        if len(ids) < 2:
            continue
        ids = ids[:min(PROMPT_TOKENS, len(ids) // 2)]
        prompts.append(Prompt(tokenizer.decode(ids), [eos] + ids, f"row {row}"))
        if len(prompts) == num_prompts:
            break
    return "text", prompts


def _parses(text: str) -> bool:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarnings (invalid escapes) are not errors
        try:
            ast.parse(text)
            return True
        except (SyntaxError, ValueError, OverflowError, RecursionError):
            return False


def _plain_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


# ---------------------------------------------------------------------------------------------
# Logits, chunk by chunk


def supervised_logits(model: nn.Module, batch: dict, vocab_size: int,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[Tensor, Iterator[tuple[slice, Tensor]]]:
    """The next-token targets of a collated batch and an iterator over float32 logits for them.

    Position t predicts token t+1 (``labels[:, 1:]``); only supervised positions (label ≠ -100)
    are kept. Returns ``(targets (N,), iterator of (rows, logits (n, vocab_size)))`` where ``rows``
    are ``chunk_slices(N, chunk_size)``. With a plain linear LM head the logits are made per chunk
    from the hidden states; otherwise (soft-capping, scaling) from the model's own dense logits.
    """
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"][:, 1:]  # (B, T-1)
    mask = labels != -100
    targets = labels[mask]  # (N,)
    head = model.get_output_embeddings()
    if _plain_head(model):
        hidden = model.base_model(**inputs).last_hidden_state[:, :-1][mask]  # (N, d)
        make = lambda rows: head(hidden[rows])  # noqa: E731
    else:
        dense = model(**inputs).logits[:, :-1][mask]  # (N, V)
        make = lambda rows: dense[rows]  # noqa: E731

    def chunks():
        for rows in chunk_slices(targets.numel(), chunk_size):
            yield rows, slice_vocab(make(rows), vocab_size).float()  # (n, V)

    return targets, chunks()


def _plain_head(model: nn.Module) -> bool:
    cfg = model.config
    scaled = any(getattr(cfg, name, None) not in (None, 1, 1.0)
                 for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"))
    return not scaled and isinstance(model.get_output_embeddings(), nn.Linear)


@dataclass
class _Sums:
    """Running sums over supervised tokens for one model (float64)."""

    n: float = 0.0
    ce: float = 0.0
    correct: float = 0.0
    agree: float = 0.0
    fkl: float = 0.0
    rkl: float = 0.0
    accept: float = 0.0
    bins: Tensor = field(default_factory=lambda: torch.zeros(ECE_BINS, 3, dtype=torch.float64))
    nonfinite: int | Tensor = 0  # positions whose logits hold a NaN or an infinity; stays on the device

    def add(self, logits: Tensor, targets: Tensor, t_logits: Optional[Tensor], finite: Tensor) -> None:
        """``finite``: (n,) bool, ``finite_rows(logits)``."""
        self.nonfinite = self.nonfinite + (~finite).sum()  # no host sync: read once, in metrics()
        top1 = logits.argmax(-1)  # (n,)
        confidence = torch.exp(-cross_entropy(logits, top1))  # (n,) probability of the top-1 token
        hit = top1 == targets
        self.n += targets.numel()
        self.ce += cross_entropy(logits, targets).double().sum().item()
        self.correct += hit.sum().item()
        self.bins += calibration_bins(confidence, hit).cpu()
        if t_logits is not None:
            self.agree += (top1 == t_logits.argmax(-1)).sum().item()
            self.fkl += forward_kl(logits, t_logits).double().sum().item()
            self.rkl += reverse_kl(logits, t_logits).double().sum().item()
            self.accept += draft_acceptance(logits, t_logits).double().sum().item()

    def metrics(self, with_teacher: bool, teacher_finite: bool = True) -> dict:
        """The per-token means; a model with any non-finite position gets None for all of them, and
        every fidelity metric is None when the teacher had one (listed in ``nonfinite_metrics``)."""
        n = max(self.n, 1.0)
        nonfinite = int(self.nonfinite)
        out = {"eval_tokens": int(self.n), "nonfinite_positions": nonfinite, "nonfinite_metrics": []}
        if nonfinite:
            out.update(dict.fromkeys(LIKELIHOOD_KEYS))
            out["nonfinite_metrics"] += LIKELIHOOD_KEYS
        else:
            out.update(eval_ce=self.ce / n, perplexity=math.exp(min(self.ce / n, 50.0)),
                       top1_accuracy=self.correct / n, ece=ece_from_bins(self.bins))
        out.update(dict.fromkeys(FIDELITY_KEYS))
        if with_teacher and (nonfinite or not teacher_finite):
            out["nonfinite_metrics"] += FIDELITY_KEYS
        elif with_teacher:
            alpha = self.accept / n
            out.update(top1_agreement=self.agree / n, forward_kl=self.fkl / n, reverse_kl=self.rkl / n,
                       draft_acceptance=alpha, draft_expected_tokens=expected_tokens_per_step(alpha))
        return out


def draft_acceptance(draft_logits: Tensor, target_logits: Tensor) -> Tensor:
    """Per position, the probability that speculative sampling accepts a token drafted from
    ``draft_logits`` by a target model with ``target_logits``: Σ_x min(p(x), q(x)) = 1 − TVD(p, q)
    (Leviathan et al. 2023). Shapes: (..., V) -> (...), float32."""
    return 1.0 - tvd(draft_logits, target_logits)


def expected_tokens_per_step(alpha: float, gamma: int = DRAFT_GAMMA) -> float:
    """Expected tokens per target-model forward with ``gamma`` draft tokens accepted independently with
    probability ``alpha``: (1 − α^(γ+1)) / (1 − α), which is γ + 1 at α = 1."""
    return float(gamma + 1) if alpha >= 1.0 else (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def finite_rows(logits: Tensor) -> Tensor:
    """Whether each row of ``logits`` (n, V) is free of NaN and infinity: (n,) bool.

    One reduction over the chunk: a float64 sum is NaN or infinite exactly when a term is (float32
    terms cannot overflow it)."""
    return torch.isfinite(logits.sum(-1, dtype=torch.float64))


@torch.inference_mode()
def likelihood_metrics(models: dict[str, nn.Module], dataset, *, teacher: Optional[str], vocab_size: int,
                       batch_size: int, pad_token_id: int, device, progress: bool = False) -> dict[str, dict]:
    """CE, perplexity, top-1 accuracy, ECE and (against ``models[teacher]``) agreement and KLs,
    per supervised token of ``dataset`` (rows with ``input_ids`` / ``labels``), for every model in
    one pass: each batch runs every model once and the teacher's logits are shared. Non-finite
    logits are counted per model (``nonfinite_positions``) and make its metrics None (``_Sums.metrics``)."""
    from tqdm.auto import tqdm

    sums = {name: _Sums() for name in models}
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc="likelihood", disable=not progress, leave=False):
        rows = dataset[start:start + batch_size]
        examples = [dict(input_ids=i, labels=l) for i, l in zip(rows["input_ids"], rows["labels"])]
        batch = {k: v.to(device) for k, v in collate(examples, pad_token_id=pad_token_id).items()}
        streams = {name: supervised_logits(model, batch, vocab_size) for name, model in models.items()}
        targets = next(iter(streams.values()))[0]
        chunk_iters = {name: s[1] for name, s in streams.items()}
        for _ in chunk_slices(targets.numel(), DEFAULT_CHUNK_SIZE):
            chunk = {name: next(it) for name, it in chunk_iters.items()}  # name -> (rows, logits)
            rows_slice = next(iter(chunk.values()))[0]
            t_logits = chunk[teacher][1] if teacher is not None else None
            for name, (_, logits) in chunk.items():
                reference = t_logits if name != teacher else None
                sums[name].add(logits, targets[rows_slice], reference, finite_rows(logits))
    teacher_finite = teacher is None or int(sums[teacher].nonfinite) == 0
    return {name: s.metrics(with_teacher=teacher is not None and name != teacher, teacher_finite=teacher_finite)
            for name, s in sums.items()}


def predicted_bytes(dataset, tokenizer) -> Optional[int]:
    """Bytes of the supervised next tokens of ``dataset`` (position t predicts token t+1; special
    tokens count 0), the denominator of ``bits_per_byte``; None when the tokenizer's tokens do not
    map to bytes (``token_bytes`` refuses its encoding)."""
    from distill.losses.cross_tokenizer import AlignmentError, token_bytes

    try:
        table = token_bytes(tokenizer)
    except AlignmentError:
        return None
    sizes = [len(b) if b is not None else 0 for b in table]
    total = 0
    for labels in dataset["labels"]:
        total += sum(sizes[t] if 0 <= t < len(sizes) else 0 for t in labels[1:] if t != -100)
    return total


def bits_per_byte(metrics: dict, n_bytes: Optional[int]) -> Optional[float]:
    """``eval_ce`` × ``eval_tokens`` ÷ bytes ÷ ln 2 (None when either is missing)."""
    if metrics.get("eval_ce") is None or not n_bytes:
        return None
    return metrics["eval_ce"] * metrics["eval_tokens"] / n_bytes / math.log(2)


def _row_logits(model: nn.Module, inputs: dict, vocab_size: int):
    """A function from flat (B·T) position indices to float32 logits (n, vocab_size): from the hidden
    states with a plain LM head (the full (B, T, V) tensor never exists), else the model's own logits."""
    if _plain_head(model):
        hidden = model.base_model(**inputs).last_hidden_state.flatten(0, 1)
        head = model.get_output_embeddings()
        return lambda index: slice_vocab(head(hidden[index]), vocab_size).float()
    dense = model(**inputs).logits.flatten(0, 1)
    return lambda index: slice_vocab(dense[index], vocab_size).float()


@torch.inference_mode()
def foreign_metrics(model: nn.Module, aligner, dataset, *, vocab_size: int, teacher: Optional[nn.Module],
                    teacher_vocab_size: int, batch_size: int, pad_token_id: int, device,
                    progress: bool = False) -> dict:
    """Metrics of a model on another tokenizer, on the same text as the others.

    ``aligner`` is ``Aligner(model's tokenizer, evaluation tokenizer)``: each block of ``dataset``
    (evaluation tokens) is re-tokenized for the model and aligned by bytes. Returns its likelihood
    metrics per its own predicted tokens (``_Sums``), ``predicted_bytes`` (theirs, for
    ``bits_per_byte``) and, with ``teacher`` (on the evaluation tokenizer), the ``ALIGNED_KEYS`` at
    τ = 1, as training's ``aligned_fidelity`` computes them with the roles of the two tokenizers
    swapped (here the teacher's side is the one the rows come from)."""
    from tqdm.auto import tqdm

    from distill.losses.cross_tokenizer import cross_tokenizer_divergence
    from distill.losses.policy import token_logprobs

    sums = _Sums()
    sizes = [len(b) if b is not None else 0 for b in aligner.teacher_bytes]
    n_bytes = 0
    agg = torch.zeros(6, dtype=torch.float64)  # kl, uld, agree, spans, single spans, own tokens in spans
    own_ids = torch.tensor(aligner.teacher_ids, dtype=torch.long, device=device)  # the model's shared ids
    ref_ids = torch.tensor(aligner.student_ids, dtype=torch.long, device=device)  # the teacher's, paired
    to_ref = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
    to_ref[own_ids] = ref_ids
    teacher_finite = True
    for start in tqdm(range(0, len(dataset), batch_size), desc="likelihood (other tokenizer)", disable=not progress,
                      leave=False):
        rows = dataset[start:start + batch_size]
        examples = [dict(input_ids=i, labels=l) for i, l in zip(rows["input_ids"], rows["labels"])]
        batch = {k: v.to(device) for k, v in collate(examples, pad_token_id=pad_token_id).items()}
        mask = batch["labels"][:, 1:] != -100
        a = aligner.batch(batch["input_ids"], batch["attention_mask"], mask)
        inputs = {k: v.to(device) for k, v in a.teacher_inputs.items()}
        ids, attn = inputs["input_ids"], inputs["attention_mask"].bool()
        predicts = (attn[:, :-1] & attn[:, 1:])  # (B, T_m - 1): position t predicts token t + 1
        T_m = ids.shape[1]
        positions = predicts.nonzero()
        flat = positions[:, 0] * T_m + positions[:, 1]  # (N,)
        targets = ids[:, 1:][predicts]  # (N,)
        own = _row_logits(model, inputs, vocab_size)
        for r in chunk_slices(flat.numel(), DEFAULT_CHUNK_SIZE):
            logits = own(flat[r])
            sums.add(logits, targets[r], None, finite_rows(logits))
        n_bytes += sum(sizes[t] if t < len(sizes) else 0 for t in targets.tolist())
        if teacher is None or not a.num_spans:
            continue
        ref = _row_logits(teacher, dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                          teacher_vocab_size)
        t_first = ref(a.s_first)  # (N, V_t): the spans' first predictions, the rows' side
        teacher_finite = teacher_finite and bool(finite_rows(t_first).all())
        t_span = torch.zeros(a.num_spans, dtype=torch.float32, device=device).index_add_(
            0, a.s_span, token_logprobs(ref(a.s_pos), a.s_tok))
        m_first = own(a.t_first)  # (N, V_m): the model's side
        m_span = torch.zeros(a.num_spans, dtype=torch.float32, device=device).index_add_(
            0, a.t_span, token_logprobs(own(a.t_pos), a.t_tok))
        kl, _ = cross_tokenizer_divergence(m_first, t_first, m_span, t_span, a.single, own_ids, ref_ids,
                                           divergence="forward_kl", uld_weight=0.0)
        _, uld = cross_tokenizer_divergence(m_first, t_first, m_span, t_span, a.single, own_ids, ref_ids,
                                            exact_weight=0.0, uld_tokens="all")
        agree = (to_ref[m_first.argmax(-1)] == t_first.argmax(-1)) & a.single
        agg += torch.tensor([kl.double().sum().item(), uld.double().sum().item(), agree.sum().item(),
                             a.num_spans, a.single.sum().item(), a.single.sum().item() + a.t_pos.numel()],
                            dtype=torch.float64)
    out = sums.metrics(with_teacher=False)
    out["predicted_bytes"] = n_bytes
    out.update(dict.fromkeys(ALIGNED_KEYS))
    if teacher is not None and (out["nonfinite_positions"] or not teacher_finite):
        out["nonfinite_metrics"] += list(ALIGNED_KEYS)
    elif teacher is not None:
        kl, uld, agree, spans, single, inside = agg.tolist()
        out.update(aligned_forward_kl=kl / spans if spans else None, aligned_uld=uld / spans if spans else None,
                   aligned_top1_agreement=agree / single if single else None,
                   aligned_token_share=inside / out["eval_tokens"] if out["eval_tokens"] else None)
    out["aligned_spans"] = int(agg[3])
    return out


@torch.inference_mode()
def teacher_nll(teacher: nn.Module, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                vocab_size: int, pad_token_id: int, batch_size: int = 8) -> tuple[float, int]:
    """The teacher's negative log-likelihood of completion tokens given their prompts.

    Returns ``(sum of −log p_teacher(token | prompt, earlier completion tokens), number of tokens)``
    over every completion token (prompt tokens are context only); divide for the mean per token. Runs
    on the teacher's device.
    """
    examples = [dict(input_ids=list(p) + list(c), labels=[-100] * len(p) + list(c))
                for p, c in zip(prompts, completions) if len(c)]
    rows = completion_logprobs(LiveTeacher(teacher, vocab_size), examples, pad_token_id=pad_token_id,
                               batch_size=batch_size)
    total = -sum(row.double().sum().item() for row in rows)
    count = sum(row.shape[0] for row in rows)
    return total, count


# ---------------------------------------------------------------------------------------------
# Generation and speed


@torch.inference_mode()
def sample_completions(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int,
                       seed: int, pad_token_id: int, eos_token_id: int, device=None,
                       guard: Optional[NonFiniteGuard] = None) -> list[tuple[list[int], bool]]:
    """One sampled completion per prompt: (token ids before the first EOS, whether EOS was sampled),
    with ``distill.generation.sample`` at temperature 1. Prompt i is sampled with the row seed
    (seed, i), so every model draws the same random stream for the same prompt. With ``guard``,
    non-finite score rows are replaced and counted there (``guard.fired()``: discard the samples);
    without one they raise. ``device`` is the model's (kept for callers; unused). A GGUF model
    (``GGUFCausalLM``) samples with llama.cpp's logits and its own seeded stream."""
    if hasattr(model, "gguf"):
        return model.sample_completions(prompts, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                        seeds=[row_seed(seed, i) for i in range(len(prompts))])
    outs = sample(model, prompts, settings=SamplingSettings(max_new_tokens), seeds=[row_seed(seed, i) for i in
                  range(len(prompts))], eos_token_id=eos_token_id, pad_token_id=pad_token_id, batch_size=batch_size,
                  guard=guard)
    return [(c.ids, c.ended) for c in outs]


@torch.inference_mode()
def measure_speed(model: nn.Module, prompts: Sequence[Sequence[int]], dataset, *, max_new_tokens: int,
                  batch_size: int, pad_token_id: int, eos_token_id: int, device, seed: int = 0,
                  guard: Optional[NonFiniteGuard] = None) -> dict:
    """Tokens per second: sampling at batch 1 (median over up to 3 prompts) and at ``batch_size``
    (left padding; EOS suppressed so exactly ``max_new_tokens`` are made per row), and a full
    forward pass over ``batch_size`` data blocks (median of at least 3 repetitions). Each is timed
    after a warm-up call. ``guard`` as in ``sample_completions``. A GGUF model times llama.cpp's
    own decoding loop at batch 1 (``GGUFCausalLM.speed``; no batched figure)."""
    if hasattr(model, "gguf"):
        return model.speed(prompts, dataset[:batch_size]["input_ids"], max_new_tokens=max_new_tokens)
    exact = SamplingSettings(max_new_tokens, ignore_eos=True)

    def generate(rows):
        sample(model, rows, settings=exact, seeds=[row_seed(seed, i) for i in range(len(rows))],
               eos_token_id=eos_token_id, pad_token_id=pad_token_id, guard=guard)
        return len(rows) * max_new_tokens

    def timed(fn, *args):
        _sync(device)
        start = time.perf_counter()
        tokens = fn(*args)
        _sync(device)
        return tokens, time.perf_counter() - start

    generate(prompts[:1])  # warm-up
    batch1 = _median([t / s for t, s in (timed(generate, [p]) for p in prompts[:3])])
    rows = [prompts[i % len(prompts)] for i in range(batch_size)]
    generate(rows[:2])  # warm-up of the batched path
    tokens, seconds = timed(generate, rows)
    batched = tokens / seconds

    examples = [dict(input_ids=i, labels=i) for i in dataset[:batch_size]["input_ids"]]
    batch = {k: v.to(device) for k, v in collate(examples, pad_token_id=pad_token_id).items()}

    def forward():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return int(batch["attention_mask"].sum())

    forward()  # warm-up
    rates, seconds = [], 0.0
    while len(rates) < 3 or (seconds < 1.0 and len(rates) < 20):
        t, s = timed(forward)
        rates.append(t / s)
        seconds += s
    return {"generate_tokens_per_s_batch1": batch1, "generate_tokens_per_s_batched": batched,
            "forward_tokens_per_s": _median(rates)}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# The whole evaluation


def weights_size(path: str) -> int:
    """Bytes of the weight files (safetensors, bin, pt, pth, gguf) directly in a model directory."""
    root = Path(path)
    if root.is_file() and root.name.endswith(WEIGHT_SUFFIXES):  # a GGUF file
        return root.stat().st_size
    if not root.is_dir():
        return 0
    return sum(f.stat().st_size for f in root.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def machine_info(device) -> dict:
    import transformers

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _raw_texts(data: str, max_examples: Optional[int]) -> list[str]:
    from distill.data.sources import load_raw, resolve_source  # the same reader load_tokenized uses

    raw = load_raw(resolve_source(data), split="train", hf_cache_dir=None)
    if max_examples is not None:
        raw = raw.select(range(min(max_examples, len(raw))))
    if "text" not in raw.column_names:
        return []
    return [t for t in raw["text"] if isinstance(t, str)]


def _data_cache_dir() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def evaluate_models(models: dict[str, str], data: str, *, teacher: str | None = None, max_length: int = 256,
                    max_examples: int | None = None, num_prompts: int = 16, max_new_tokens: int = 64,
                    batch_size: int = 8, seed: int = 0, speed: bool = True, dtype: str = "float32",
                    draft_prompts: int = 8, progress: bool = True) -> dict:
    """Evaluate ``models`` (name -> Hugging Face model directory) and ``teacher`` on ``data``.

    The teacher, when given, is evaluated too, as the model named "teacher", and is the reference
    for the fidelity metrics and ``teacher_nll``. ``data`` is read as text (column ``text``; any
    source ``load_tokenized`` takes) and packed into blocks of ``max_length`` tokens for the
    likelihood metrics; prompts come from the same documents (``extract_prompts``).

    Returns ``{"data", "settings", "models": {name: metrics}, "samples": [{"prompt", "source",
    "completions": {name: text}}], "machine"}``, JSON-serializable, with no NaN or infinity in it:
    metrics that do not apply are None, and so are those that non-finite outputs made meaningless
    (each model's ``status`` and ``nonfinite_metrics`` say which; see the module docstring). A model
    with non-finite outputs is a result, not an error: it is reported, not raised. Raises UserError
    for bad arguments, missing models or data, mismatched tokenizers.
    """
    from distill import models as loading
    from distill.data.sources import DataError

    if not models:
        raise UserError("no models to evaluate: give at least one NAME=PATH")
    if teacher is not None and "teacher" in models:
        raise UserError("the model name 'teacher' is reserved for the teacher: rename that model")
    for name, path in models.items():
        if not name or not isinstance(path, str) or not path:
            raise UserError(f"bad model entry {name!r}={path!r}: expected NAME=PATH")
    for key, value, low in (("max_length", max_length, 2), ("num_prompts", num_prompts, 0),
                            ("draft_prompts", draft_prompts, 0),
                            ("max_new_tokens", max_new_tokens, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{key} must be an integer >= {low}, got {value!r}")
    if dtype not in loading.DTYPES:
        raise UserError(f"dtype must be one of {', '.join(loading.DTYPES)}, got {dtype!r}")
    paths = ({"teacher": teacher} if teacher is not None else {}) | dict(models)
    reference = "teacher" if teacher is not None else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    tokenizer, foreign = _load_tokenizers(paths)  # foreign: name -> (its tokenizer, its Aligner)
    vocab_size = len(tokenizer)
    loaded = {}
    # GGUF files first: their checks are cheap and fail before any HF model has been loaded
    for name, path in sorted(paths.items(), key=lambda item: not is_gguf(item[1])):
        if is_gguf(path):
            if name == reference:
                raise UserError("the teacher must be a Hugging Face model folder, not a GGUF file")
            loaded[name] = _load_gguf(name, path, tokenizer, n_ctx=max_length + max_new_tokens)
            continue
        try:
            model = loading.load_causal_lm(path, dtype=loading.DTYPES[dtype])
        except UserError as e:
            raise UserError(f"model {name!r}: {e}") from None
        width = model.get_output_embeddings().weight.shape[0]
        own_size = len(foreign[name][0]) if name in foreign else vocab_size
        if width < own_size:
            raise UserError(f"model {name!r} has {width} vocabulary rows but the tokenizer has {own_size} tokens")
        loaded[name] = loading.freeze(model.to(device))
        if name in foreign:  # rows longer than its positions are cut (their spans dropped)
            foreign[name][1].max_teacher_length = getattr(model.config, "max_position_embeddings", None)
    loaded = {name: loaded[name] for name in paths}
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    dataset = load_tokenized(data, tokenizer=tokenizer, format="text", packing=True, max_length=max_length,
                             max_examples=max_examples, cache_dir=_data_cache_dir())
    if len(dataset) == 0:
        raise DataError(f"{data}: no complete block of {max_length} tokens; lower --max-length or add data")
    results = {name: {"path": str(paths[name]), "status": "ok", "finite": True,  # both set at the end
                      "params": _params(m), "format": "gguf" if is_gguf(paths[name]) else "hf",
                      "size_bytes": weights_size(paths[name])} for name, m in loaded.items()}
    for name, r in results.items():
        r["size_mb"] = r["size_bytes"] / 1e6
        r["tokenizer"] = str(paths[name]) if name in foreign else "shared"
    shared = {name: m for name, m in loaded.items() if name not in foreign}
    ref_bytes = predicted_bytes(dataset, tokenizer)
    for name, metrics in likelihood_metrics(shared, dataset, teacher=reference, vocab_size=vocab_size,
                                            batch_size=batch_size, pad_token_id=pad, device=device,
                                            progress=progress).items():
        results[name].update(metrics, bits_per_byte=bits_per_byte(metrics, ref_bytes),
                             **dict.fromkeys(ALIGNED_KEYS))
    for name, (own_tok, aligner) in foreign.items():
        if progress:
            print(f"scoring {name} on its own tokenizer, aligned by bytes", flush=True, file=_stderr())
        metrics = foreign_metrics(loaded[name], aligner, dataset, vocab_size=len(own_tok),
                                  teacher=loaded[reference] if reference is not None else None,
                                  teacher_vocab_size=vocab_size, batch_size=batch_size, pad_token_id=pad,
                                  device=device, progress=progress)
        results[name].update(metrics, bits_per_byte=bits_per_byte(metrics, metrics.pop("predicted_bytes")))

    # Generation: the same prompts and random stream for every model.
    max_positions = min(getattr(m.config, "max_position_embeddings", 1 << 30) or (1 << 30) for m in loaded.values())
    mode, prompts = "text", []
    if num_prompts:
        budget = min(max_length, max_positions - max_new_tokens)
        if budget < 2:
            raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the models' "
                            f"{max_positions} positions")
        mode, prompts = extract_prompts(_raw_texts(data, max_examples), tokenizer, num_prompts=num_prompts,
                                        seed=seed, max_prompt_tokens=budget)
    prompt_ids = [p.ids for p in prompts]
    samples = [{"prompt": p.text, "source": p.source, "completions": {}} for p in prompts]
    # A model on another tokenizer: the same prompt text in its own tokens, its own pad and EOS.
    own = {name: (tokenizer, prompt_ids, pad, eos, dataset) for name in loaded}
    for name, (own_tok, aligner) in foreign.items():
        o_eos = own_tok.eos_token_id
        o_pad = own_tok.pad_token_id if own_tok.pad_token_id is not None else o_eos
        budget = max(1, min(max_length, max_positions - max_new_tokens) - 1)
        o_prompts = [[o_eos] + _plain_ids(own_tok, p.text)[-budget:] for p in prompts]
        blocks = [aligner.row(ids)[0][:aligner.max_teacher_length or None]
                  for ids in dataset[:batch_size]["input_ids"]]
        own[name] = (own_tok, o_prompts, o_pad, o_eos, _Rows(blocks))
    # What was non-finite (issues) and what that left uncomputed (skipped), per model, for `status`.
    issues = {name: [] for name in loaded}
    skipped = {name: [] for name in loaded}
    for name, r in results.items():
        if r["nonfinite_positions"]:
            issues[name].append(f"non-finite outputs at {r['nonfinite_positions']} of {r['eval_tokens']} positions")
    teacher_finite = reference is None or not issues[reference]
    for name, model in loaded.items():
        r = results[name]
        m_tok, m_prompts, m_pad, m_eos, m_data = own[name]
        gen = {"teacher_nll": None, "valid_python": None, "distinct_1": None, "distinct_2": None,
               "completion_tokens": 0}
        applies = [k for k in GENERATION_KEYS if (k != "teacher_nll" or reference is not None)
                   and (k != "valid_python" or mode == "python")] if prompts else []
        sampled = False
        if prompts and issues[name]:
            skipped[name].append("generation and speed skipped" if speed else "generation skipped")
            r["nonfinite_metrics"] += applies + (list(SPEED_KEYS) if speed else [])
        elif prompts:
            if progress:
                print(f"sampling {len(prompts)} completions from {name}", flush=True, file=_stderr())
            guard = NonFiniteGuard()
            outs = sample_completions(model, m_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                      seed=seed, pad_token_id=m_pad, eos_token_id=m_eos, device=device, guard=guard)
            sampled = not guard.fired()
            if not sampled:  # the samples came partly from replaced rows: not the model's
                issues[name].append("non-finite outputs while sampling")
                skipped[name].append("generation metrics not computed")
                r["nonfinite_metrics"] += applies
        if sampled:
            texts = [_completion_text(m_tok, p, ids) for p, (ids, _) in zip(m_prompts, outs)]
            for record, text in zip(samples, texts):
                record["completions"][name] = text
            if name in foreign:  # read in the teacher's tokens, so that distinct-n and teacher NLL compare
                outs_ref = [(_plain_ids(tokenizer, text), ended) for text, (_, ended) in zip(texts, outs)]
            else:
                outs_ref = outs
            token_lists = [ids for ids, _ in outs_ref]
            gen.update(distinct_1=distinct_n(token_lists, 1), distinct_2=distinct_n(token_lists, 2),
                       completion_tokens=sum(len(ids) for ids, _ in outs))
            if reference is not None and teacher_finite:
                scored = [ids + [eos] if ended else ids for ids, ended in outs_ref]  # a sampled EOS is scored too
                total, count = teacher_nll(loaded[reference], prompt_ids, scored, vocab_size=vocab_size,
                                           pad_token_id=pad, batch_size=batch_size)
                if math.isfinite(total):
                    gen["teacher_nll"] = total / count if count else None
                else:  # finite on the data, not on these completions
                    if "non-finite outputs while scoring completions" not in issues[reference]:
                        issues[reference].append("non-finite outputs while scoring completions")
                    skipped[name].append("teacher NLL not computed: the teacher's outputs are non-finite")
                    r["nonfinite_metrics"].append("teacher_nll")
            elif reference is not None:
                r["nonfinite_metrics"].append("teacher_nll")
            if mode == "python":
                gen["valid_python"] = sum(completion_is_valid_python(p.text, t)
                                          for p, t in zip(prompts, texts)) / len(prompts)
        r.update(gen)
        r.update(dict.fromkeys(SPEED_KEYS))
        if speed and sampled:
            if progress:
                print(f"timing {name}", flush=True, file=_stderr())
            guard = NonFiniteGuard()
            timing = measure_speed(model, m_prompts, m_data, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   pad_token_id=m_pad, eos_token_id=m_eos, device=device, seed=seed, guard=guard)
            if guard.fired():
                issues[name].append("non-finite outputs while timing generation")
                skipped[name].append("generation speed not reported")
                timing.update(generate_tokens_per_s_batch1=None, generate_tokens_per_s_batched=None)
                r["nonfinite_metrics"] += ["generate_tokens_per_s_batch1", "generate_tokens_per_s_batched"]
            r.update(timing)
    # Speculative decoding, measured: the teacher with each (HF) model as its assistant.
    spec_prompts = prompt_ids[:draft_prompts] if speed else []
    for name, model in loaded.items():
        r = results[name]
        r.update(dict.fromkeys(SPEC_KEYS))
        if not spec_prompts or reference is None or name == reference or hasattr(model, "gguf") or name in foreign:
            continue  # a draft on another tokenizer cannot propose the teacher's tokens
        if issues[name] or not teacher_finite:
            r["nonfinite_metrics"] += list(SPEC_KEYS)
            continue
        if progress:
            print(f"teacher + {name} as its draft: {len(spec_prompts)} prompts", flush=True, file=_stderr())
        from distill.speculative import measure_assisted

        r.update(measure_assisted(loaded[reference], model, spec_prompts, max_new_tokens=max_new_tokens,
                                  vocab_size=vocab_size, eos_token_id=eos, pad_token_id=pad, device=device,
                                  gamma=DRAFT_GAMMA, seed=seed))
    if reference is not None and not teacher_finite:
        skipped[reference].append("no model's fidelity to the teacher or teacher NLL is computed")
        for name in foreign:
            if results[name]["aligned_forward_kl"] is not None:
                results[name].update(dict.fromkeys(ALIGNED_KEYS))
                results[name]["nonfinite_metrics"] += list(ALIGNED_KEYS)
        for name in loaded:
            if name != reference and not issues[name]:
                skipped[name].append("fidelity to the teacher not computed: the teacher's outputs are non-finite")
    for name, r in results.items():
        r["finite"] = not issues[name]
        r["status"] = "; ".join(issues[name] + skipped[name]) or "ok"

    settings = {"teacher": teacher, "models": dict(models), "max_length": max_length, "max_examples": max_examples,
                "num_prompts": num_prompts, "prompts_found": len(prompts), "prompt_mode": mode,
                "max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed, "speed": speed,
                "draft_prompts": len(spec_prompts), "draft_gamma": DRAFT_GAMMA,
                "dtype": dtype, "eval_blocks": len(dataset), "ece_bins": ECE_BINS,
                "eval_bytes": ref_bytes, "other_tokenizers": sorted(foreign),
                "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": None}}
    for model in loaded.values():
        if hasattr(model, "gguf"):
            model.close()
    return {"data": str(data), "settings": settings, "models": results, "samples": samples,
            "machine": machine_info(device)}


def is_gguf(path) -> bool:
    return str(path).endswith(".gguf")


def _load_gguf(name: str, path: str, tokenizer, *, n_ctx: int):
    """A GGUF model for scoring (``GGUFCausalLM``), refused unless llama.cpp tokenizes the export
    test strings exactly as ``tokenizer`` does (the ids it is scored on come from ``tokenizer``)."""
    from distill.export import TOKENIZER_TEST_STRINGS
    from distill.export.llamacpp import GGUFCausalLM

    try:
        model = GGUFCausalLM(path, n_ctx=n_ctx)
    except UserError as e:
        raise UserError(f"model {name!r}: {e}") from None
    bad = [t for t in TOKENIZER_TEST_STRINGS if model.gguf.tokenize(t) != _plain_ids(tokenizer, t)]
    if bad:
        model.close()
        raise UserError(f"model {name!r}: the GGUF's tokenizer differs from the evaluation's on {len(bad)} test "
                        f"strings (first: {bad[0]!r}); evaluate it with the model it was exported from")
    if model.vocab_size < len(tokenizer):
        model.close()
        raise UserError(f"model {name!r} has {model.vocab_size} vocabulary rows but the tokenizer has "
                        f"{len(tokenizer)} tokens")
    return model


def _params(model: nn.Module) -> int:
    return model.n_params if hasattr(model, "gguf") else sum(p.numel() for p in model.parameters())


def _load_tokenizers(paths: dict[str, str]):
    """(the evaluation tokenizer, {name: own tokenizer} of the models on another one).

    The evaluation tokenizer is the teacher's (or the first HF model's). A model directory whose
    tokenizer maps the shared ids to the same tokens shares it; one with another tokenizer is scored
    through byte alignment (``foreign_metrics``), which needs both tokenizers to spell their text
    with their tokens and to give offsets (one line otherwise). GGUF files are read with the
    evaluation tokenizer (``_load_gguf`` checks it)."""
    from distill import models as loading
    from distill.losses.cross_tokenizer import AlignmentError
    from distill.teachers.cross import Aligner

    hf_paths = {name: path for name, path in paths.items() if not is_gguf(path)}
    if not hf_paths:
        raise UserError("GGUF models are scored with the tokenizer of a Hugging Face model: give --teacher or a "
                        "--model that is an HF folder")
    first_name, first_path = next(iter(hf_paths.items()))
    if not os.path.exists(os.path.expanduser(first_path)) and first_path.startswith(("/", ".", "~")):
        raise UserError(f"model {first_name!r} not found: {first_path}")
    try:
        tokenizer = loading.load_tokenizer(first_path)
    except UserError as e:
        raise UserError(f"model {first_name!r}: {e}") from None
    foreign = {}
    for name, path in list(hf_paths.items())[1:]:
        if os.path.isdir(path) and any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            own = loading.load_tokenizer(path)
            try:
                check_tokenizers_compatible(own, tokenizer)
            except TokenizerMismatchError:
                try:
                    foreign[name] = (own, Aligner(own, tokenizer))
                except AlignmentError as e:
                    raise UserError(f"model {name!r} is on another tokenizer than {first_name!r}'s and cannot be "
                                    f"aligned with it by bytes: {e}") from None
    return tokenizer, foreign


def _completion_text(tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    """The completion as text: decoded together with the prompt (so word-level decoders place the
    joining space) and cut after the prompt's own decoding."""
    head = tokenizer.decode(prompt_ids[1:])
    full = tokenizer.decode(prompt_ids[1:] + ids)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(ids)


class _Rows:
    """Token rows that ``measure_speed`` slices like a dataset (``rows[:n]["input_ids"]``)."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    def __getitem__(self, index: slice) -> dict:
        return {"input_ids": self.rows[index]}

    def __len__(self) -> int:
        return len(self.rows)


def _stderr():
    import sys

    return sys.stderr


# ---------------------------------------------------------------------------------------------
# Generated data (`distill generate`'s output)


def evaluate_generated(folder, *, teacher: Optional[str] = None, tokenizer: Optional[str] = None,
                       max_length: int = 1024, batch_size: int = 8, dtype: str = "float32",
                       max_examples: Optional[int] = None) -> dict:
    """What `distill generate` wrote in ``folder``, scored: the training rows' completion lengths
    (tokens of ``tokenizer``, default the teacher's, else the generating teacher's model), the share
    cut by max_new_tokens, distinct completions, distinct-2, the verification rate of CoT traces
    (correct / all samples with a verdict) and, with a ``teacher``, its NLL per completion token
    (mean over tokens, and per row for the histogram) given the prompt, as training tokenizes it.
    """
    import json

    from distill import models as model_io
    from distill.generate import MANIFEST

    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not a finished `distill generate` folder ({MANIFEST} not found)")
    manifest = json.loads(path.read_text())
    data = folder / manifest["data"]
    tok_name = tokenizer or teacher or (manifest["teacher"].get("model") if manifest["teacher"]["kind"] == "local"
                                        else None)
    if tok_name is None:
        raise UserError("give --teacher (or --tokenizer) to count the tokens of an HTTP teacher's text")
    tok = model_io.load_tokenizer(tok_name)
    dataset = load_tokenized(str(data), tokenizer=tok, format="auto", max_length=max_length, packing=False,
                             max_examples=max_examples)
    if data.suffix == ".jsonl":
        rows = [json.loads(line) for line in data.read_text().splitlines()]
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(data).to_pylist()
    rows = rows[:max_examples] if max_examples else rows
    completions = [[x for x in labels if x != -100][:-1] for labels in dataset["labels"]]  # without the EOS
    lengths = [len(ids) for ids in completions]
    texts = [r["completion"] if "completion" in r else r["messages"][-1]["content"] for r in rows]
    c = manifest["counts"]
    verdicts = sum(c.get(k, 0) for k in ("correct", "wrong", "unparseable"))
    result = {
        "folder": str(folder), "teacher_of_data": manifest["teacher"], "rows": len(rows),
        "prompts": len({r["prompt_index"] for r in rows}), "samples": c["samples"], "kept_fraction": c["kept"] / c["samples"],
        "completion_tokens_mean": sum(lengths) / len(lengths), "completion_tokens_p50": _quantile(lengths, 0.5),
        "completion_tokens_p95": _quantile(lengths, 0.95), "completion_tokens_max": max(lengths),
        "unfinished_fraction": sum(r.get("finish_reason") == "length" for r in rows) / len(rows),
        "distinct_completions": len(set(texts)) / len(texts), "distinct_2": distinct_n(completions, 2),
        "verification_rate": c["correct"] / verdicts if verdicts else None,
        "unparseable_rate": c["unparseable"] / verdicts if verdicts else None,
        "too_long": c["too_long"], "lengths": lengths, "teacher": teacher, "teacher_nll": None, "row_nll": None,
        "rows_scored": len(dataset),
    }
    if teacher is not None:
        from distill.build import has_accelerator

        device = torch.device("cuda") if has_accelerator() and torch.cuda.is_available() else torch.device("cpu")
        model = model_io.freeze(model_io.load_causal_lm(teacher, dtype=model_io.DTYPES[dtype])).to(device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows = completion_logprobs(LiveTeacher(model, len(tok)), [dict(input_ids=i, labels=l) for i, l in zip(
            dataset["input_ids"], dataset["labels"])], pad_token_id=pad, batch_size=batch_size)
        per_row = [-row.double().mean().item() for row in rows]
        total, count = -sum(row.double().sum().item() for row in rows), sum(row.shape[0] for row in rows)
        result.update(teacher_nll=total / count, row_nll=per_row)
    return result


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])
