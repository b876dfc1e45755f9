"""`distill train` end to end through the CLI, on tiny models: the invariants that must hold."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import distill_config, write_config
from tests.helpers import deterministic_metrics, make_tokenizer, read_metrics, run_cli, two_processes

pytestmark = pytest.mark.slow


def train_cli(tmp_path, ws, name, env=None, launcher=None, **sections):
    config = distill_config(ws, tmp_path / name, **sections)
    result = run_cli("train", str(write_config(tmp_path / f"{name}.yaml", config)), env=env, launcher=launcher)
    return result, tmp_path / name


def params(run_dir):
    return load_file(str(run_dir / "student" / "model.safetensors"))


def assert_same_params(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")


def evals(run_dir):
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if "eval/ce" in m]


def test_supervised_run_learns_and_saves_a_standard_student(workspace):
    """kd_weight 0 is plain supervised training by the same loop; the result loads with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = workspace / "teacher_run"
    logs = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert logs[-1]["loss"] < 0.6 * logs[0]["loss"]
    assert evals(run)[-1]["eval/ppl"] < 8  # uniform over 45 tokens would be 45
    model = AutoModelForCausalLM.from_pretrained(run / "student")
    tok = AutoTokenizer.from_pretrained(run / "student")
    ids = tok("the big dog sees the cat", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    assert (run / "config.yaml").is_file() and not list(run.glob(".tmp*"))


def test_distillation_lowers_divergence_and_eval_loss(workspace, tmp_path):
    result, run = train_cli(tmp_path, workspace, "kd", train={"max_steps": 40, "eval_at_start": True, "eval_every": 20})
    assert result.returncode == 0, result.stderr[-3000:]
    first, *_, last = evals(run)
    assert first["step"] == 0 and last["step"] == 40
    assert last["eval/forward_kl"] < 0.5 * first["eval/forward_kl"]
    assert last["eval/ce"] < first["eval/ce"] - 0.5
    assert last["eval/top1_agreement"] > first["eval/top1_agreement"] + 0.2


def _pc(ws):  # prompt/completion data: micro-batches hold different numbers of supervised tokens
    return {"train": str(ws / "pc_train.jsonl"), "eval": str(ws / "pc_eval.jsonl"), "format": "prompt_completion",
            "max_length": 48}


@pytest.mark.parametrize("chunk_size", [0, 16])
def test_micro_batch_times_accumulation_gives_the_same_parameters(workspace, tmp_path, chunk_size):
    # The three runs differ only in float32 rounding (GEMM blocking depends on the batch shape and
    # the CPU's kernels). At lr 2.0 three SGD steps amplified that to 1.9-2.2e-6, at the tolerance
    # itself, so the test failed on some machines (the suite's one flaky test); at lr 0.5 it is
    # <= 1.2e-7, while dividing by each micro-batch's own token count misses by 1.6e-2.
    runs = {}
    for batch, accum in [(8, 1), (4, 2), (1, 8)]:
        result, runs[batch, accum] = train_cli(
            tmp_path, workspace, f"b{batch}a{accum}", data=_pc(workspace), loss={"chunk_size": chunk_size, "ce_weight": 0.5},
            train={"max_steps": 3, "batch_size": batch, "grad_accum_steps": accum, "optimizer": "sgd", "lr": 0.5,
                   "max_grad_norm": 0.0, "schedule": "constant"})
        assert result.returncode == 0, result.stderr[-3000:]
    reference = params(runs[8, 1])
    for key in (8, 1), (4, 2), (1, 8):
        assert_same_params(params(runs[key]), reference, atol=2e-6)
    logs = {k: [m for m in read_metrics(r / "metrics.jsonl") if "loss" in m] for k, r in runs.items()}
    for key in logs:
        assert [m["supervised_tokens"] for m in logs[key]] == [m["supervised_tokens"] for m in logs[8, 1]]
        assert logs[key][-1]["loss"] == pytest.approx(logs[8, 1][-1]["loss"], rel=1e-5)


def test_chunked_and_dense_training_agree(workspace, tmp_path):
    runs = []
    for chunk in (0, 7):
        result, run = train_cli(tmp_path, workspace, f"chunk{chunk}", loss={"chunk_size": chunk, "divergence": "jsd",
                                                                            "beta": 0.3, "temperature": 2.0, "ce_weight": 0.2},
                                train={"max_steps": 4, "optimizer": "sgd", "lr": 1.0, "max_grad_norm": 0.0})
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(run)
    assert_same_params(params(runs[0]), params(runs[1]), atol=2e-6)


def test_killed_run_resumes_exactly(workspace, tmp_path):
    student = {"config": {**distill_config(workspace, tmp_path)["student"]["config"], "attention_dropout": 0.2}}
    common = dict(student=student, train={"max_steps": 8, "save_every": 3, "log_every": 1, "eval_every": 4})
    result, straight = train_cli(tmp_path, workspace, "straight", **common)
    assert result.returncode == 0, result.stderr[-3000:]

    result, resumed = train_cli(tmp_path, workspace, "resumed", env={"DISTILL_TEST_KILL_AT": "step:5"}, **common)
    assert result.returncode == -signal.SIGKILL
    assert [p.name for p in (resumed / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000003"]
    assert max(m["step"] for m in read_metrics(resumed / "metrics.jsonl")) == 5  # logged past the checkpoint
    result, resumed = train_cli(tmp_path, workspace, "resumed", **common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout + result.stderr

    assert_same_params(params(resumed), params(straight), atol=0)

    assert deterministic_metrics(resumed) == deterministic_metrics(straight)


def test_two_processes_match_one_process_on_the_same_global_batch(workspace, tmp_path):
    common = dict(data=_pc(workspace), loss={"ce_weight": 0.5},
                  train={"max_steps": 3, "optimizer": "sgd", "lr": 0.5, "max_grad_norm": 0.0, "schedule": "constant"})
    result, one = train_cli(tmp_path, workspace, "one", **{**common, "train": {**common["train"], "batch_size": 8}})
    assert result.returncode == 0, result.stderr[-3000:]
    result, two = train_cli(tmp_path, workspace, "two", launcher=two_processes(29513),
                            **{**common, "train": {**common["train"], "batch_size": 4}})
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_params(params(two), params(one), atol=2e-6)
    assert evals(two)[-1]["eval/tokens"] == evals(one)[-1]["eval/tokens"]
    assert evals(two)[-1]["eval/ce"] == pytest.approx(evals(one)[-1]["eval/ce"], rel=1e-5)


def _default_sigint():
    # A child of a shell's background job inherits SIGINT ignored (POSIX, no job control), and Python
    # then keeps it ignored: this test hung whenever the suite itself was started that way.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_the_run_resumes(workspace, tmp_path, sig, code):
    config = distill_config(workspace, tmp_path / "sigint", train={"max_steps": 100000, "log_every": 1})
    path = write_config(tmp_path / "sigint.yaml", config)
    proc = subprocess.Popen([sys.executable, "-m", "distill", "train", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=_default_sigint)
    metrics = tmp_path / "sigint" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # show where it is stuck (the CLI dumps its stacks on SIGUSR1)
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"no exit 120 s after the signal; its stacks:\n{err[-6000:]}")
    assert proc.returncode == code, err[-3000:]
    assert "run the same command again to resume" in out + err
    saved = [p for p in (tmp_path / "sigint" / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert len(saved) == 1 and "Traceback" not in err
    step = int(saved[0].name.split("-")[1])
    result = run_cli("train", str(path), f"train.max_steps={step + 2}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step {step} of {step + 2}" in result.stdout + result.stderr


def test_bf16_run_and_student_from_teacher_layers(workspace, tmp_path):
    result, run = train_cli(tmp_path, workspace, "bf16", student={"config": None, "init_from_teacher_layers": [1]},
                            train={"precision": "bf16", "max_steps": 4, "eval_at_start": True})
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = evals(run)
    assert first["eval/top1_agreement"] > 0.3  # one teacher layer already agrees with the teacher often
    assert last["eval/forward_kl"] < first["eval/forward_kl"]


def test_resume_refuses_a_changed_config(workspace, tmp_path):
    result, run = train_cli(tmp_path, workspace, "changed", train={"max_steps": 2})
    assert result.returncode == 0
    result, _ = train_cli(tmp_path, workspace, "changed", loss={"divergence": "tvd"}, train={"max_steps": 2})
    assert result.returncode == 2 and "different config (loss.divergence changed)" in result.stderr


def test_compiled_loss_trains_like_the_eager_one(workspace, tmp_path):
    """loss.compile: the same parameters as the eager chunked loss, over micro-batches whose supervised row counts
    differ (last chunks of several sizes: the compiled objective's shapes change from step to step)."""
    runs = []
    for compiled in (False, True):
        kernels = tmp_path / f"inductor{compiled}"  # where torch.compile writes what it generates
        result, run = train_cli(tmp_path, workspace, f"compiled{compiled}", data=_pc(workspace),
                                env={"TORCHINDUCTOR_CACHE_DIR": str(kernels)},
                                loss={"chunk_size": 7, "divergence": "jsd", "temperature": 2.0, "ce_weight": 0.2,
                                      "compile": compiled},
                                train={"max_steps": 4, "optimizer": "sgd", "lr": 1.0, "max_grad_norm": 0.0})
        assert result.returncode == 0, result.stderr[-3000:]
        assert any(kernels.rglob("*.py")) == compiled  # the compiled run generated kernels, the eager one none
        runs.append(run)
    assert_same_params(params(runs[0]), params(runs[1]), atol=2e-6)


@pytest.mark.parametrize("case", ["mismatched_tokenizer", "missing_data", "empty_data", "missing_teacher",
                                  "too_little_data"])
def test_user_errors_are_one_line_and_exit_2(workspace, tmp_path, case):
    sections = {}
    if case == "mismatched_tokenizer":
        make_tokenizer(tmp_path / "other_tok", shuffle_seed=3)
        sections = {"student": {"tokenizer": str(tmp_path / "other_tok")}}
        expected = "cross-tokenizer"
    elif case == "missing_data":
        sections = {"data": {"train": str(tmp_path / "nope.jsonl")}}
        expected = "nope.jsonl"
    elif case == "empty_data":
        (tmp_path / "empty.jsonl").write_text("")
        sections = {"data": {"train": str(tmp_path / "empty.jsonl")}}
        expected = "empty"
    elif case == "missing_teacher":
        sections = {"teacher": {"model": str(tmp_path / "no_teacher")}}
        expected = "not found"
    else:
        sections = {"data": {**_pc(workspace), "train": str(workspace / "pc_eval.jsonl")},
                    "train": {"batch_size": 32}}
        expected = "fewer than one global batch"
    result, run = train_cli(tmp_path, workspace, case, **sections)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [l for l in result.stderr.splitlines() if l.startswith("distill: error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (run / "student").exists()


def test_toy_demo_from_the_readme_runs(tmp_path):
    """The README's first command runs this demo; keep it from rotting."""
    result = subprocess.run([sys.executable, "-m", "distill.toy", str(tmp_path / "toy"), "--steps", "3",
                             "--teacher-steps", "3"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "DISTILL_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index("model "):]
    assert [line.split()[0] for line in table.splitlines()[1:4]] == ["teacher", "baseline", "distilled"]
    for name in ("teacher", "baseline", "distilled"):
        assert (tmp_path / "toy" / name / "student" / "model.safetensors").is_file()
    assert list((tmp_path / "toy" / "distilled").rglob("events.out.tfevents*"))  # TensorBoard is the default tracker
