"""The shared sampler (distill/generation.py) and the on-policy batches built from it (distill/batches.py)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from distill.batches import prompt_of, sampled_batches, step_source
from distill.generation import (Completion, NonFiniteGuard, SamplingSettings, filter_logits, gumbel_sample, row_seed,
                                sample)
from distill.teachers import LiveTeacher

EOS, PAD, VOCAB = 3, 0, 61
PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14, 15], [3, 4], [20, 21, 22, 23]]


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    arch = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, **overrides)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **arch))


def seeds(n, step=0):
    return [row_seed(0, step, i) for i in range(n)]


def run(model, prompts, settings, row_seeds, **kw):
    return sample(model, prompts, settings=settings, seeds=row_seeds, eos_token_id=EOS, pad_token_id=PAD, **kw)


def test_kv_cache_and_left_padding_give_what_a_full_recompute_gives():
    model = tiny_llama().eval()
    greedy = SamplingSettings(max_new_tokens=9, top_k=1)
    got = run(model, PROMPTS, greedy, seeds(len(PROMPTS)), batch_size=3)
    for prompt, completion in zip(PROMPTS, got):
        sequence = list(prompt)
        for _ in range(9):  # no cache, no padding: the whole sequence every step
            with torch.no_grad():
                token = int(model(torch.tensor([sequence])).logits[0, -1].argmax())
            sequence.append(token)
            if token == EOS:
                break
        tail = sequence[len(prompt):]
        assert completion == Completion([t for t in tail if t != EOS], EOS in tail)


def test_a_rows_sample_depends_on_its_seed_not_on_its_batch():
    model = tiny_llama(1).eval()
    settings = SamplingSettings(max_new_tokens=40, temperature=1.5)
    row_seeds = seeds(len(PROMPTS))
    together = run(model, PROMPTS, settings, row_seeds)
    alone = [run(model, [p], settings, [s])[0] for p, s in zip(PROMPTS, row_seeds)]
    reordered = run(model, PROMPTS[::-1], settings, row_seeds[::-1], batch_size=2)[::-1]
    assert together == alone == reordered
    assert run(model, PROMPTS, settings, seeds(len(PROMPTS), step=1)) != together  # another step: other samples
    assert any(c.ended for c in together) and not all(c.ended for c in together)  # rows stopped on their own
    assert all(EOS not in c.ids and len(c.ids) <= 40 for c in together)
    assert all(len(c.ids) == 40 for c in together if not c.ended)


def test_sampling_runs_without_dropout_and_restores_the_training_mode():
    model = tiny_llama(2, attention_dropout=0.5)
    settings = SamplingSettings(max_new_tokens=6)
    model.train()
    first = run(model, PROMPTS, settings, seeds(len(PROMPTS)))
    assert model.training
    again = run(model, PROMPTS, settings, seeds(len(PROMPTS)))
    assert first == again == run(model.eval(), PROMPTS, settings, seeds(len(PROMPTS)))


def test_gumbel_sampling_draws_from_the_softmax():
    scores = torch.tensor([[1.0, 0.0, -1.0, 2.0, float("-inf")]])
    draws = torch.stack([gumbel_sample(scores, [torch.Generator().manual_seed(i)]) for i in range(20000)])
    freq = torch.bincount(draws.flatten(), minlength=5).double() / draws.numel()
    torch.testing.assert_close(freq, torch.softmax(scores[0].double(), -1), atol=0.012, rtol=0)
    assert freq[4] == 0  # a banned token is never drawn


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (5, 1.0), (7, 0.5), (0, 0.05)])
def test_top_k_and_top_p_filter_as_transformers_does(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(4)
    logits = torch.randn(6, 40) * 3
    ours = filter_logits(logits, temperature=0.7, top_k=top_k, top_p=top_p)
    theirs = logits / 0.7
    if top_k:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p < 1:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_non_finite_scores_raise_unless_a_guard_repairs_and_counts_them():
    model = tiny_llama(3).eval()
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")
    settings = SamplingSettings(max_new_tokens=3)
    with pytest.raises(RuntimeError, match="NaN or inf"):
        run(model, PROMPTS, settings, seeds(len(PROMPTS)))
    guard = NonFiniteGuard()
    run(model, PROMPTS, settings, seeds(len(PROMPTS)), guard=guard)
    assert guard.fired()


def test_ignore_eos_makes_exactly_max_new_tokens():
    model = tiny_llama(5).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 0
        model.lm_head.bias = None
    out = run(model, PROMPTS, SamplingSettings(max_new_tokens=7, ignore_eos=True), seeds(len(PROMPTS)))
    assert all(len(c.ids) == 7 and not c.ended for c in out)


def test_the_step_source_is_a_pure_function_with_the_right_rate():
    picks = [step_source(s, seed=3, lmbda=0.3, seq_kd=True) for s in range(2000)]
    assert picks == [step_source(s, seed=3, lmbda=0.3, seq_kd=True) for s in range(2000)]
    assert set(picks) == {"student", "teacher"}
    assert 0.26 < picks.count("student") / len(picks) < 0.34
    assert {step_source(s, seed=0, lmbda=0.0, seq_kd=False) for s in range(50)} == {"data"}
    assert {step_source(s, seed=0, lmbda=1.0, seq_kd=False) for s in range(50)} == {"student"}


def test_the_prompt_of_an_example_is_everything_before_its_last_supervised_span():
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    assert prompt_of(ids, [-100, -100, 3, 4, -100, -100, 7, 8]) == [1, 2, 3, 4, 5, 6]  # chat: the last turn
    assert prompt_of(ids, [-100] * 3 + ids[3:]) == [1, 2, 3]  # prompt/completion
    assert prompt_of(ids, [-100] * 8) == ids  # prompt-only


def test_sampled_batches_supervise_exactly_the_sampled_tokens_and_the_teacher_scores_them():
    student, teacher_model = tiny_llama(6).eval(), tiny_llama(7).eval()
    rows = [{"input_ids": [[1, 5, 6, 7, 30, 31], [1, 8, 9]], "labels": [[-100] * 4 + [30, 31], [-100] * 3]},
            {"input_ids": [[1, 10, 11, 12, 13]], "labels": [[-100, -100, 11, 12, 13]]}]
    examples = [[4, 9], [2]]
    settings = SamplingSettings(max_new_tokens=10, temperature=2.0)

    def generate(prompts, row_seeds):
        return run(student, prompts, settings, row_seeds)

    batches, made = sampled_batches(rows, examples, step=5, seed=0, num_generations=2, generate=generate,
                                    eos_token_id=EOS, pad_token_id=PAD, device="cpu")
    assert [r["example"] for r in made["records"]] == [4, 4, 9, 9, 2, 2]
    assert [r["seed"] for r in made["records"]] == [row_seed(0, 5, e, j) for e in (4, 9, 2) for j in (0, 1)]
    assert [r["prompt_ids"] for r in made["records"][::2]] == [[1, 5, 6, 7], [1, 8, 9], [1, 10]]
    assert made["tokens"] == sum(len(r["completion_ids"]) + r["ended"] for r in made["records"])
    records = iter(made["records"])
    live = LiveTeacher(teacher_model, VOCAB)
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            r = next(records)
            prompt, tail = r["prompt_ids"], r["completion_ids"] + ([EOS] if r["ended"] else [])
            n = len(prompt) + len(tail)
            assert batch["input_ids"][row, :n].tolist() == prompt + tail
            assert batch["labels"][row].tolist() == [-100] * len(prompt) + tail + [-100] * (batch["labels"].shape[1] - n)
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["labels"].shape[1] - n)
        # The teacher's targets are a teacher forward over exactly the sampled sequences.
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        signal = live.signal(inputs, mask, None, want="logits")
        manual = []
        for row in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][row].sum())
            with torch.no_grad():
                logits = teacher_model(batch["input_ids"][row:row + 1, :n]).logits[0, :-1]  # no padding at all
            manual.append(logits[mask[row, :n - 1]])
        torch.testing.assert_close(signal.logits, torch.cat(manual), rtol=1e-5, atol=1e-5)
        token_lp = live.signal(inputs, mask, None, want="token_logprobs", tokens=labels[mask]).token_logprobs
        torch.testing.assert_close(token_lp, torch.log_softmax(torch.cat(manual), -1)
                                   .gather(-1, labels[mask][:, None]).squeeze(-1), rtol=1e-5, atol=1e-5)
