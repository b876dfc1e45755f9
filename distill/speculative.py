"""The student as the teacher's draft model, measured: Hugging Face assisted generation with
speculative sampling (Leviathan et al. 2023, algorithm 1), against the teacher sampling alone.

For each prompt (batch 1, temperature 1, no top-k / top-p, the same seed for both runs) the teacher
samples ``max_new_tokens`` alone and then with the draft as ``assistant_model``, drafting a constant
``gamma`` tokens per verification step (no confidence early stop, no heuristic schedule: the setting
the expected-tokens formula describes). Tokens per second of both runs are the measured speedup.

The acceptance is read from the verification steps themselves (the teacher's candidate generator is
wrapped to record each step's drafted tokens and the tokens the step kept): a draft is accepted iff
the kept token at its place is the draft itself (a rejected draft x had q(x) > p(x), so the
correction, drawn from (p − q)+, is never x), and the step judged its drafts up to the first
rejection (``judged_drafts``). ``acceptance_measured`` = accepted / judged. Its expectation is not
the corpus ``draft_acceptance`` (teacher-forced data positions; these are positions on the teacher's
own samples) but the mean of α_t = Σ_x min(p_t(x), q_t(x)) over the judged positions, which the
teacher and draft give after the fact on the generated sequence (``acceptance_expected``). Whether
position t is judged depends only on the outcomes before it, so Σ (accepted_t − α_t) is a martingale
with variance Σ α_t (1 − α_t): ``acceptance_z`` is the standardized difference, within ±3 when the
measurement agrees with α. A step cut short by EOS or the length limit is counted as far as it was
kept (those are stopping times too).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn

from distill.generation import row_seed


def judged_drafts(drafted: Sequence[int], kept: Sequence[int]) -> tuple[int, int]:
    """(accepted, judged) for one verification step that drafted ``drafted`` and kept ``kept``:
    accepted = the leading drafts kept as they were; judged = those plus the first rejected one,
    if the step kept a token in its place."""
    accepted = 0
    while accepted < min(len(drafted), len(kept)) and kept[accepted] == drafted[accepted]:
        accepted += 1
    rejected = accepted < len(drafted) and accepted < len(kept)
    return accepted, accepted + rejected


class _StepRecorder:
    """Wraps the teacher's candidate generator to record each step's (start length, drafted tokens, end length)."""

    def __init__(self, target: nn.Module):
        self.target, self.steps = target, []

    def __enter__(self):
        original = self.target._get_candidate_generator

        def wrapped(*args, **kwargs):
            generator = original(*args, **kwargs)
            get, update = generator.get_candidates, generator.update_candidate_strategy
            seen = {}

            def get_candidates(input_ids, *a, **k):
                out = get(input_ids, *a, **k)
                seen.update(start=input_ids.shape[1], drafted=out[0][0, input_ids.shape[1]:].tolist())
                return out

            def update_candidate_strategy(input_ids, scores, num_matches):
                self.steps.append((seen["start"], seen["drafted"], input_ids.shape[1]))
                return update(input_ids, scores, num_matches)

            generator.get_candidates, generator.update_candidate_strategy = get_candidates, update_candidate_strategy
            return generator

        self.target._get_candidate_generator = wrapped
        return self

    def __exit__(self, *exc):
        del self.target._get_candidate_generator  # the instance attribute; the class method is back


def _generate(model: nn.Module, prompt: Sequence[int], *, max_new_tokens: int, seed: int, eos_token_id: int,
              pad_token_id: int, device, assistant=None) -> tuple[list[int], float]:
    ids = torch.tensor([list(prompt)], device=device)
    torch.manual_seed(seed)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                         top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, assistant_model=assistant)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return out[0, len(prompt):].tolist(), time.perf_counter() - start


@torch.inference_mode()
def path_acceptance(target: nn.Module, draft: nn.Module, sequence: Sequence[int], vocab_size: int, device) -> torch.Tensor:
    """α_t = Σ min(p_t, q_t) for every position t ≥ 1 of ``sequence`` (predicting token t), float64."""
    ids = torch.tensor([list(sequence)], device=device)
    from distill.evaluate import draft_acceptance

    p = target(input_ids=ids).logits[0, :-1, :vocab_size].double()
    q = draft(input_ids=ids).logits[0, :-1, :vocab_size].double()
    return draft_acceptance(q, p)


def measure_assisted(target: nn.Module, draft: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                     vocab_size: int, eos_token_id: int, pad_token_id: int, device, gamma: int = 4,
                     seed: int = 0) -> dict:
    """Teacher alone vs teacher + ``draft`` as assistant on ``prompts``; see the module docstring."""
    config = draft.generation_config
    saved = {k: getattr(config, k, None) for k in ("num_assistant_tokens", "num_assistant_tokens_schedule",
                                                   "assistant_confidence_threshold")}
    config.num_assistant_tokens, config.num_assistant_tokens_schedule = gamma, "constant"
    config.assistant_confidence_threshold = 0.0  # no early stop of a draft: exactly gamma per step
    settings = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                    device=device)
    try:
        _generate(target, prompts[0], seed=0, **{**settings, "max_new_tokens": 4})  # warm-ups
        _generate(target, prompts[0], seed=0, assistant=draft, **{**settings, "max_new_tokens": 4})
        alone_tokens = alone_s = assisted_tokens = assisted_s = 0.0
        accepted = judged = steps = 0
        expected = variance = 0.0
        for i, prompt in enumerate(prompts):
            seed_i = row_seed(seed, i)
            made, seconds = _generate(target, prompt, seed=seed_i, **settings)
            alone_tokens, alone_s = alone_tokens + len(made), alone_s + seconds
            with _StepRecorder(target) as recorder:
                made, seconds = _generate(target, prompt, seed=seed_i, assistant=draft, **settings)
            assisted_tokens, assisted_s = assisted_tokens + len(made), assisted_s + seconds
            steps += len(recorder.steps)
            sequence = list(prompt) + made
            alpha = path_acceptance(target, draft, sequence, vocab_size, device)
            for start, drafted, end in recorder.steps:
                took, n = judged_drafts(drafted, sequence[start:end])
                a = alpha[start - 1:start - 1 + n]  # α of the positions of the judged drafts
                accepted, judged = accepted + took, judged + n
                expected, variance = expected + float(a.sum()), variance + float((a * (1 - a)).sum())
    finally:
        for key, value in saved.items():
            setattr(config, key, value)
    alone_rate = alone_tokens / alone_s if alone_s else None
    assisted_rate = assisted_tokens / assisted_s if assisted_s else None
    return {"spec_gamma": gamma, "spec_prompts": len(prompts), "spec_judged_drafts": judged,
            "spec_acceptance_measured": accepted / judged if judged else None,
            "spec_acceptance_expected": expected / judged if judged else None,
            "spec_acceptance_z": (accepted - expected) / variance ** 0.5 if variance > 0 else None,
            "spec_tokens_per_step": assisted_tokens / steps if steps else None,
            "spec_teacher_tokens_per_s": alone_rate, "spec_assisted_tokens_per_s": assisted_rate,
            "spec_speedup": assisted_rate / alone_rate if alone_rate and assisted_rate else None}
