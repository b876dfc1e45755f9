"""`distill generate` with a local teacher: data that round-trips into `distill train`, byte-identical
re-runs, resume after a kill at every chunk boundary, chain-of-thought verification, synthetic
prompts, prompts too long for the context, refusals. The answer extractor and the near-duplicate
filter on hand cases."""

import json

import pytest

from distill.traces import NearDuplicates, extract_answer, jaccard, ngrams, normalize_answer, verdict
from tests.conftest import distill_config, write_config
from tests.helpers import run_cli

PATTERN = r"####\s*(.+?)\s*$"


# ---- the answer extractor and verifier ------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("3 + 4 = 7\n#### 7", "7"),
    ("no final line here", None),
    ("#### 5\nwait, I was wrong\n#### 6", "6"),  # several answers: the last one counts
    ("####   \n", None),  # an empty answer is no answer
    ("#### 1,234.50 \nthanks", "1,234.50"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text, PATTERN) == expected


def test_verdicts_and_normalization():
    assert verdict("so\n#### 12", "12", PATTERN) == ("correct", "12")
    assert verdict("so\n#### 13", "12", PATTERN) == ("wrong", "13")
    assert verdict("so the answer is 12", "12", PATTERN) == ("unparseable", None)
    assert verdict("#### 1,000", "1000", PATTERN)[0] == "correct"  # thousands separators
    assert verdict("#### 12.0", "12", PATTERN)[0] == "correct"  # numbers compare as numbers
    assert verdict("#### $5.", "5", PATTERN)[0] == "correct"
    assert verdict("#### 0.5", "5", PATTERN)[0] == "wrong"
    assert verdict("#### Paris", "paris", PATTERN)[0] == "correct"
    assert verdict("#### -3", "3", PATTERN)[0] == "wrong"
    assert normalize_answer("007") == "7" and normalize_answer("1e3") == "1000"
    # a custom pattern: the answer is the last boxed value
    assert verdict(r"\boxed{3} then \boxed{4}", "4", r"\\boxed\{([^}]*)\}") == ("correct", "4")


def test_near_duplicates():
    seen = NearDuplicates(n=2, max_overlap=0.5)
    assert seen.add("Write a function that reverses a list.")
    assert not seen.add("write a function, that reverses a LIST")  # same words: the exact hash
    assert seen.reason("Write a function that reverses a list quickly.") == "overlap"
    assert seen.add("Explain how a hash map handles collisions.")
    assert jaccard(ngrams("a b c", 2), ngrams("a b d", 2)) == pytest.approx(1 / 3)
    assert ngrams("one", 3) == {("one",)}


# ---- the verb, with the workspace's teacher -------------------------------------------------

def gen_config(tmp_path, ws, name, prompts=None, **generate):
    config = {"teacher": {"model": str(ws / "teacher_run" / "student")},
              "data": {"train": str(prompts or ws / "pc_train.jsonl"), "max_length": 64},
              "generate": {"output": str(tmp_path / name), "max_new_tokens": 12, "num_samples": 2,
                           "chunk_size": 8, "batch_size": 6, "max_prompts": 24, **generate}}
    return str(write_config(tmp_path / f"{name}.yaml", config)), tmp_path / name


