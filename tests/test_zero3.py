"""DeepSpeed ZeRO-3 in `distill train` (distill/zero3.py) on CPU over gloo: two processes against one,
a kill and resume, the bytes each process holds, the launch config's checks."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import read_metrics
from tests.test_fsdp import (_common, _held_bytes, _two_layers, accelerate_processes,
                              assert_resumes_after_a_kill_exactly, assert_same_sampling, assert_same_training,
                              sampling_sections)
from tests.test_nonfinite import BATCH, POISONED_STEP, poisoned, poisoned_sections  # noqa: F401 (a fixture)
from tests.test_train import params, train_cli

deepspeed = pytest.importorskip("deepspeed", reason="the deepspeed extra: pip install -e '.[deepspeed]'")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ZERO3_CONFIG = ROOT / "examples" / "accelerate" / "zero3.yaml"
PORT = 29561  # this file's own (files run in parallel)


def zero3_processes(n: int = 2, *options: str) -> list[str]:
    """`accelerate launch` with the shipped ZeRO-3 config."""
    return accelerate_processes(ZERO3_CONFIG, PORT, n, *options)


def _every_parameter_partitioned(tmp_path) -> Path:
    # DeepSpeed keeps parameters under 1e5 elements whole by default: all of these tiny models' are.
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0},
                                "train_micro_batch_size_per_gpu": "auto"}))
    return path


def _held(result) -> dict:
    line = next(line for line in result.stdout.splitlines() if line.startswith("ZeRO-3 over"))
    line = line.rsplit(" (", 1)[0]
    return {part.split()[0]: (int(part.split()[1].replace(",", "")), int(part.split()[3].replace(",", "")))
            for part in line.split(": ", 1)[1].split("; ")}


def test_two_zero3_processes_match_one_process(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    common = _common(workspace, tmp_path)
    common["train"] = {**common["train"], "warmup_steps": 2, "schedule": "linear"}  # our scheduler drives the engine
    result, one = train_cli(tmp_path, workspace, "one", **{**common, "train": {**common["train"], "batch_size": 4}})
    assert result.returncode == 0, result.stderr[-3000:]
    result, two = train_cli(tmp_path, workspace, "two", env={"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(
        _every_parameter_partitioned(tmp_path))}, launcher=zero3_processes(2),
        **{**common, "train": {**common["train"], "batch_size": 2, "gradient_checkpointing": True}})
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(two, one, lr=True)
    (ckpt,) = (two / "checkpoints").iterdir()
    assert len(list((ckpt / "zero3" / "state").glob("*optim_states.pt"))) == 2  # one partition per process
    assert AutoModelForCausalLM.from_pretrained(two / "student").num_parameters() == \
        AutoModelForCausalLM.from_pretrained(one / "student").num_parameters()

    # What process 0 holds: half of every student parameter (DeepSpeed pads each to a multiple of
    # the process count), and of the teacher what FSDP2 would hold.
    held = _held(result)
    teacher = AutoModelForCausalLM.from_pretrained(workspace / "teacher_run" / "student")
    student = AutoModelForCausalLM.from_pretrained(one / "student")
    assert held["student"] == (sum(-(-p.numel() // 2) * 4 for p in student.parameters()),
                               sum(p.numel() * 4 for p in student.parameters()))
    whole = sum(p.numel() * p.element_size() for p in teacher.parameters())
    assert held["teacher"] == (_held_bytes(teacher, [*teacher.model.layers, teacher.model.embed_tokens]), whole)


def test_zero3_resumes_after_a_kill_exactly(workspace, tmp_path):
    assert_resumes_after_a_kill_exactly(workspace, tmp_path, zero3_processes(), env={
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(_every_parameter_partitioned(tmp_path))})


def test_a_tied_student_skips_a_nonfinite_step_under_zero3_as_one_process_does(workspace, poisoned, tmp_path):
    """The tied LM head (an external parameter of the root, and the input embeddings) trains as one
    process trains it, and a step whose teacher targets are non-finite (train.nonfinite=skip) is
    dropped as one process drops it: no parameter, AdamW moment or schedule step of it survives."""
    sections = poisoned_sections(poisoned, workspace, nonfinite="skip", max_steps=4, save_every=0,
                                 warmup_steps=1, max_grad_norm=1.0)
    sections["student"] = _two_layers(workspace, tmp_path, tie_word_embeddings=True)
    result, one = train_cli(tmp_path, workspace, "one", **sections)
    assert result.returncode == 0, result.stderr[-3000:]
    sections["train"] = {**sections["train"], "batch_size": BATCH // 2}
    result, two = train_cli(tmp_path, workspace, "two", env={"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(
        _every_parameter_partitioned(tmp_path))}, launcher=zero3_processes(2), **sections)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped step {POISONED_STEP}: non-finite teacher targets" in result.stdout + result.stderr
    logs = {r: [m for m in read_metrics(r / "metrics.jsonl") if "loss" in m] for r in (one, two)}
    assert [m["skipped_steps"] for m in logs[two]] == [m["skipped_steps"] for m in logs[one]] == [0, 0, 1, 1]
    a, b = params(two), params(one)
    assert a.keys() == b.keys() and "lm_head.weight" not in a  # tied: saved once, as transformers saves it
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-6, rtol=0, msg=lambda m: f"{key}: {m}")


def test_the_launch_config_is_checked_against_train(tmp_path, monkeypatch):
    from distill import zero3
    from distill.errors import UserError

    t = SimpleNamespace(batch_size=4, grad_accum_steps=2, max_grad_norm=1.0)  # what ds_config reads of train.*
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(key)
    cfg = zero3.ds_config(t, 2)
    assert (cfg["zero_optimization"], cfg["train_batch_size"], cfg["gradient_accumulation_steps"],
            cfg["gradient_clipping"]) == ({"stage": 3}, 16, 2, 1.0)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
    assert zero3.ds_config(t, 2)["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")

    def refused(env: dict, file=None) -> str:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        if file is not None:
            (tmp_path / "ds.json").write_text(json.dumps(file))
            monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
        try:
            with pytest.raises(UserError) as e:
                zero3.ds_config(t, 2)
        finally:
            for k in [*env, "ACCELERATE_DEEPSPEED_CONFIG_FILE"]:
                monkeypatch.delenv(k, raising=False)
        return str(e.value)

    assert "ZeRO stage 2" in refused({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    assert "train.grad_accum_steps=2" in refused({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"})
    assert "train.max_grad_norm=1.0" in refused({"ACCELERATE_GRADIENT_CLIPPING": "0.5"})
    assert "\"bf16\" section" in refused({}, {"bf16": {"enabled": True}})
    assert "\"optimizer\" section" in refused({}, {"optimizer": {"type": "AdamW"}})
    assert "train_batch_size=32" in refused({}, {"train_batch_size": 32})
    assert "ZeRO stage 1" in refused({}, {"zero_optimization": {"stage": 1}})
    (tmp_path / "bad.json").write_text("{")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "bad.json"))
    with pytest.raises(UserError, match="is not valid JSON"):
        zero3.ds_config(t, 2)
    # what agrees is kept: "auto", equal values, ZeRO settings of the file
    (tmp_path / "ds.json").write_text(json.dumps({"train_batch_size": 16, "gradient_clipping": "auto",
                                                  "zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    assert zero3.ds_config(t, 2)["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}
    assert zero3.memory_settings() == (1000, 10 ** 9)  # what the memory plan counts: the file's, else DeepSpeed's
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    assert zero3.memory_settings() == (5 * 10 ** 8, 10 ** 9)


def test_zero3_refuses_what_it_cannot_run_before_writing_anything(workspace, tmp_path):
    common = dict(student=_two_layers(workspace, tmp_path), train={"max_steps": 2, "batch_size": 4})
    result, _ = train_cli(tmp_path, workspace, "stage2", env={"ACCELERATE_USE_DEEPSPEED": "true",
                                                              "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, **common)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "distill runs DeepSpeed at stage 3 only" in result.stderr and not (tmp_path / "stage2").exists()
    result, _ = train_cli(tmp_path, workspace, "qat", **{**common, "train": {**common["train"], "sharding": "zero3",
                                                                           "qat": {"bits": 4, "group_size": 16}}})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.sharding=zero3 does not support train.qat" in result.stderr and not (tmp_path / "qat").exists()


def test_zero3_samples_in_the_loop_as_one_process_does(workspace, tmp_path):
    """On-policy steps (the student samples, gathered once with ZeRO-3's hooks off) and sequence-level
    steps (the teacher, sharded as under FSDP2, samples): the completions, losses and weights of two
    ZeRO-3 processes are one process's, and training goes on with the hooks back on."""
    common = sampling_sections(workspace, tmp_path)
    result, one = train_cli(tmp_path, workspace, "one", **{**common, "train": {**common["train"], "batch_size": 8}})
    assert result.returncode == 0, result.stderr[-3000:]
    result, two = train_cli(tmp_path, workspace, "two", env={"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(
        _every_parameter_partitioned(tmp_path))}, launcher=zero3_processes(),
        **{**common, "train": {**common["train"], "batch_size": 4}})
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_sampling(two, one)


