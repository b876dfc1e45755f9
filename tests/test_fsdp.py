"""FSDP2 in `distill train` (distill/sharding.py) on CPU over gloo: two sharded processes against one
process, a kill and resume under FSDP2, the memory each process holds, the shipped launch configs."""

import json
import os
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file

from distill import sharding
from tests.conftest import distill_config
from tests.helpers import deterministic_metrics, read_metrics
from tests.test_train import params, train_cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FSDP2_CONFIG = ROOT / "examples" / "accelerate" / "fsdp2.yaml"
PORT = 29541  # this file's own (files run in parallel)


def accelerate_processes(config: Path, port: int, n: int, *options: str) -> list[str]:
    """`accelerate launch --config_file CONFIG` of n processes running `python -m distill`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(n), "--main_process_port", str(port), *options, "-m", "distill"]


def fsdp2_processes(n: int = 2, *options: str) -> list[str]:
    """`accelerate launch` with the shipped FSDP2 config: distill shards when launched this way."""
    return accelerate_processes(FSDP2_CONFIG, PORT, n, *options)


def _two_layers(ws, tmp_path, **extra):
    arch = {**distill_config(ws, tmp_path)["student"]["config"], "num_hidden_layers": 2, **extra}
    return {"config": arch}


def _common(ws, tmp_path):
    # Prompt/completion rows (micro-batches with different supervised counts), the chunked loss with
    # KD and CE, clipping that is active (the norm over both processes' shards decides it), 2 micro-
    # batches per step, and 9 eval rows in batches of 4 (one process runs a padding batch).
    return dict(student=_two_layers(ws, tmp_path),
                data={"train": str(ws / "pc_train.jsonl"), "eval": str(ws / "pc_eval.jsonl"),
                      "format": "prompt_completion", "max_length": 48, "max_eval_examples": 9},
                loss={"chunk_size": 16, "ce_weight": 0.5},
                train={"max_steps": 3, "optimizer": "sgd", "lr": 0.5, "max_grad_norm": 0.5, "schedule": "constant",
                       "grad_accum_steps": 2, "eval_batch_size": 4, "log_every": 1})


def _held_bytes(model, sharded) -> int:
    """Bytes process 0 holds of ``model`` when the parameters of the modules in ``sharded`` are
    split along dim 0 (process 0 takes the first ceil(rows / 2))."""
    inside = {id(p) for m in sharded for p in m.parameters()}
    total = 0
    for p in model.parameters():
        rows = -(-p.shape[0] // 2) if id(p) in inside else p.shape[0]
        total += rows * (p.numel() // p.shape[0]) * p.element_size()
    return total


def assert_same_training(two, one, lr: bool = False) -> None:
    """Two sharded processes' run ``two`` against one process's ``one``: parameters (2e-6), the
    supervised-token counts, losses and gradient norms of every logged step (and learning rates),
    the last eval's numbers (a padding batch counts nothing)."""
    a, b = params(two), params(one)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-6, rtol=0, msg=lambda m: f"{key}: {m}")
    logs = {r: [m for m in read_metrics(r / "metrics.jsonl") if "loss" in m] for r in (one, two)}
    assert [m["supervised_tokens"] for m in logs[two]] == [m["supervised_tokens"] for m in logs[one]]
    for x, y in zip(logs[two], logs[one]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["grad_norm"] == pytest.approx(y["grad_norm"],
                                                                                                   rel=1e-5)
        assert not lr or x["lr"] == y["lr"]
    assert logs[one][0]["grad_norm"] > 0.5  # the clipping was active
    evals = {r: [m for m in read_metrics(r / "metrics.jsonl") if "eval/ce" in m][-1] for r in (one, two)}
    assert evals[two]["eval/tokens"] == evals[one]["eval/tokens"]  # the padding batch counted nothing
    for k in ("eval/ce", "eval/forward_kl", "eval/top1_agreement"):
        assert evals[two][k] == pytest.approx(evals[one][k], rel=1e-5)


def sampling_sections(ws, tmp_path) -> dict:
    """On-policy (λ 0.5) and sequence-level steps, with every sample logged."""
    return dict(student=_two_layers(ws, tmp_path),
                data={"train": str(ws / "pc_train.jsonl"), "eval": None, "format": "prompt_completion",
                      "max_length": 48},
                loss={"divergence": "reverse_kl", "ce_weight": 0.5},
                generation={"lmbda": 0.5, "seq_kd": True, "max_new_tokens": 8, "log_samples": 1000},
                train={"max_steps": 4, "optimizer": "sgd", "lr": 0.5, "max_grad_norm": 0.0, "schedule": "constant",
                       "log_every": 1})


def assert_same_sampling(two, one) -> None:
    """Sampled steps of two processes against one: parameters, losses, token counts, and every
    completion process 0 logged (its own rows) equal to one process's."""
    a, b = params(two), params(one)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-6, rtol=0, msg=lambda m: f"{key}: {m}")
    logs = {r: [m for m in read_metrics(r / "metrics.jsonl") if "loss" in m] for r in (one, two)}
    for x, y in zip(logs[one], logs[two]):
        assert (x["supervised_tokens"], x["generated_tokens"]) == (y["supervised_tokens"], y["generated_tokens"])
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    assert sum(m["steps_student"] for m in logs[two]) and sum(m["steps_teacher"] for m in logs[two])
    rows = {r: [json.loads(line) for line in (r / "samples.jsonl").read_text().splitlines()] for r in (one, two)}
    by_key = {(r["step"], r["example"]): r["completion_ids"] for r in rows[one]}
    assert len(rows[two]) == len(rows[one]) // 2  # process 0 logs its own rows
    assert all(by_key[(r["step"], r["example"])] == r["completion_ids"] for r in rows[two])
    lengths = {len(r["completion_ids"]) + r["ended"] for r in rows[one]}
    assert len(lengths) > 1  # rows ended at different tokens


