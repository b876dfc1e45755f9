"""distill.batches: who writes a step's completions, the prompt of an example, sampled micro-batches."""

from __future__ import annotations

from collections import Counter

import pytest

from distill.batches import prompt_of, sampled_batches, step_source
from distill.data import IGNORE_INDEX as X
from distill.generation import Completion, row_seed


@pytest.mark.parametrize("lmbda", [0.25, 0.5, 0.9])
def test_step_source_is_a_pure_function_with_the_right_frequency(lmbda):
    a = [step_source(s, seed=7, lmbda=lmbda, seq_kd=False) for s in range(4000)]
    b = [step_source(s, seed=7, lmbda=lmbda, seq_kd=False) for s in range(4000)]
    assert a == b  # every process and every resumption agrees
    share = Counter(a)["student"] / len(a)
    assert abs(share - lmbda) < 4 * (lmbda * (1 - lmbda) / len(a)) ** 0.5  # binomial, 4 sigma
    assert set(a) == {"student", "data"}
    with_teacher = [step_source(s, seed=7, lmbda=lmbda, seq_kd=True) for s in range(4000)]
    assert [x if x == "student" else "data" for x in with_teacher] == a  # seq_kd only renames the others
    assert a != [step_source(s, seed=8, lmbda=lmbda, seq_kd=False) for s in range(4000)]


def test_step_source_extremes():
    assert {step_source(s, seed=0, lmbda=0.0, seq_kd=False) for s in range(200)} == {"data"}
    assert {step_source(s, seed=0, lmbda=0.0, seq_kd=True) for s in range(200)} == {"teacher"}
    assert {step_source(s, seed=0, lmbda=1.0, seq_kd=False) for s in range(200)} == {"student"}


def test_prompt_of_each_format():
    # prompt/completion: everything before the completion
    assert prompt_of([5, 6, 7, 8, 0], [X, X, 7, 8, 0]) == [5, 6]
    # chat: up to the last assistant turn (earlier turns, supervised or not, stay in the prompt)
    assert prompt_of([1, 2, 3, 4, 5, 6, 7], [X, 2, 3, X, X, 6, 7]) == [1, 2, 3, 4, 5]
    # prompt only: nothing supervised, all of it
    assert prompt_of([1, 2, 3], [X, X, X]) == [1, 2, 3]
    # trailing unsupervised tokens after the last span are not part of the prompt
    assert prompt_of([1, 2, 3, 4], [X, 2, X, X]) == [1]


def test_sampled_batches_supervise_only_completions_and_their_eos():
    eos, pad = 0, 9
    rows = [{"input_ids": [[5, 6, 7, 8, 0], [4, 3, 0]], "labels": [[X, X, 7, 8, 0], [X, 3, 0]]}]
    calls = []

    def generate(prompts, seeds):
        calls.append((prompts, seeds))
        return [Completion([11, 12], ended=True), Completion([13], ended=False),
                Completion([14, 15, 16], ended=False), Completion([], ended=True)]

    batches, made = sampled_batches(rows, [[3, 10]], step=4, seed=1, num_generations=2, generate=generate,
                                    eos_token_id=eos, pad_token_id=pad, device="cpu")
    assert len(calls) == 1  # one batched generate call for the whole step
    prompts, seeds = calls[0]
    assert prompts == [[5, 6], [5, 6], [4], [4]]
    assert seeds == [row_seed(1, 4, 3, 0), row_seed(1, 4, 3, 1), row_seed(1, 4, 10, 0), row_seed(1, 4, 10, 1)]
    (batch,) = batches
    assert batch["labels"].tolist() == [[X, X, 11, 12, eos], [X, X, 13, X, X], [X, 14, 15, 16, X], [X, eos, X, X, X]]
    assert batch["input_ids"].tolist()[1] == [5, 6, 13, pad, pad]
    assert batch["attention_mask"].tolist()[3] == [1, 1, 0, 0, 0]
    assert made["tokens"] == 3 + 1 + 3 + 1  # sampled tokens, each sampled EOS included
    assert [(r["example"], r["generation"], r["ended"]) for r in made["records"]] == [
        (3, 0, True), (3, 1, False), (10, 0, False), (10, 1, True)]
