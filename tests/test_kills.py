"""SIGKILL in the middle of every write, through the CLI: the same command then resumes, the final
artifacts equal an uninterrupted run's (parameters bit-exact, caches byte-identical), and no partial
artifact is ever taken for a whole one. A write that fails (over a file-size limit, the way a full
disk fails) gives one line and keeps the previous checkpoint intact.

The kill points are ``distill.faults``'s (``DISTILL_TEST_KILL_AT=point:n``)."""

import hashlib
import resource
import signal

import pytest
from safetensors.torch import load_file

from distill.training import checkpoints
from tests.conftest import distill_config, write_config
from tests.helpers import deterministic_metrics, run_cli

pytestmark = pytest.mark.slow

TRAIN = {"max_steps": 6, "save_every": 2, "log_every": 1, "eval_every": 3, "keep_checkpoints": 2}
CACHE = {"k": 8, "shard_size": 64}  # six shards of the workspace's training data


def config_path(tmp_path, ws, name, **sections):
    return str(write_config(tmp_path / f"{name}.yaml", distill_config(ws, tmp_path / name, **sections)))


def leftovers(run_dir):
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name.startswith((".tmp", ".trash")))


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory):
    """One uninterrupted training run and one uninterrupted cache, to compare every killed one with."""
    root = tmp_path_factory.mktemp("reference")
    result = run_cli("train", config_path(root, workspace, "train", train=TRAIN))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("cache", config_path(root, workspace, "cache", cache={"dir": str(root / "cache_dir"), **CACHE}))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def check_killed_state(point, out):
    """What a kill at ``point`` leaves, before the resume: never a partial artifact under a whole name."""
    done = [p.name for p in checkpoints(out)]
    for name in done:
        assert {"model.safetensors", "optimizer.bin", "trainer_state.json"} <= {f.name for f in (out / "checkpoints" / name).iterdir()}
    assert not (out / "student").exists()
    if point == "checkpoint":  # in step 4's save: its files are there, its marker and name are not
        assert done == ["step-00000002"]
        tmp = out / "checkpoints" / ".tmp-step-00000004"
        assert (tmp / "model.safetensors").is_file() and not (tmp / "trainer_state.json").exists()
    elif point == "rotate":  # in step 6's save: step 2 removed, step 6 complete but not yet renamed in
        assert done == ["step-00000004"]
        assert (out / "checkpoints" / ".tmp-step-00000006" / "trainer_state.json").is_file()
    elif point == "metrics":  # in step 4's log line: half of it on disk
        text = (out / "metrics.jsonl").read_text()
        assert not text.endswith("\n") and done == ["step-00000002"]
    elif point == "student":
        assert (out / ".tmp-student" / "model.safetensors").is_file()
        assert not (out / ".tmp-student" / "tokenizer.json").exists()


@pytest.mark.parametrize("point", ["checkpoint:2", "rotate:3", "metrics:5", "student:1", "tokenized:1"])
def test_training_killed_in_a_write_resumes_to_the_same_result(workspace, reference, tmp_path, point):
    env = {}
    if point.startswith("tokenized"):  # a tokenization cache of its own, so this run has to write one
        env["DISTILL_CACHE"] = str(tmp_path / "cache")
    path = config_path(tmp_path, workspace, "run", train=TRAIN)
    result = run_cli("train", path, env={**env, "DISTILL_TEST_KILL_AT": point})
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    out, name = tmp_path / "run", point.split(":")[0]
    check_killed_state(name, out)
    if name == "tokenized":
        tmp = [p for p in (tmp_path / "cache" / "tokenized").iterdir() if p.name.startswith(".tmp-")]
        assert len(tmp) == 1 and not (tmp[0] / "manifest.json").exists()
        assert not [p for p in (tmp_path / "cache" / "tokenized").glob("*/manifest.json")]  # no entry taken as whole

    result = run_cli("train", path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ref = reference / "train"
    a, b = load_file(str(out / "student" / "model.safetensors")), load_file(str(ref / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit-exact
    assert deterministic_metrics(out) == deterministic_metrics(ref)
    assert [p.name for p in checkpoints(out)] == [p.name for p in checkpoints(ref)]
    assert sorted(p.name for p in (out / "student").iterdir()) == sorted(p.name for p in (ref / "student").iterdir())
    assert leftovers(out) == []
    if name == "tokenized":
        assert not [p for p in (tmp_path / "cache" / "tokenized").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("point", ["shard:2", "manifest:1"])
def test_cache_killed_in_a_write_resumes_byte_identical(workspace, reference, tmp_path, point):
    folder = tmp_path / "cache_dir"
    path = config_path(tmp_path, workspace, "cache", cache={"dir": str(folder), **CACHE})
    result = run_cli("cache", path, env={"DISTILL_TEST_KILL_AT": point})
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    names = sorted(p.name for p in folder.iterdir())
    assert "manifest.json" not in names and "manifest.partial.json" in names  # never taken for a whole cache
    assert any(n.startswith(".tmp-") for n in names)  # the cut write, under its temporary name
    if point.startswith("shard"):
        assert names.count("shard-00000.parquet") == 1 and "shard-00001.parquet" not in names
    else:
        assert len([n for n in names if n.startswith("shard-")]) == 6

    result = run_cli("cache", path)
    assert result.returncode == 0, result.stderr[-3000:]
    ref = reference / "cache_dir"
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    assert files == {p.name: p.read_bytes() for p in sorted(ref.iterdir())}


def _limit_file_size(limit):
    def apply():  # in the child: a write past `limit` bytes fails with EFBIG, as a full disk fails with ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint(workspace, tmp_path):
    import subprocess
    import sys

    path = config_path(tmp_path, workspace, "full", train={"max_steps": 4, "save_every": 1})
    result = run_cli("train", path, env={"DISTILL_TEST_KILL_AT": "step:3"})  # checkpoints 1 and 2, then killed
    assert result.returncode == -signal.SIGKILL
    out = tmp_path / "full"
    previous = out / "checkpoints" / "step-00000002"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in previous.iterdir()}

    # The student's weights (about 50 kB) no longer fit; the config and metrics (a few kB) still do.
    result = subprocess.run([sys.executable, "-m", "distill", "train", path], capture_output=True, text=True,
                            preexec_fn=_limit_file_size(20_000), timeout=600)
    lines = [line for line in result.stderr.splitlines() if line.startswith("distill: error:")]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "could not write checkpoint step-00000003" in lines[0] and "File too large" in lines[0]
    assert "the previous checkpoint step-00000002 is intact" in lines[0]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in previous.iterdir()} == before
    assert [p.name for p in checkpoints(out)] == ["step-00000001", "step-00000002"]
    assert leftovers(out) == [] and not (out / "student").exists()

    result = run_cli("train", path)  # space again: the same command resumes from step 2 and finishes
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout + result.stderr and (out / "student" / "model.safetensors").is_file()