def test_two_fsdp2_processes_match_one_process(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    common = _common(workspace, tmp_path)
    result, one = train_cli(tmp_path, workspace, "one", **{**common, "train": {**common["train"], "batch_size": 4}})
    assert result.returncode == 0, result.stderr[-3000:]
    # The sharded run also checkpoints activations (the launch's fsdp_activation_checkpointing):
    # recomputing each layer, gathered again in backward, changes nothing.
    result, two = train_cli(tmp_path, workspace, "two",
                            launcher=fsdp2_processes(2, "--fsdp_activation_checkpointing", "true"),
                            **{**common, "train": {**common["train"], "batch_size": 2}})
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(two, one)
    # Checkpoints are sharded state dicts; the student is a whole HF model.
    (ckpt,) = (two / "checkpoints").iterdir()
    assert (ckpt / "sharded" / ".metadata").is_file() and len(list((ckpt / "sharded").glob("*.distcp"))) == 2
    assert AutoModelForCausalLM.from_pretrained(two / "student").num_parameters() == \
        AutoModelForCausalLM.from_pretrained(one / "student").num_parameters()

    # What process 0 holds: half of every sharded unit (decoder layers and, untied, the teacher's
    # input embeddings; the whole student), all of the teacher's head and final norm.
    line = next(line for line in result.stdout.splitlines() if line.startswith("FSDP2 over 2 processes"))
    assert line.endswith(" (activation checkpointing on)")
    line = line.rsplit(" (", 1)[0]
    held = {part.split()[0]: (int(part.split()[1].replace(",", "")), int(part.split()[3].replace(",", "")))
            for part in line.split(": ", 1)[1].split("; ")}
    teacher = AutoModelForCausalLM.from_pretrained(workspace / "teacher_run" / "student")
    student = AutoModelForCausalLM.from_pretrained(one / "student")
    whole = sum(p.numel() * p.element_size() for p in teacher.parameters())
    assert held["teacher"] == (_held_bytes(teacher, [*teacher.model.layers, teacher.model.embed_tokens]), whole)
    assert held["student"] == (_held_bytes(student, [student]), sum(p.numel() * 4 for p in student.parameters()))
    layers = sum(p.numel() * p.element_size() for p in teacher.model.layers.parameters())
    assert held["teacher"][0] <= whole - layers // 2  # the layers' memory halves


def assert_resumes_after_a_kill_exactly(ws, tmp_path, launcher: list, env: Optional[dict] = None) -> None:
    """A run SIGKILLed after step 5 (checkpoint at step 3) and run again resumes to the parameters and
    metrics of an uninterrupted run, to the bit."""
    env = env or {}
    common = dict(student=_two_layers(ws, tmp_path, attention_dropout=0.2),  # RNG state matters
                  data={"max_eval_examples": 9}, loss={"chunk_size": 16, "ce_weight": 0.3},
                  train={"max_steps": 7, "save_every": 3, "log_every": 1, "eval_every": 4, "batch_size": 4,
                         "eval_batch_size": 4})  # AdamW with a cosine schedule: optimizer and scheduler state
    result, straight = train_cli(tmp_path, ws, "straight", env=env, launcher=launcher, **common)
    assert result.returncode == 0, result.stderr[-3000:]
    result, resumed = train_cli(tmp_path, ws, "resumed", launcher=launcher,
                                env={**env, "DISTILL_TEST_KILL_AT": "step:5"}, **common)
    assert result.returncode != 0
    assert [p.name for p in (resumed / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000003"]
    result, resumed = train_cli(tmp_path, ws, "resumed", env=env, launcher=launcher, **common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout + result.stderr
    a, b = params(resumed), params(straight)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=lambda m: f"{key}: {m}")
    assert deterministic_metrics(resumed) == deterministic_metrics(straight)


def test_fsdp2_resumes_after_a_kill_exactly(workspace, tmp_path):
    assert_resumes_after_a_kill_exactly(workspace, tmp_path, fsdp2_processes())


def test_fsdp2_samples_in_the_loop_as_one_process_does(workspace, tmp_path):
    """On-policy steps (the student samples, gathered once) and sequence-level steps (the sharded
    teacher samples): every process decodes until all have ended, and nothing of that shows in
    the completions, the losses or the weights."""
    common = sampling_sections(workspace, tmp_path)
    result, one = train_cli(tmp_path, workspace, "one", **{**common, "train": {**common["train"], "batch_size": 8}})
    assert result.returncode == 0, result.stderr[-3000:]
    result, two = train_cli(tmp_path, workspace, "two", launcher=fsdp2_processes(),
                            **{**common, "train": {**common["train"], "batch_size": 4}})
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_sampling(two, one)


def test_one_fsdp2_process_trains_like_ddp_and_refuses_what_it_cannot_shard(workspace, tmp_path):
    common = dict(student=_two_layers(workspace, tmp_path, tie_word_embeddings=True), loss={"ce_weight": 0.5},
                  train={"max_steps": 3, "optimizer": "sgd", "lr": 0.5, "max_grad_norm": 0.0, "schedule": "constant",
                         "batch_size": 4})
    result, ddp = train_cli(tmp_path, workspace, "ddp", **common)
    assert result.returncode == 0, result.stderr[-3000:]
    result, fsdp = train_cli(tmp_path, workspace, "fsdp", **{**common, "train": {**common["train"],
                                                                                  "sharding": "fsdp2"}})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP2 over 1 processes" in result.stdout
    a, b = params(fsdp), params(ddp)
    assert a.keys() == b.keys()  # the tied head saved once, as transformers saves it
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")

    # A checkpoint keeps its layout: a DDP run's cannot resume under an FSDP launch.
    more = {**common["train"], "max_steps": 4}
    result, _ = train_cli(tmp_path, workspace, "ddp", env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
                          **{**common, "train": more})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "was saved by a ddp run and this one is fsdp2" in result.stderr

    result, _ = train_cli(tmp_path, workspace, "v1", env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, **common)
    assert result.returncode == 2 and "fsdp_version: 2" in result.stderr and "Traceback" not in result.stderr
    result, _ = train_cli(tmp_path, workspace, "qat", **{**common, "train": {**common["train"], "sharding": "fsdp2",
                                                                           "qat": {"bits": 4, "group_size": 16}}})
    assert result.returncode == 2 and "train.sharding=fsdp2 does not support train.qat" in result.stderr


@pytest.mark.parametrize("name", ["fsdp2.yaml", "ddp.yaml"])
def test_shipped_accelerate_configs_launch_what_they_say(name, monkeypatch):
    """Each config in examples/accelerate, through accelerate's own launch-argument handling, sets
    the environment from which distill picks its strategy and FSDP2 settings."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "examples" / "accelerate" / name),
                                               "--num_processes", "2", "-m", "distill", "train", "x.yaml"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    for key in [k for k in os.environ if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if name == "fsdp2.yaml":
        assert sharding.mode("auto") == "fsdp2"
        s = sharding.settings("bf16")
        assert (s.reshard_after_forward, s.offload, s.checkpointing, s.param_dtype) == (True, False, False,
                                                                                       torch.bfloat16)
        monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
        assert sharding.settings("fp32").offload and sharding.settings("fp32").param_dtype is None
    else:
        assert sharding.mode("auto") == "ddp"
    assert sharding.mode("ddp") == "ddp"


def _teacher_worker(rank: int, folder: str, store: str, results: str) -> None:
    """One of two processes: the teacher read by process 0 only, sharded, filled by broadcast."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from distill import models
    from distill.errors import UserError

    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    loads = []

    def load(weights):
        loads.append(weights)
        if weights:
            return models.freeze(models.check_finite(models.load_causal_lm(folder, dtype=torch.bfloat16), "it"))
        return models.freeze(models.empty_causal_lm(folder, dtype=torch.bfloat16))

    out = {"loads": loads}
    try:
        teacher = sharding.first_loads(load)
    except UserError as e:
        out["error"] = str(e)
    else:
        out["meta_before"] = any(p.is_meta for p in teacher.parameters())
        sharding.shard_teacher(teacher, init_device_mesh("cpu", (2,)))
        ids = torch.arange(24).view(2, 12) % 60
        with torch.no_grad():
            out["logits"] = teacher(input_ids=ids).logits.float()
        out["tied"] = teacher.get_output_embeddings().weight is teacher.get_input_embeddings().weight
        out["held"] = sharding.local_bytes(teacher)
    torch.save(out, f"{results}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("tied", [True, False])
def test_the_sharded_teacher_is_read_by_process_0_only(tmp_path, tied):
    """Process 1 builds the teacher's shape on the meta device and gets its shards from process 0:
    the same logits as the whole teacher, the tie kept, half of each layer held."""
    import torch.multiprocessing as mp
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                               tie_word_embeddings=tied)
    torch.manual_seed(0)
    whole = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    whole.save_pretrained(tmp_path / "teacher")
    mp.spawn(_teacher_worker, args=(str(tmp_path / "teacher"), str(tmp_path / "store"), str(tmp_path / "out")),
             nprocs=2)
    got = [torch.load(tmp_path / f"out.{r}") for r in (0, 1)]
    assert [g["loads"] for g in got] == [[True], [False]]  # process 1 never reads the weights
    assert [g["meta_before"] for g in got] == [False, True]
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", dtype=torch.bfloat16).eval()  # fp32 rotary
    with torch.no_grad():
        expected = whole(input_ids=torch.arange(24).view(2, 12) % 60).logits.float()
    for g in got:
        torch.testing.assert_close(g["logits"], expected, atol=0, rtol=0)
        assert g["tied"] is tied
    sharded = [*whole.model.layers] + ([] if tied else [whole.model.embed_tokens])
    assert got[0]["held"] == (_held_bytes(whole, sharded), sum(p.numel() * 2 for p in whole.parameters()))


def test_a_bad_teacher_on_process_0_stops_every_process(tmp_path):
    """Non-finite weights, found by process 0 (the only one that reads them): both processes raise
    the same UserError, and neither waits for the other."""
    import torch.multiprocessing as mp
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "teacher")
    mp.spawn(_teacher_worker, args=(str(tmp_path / "teacher"), str(tmp_path / "store"), str(tmp_path / "out")),
             nprocs=2)
    got = [torch.load(tmp_path / f"out.{r}") for r in (0, 1)]
    assert [g["loads"] for g in got] == [[True], []]
    assert got[0]["error"] == got[1]["error"] and "non-finite weights" in got[0]["error"]


def test_a_student_read_by_process_0_alone_trains_as_one_process(workspace, tmp_path):
    """student.model under two FSDP2 processes: process 1 builds the (tied) student on the meta
    device and receives its shards from process 0; training matches one process that read it."""
    from distill import models

    teacher = workspace / "teacher_run" / "student"
    arch = {**_two_layers(workspace, tmp_path, tie_word_embeddings=True)["config"]}
    torch.manual_seed(3)
    start = models.student_from_config(arch, vocab_size=len(models.load_tokenizer(str(teacher))))
    start.save_pretrained(tmp_path / "start")
    common = _common(workspace, tmp_path)
    common["student"] = {"model": str(tmp_path / "start"), "tokenizer": str(teacher), "config": None}
    result, one = train_cli(tmp_path, workspace, "one", **{**common, "train": {**common["train"], "batch_size": 4}})
    assert result.returncode == 0, result.stderr[-3000:]
    result, two = train_cli(tmp_path, workspace, "two", launcher=fsdp2_processes(2),
                            **{**common, "train": {**common["train"], "batch_size": 2}})
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = params(two), params(one)
    assert a.keys() == b.keys() == {k for k in load_file(str(tmp_path / "start" / "model.safetensors"))}
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-6, rtol=0, msg=lambda m: f"{key}: {m}")
    assert not torch.equal(a["model.norm.weight"], load_file(str(tmp_path / "start" / "model.safetensors"))[
        "model.norm.weight"])  # it trained


def test_a_student_from_teacher_layers_under_fsdp2_is_built_from_process_0s_teacher(workspace, tmp_path):
    """student.init_from_teacher_layers under two FSDP2 processes: process 1's teacher, and so the
    student made from its layers, have meta parameters until process 0 sends theirs; training
    matches one process."""
    common = _common(workspace, tmp_path)
    common["student"] = {"config": None, "init_from_teacher_layers": [1]}
    result, one = train_cli(tmp_path, workspace, "one", **{**common, "train": {**common["train"], "batch_size": 4}})
    assert result.returncode == 0, result.stderr[-3000:]
    result, two = train_cli(tmp_path, workspace, "two", launcher=fsdp2_processes(2),
                            **{**common, "train": {**common["train"], "batch_size": 2}})
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = params(two), params(one)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-6, rtol=0, msg=lambda m: f"{key}: {m}")