def one_error_line(result) -> bool:
    """One `distill: error:` line and no traceback (progress bars of model loading may come before it)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("distill:")]
    return len(lines) == 1 and lines[0].startswith("distill: error: ") and "Traceback" not in result.stderr


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json",)}


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    path, out = gen_config(root, workspace, "ref")
    result = run_cli("generate", path)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, out


def test_generated_data_is_complete_and_trains(reference, workspace, tmp_path):
    _, out = reference
    manifest = json.loads((out / "manifest.json").read_text())
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for f in sorted((out / "samples").iterdir()) for line in f.read_text().splitlines()]
    assert len(samples) == 48 and sorted((r["prompt_index"], r["sample"]) for r in samples) == \
        [(i, s) for i in range(24) for s in range(2)]
    assert manifest["counts"]["samples"] == 48 and manifest["counts"]["kept"] == len(rows) > 40
    assert manifest["teacher"]["kind"] == "local" and len(manifest["teacher"]["weights_sha256"]) == 64
    assert manifest["settings"]["max_new_tokens"] == 12 and manifest["settings"]["seed"] == 0
    prompts = [json.loads(line)["prompt"] for line in (workspace / "pc_train.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["prompt"] == prompts[r["prompt_index"]] and r["completion"].strip()
    assert len({r["completion"] for r in rows}) > len(rows) // 2  # sampled, not one greedy answer
    # the data trains as it is, and the student learns from it
    config = distill_config(workspace, tmp_path / "student", data={"train": str(out / "data.jsonl"),
                                                                   "eval": str(out / "data.jsonl")},
                            loss={"kd_weight": 0.0, "ce_weight": 1.0}, train={"max_steps": 20, "eval_at_start": True,
                                                                               "batch_size": 8})
    result = run_cli("train", str(write_config(tmp_path / "train.yaml", config)))
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()
             if "eval/ce" in line]
    assert evals[-1]["eval/ce"] < evals[0]["eval/ce"] - 0.5


def test_eval_scores_generated_data(reference, workspace, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from distill.data import load_tokenized
    from distill.models import load_tokenizer

    _, out = reference
    teacher = workspace / "teacher_run" / "student"
    result = run_cli("eval", "--generated", str(out), "--teacher", str(teacher), "--out", str(tmp_path / "ev"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher NLL per token" in result.stdout and (tmp_path / "ev" / "generated.html").is_file()
    r = json.loads((tmp_path / "ev" / "generated.json").read_text())
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert r["rows"] == len(rows) and r["samples"] == 48
    assert r["unfinished_fraction"] == sum(x["finish_reason"] == "length" for x in rows) / len(rows)
    # the teacher NLL, recomputed here in float64 from the tokenized rows
    tok = load_tokenizer(str(teacher))
    data = load_tokenized(str(out / "data.jsonl"), tokenizer=tok, format="prompt_completion", max_length=256,
                          packing=False)
    model = AutoModelForCausalLM.from_pretrained(teacher).double().eval()
    total, count = 0.0, 0
    for ids, labels in zip(data["input_ids"], data["labels"]):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
        target = torch.tensor(labels[1:])
        keep = target != -100
        total -= logp[keep].gather(-1, target[keep][:, None]).sum().item()
        count += int(keep.sum())
    assert r["teacher_nll"] == pytest.approx(total / count, rel=1e-4)
    assert r["completion_tokens_mean"] == pytest.approx(count / len(rows) - 1)  # EOS is not part of the completion


def test_same_config_gives_identical_files(reference, workspace, tmp_path):
    root, out = reference
    path, again = gen_config(tmp_path, workspace, "ref")
    assert run_cli("generate", path).returncode == 0
    assert files(again) == files(out)
    # a different seed samples different text
    path, other = gen_config(tmp_path, workspace, "seed1", seed=1)
    assert run_cli("generate", path).returncode == 0
    assert (other / "data.jsonl").read_bytes() != (out / "data.jsonl").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["gen-chunk-done:1", "gen-chunk-done:2", "gen-chunk:3", "gen-manifest"])
def test_resume_after_a_kill_is_identical(point, reference, workspace, tmp_path):
    _, out = reference
    path, killed = gen_config(tmp_path, workspace, "ref")
    result = run_cli("generate", path, env={"DISTILL_TEST_KILL_AT": point})
    assert result.returncode == -9
    assert not (killed / "manifest.json").exists()
    chunks = sorted(p.name for p in (killed / "samples").glob("chunk-*"))
    expected = {"gen-chunk-done:1": 1, "gen-chunk-done:2": 2, "gen-chunk:3": 2, "gen-manifest": 3}[point]
    assert len(chunks) == expected  # a chunk is there whole, or not at all
    result = run_cli("generate", path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files(killed) == files(out)
    assert not list(killed.rglob(".tmp-*"))


def test_changed_settings_are_refused(reference, workspace, tmp_path):
    root, out = reference
    path, _ = gen_config(root, workspace, "ref", temperature=0.5)
    result = run_cli("generate", path)
    assert result.returncode == 2
    assert "other settings (settings.temperature changed)" in result.stderr
    assert one_error_line(result)


def test_prompts_too_long_are_skipped_and_counted(workspace, tmp_path):
    long_prompt = " ".join(["the cat sees a dog and then"] * 20)  # 140 words: over the 128-token context
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the dog", long_prompt, "a bird"]))
    path, out = gen_config(tmp_path, workspace, "long", prompts=prompts, num_samples=1)
    result = run_cli("generate", path)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["too_long"] == 1 and manifest["counts"]["samples"] == 3
    assert "1 samples skipped" in result.stderr and "prompts 2" in result.stderr
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert [r["prompt_index"] for r in rows] == [0, 2]


def test_chain_of_thought_verification(workspace, tmp_path):
    """A toy 'answer': the last animal a completion names; the reference is 'cat'. The counts agree
    with the samples, and only verified ones are kept (shortest per prompt with keep=shortest)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "the dog sees a", "answer": "cat"}) + "\n" for _ in range(12)))
    cot = {"answer_pattern": r"\b(cat|dog|bird|fish|fox|mouse|horse)\b(?!.*\b(?:cat|dog|bird|fish|fox|mouse|horse)\b)",
           "keep": "shortest"}
    path, out = gen_config(tmp_path, workspace, "cot", prompts=prompts, num_samples=4, cot=cot)
    result = run_cli("generate", path)
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    samples = [json.loads(line) for f in sorted((out / "samples").iterdir()) for line in f.read_text().splitlines()]
    c = m["counts"]
    assert c["correct"] + c["wrong"] + c["unparseable"] == 48
    assert c["correct"] == sum(s["verdict"] == "correct" for s in samples) > 0
    assert c["wrong"] == sum(s["verdict"] == "wrong" for s in samples) > 0
    for s in samples:
        assert s["verdict"] == verdict(s["completion"], "cat", cot["answer_pattern"])[0]
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    correct_prompts = {s["prompt_index"] for s in samples if s["verdict"] == "correct"}
    assert sorted(r["prompt_index"] for r in rows) == sorted(correct_prompts)  # one (the shortest) per prompt
    by_key = {(s["prompt_index"], s["sample"]): s for s in samples}
    for r in rows:
        chosen = by_key[(r["prompt_index"], r["sample"])]
        assert chosen["verdict"] == "correct" and r["completion"] == chosen["completion"]
        assert chosen["completion_tokens"] == min(s["completion_tokens"] for s in samples
                                                  if s["prompt_index"] == r["prompt_index"] and s["verdict"] == "correct")
    # answer-only data: the completion is the formatted answer
    path, out2 = gen_config(tmp_path, workspace, "cot_answer", prompts=prompts, num_samples=4,
                            cot={**cot, "keep": "first", "train_on": "answer"})
    assert run_cli("generate", path).returncode == 0
    assert {json.loads(line)["completion"] for line in (out2 / "data.jsonl").read_text().splitlines()} == {"#### cat"}


