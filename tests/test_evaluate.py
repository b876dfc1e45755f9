"""distill.evaluate: metric functions against plain references, prompts, the valid-Python rule, and
evaluate_models on the tiny workspace teacher (a model against itself, a random student against a
dense float64 reference). Never asserts on timings."""

import math
import random

import pytest
import torch

from distill.evaluate import (completion_is_valid_python, distinct_n, evaluate_models, expected_calibration_error,
                              extract_prompts, function_prompts, teacher_nll)
from tests.helpers import make_llama
from tests.reference import ref_forward_kl, ref_reverse_kl


# ---------------------------------------------------------------------------------------------
# Plain references, written from the definitions


def ref_ece(confidence, correct, num_bins=15):
    """ECE = Σ_m |B_m|/N · |acc(B_m) − conf(B_m)|, bin m holding confidences in ((m-1)/M, m/M]."""
    confidence, correct = [float(c) for c in confidence], [float(c) for c in correct]
    n, total = len(confidence), 0.0
    for m in range(1, num_bins + 1):
        lo, hi = (m - 1) / num_bins, m / num_bins
        members = [i for i, c in enumerate(confidence) if (lo < c <= hi) or (m == 1 and c == 0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            conf = sum(confidence[i] for i in members) / len(members)
            total += len(members) / n * abs(acc - conf)
    return total


def ref_likelihood(model, dataset, pad_token_id, batch_size):
    """Dense float64 logits on the same batches: CE, top-1 accuracy, ECE inputs."""
    from distill.data import collate

    nll, conf, hits = [], [], []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start:start + batch_size]
        batch = collate([dict(input_ids=i, labels=l) for i, l in zip(rows["input_ids"], rows["labels"])],
                        pad_token_id=pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        log_p = torch.log_softmax(logits.double(), -1)[mask]  # (N, V)
        targets = labels[mask]
        nll += (-log_p.gather(-1, targets[:, None]).squeeze(-1)).tolist()
        conf += log_p.exp().max(-1).values.tolist()
        hits += (log_p.argmax(-1) == targets).tolist()
    return nll, conf, hits


# ---------------------------------------------------------------------------------------------
# Pure metric functions


def test_ece_matches_reference_on_synthetic_predictions():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 1000):
        confidence = torch.rand(n, generator=gen)
        correct = torch.rand(n, generator=gen) < confidence ** 2
        assert expected_calibration_error(confidence, correct) == pytest.approx(ref_ece(confidence, correct), abs=1e-12)
    assert expected_calibration_error(torch.zeros(0), torch.zeros(0, dtype=torch.bool)) == 0.0


def test_ece_is_zero_when_calibrated_and_known_when_not():
    # 10 predictions at 0.8 with 8 right, 4 at 0.25 with 1 right, 2 at 1.0 both right: calibrated.
    confidence = torch.tensor([0.8] * 10 + [0.25] * 4 + [1.0] * 2, dtype=torch.float64)
    correct = torch.tensor([1] * 8 + [0] * 2 + [1] + [0] * 3 + [1, 1])
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.0, abs=1e-12)
    # Always 90% sure, right half the time: ECE 0.4.
    assert expected_calibration_error(torch.full((10,), 0.9), torch.arange(10) % 2 == 0) == pytest.approx(0.4)


def test_distinct_n_on_hand_made_tokens():
    seqs = [[1, 2, 3, 1], [1, 2]]
    assert distinct_n(seqs, 1) == pytest.approx(3 / 6)  # {1, 2, 3} of 6 tokens
    assert distinct_n(seqs, 2) == pytest.approx(3 / 4)  # (1,2) (2,3) (3,1) (1,2): never across sequences
    assert distinct_n([[5, 5, 5, 5]], 2) == pytest.approx(1 / 3)
    assert distinct_n([[7], []], 2) == 0.0


# ---------------------------------------------------------------------------------------------
# The valid-Python rule

PROMPT = 'def area(w, h):\n    """Area of a w by h rectangle."""'
METHOD = 'class Box:\n    def area(self):\n        """Area."""'.split("\n", 1)[1]  # an indented method