def test_zero3_offloaded_with_a_student_from_teacher_layers(workspace, tmp_path):
    """offload_optimizer_device and offload_param_device: cpu (DeepSpeed's offload code paths: fp32
    masters, gradients and AdamW state in CPU buffers, its own norm; on this CPU-only machine the
    memory is the same, the code is not) and a student made from the teacher's layers (every process
    reads the teacher, DeepSpeed partitions the student it makes): two ZeRO-3 processes == one."""
    common = dict(student={"config": None, "init_from_teacher_layers": [0, 1]}, loss={"ce_weight": 0.5, "chunk_size": 16},
                  train={"max_steps": 3, "max_grad_norm": 0.5, "log_every": 1, "warmup_steps": 1})
    result, one = train_cli(tmp_path, workspace, "one", **{**common, "train": {**common["train"], "batch_size": 8}})
    assert result.returncode == 0, result.stderr[-3000:]
    result, two = train_cli(tmp_path, workspace, "two", env={
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(_every_parameter_partitioned(tmp_path))},
        launcher=zero3_processes(2, "--offload_optimizer_device", "cpu", "--offload_param_device", "cpu"),
        **{**common, "train": {**common["train"], "batch_size": 4}})
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("DeepSpeed ZeRO-3: offload optimizer cpu, offload parameters cpu, reduce_bucket_size 5e+08, "
            "stage3_max_live_parameters 1e+09, stage3_param_persistence_threshold 0") in result.stdout
    a, b = params(two), params(one)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-6, rtol=0, msg=lambda m: f"{key}: {m}")
    logs = {r: [m for m in read_metrics(r / "metrics.jsonl") if "loss" in m] for r in (one, two)}
    for x, y in zip(logs[two], logs[one]):
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5) and x["lr"] == y["lr"]