def test_keep_likeliest_uses_the_teachers_log_probs(workspace, tmp_path):
    """keep=likeliest: per prompt the verified sample with the highest mean teacher log-probability,
    which is the model's own (checked in float64 against a plain forward)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n"
                               for p in ["the dog sees a", "a cat likes the", "some fish"]))
    cot = {"answer_pattern": r"(\w+)", "verify": False, "keep": "likeliest"}
    path, out = gen_config(tmp_path, workspace, "best", prompts=prompts, num_samples=4, cot=cot)
    assert run_cli("generate", path).returncode == 0
    samples = [json.loads(line) for f in sorted((out / "samples").iterdir()) for line in f.read_text().splitlines()]
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        group = [s for s in samples if s["prompt_index"] == r["prompt_index"]]
        assert r["sample"] == max(group, key=lambda s: s["mean_logprob"])["sample"]
    teacher = workspace / "teacher_run" / "student"
    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher).double().eval()
    s = samples[0]
    prompt = tok(s["prompt"], add_special_tokens=False)["input_ids"]
    completion = tok(s["completion"], add_special_tokens=False)["input_ids"]
    ids = prompt + completion + ([tok.eos_token_id] if s["finish_reason"] == "stop" else [])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
    target = torch.tensor(ids[1:])[len(prompt) - 1:]
    expected = logp[len(prompt) - 1:].gather(-1, target[:, None]).mean().item()
    assert s["mean_logprob"] == pytest.approx(expected, abs=1e-4)


def test_synthetic_prompts(workspace, tmp_path):
    examples = ["the cat sees a dog", "a bird finds the fish", "one fox chases some mouse"]
    synthetic = {"num_prompts": 6, "examples": examples, "template": "{examples} and ", "separator": " and ",
                 "max_new_tokens": 10, "examples_per_request": 2, "ngram": 2, "max_overlap": 0.5}
    config = {"teacher": {"model": str(workspace / "teacher_run" / "student")}, "data": {"max_length": 64},
              "generate": {"output": str(tmp_path / "syn"), "max_new_tokens": 8, "synthetic": synthetic}}
    path = write_config(tmp_path / "syn.yaml", config)
    result = run_cli("generate", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "syn" / "prompts.jsonl").read_text().splitlines()]
    info = json.loads((tmp_path / "syn" / "synthetic.json").read_text())
    assert 0 < len(prompts) <= 6 and info["counts"]["kept"] == len(prompts)
    seen = NearDuplicates(2, 0.5)
    for e in examples:
        seen.add(e)
    assert all(seen.add(p) for p in prompts)  # no near-duplicate of each other or of an example
    rows = [json.loads(line) for line in (tmp_path / "syn" / "data.jsonl").read_text().splitlines()]
    assert {r["prompt"] for r in rows} <= set(prompts) and rows


@pytest.mark.parametrize("generate, message", [
    ({"temperature": 0}, "generate.temperature must be > 0"),
    ({"cot": {"answer_pattern": "no group"}}, "exactly one group"),
    ({"template": "{question}"}, "uses {question}"),
    ({"num_sample": 2}, "did you mean 'generate.num_samples'"),
])
def test_bad_configs_are_one_line(workspace, tmp_path, generate, message):
    path, _ = gen_config(tmp_path, workspace, "bad", **generate)
    result = run_cli("generate", path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert one_error_line(result)