@pytest.mark.parametrize("prompt, completion, valid", [
    (PROMPT, "\n    return w * h\n", True),  # complete
    (PROMPT, "\n    return w * h\n\n\ndef other(:\n  broken", True),  # the function ended; the rest is ignored
    (PROMPT, "\n    return w * h\nprint(area(2, 3))\n", True),  # followed by more code
    (PROMPT, "\n    y = w\n    x = w *", True),  # out of tokens mid-line: the unfinished line is dropped
    (PROMPT, "\n    x = w *", False),  # ... which leaves no body
    (PROMPT, "\n    if w > 0:\n        return (w,\n                h", True),  # open bracket: incomplete, no error
    (PROMPT, "\n    x = \"unterminated", False),  # an error, and without that line no body
    (PROMPT, "\n    return w * h )\n", False),  # a syntax error in a finished function
    (PROMPT, "\n    return w * h\n  oops = 1\n", False),  # bad dedent inside the function
    (PROMPT, "\n    return = 3\n    x = 1", False),
    (PROMPT, "", False),  # nothing added to the body
    (PROMPT, "\ndef next_one():\n    pass\n", False),  # ends at once: no body added
    (METHOD, "\n        return self.w * self.h\n    def volume(self):\n", True),  # a method, dedented
    (METHOD, "\n        return self.w *\n", False),  # a finished line that does not parse
])
def test_valid_python_rule(prompt, completion, valid):
    assert completion_is_valid_python(prompt, completion) is valid


# ---------------------------------------------------------------------------------------------
# Prompts

SOURCE = '''import os


def plain(a):
    """Plain function."""
    return a


@decorator
def decorated(
    b,
):
    """Decorated, with a signature
    on several lines."""
    x = b
    return x


def no_doc():
    return 1


def only_doc():
    """Nothing else."""


class Thing:
    """A class docstring is not a function."""

    def method(self):
        """A method."""

        def inner():
            """Nested."""
            return 2
        return inner()

    async def fetch(self):
        """Async."""
        await self.x
'''


def test_function_prompts_cover_functions_methods_and_nested():
    found = dict(function_prompts(SOURCE))
    assert sorted(found.values()) == sorted([
        'def plain(a):\n    """Plain function."""',
        'def decorated(\n    b,\n):\n    """Decorated, with a signature\n    on several lines."""',
        '    def method(self):\n        """A method."""',
        '        def inner():\n            """Nested."""',
        '    async def fetch(self):\n        """Async."""',
    ])
    assert list(found) == sorted(found)  # by line
    assert function_prompts("def broken(:\n") == []


