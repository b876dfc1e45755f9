"""`distill cache` and training from its cache, end to end through the CLI on tiny models."""

import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import distill_config, write_config
from tests.helpers import make_tokenizer, read_metrics, run_cli, two_processes

pytestmark = pytest.mark.slow

VOCAB = 45  # the toy tokenizer's vocabulary: k = VOCAB stores the full distribution
TWO_PROCESSES = two_processes(29517)


def run(verb, tmp_path, ws, name, env=None, launcher=None, **sections):
    config = distill_config(ws, tmp_path / name, **sections)
    return run_cli(verb, str(write_config(tmp_path / f"{name}.yaml", config)), env=env, launcher=launcher)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def params(run_dir):
    return load_file(str(run_dir / "student" / "model.safetensors"))


SMALL = {"k": 8, "shard_size": 64}  # uint8 values; the workspace's training data gives 6 shards


@pytest.fixture(scope="module")
def caches(workspace, tmp_path_factory):
    """A full-distribution cache (k = V, float32) and a small one (k = 8, uint8), written in one go."""
    root = tmp_path_factory.mktemp("caches")
    full = {"dir": str(root / "full"), "k": VOCAB, "logprob_dtype": "float32", "shard_size": 100}
    for name, settings in (("full", full), ("small", {"dir": str(root / "small"), **SMALL})):
        result = run("cache", root, workspace, name, cache=settings)
        assert result.returncode == 0, result.stderr[-3000:]
    return root


# lr 0.25: at lr 1.0 float32 rounding between the dense and the sparse loss grew to 1.0e-6 in 4 steps
# (half the tolerance, on this CPU); at 0.25 it is 4.5e-8.
SGD = {"max_steps": 4, "optimizer": "sgd", "lr": 0.25, "max_grad_norm": 0.0, "schedule": "constant"}


def test_full_distribution_cache_trains_like_the_live_teacher(workspace, caches, tmp_path):
    """k = V, float32: the tail is empty and the sparse forward KL is the dense one, so after 4 SGD steps
    the parameters match the live-teacher run (fused chunked loss and dense path alike)."""
    result = run("train", tmp_path, workspace, "live", train=SGD)
    assert result.returncode == 0, result.stderr[-3000:]
    live = params(tmp_path / "live")
    for chunk in (256, 0):
        result = run("train", tmp_path, workspace, f"cached{chunk}", train=SGD, loss={"chunk_size": chunk},
                     teacher={"source": "cache"}, cache={"dir": str(caches / "full")})
        assert result.returncode == 0, result.stderr[-3000:]
        cached = params(tmp_path / f"cached{chunk}")
        assert cached.keys() == live.keys()
        for key in live:
            torch.testing.assert_close(cached[key], live[key], atol=2e-6, rtol=0, msg=lambda m: f"{key}: {m}")
        logs = [m for m in read_metrics(tmp_path / f"cached{chunk}" / "metrics.jsonl") if "loss" in m]
        live_logs = [m for m in read_metrics(tmp_path / "live" / "metrics.jsonl") if "loss" in m]
        assert logs[-1]["kd"] == pytest.approx(live_logs[-1]["kd"], rel=1e-4)


def test_manifest_records_what_the_cache_holds(caches):
    import json

    manifest = json.loads((caches / "small" / "manifest.json").read_text())
    assert manifest["targets"] == {"mode": "topk", "k": 8, "temperature": 1.0, "seed": None}
    assert manifest["encoding"]["values"]["kind"] == "logprob_sqrt_uint8"
    assert len(manifest["teacher"]["weights_sha256"]) == len(manifest["tokenizer_sha256"]) == 64
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.parquet" for i in range(manifest["num_shards"])]
    assert sum(s["examples"] for s in manifest["shards"]) == manifest["data"]["examples"]
    assert manifest["totals"]["bytes_per_position"] < 20
    assert not (caches / "small" / "manifest.partial.json").exists()


def test_killed_mid_write_and_rerun_gives_the_same_files(workspace, caches, tmp_path):
    settings = {"dir": str(tmp_path / "resumed"), **SMALL}
    result = run("cache", tmp_path, workspace, "resumed", env={"DISTILL_TEST_KILL_AT": "shard-done:2"}, cache=settings)
    assert result.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == [
        "manifest.partial.json", "shard-00000.parquet", "shard-00001.parquet"]
    (tmp_path / "resumed" / ".tmp-shard-00002-123.parquet").write_bytes(b"half a shard")  # as a kill mid-shard leaves
    result = run("cache", tmp_path, workspace, "resumed", cache=settings)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = len(list((caches / "small").glob("shard-*")))
    assert f"{shards} shards ({shards - 2} written now" in result.stdout
    assert files(tmp_path / "resumed") == files(caches / "small")


def test_two_processes_write_the_same_cache(workspace, caches, tmp_path):
    result = run("cache", tmp_path, workspace, "two", launcher=TWO_PROCESSES,
                 cache={"dir": str(tmp_path / "two"), **SMALL})
    assert result.returncode == 0, result.stderr[-3000:]
    assert files(tmp_path / "two") == files(caches / "small")


def test_sampled_cache_and_renormalized_mode_train(workspace, tmp_path, caches):
    settings = {"dir": str(tmp_path / "sampled"), "mode": "sampled", "samples": 16, "shard_size": 200}
    result = run("cache", tmp_path, workspace, "sampled", cache=settings)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, sections in (("from_sampled", {"cache": settings}),
                           ("renormalized", {"cache": {"dir": str(caches / "small")},
                                             "loss": {"sparse_mode": "renormalized", "temperature": 2.0}})):
        result = run("train", tmp_path, workspace, name, teacher={"source": "cache"},
                     train={"max_steps": 3, "log_every": 1}, **{"loss": {}, **sections})
        assert result.returncode == 0, result.stderr[-3000:]
        assert len([m for m in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in m]) == 3


def corrupt(folder, how):
    path = folder / "shard-00001.parquet"
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["corrupt", "truncated", "tokenizer", "data", "temperature", "changed_settings"])
def test_mismatches_are_clear_errors_with_exit_2(workspace, caches, tmp_path, case):
    folder = tmp_path / "cache"
    shutil.copytree(caches / "small", folder)
    sections = {"teacher": {"source": "cache"}, "cache": {"dir": str(folder)}}
    verb = "train"
    if case in ("corrupt", "truncated"):
        corrupt(folder, case)
        expected = f"shard {folder / 'shard-00001.parquet'} is {case}"
    elif case == "tokenizer":
        make_tokenizer(tmp_path / "other_tok", shuffle_seed=3)
        sections["student"] = {"tokenizer": str(tmp_path / "other_tok")}
        expected = "was built with a different tokenizer"
    elif case == "data":
        sections["data"] = {"train": str(workspace / "eval.jsonl")}
        expected = "was built from different training data"
    elif case == "temperature":
        sections["loss"] = {"temperature": 2.0}
        expected = "use loss.sparse_mode=renormalized"
    else:
        verb = "cache"
        sections = {"cache": {"dir": str(folder), **SMALL, "k": 16}}
        expected = "holds a different teacher cache (targets.k changed)"
    result = run(verb, tmp_path, workspace, case, **sections)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("distill: error:") and expected in last, last
    assert "Traceback" not in result.stderr
    if case == "corrupt":  # re-running `distill cache` on it names the shard too
        result = run("cache", tmp_path, workspace, "again", cache={"dir": str(folder), **SMALL})
        assert result.returncode == 2 and "shard-00001.parquet is corrupt" in result.stderr
