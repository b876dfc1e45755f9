"""Sequence-level KD on the quickstart task: the teacher's completions vs the corpus's own text.

    python benchmarks/generate_seqkd.py --out runs/seqkd-bench --seeds 0 1 2

Builds prompt/continuation pairs from the bundled corpus's train split (a prompt of whole lines,
about 48 tokens, and the next whole lines, about 128 tokens), then trains the quickstart student
(same architecture, init, steps, batch and seed in every arm) on:

- ``original``: the corpus's own continuations, cross-entropy (the baseline);
- ``seq_kd``: the bundled teacher's sampled continuations of the same prompts (`distill generate`,
  local teacher, temperature 1), cross-entropy: Kim & Rush's sequence-level KD;
- ``seq_kd+topk``: continuations written by the same teacher behind llama-cpp-python's
  OpenAI-compatible server (GGUF f16), with its top-5 log-probs kept as a teacher cache: CE + sparse
  forward KL (0.5 / 0.5) on the rows whose tokens the tokenizer reproduces;
- ``token_kd``: white-box forward KL from the live teacher on the original pairs (the reference).

Every student is evaluated with `distill eval`'s ``evaluate_models`` on the eval split: perplexity,
teacher NLL of its generations, valid Python. Prints a Markdown table (mean and per seed) and saves
the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from distill.quickstart import CORPUS, STUDENT_ARCH, TEACHER

ARMS = ("original", "seq_kd", "seq_kd+topk", "token_kd")


def make_pairs(n: int, seed: int = 0, prompt_tokens: int = 48, completion_tokens: int = 128) -> list[dict]:
    """``n`` prompt / original-continuation pairs from the train split, cut at line boundaries."""
    import random

    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TEACHER)
    texts = pq.read_table(CORPUS / "train.parquet").column("text").to_pylist()
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        lines = rng.choice(texts).splitlines(keepends=True)
        if len(lines) < 20:
            continue
        start = rng.randrange(0, len(lines) - 10)
        prompt, i = "", start
        while i < len(lines) and len(tok(prompt)["input_ids"]) < prompt_tokens:
            prompt += lines[i]
            i += 1
        completion = ""
        while i < len(lines) and len(tok(completion)["input_ids"]) < completion_tokens:
            completion += lines[i]
            i += 1
        if prompt.strip() and completion.strip() and len(tok(prompt)["input_ids"]) <= 2 * prompt_tokens:
            pairs.append({"prompt": prompt, "completion": completion})
    return pairs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(gguf: Path, log: Path) -> tuple[subprocess.Popen, str]:
    import requests

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "1024"], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(240):
        try:
            if requests.get(url + "/models", timeout=1).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.5)
    raise RuntimeError(f"llama server did not start: {log.read_text()[-2000:]}")


def generate_data(out: Path, pairs_path: Path, n_new: int) -> dict:
    from distill.export import export
    from distill.generate import generate

    paths = {}
    common = {"data": {"train": str(pairs_path), "max_length": 256},
              "generate": {"max_new_tokens": n_new, "temperature": 1.0, "batch_size": 32, "chunk_size": 256}}
    local = {"teacher": {"model": str(TEACHER), "dtype": "bfloat16"},
             "generate": {**common["generate"], "output": str(out / "gen-local")}, "data": common["data"]}
    tic = time.perf_counter()
    m = generate(local, progress=True)
    paths["local"] = {"data": str(out / "gen-local" / "data.jsonl"), "seconds": time.perf_counter() - tic,
                      "run": m["run"], "counts": m["counts"]}
    gguf = out / "teacher-f16.gguf"
    if not gguf.exists():
        export(str(TEACHER), to="gguf", quant="f16", out=str(gguf), progress=False)
    proc, url = start_llama_server(gguf, out / "llama-server.log")
    try:
        http = {"teacher": {"source": "http", "http": {"url": url, "logprobs": 5, "concurrency": 4}},
                "student": {"tokenizer": str(TEACHER)}, "data": common["data"],
                "generate": {**common["generate"], "output": str(out / "gen-http")}}
        tic = time.perf_counter()
        m = generate(http, progress=True)
        paths["http"] = {"data": str(out / "gen-http" / "data-logprobs.jsonl"), "cache": str(out / "gen-http" / "cache"),
                         "seconds": time.perf_counter() - tic, "run": m["run"], "counts": m["counts"],
                         "logprobs": m["logprobs"]}
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    return paths


def arm_config(out: Path, arm: str, seed: int, steps: int, data: dict, pairs_path: Path) -> dict:
    train = {"original": str(pairs_path), "seq_kd": data["local"]["data"], "seq_kd+topk": data["http"]["data"],
             "token_kd": str(pairs_path)}[arm]
    loss = {"original": {"kd_weight": 0.0, "ce_weight": 1.0}, "seq_kd": {"kd_weight": 0.0, "ce_weight": 1.0},
            "seq_kd+topk": {"kd_weight": 0.5, "ce_weight": 0.5}, "token_kd": {"kd_weight": 1.0, "ce_weight": 0.0}}[arm]
    config = {
        "teacher": ({"source": "cache"} if arm == "seq_kd+topk" else {"model": str(TEACHER)}),
        "student": {"config": dict(STUDENT_ARCH), "tokenizer": str(TEACHER)},
        "data": {"train": train, "eval": str(CORPUS / "eval.parquet"), "max_length": 256, "max_eval_examples": 8},
        "loss": {"divergence": "forward_kl", **loss},
        "train": {"output_dir": str(out / f"{arm}-s{seed}"), "max_steps": steps, "batch_size": 16, "lr": 3e-3,
                  "warmup_steps": max(1, steps // 20), "schedule": "cosine", "min_lr_ratio": 0.1, "weight_decay": 0.1,
                  "adam_betas": [0.9, 0.95], "precision": "bf16", "seed": seed, "eval_every": steps,
                  "tracker": "none", "progress": False},
    }
    if arm == "seq_kd+topk":
        config["cache"] = {"dir": data["http"]["cache"]}
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/seqkd-bench"))
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--prompts", type=int, default=32, help="eval prompts per model (teacher NLL, valid Python)")
    args = parser.parse_args()
    from distill.evaluate import evaluate_models
    from distill.training import train

    args.out.mkdir(parents=True, exist_ok=True)
    pairs_path = args.out / "pairs.jsonl"
    if not pairs_path.exists():
        pairs_path.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(args.pairs)))
    data = generate_data(args.out, pairs_path, args.max_new_tokens)
    results = {"data": data, "arms": {}}
    for seed in args.seeds:
        for arm in ARMS:
            config = arm_config(args.out, arm, seed, args.steps, data, pairs_path)
            tic = time.perf_counter()
            print(f"== {arm} seed {seed}", flush=True)
            train(config)
            results["arms"].setdefault(arm, {})[seed] = {"train_s": time.perf_counter() - tic}
        models = {arm: str(args.out / f"{arm}-s{seed}" / "student") for arm in ARMS}
        ev = evaluate_models(models, str(CORPUS / "eval.parquet"), teacher=str(TEACHER), max_length=256,
                             num_prompts=args.prompts, max_new_tokens=64, seed=seed, speed=False, draft_prompts=0,
                             progress=False)
        for arm in ARMS:
            m = ev["models"][arm]
            results["arms"][arm][seed].update({k: m.get(k) for k in ("perplexity", "eval_ce", "forward_kl",
                                                                      "top1_agreement", "teacher_nll", "valid_python")})
        results.setdefault("teacher", {k: ev["models"]["teacher"].get(k) for k in ("perplexity", "teacher_nll",
                                                                                   "valid_python")})
    results["experiment"] = {"pairs": args.pairs, "max_new_tokens": args.max_new_tokens, "steps": args.steps,
                             "seeds": args.seeds, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                             "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    (args.out / "generate_seqkd.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "generate_seqkd.md").write_text(table + "\n")
    print(table)


def markdown(results: dict) -> str:
    keys = (("perplexity", "perplexity (eval)", "{:.1f}"), ("teacher_nll", "teacher NLL of generations", "{:.3f}"),
            ("valid_python", "valid Python", "{:.1%}"), ("forward_kl", "KL(teacher || student)", "{:.3f}"),
            ("top1_agreement", "top-1 agreement", "{:.3f}"))
    lines = ["| arm | " + " | ".join(label for _, label, _ in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for arm, seeds in results["arms"].items():
        cells = []
        for key, _, fmt in keys:
            values = [s[key] for s in seeds.values() if s.get(key) is not None]
            mean = sum(values) / len(values) if values else None
            per = ", ".join(fmt.format(v) for v in values)
            cells.append(f"{fmt.format(mean)} ({per})" if mean is not None else "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    t = results.get("teacher", {})
    lines.append("| teacher | " + " | ".join(fmt.format(t[k]) if t.get(k) is not None else "-" for k, _, fmt in keys)
                 + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
