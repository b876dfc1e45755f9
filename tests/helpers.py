"""Test helpers: running the CLI, reading metrics. Tiny models and data come from distill.toy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from distill.toy import make_llama, make_tokenizer, write_prompt_completion, write_text  # noqa: F401


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, launcher: list[str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``distill ARGS`` in a fresh process (or under ``launcher``), capturing output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = (launcher or [sys.executable, "-m", "distill"]) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)


def two_processes(port: int) -> list[str]:
    """`accelerate launch` of ``python -m distill`` in two processes. accelerate starts several
    processes only with --multi_gpu (its --cpu launcher runs one); on a machine without a GPU distill
    then runs them on the CPU over gloo. Each test file passes its own port: files run in parallel
    (pytest -n 2)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--main_process_port", str(port), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "-m", "distill"]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def deterministic_metrics(run_dir: Path) -> list[dict]:
    """``run_dir``'s metrics.jsonl without the wall-clock numbers (throughput and the time split),
    which differ between runs; everything else must match line for line."""
    return [{k: v for k, v in m.items() if k != "tokens_per_s" and not k.startswith("time/")}
            for m in read_metrics(Path(run_dir) / "metrics.jsonl")]


def poison_teacher(src: Path, dst: Path, token_id: int) -> Path:
    """A copy of the Llama at ``src`` whose weights are all finite but whose activations overflow
    float32 (inf, then NaN) in every sequence that holds ``token_id``, and in no other.

    Dimension 0 of the residual stream is made to carry only ``token_id``'s embedding (no other
    token and no attention output writes it); one MLP unit of layer 0 reads it with weight 1e20 in
    both its gate and up projections, so their product (about 1e40) is inf exactly there."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight  # (V, d)
        embed[:, 0] = 0.0
        embed[token_id, 0] = 1.0
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight[0, :] = 0.0  # attention never writes dimension 0
        layer.post_attention_layernorm.weight[0] = 1.0
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.weight[0, :] = 0.0
            proj.weight[0, 0] = 1e20
    model.save_pretrained(dst)
    return dst
