"""On-policy distillation through `distill train` (generation.lmbda, seq_kd, sampled_reverse_kl) on tiny models."""

import json
import signal

import pytest

from distill.generation import SamplingSettings, sample
from distill.models import load_causal_lm, load_tokenizer
from tests.conftest import distill_config, write_config
from tests.helpers import deterministic_metrics, read_metrics, run_cli, two_processes
from tests.test_train import assert_same_params, params

pytestmark = pytest.mark.slow

GEN = {"max_new_tokens": 8, "log_samples": 1000}


def pc(ws, **extra):
    return {"train": str(ws / "pc_train.jsonl"), "eval": str(ws / "pc_eval.jsonl"), **extra}


def train_cli(tmp_path, ws, name, env=None, launcher=None, **sections):
    sections.setdefault("data", pc(ws))
    config = distill_config(ws, tmp_path / name, **sections)
    result = run_cli("train", str(write_config(tmp_path / f"{name}.yaml", config)), env=env, launcher=launcher)
    return result, tmp_path / name


def samples(run_dir):
    path = run_dir / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def resample(model_dir, ws, records, settings):
    """The completions ``model_dir`` samples for ``records``' prompts and seeds, all in one call as the loop does."""
    tok = load_tokenizer(str(ws / "tok"))
    model = load_causal_lm(str(model_dir))
    outs = sample(model, [r["prompt_ids"] for r in records], settings=settings, seeds=[r["seed"] for r in records],
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return [(c.ids, c.ended) for c in outs]


def test_lmbda_zero_is_the_off_policy_run_bit_for_bit(workspace, tmp_path):
    common = dict(loss={"divergence": "reverse_kl"}, train={"max_steps": 4, "log_every": 1})
    result, plain = train_cli(tmp_path, workspace, "plain", **common)
    assert result.returncode == 0, result.stderr[-3000:]
    result, zero = train_cli(tmp_path, workspace, "zero", generation={"lmbda": 0.0, "temperature": 0.7, **GEN},
                             **common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_params(params(zero), params(plain), atol=0)
    assert deterministic_metrics(zero) == deterministic_metrics(plain)
    assert not samples(zero)


def test_on_policy_supervises_exactly_the_sampled_tokens_from_the_current_weights(workspace, tmp_path):
    # Constant LR and a large step, so that each step's weights differ enough to sample differently.
    common = dict(loss={"divergence": "reverse_kl"}, generation={"lmbda": 1.0, "temperature": 1.5, **GEN},
                  train={"log_every": 1, "lr": 0.05, "schedule": "constant", "max_grad_norm": 0.0})
    result, three = train_cli(tmp_path, workspace, "three", **{**common, "train": {**common["train"], "max_steps": 3}})
    assert result.returncode == 0, result.stderr[-3000:]
    logged = samples(three)
    assert {r["source"] for r in logged} == {"student"} and {r["step"] for r in logged} == {1, 2, 3}
    for step, record in zip((1, 2, 3), [m for m in read_metrics(three / "metrics.jsonl") if "loss" in m]):
        rows = [r for r in logged if r["step"] == step]
        assert len(rows) == 8  # batch 8, one generation each
        # The supervised positions are exactly the sampled tokens (and each sampled EOS): prompts and
        # the padding after EOS are masked.
        assert record["supervised_tokens"] == sum(len(r["completion_ids"]) + r["ended"] for r in rows)
        assert record["generated_tokens"] == record["supervised_tokens"]

    # Step 3 sampled from the weights after step 2 (a 2-step run's student), not those after step 1.
    result, two = train_cli(tmp_path, workspace, "two", **{**common, "train": {**common["train"], "max_steps": 2}})
    assert result.returncode == 0, result.stderr[-3000:]
    result, one = train_cli(tmp_path, workspace, "one", **{**common, "train": {**common["train"], "max_steps": 1}})
    assert result.returncode == 0, result.stderr[-3000:]
    step3 = [r for r in logged if r["step"] == 3]
    settings = SamplingSettings(max_new_tokens=8, temperature=1.5)
    logged3 = [(r["completion_ids"], r["ended"]) for r in step3]
    assert resample(two / "student", workspace, step3, settings) == logged3
    assert resample(one / "student", workspace, step3, settings) != logged3  # stale weights would be caught


def test_a_killed_mixed_run_resumes_to_the_same_parameters_and_samples(workspace, tmp_path):
    student = {"config": {**distill_config(workspace, tmp_path)["student"]["config"], "attention_dropout": 0.2}}
    common = dict(student=student, loss={"divergence": "jsd", "beta": 0.5}, generation={"lmbda": 0.5, **GEN},
                  train={"max_steps": 8, "save_every": 3, "log_every": 1, "eval_every": 4})
    result, straight = train_cli(tmp_path, workspace, "straight", **common)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = {r["step"] for r in samples(straight)}
    assert 0 < len(steps) < 8  # both on-policy and off-policy steps happened

    result, resumed = train_cli(tmp_path, workspace, "resumed", env={"DISTILL_TEST_KILL_AT": "step:5"}, **common)
    assert result.returncode == -signal.SIGKILL
    result, resumed = train_cli(tmp_path, workspace, "resumed", **common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout + result.stderr
    assert_same_params(params(resumed), params(straight), atol=0)
    assert deterministic_metrics(resumed) == deterministic_metrics(straight)
    assert samples(resumed) == samples(straight)


def test_two_processes_sample_and_train_as_one_process_with_twice_the_micro_batch(workspace, tmp_path):
    common = dict(loss={"divergence": "reverse_kl", "ce_weight": 0.5}, generation={"lmbda": 1.0, **GEN},
                  train={"max_steps": 3, "optimizer": "sgd", "lr": 0.5, "max_grad_norm": 0.0, "schedule": "constant",
                         "log_every": 1})
    result, one = train_cli(tmp_path, workspace, "one", **{**common, "train": {**common["train"], "batch_size": 8}})
    assert result.returncode == 0, result.stderr[-3000:]
    result, two = train_cli(tmp_path, workspace, "two", launcher=two_processes(29519),
                            **{**common, "train": {**common["train"], "batch_size": 4}})
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_params(params(two), params(one), atol=2e-6)
    for a, b in zip(read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")):
        if "loss" in a:  # the same completions: the same token counts, the same losses
            assert (a["supervised_tokens"], a["generated_tokens"]) == (b["supervised_tokens"], b["generated_tokens"])
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # Process 0's rows (examples of the first half of each micro-batch) are the single process's rows.
    by_key = {(r["step"], r["example"]): r["completion_ids"] for r in samples(one)}
    assert all(by_key[(r["step"], r["example"])] == r["completion_ids"] for r in samples(two))


def test_seq_kd_trains_on_the_teachers_samples(workspace, tmp_path):
    result, out = train_cli(tmp_path, workspace, "seqkd", loss={"divergence": "forward_kl"},
                            generation={"seq_kd": True, **GEN}, train={"max_steps": 2, "log_every": 1})
    assert result.returncode == 0, result.stderr[-3000:]
    logged = samples(out)
    assert {r["source"] for r in logged} == {"teacher"} and len(logged) == 16
    first = [r for r in logged if r["step"] == 1]
    teacher = workspace / "teacher_run" / "student"
    assert resample(teacher, workspace, first, SamplingSettings(max_new_tokens=8)) == [
        (r["completion_ids"], r["ended"]) for r in first]
    metrics = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert metrics[0]["steps_teacher"] == 1 and metrics[0]["steps_student"] == 0
    assert metrics[0]["supervised_tokens"] == sum(len(r["completion_ids"]) + r["ended"] for r in first)


def sampled_run(workspace, tmp_path, chunk_size):
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(line) for line in (workspace / "pc_train.jsonl").read_text().splitlines()]
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    result, out = train_cli(tmp_path, workspace, f"sampled{chunk_size}", data={"train": str(prompts), "eval": None},
                            loss={"divergence": "sampled_reverse_kl", "discount": 0.5, "chunk_size": chunk_size},
                            generation={"lmbda": 1.0, "num_generations": 2, **GEN},
                            train={"max_steps": 3, "log_every": 1, "lr": 1e-2})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert len(metrics) == 3 and all(m["loss"] is not None and m["grad_norm"] > 0 for m in metrics)
    assert len([r for r in samples(out) if r["step"] == 1]) == 16  # 8 prompts x 2 generations
    assert (out / "student" / "model.safetensors").is_file()
    return metrics


def test_sampled_reverse_kl_trains_from_prompts_alone_chunked_as_dense(workspace, tmp_path):
    dense = sampled_run(workspace, tmp_path, 0)
    chunked = sampled_run(workspace, tmp_path, 16)
    for a, b in zip(dense, chunked):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


@pytest.mark.parametrize("case", ["text", "prompt_only_mixed", "prompt_only_offline", "sampled_mixed", "cache"])
def test_on_policy_user_errors_are_one_line_and_exit_2(workspace, tmp_path, case):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat"}\n' * 20)
    sections = {
        "text": dict(data={"train": str(workspace / "train.jsonl")}, generation={"lmbda": 0.5}),
        "prompt_only_mixed": dict(data={"train": str(prompts), "eval": None}, generation={"lmbda": 0.5}),
        "prompt_only_offline": dict(data={"train": str(prompts), "eval": None}),
        "sampled_mixed": dict(loss={"divergence": "sampled_reverse_kl"}, generation={"lmbda": 0.5}),
        "cache": dict(teacher={"source": "cache"}, cache={"dir": str(tmp_path / "c")}, generation={"lmbda": 1.0}),
    }[case]
    expected = {"text": "which has no prompts", "prompt_only_mixed": "no completions for the off-policy steps",
                "prompt_only_offline": "nothing to train on unless completions are sampled",
                "sampled_mixed": "needs generation.lmbda=1", "cache": "use teacher.source=live"}[case]
    result, _ = train_cli(tmp_path, workspace, case, **sections)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("distill: error")]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
