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


@pytest.mark.parametrize("divergence, chunk_size", [("reverse_kl", 0), ("reverse_kl", 5), ("jsd", 5),
                                                    ("sampled_reverse_kl", 0)])
def test_the_teacher_scores_exactly_the_sampled_sequences(tmp_path, divergence, chunk_size):
    """The loss of a sampled micro-batch equals a float64 reference computed from a manual teacher
    and student forward over each row's own prompt + completion (+ EOS), completion positions only."""
    import datasets
    import torch

    from distill.batches import step_batches
    from distill.generation import SamplingSettings, sample
    from distill.losses import jsd, reverse_kl
    from distill.teachers import LiveTeacher
    from distill.toy import make_llama
    from distill.training import Backbone, LossSettings, micro_batch_loss

    vocab, eos, pad = 40, 0, 1
    teacher = make_llama(tmp_path / "t", vocab_size=vocab, seed=1).eval()
    student = make_llama(tmp_path / "s", vocab_size=vocab, seed=2).eval()
    data = [{"input_ids": [5, 6, 7, 8, eos], "labels": [X, X, 7, 8, eos]},
            {"input_ids": [9, 10, 11, 12, 13, eos], "labels": [X, X, X, 12, 13, eos]},
            {"input_ids": [14, 15, 16], "labels": [X, X, X]}]  # prompt only
    settings = SamplingSettings(max_new_tokens=6, temperature=1.5)
    made = step_batches(datasets.Dataset.from_list(data), [[0, 1, 2]], step=3, source="student", seed=0, num_generations=2, pad_token_id=pad,
                        eos_token_id=eos, device="cpu",
                        generate=lambda prompts, seeds: sample(student, prompts, settings=settings, seeds=seeds,
                                                               eos_token_id=eos, pad_token_id=pad))
    (batch,) = made.batches
    s = LossSettings(divergence=divergence, divergence_kwargs={"beta": 0.5} if divergence == "jsd" else {},
                     temperature=1.0, scale_by_tau2=True, kd_weight=1.0, ce_weight=0.0, chunk_size=chunk_size,
                     vocab_size=vocab)
    with torch.no_grad():
        parts, ok = micro_batch_loss(Backbone(student), LiveTeacher(teacher, vocab, chunk_size=4), batch, s)
    assert bool(ok)

    expected, count = torch.zeros((), dtype=torch.float64), 0
    for r in made.samples:
        tail = r["completion_ids"] + ([eos] if r["ended"] else [])
        seq = torch.tensor([r["prompt_ids"] + tail])
        with torch.no_grad():
            p_logits = teacher(input_ids=seq).logits[0].double()
            q_logits = student(input_ids=seq).logits[0].double()
        rows = torch.arange(len(r["prompt_ids"]) - 1, seq.shape[1] - 1)  # positions that predict the completion
        targets = seq[0, rows + 1]
        if divergence == "sampled_reverse_kl":  # the value is the sampled-token estimate log q - log p
            expected += (q_logits[rows].log_softmax(-1).gather(-1, targets[:, None])
                         - p_logits[rows].log_softmax(-1).gather(-1, targets[:, None])).sum()
        elif divergence == "reverse_kl":
            expected += reverse_kl(q_logits[rows], p_logits[rows]).sum()
        else:
            expected += jsd(q_logits[rows], p_logits[rows], beta=0.5).sum()
        count += len(rows)
    assert int(parts.num_supervised) == count == made.generated_tokens
    assert float(parts.kd) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
