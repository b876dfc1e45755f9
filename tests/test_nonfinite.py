"""Non-finite values through the CLI: a NaN never reaches a checkpoint, a cache shard or a saved student.

The teachers here have finite weights whose activations overflow (``poison_teacher``) on one chosen
training example, so the guard that fires is the one per optimizer step, at a known step; a teacher
with NaN weights is refused when it is loaded."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.cache.format import decode, encode, file_sha256, write_shard
from distill.training import batch_indices
from tests.conftest import distill_config, write_config
from tests.helpers import poison_teacher, read_metrics, run_cli

pytestmark = pytest.mark.slow

VOCAB = 45  # the toy tokenizer's
POISONED_STEP = 3  # the optimizer step (1-based) whose batch holds the poisoned example
N_TRAIN, BATCH = 64, 8  # the workspace's prompt/completion training data; the tests' micro-batch


def poisoned_example() -> int:
    return batch_indices(POISONED_STEP - 1, 0, n=N_TRAIN, batch_size=BATCH, accum=1, world=1, rank=0, seed=0)[3]


@pytest.fixture(scope="module")
def poisoned(workspace, tmp_path_factory):
    """A teacher whose outputs are NaN exactly on sequences with <unk>, and prompt/completion data
    with one unknown word in one example."""
    root = tmp_path_factory.mktemp("poisoned")
    poison_teacher(workspace / "teacher_run" / "student", root / "teacher", token_id=1)  # 1: <unk>
    lines = (workspace / "pc_train.jsonl").read_text().splitlines()
    assert len(lines) == N_TRAIN
    row = json.loads(lines[poisoned_example()])
    row["completion"] = row["completion"].replace(" the ", " the zebra ", 1)  # zebra: not in the vocabulary
    lines[poisoned_example()] = json.dumps(row)
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root


def run(verb, tmp_path, ws, name, **sections):
    config = distill_config(ws, tmp_path / name, **sections)
    return run_cli(verb, str(write_config(tmp_path / f"{name}.yaml", config))), tmp_path / name


def poisoned_sections(poisoned, ws, **train):
    return dict(teacher={"model": str(poisoned / "teacher")},
                data={"train": str(poisoned / "train.jsonl"), "eval": str(ws / "pc_eval.jsonl"),
                      "format": "prompt_completion", "max_length": 48},
                train={"max_steps": 5, "batch_size": BATCH, "save_every": 1, "keep_checkpoints": 3, "log_every": 1,
                       **train})


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("distill: error:")]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def checkpoint_names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_nonfinite_teacher_targets_stop_the_run_and_save_nothing(workspace, poisoned, tmp_path):
    result, out = run("train", tmp_path, workspace, "stop", **poisoned_sections(poisoned, workspace))
    line = error_line(result)
    assert f"step {POISONED_STEP}: non-finite teacher targets" in line
    assert str(poisoned_example()) in line.split("training examples")[1].split(")")[0].split(", ")
    assert "the newest checkpoint is step-00000002" in line and "train.nonfinite=skip" in line
    # The last good checkpoint is the newest and whole; nothing of the bad step, no student.
    assert checkpoint_names(out) == ["step-00000001", "step-00000002"]
    newest = out / "checkpoints" / "step-00000002"
    assert json.loads((newest / "trainer_state.json").read_text())["step"] == 2
    assert (newest / "model.safetensors").is_file() and (newest / "optimizer.bin").is_file()
    assert not (out / "student").exists() and not list(out.glob(".tmp*"))
    assert all(m["step"] <= 2 for m in read_metrics(out / "metrics.jsonl"))


def test_skip_drops_exactly_the_nonfinite_step(workspace, poisoned, tmp_path):
    result, out = run("train", tmp_path, workspace, "skip",
                      **poisoned_sections(poisoned, workspace, nonfinite="skip", max_steps=4))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped step {POISONED_STEP}: non-finite teacher targets" in result.stdout + result.stderr
    ckpt = {s: out / "checkpoints" / f"step-{s:08d}" for s in (2, 3, 4)}
    before, skipped, after = (load_file(str(ckpt[s] / "model.safetensors")) for s in (2, 3, 4))
    for key in before:  # the skipped step changed no parameter ...
        assert torch.equal(before[key], skipped[key]), key
    assert any(not torch.equal(skipped[k], after[k]) for k in skipped)  # ... and the next one trains
    opt_before, opt_skipped = (torch.load(ckpt[s] / "optimizer.bin", weights_only=True) for s in (2, 3))
    for index, moments in opt_before["state"].items():  # ... and no optimizer state
        for name, value in moments.items():
            assert torch.equal(value, opt_skipped["state"][index][name]), (index, name)
    assert opt_before["param_groups"] == opt_skipped["param_groups"]  # the schedule did not move either
    logs = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert [m["skipped_steps"] for m in logs] == [0, 0, 1, 1]
    assert logs[2]["loss"] is None and all(np.isfinite(m["loss"]) for m in logs if m["step"] != POISONED_STEP)
    assert (out / "student" / "model.safetensors").is_file()


def test_skip_stops_after_max_skipped_steps_in_a_row(workspace, poisoned, tmp_path):
    # Every example poisoned: with max_skipped_steps=2 the second non-finite step in a row ends the run.
    all_bad = tmp_path / "all_bad.jsonl"
    all_bad.write_text("".join(json.dumps({**json.loads(line), "prompt": "zebra " + json.loads(line)["prompt"]}) + "\n"
                               for line in (workspace / "pc_train.jsonl").read_text().splitlines()))
    sections = poisoned_sections(poisoned, workspace, nonfinite="skip", max_skipped_steps=2)
    sections["data"]["train"] = str(all_bad)
    result, out = run("train", tmp_path, workspace, "skip_limit", **sections)
    line = error_line(result)
    assert "2 optimizer steps in a row were non-finite (train.max_skipped_steps=2), the last at step 2" in line
    assert "no checkpoint was saved" in line or "step-00000001" in line
    assert not (out / "student").exists()


def test_overflowing_student_loss_stops_the_run(workspace, tmp_path):
    # SGD at lr 1e36 with clipping to norm 1: step 1 moves weights by up to 1e36, step 2's forward overflows.
    result, out = run("train", tmp_path, workspace, "overflow",
                      train={"max_steps": 4, "optimizer": "sgd", "lr": 1e36, "save_every": 1, "schedule": "constant"})
    line = error_line(result)
    assert "step 2: non-finite student loss in micro-batch 1 of 1" in line
    assert checkpoint_names(out) == ["step-00000001"] and not (out / "student").exists()


def test_nan_weights_are_refused_at_load_by_train_and_cache(workspace, tmp_path):
    broken = tmp_path / "nan_teacher"
    shutil.copytree(workspace / "teacher_run" / "student", broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"][3] = float("nan")  # one bad row in an MLP
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    for verb in ("train", "cache"):
        result, out = run(verb, tmp_path, workspace, verb, teacher={"model": str(broken)},
                          cache={"dir": str(tmp_path / "cache_dir")})
        line = error_line(result)
        assert "non-finite weights: model.layers.1.mlp.down_proj.weight (96 NaN, 0 inf of 4608)" in line
        assert not (out / "student").exists() and not (tmp_path / "cache_dir" / "manifest.json").exists()


def test_cache_refuses_a_nonfinite_teacher_and_writes_no_bad_shard(workspace, poisoned, tmp_path):
    bad = poisoned_example()
    sections = poisoned_sections(poisoned, workspace)
    result, _ = run("cache", tmp_path, workspace, "cache", cache={"dir": str(tmp_path / "cache"), "shard_size": 16,
                                                                  "k": 8, "logprob_dtype": "float32"}, **sections)
    line = error_line(result)
    assert f"non-finite (NaN or inf) for training example {bad}, in shard-{bad // 16:05d}.parquet" in line
    folder = tmp_path / "cache"
    assert not (folder / "manifest.json").exists() and (folder / "manifest.partial.json").exists()
    assert not (folder / f"shard-{bad // 16:05d}.parquet").exists()
    written = sorted(folder.glob("shard-*.parquet"))
    assert len(written) == bad // 16  # the shards before the bad one, and they are finite
    encoding = json.loads((folder / "manifest.partial.json").read_text())["encoding"]["values"]
    for shard in written:
        for row in pq.read_table(shard).to_pylist():
            _, logprobs, tail = decode(row["ids"], row["values"], row["log_tail"], positions=row["positions"], k=8,
                                       vocab_size=VOCAB, encoding=encoding)
            assert not (np.isnan(logprobs).any() or np.isposinf(logprobs).any() or np.isnan(tail).any())


def test_an_inf_in_a_cache_shard_stops_training(workspace, tmp_path):
    folder = tmp_path / "cache"
    result, _ = run("cache", tmp_path, workspace, "writer", cache={"dir": str(folder), "k": 8,
                                                                   "logprob_dtype": "float32", "shard_size": 400})
    assert result.returncode == 0, result.stderr[-3000:]
    # An inf in every example's first log-probability, with the manifest's checksums updated: a cache
    # that verifies but holds a non-finite value (e.g. one written by a tool without the guard).
    manifest = json.loads((folder / "manifest.json").read_text())
    encoding = manifest["encoding"]["values"]
    for info in manifest["shards"]:
        path = folder / info["file"]
        rows = pq.read_table(path).to_pylist()
        for row in rows:
            ids, logprobs, tail = decode(row["ids"], row["values"], row["log_tail"], positions=row["positions"], k=8,
                                         vocab_size=VOCAB, encoding=encoding)
            logprobs[0, -1] = np.inf
            row.update(encode(ids, logprobs, tail, vocab_size=VOCAB, encoding=encoding))
        write_shard(path, rows)
        info["bytes"], info["sha256"] = path.stat().st_size, file_sha256(path)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result, out = run("train", tmp_path, workspace, "from_cache", teacher={"source": "cache"},
                      cache={"dir": str(folder)}, train={"save_every": 1})
    line = error_line(result)
    assert "step 1: non-finite teacher targets in micro-batch 1 of 1" in line
    assert not (out / "checkpoints").exists() and not (out / "student").exists()


class _InfGradient(torch.autograd.Function):
    """The identity whose gradient is inf: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_nonfinite_gradients_stop_the_run(workspace, tmp_path, monkeypatch):
    import dataclasses

    import distill.training as training

    original, calls = training.micro_batch_loss, []

    def second_step_has_an_inf_gradient(*args, **kwargs):
        parts, teacher_ok = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            parts = dataclasses.replace(parts, loss=_InfGradient.apply(parts.loss))
        return parts, teacher_ok

    monkeypatch.setattr(training, "micro_batch_loss", second_step_has_an_inf_gradient)
    out = tmp_path / "grad"
    with pytest.raises(training.NonFiniteError, match=r"step 2: non-finite gradients \(the loss is finite"):
        training.train(distill_config(workspace, out, train={"max_steps": 3, "save_every": 1}))
    assert checkpoint_names(out) == ["step-00000001"] and not (out / "student").exists()