class WordTokenizer:
    """Enough of a tokenizer for extract_prompts: one id per character."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) + 1 for c in text]}

    def decode(self, ids):
        return "".join(chr(i - 1) for i in ids)


def test_extract_prompts_is_deterministic_and_picks_the_mode():
    tok = WordTokenizer()
    texts = [SOURCE, SOURCE.replace("plain", "simple")]
    mode, first = extract_prompts(texts, tok, num_prompts=4, seed=0, max_prompt_tokens=1000)
    _, again = extract_prompts(texts, tok, num_prompts=4, seed=0, max_prompt_tokens=1000)
    _, other = extract_prompts(texts, tok, num_prompts=10, seed=1, max_prompt_tokens=1000)
    assert mode == "python" and len(first) == 4
    assert [p.text for p in first] == [p.text for p in again]
    assert {p.text for p in first} <= {p.text for p in other} and len(other) == 10
    assert all(p.ids == [0] + tok(p.text)["input_ids"] for p in first)  # EOS, then the prompt
    _, short = extract_prompts(texts, tok, num_prompts=10, seed=0, max_prompt_tokens=40)
    assert short and all(len(p.ids) <= 40 for p in short)

    prose = ["the cat sees the dog " * 5, "a bird", "x"]
    mode, prompts = extract_prompts(prose, tok, num_prompts=5, seed=0, max_prompt_tokens=1000)
    assert mode == "text"
    assert sorted(p.text for p in prompts) == sorted([prose[0][:32], "a b"])  # 32 tokens, or half; "x" skipped


# ---------------------------------------------------------------------------------------------
# On the workspace's tiny trained teacher


@pytest.fixture(scope="module")
def teacher_dir(workspace):
    return str(workspace / "teacher_run" / "student")


@pytest.mark.slow
def test_a_model_against_itself_and_a_student_against_dense_references(workspace, teacher_dir, tmp_path):
    from distill.data import load_tokenized
    from distill.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(teacher_dir)
    make_llama(tmp_path / "student", vocab_size=len(tok), layers=1, hidden=32, seed=7)
    data = str(workspace / "eval.jsonl")
    results = evaluate_models({"self": teacher_dir, "student": str(tmp_path / "student")}, data, teacher=teacher_dir,
                              max_length=32, num_prompts=3, max_new_tokens=6, batch_size=5, speed=False,
                              progress=False)
    models = results["models"]
    assert list(models) == ["teacher", "self", "student"]
    me = models["self"]
    assert me["top1_agreement"] == 1.0
    assert me["forward_kl"] == pytest.approx(0.0, abs=1e-6) and me["reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert models["teacher"]["top1_agreement"] is None  # the reference has no fidelity to itself

    dataset = load_tokenized(data, tokenizer=tok, format="text", packing=True, max_length=32)
    teacher = load_causal_lm(teacher_dir).eval()
    nll, conf, hits = ref_likelihood(teacher, dataset, tok.pad_token_id, batch_size=3)
    assert me["eval_tokens"] == len(nll)
    assert me["eval_ce"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert me["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert me["top1_accuracy"] == pytest.approx(sum(hits) / len(hits), abs=1e-9)
    assert me["ece"] == pytest.approx(ref_ece(conf, hits), abs=1e-5)
    assert me["params"] == sum(p.numel() for p in teacher.parameters()) and me["size_bytes"] > 0

    # The random student against dense float64 references, on the same tokens.
    from distill.data import collate

    student = load_causal_lm(str(tmp_path / "student")).eval()
    batch = collate([dict(input_ids=i, labels=l) for i, l in zip(dataset["input_ids"], dataset["labels"])],
                    pad_token_id=tok.pad_token_id)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        s_logits = student(**inputs).logits[:, :-1][mask].double()
        t_logits = teacher(**inputs).logits[:, :-1][mask].double()
    got = models["student"]
    assert got["forward_kl"] == pytest.approx(ref_forward_kl(s_logits, t_logits).mean().item(), rel=1e-4)
    assert got["reverse_kl"] == pytest.approx(ref_reverse_kl(s_logits, t_logits).mean().item(), rel=1e-4)
    assert got["top1_agreement"] == pytest.approx((s_logits.argmax(-1) == t_logits.argmax(-1)).double().mean().item())

    # Generation: the same model with the same seed writes the same text; the report can find it.
    samples = results["samples"]
    assert len(samples) == 3 and results["settings"]["prompt_mode"] == "text"
    assert all(s["completions"]["teacher"] == s["completions"]["self"] for s in samples)
    assert me["teacher_nll"] == pytest.approx(models["teacher"]["teacher_nll"])
    assert me["valid_python"] is None and me["generate_tokens_per_s_batch1"] is None
    import json
    json.dumps(results)  # serializable as is


@pytest.mark.slow
def test_teacher_nll_equals_a_reference_for_a_fixed_completion(teacher_dir):
    from distill.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(teacher_dir)
    model = load_causal_lm(teacher_dir).eval()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [[tok.eos_token_id] + ids("the big dog"), [tok.eos_token_id] + ids("a cat sees the fish near the")]
    completions = [ids("sees the cat today"), ids("river") + [tok.eos_token_id]]
    total, count = teacher_nll(model, prompts, completions, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               batch_size=2)
    expected = 0.0
    for p, c in zip(prompts, completions):
        with torch.no_grad():
            log_p = torch.log_softmax(model(torch.tensor([p + c])).logits[0].double(), -1)  # (T, V)
        expected += -sum(log_p[len(p) - 1 + i, token].item() for i, token in enumerate(c))
    assert count == sum(len(c) for c in completions)
    assert total == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_user_errors(workspace, teacher_dir, tmp_path):
    from distill.errors import UserError

    data = str(workspace / "eval.jsonl")
    with pytest.raises(UserError, match="no models"):
        evaluate_models({}, data, teacher=teacher_dir)
    with pytest.raises(UserError, match="reserved"):
        evaluate_models({"teacher": teacher_dir}, data, teacher=teacher_dir)
    with pytest.raises(UserError, match="not found"):
        evaluate_models({"a": str(tmp_path / "missing")}, data)
    with pytest.raises(UserError, match="not found"):
        evaluate_models({"a": teacher_dir}, str(tmp_path / "missing.jsonl"), progress=False)


def test_random_module_state_is_not_used_for_prompt_choice():
    """extract_prompts uses its own seeded RNG: the global random state does not change the choice."""
    tok = WordTokenizer()
    random.seed(1)
    a = extract_prompts([SOURCE], tok, num_prompts=3, seed=5, max_prompt_tokens=1000)[1]
    random.seed(2)
    b = extract_prompts([SOURCE], tok, num_prompts=3, seed=5, max_prompt_tokens=1000)[1]
    assert [p.text for p in a] == [p.text for p in b]
