"""`distill plan` against measured peaks: is the memory estimate within 20% of what a run uses?

    python benchmarks/plan_memory.py --out runs/plan-memory

Each case is a real `distill train` run (2 optimizer steps, bf16 autocast, one process) on the
bundled corpus and tokenizer, with a student built from a config and a randomly initialized
teacher saved to disk first (58M parameters, bf16). The run executes in a subprocess that records
the peak of its live tensor bytes (what the plan estimates): on CPU from every allocation and free
``torch.profiler`` records (``profile_memory=True``), on a GPU ``torch.cuda.max_memory_allocated``.
On CPU it also records the process's peak resident memory (VmHWM) above its resident memory right
before ``train()`` (after every import): tensors plus the allocator's fragmentation, the data,
tokenizer and libraries. The plan (for the run's strategy: DDP, FSDP2 under ``train.sharding=fsdp2``,
ZeRO-3 under ``train.sharding=zero3``, which needs deepspeed) is computed from the same config. The 2-process cases run under
``torch.distributed.run`` (gloo) and report the larger of the two processes' peaks.

Prints a Markdown table and saves ``plan_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "distill" / "assets"
TEACHER_ARCH = dict(model_type="llama", hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                    num_attention_heads=12, num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=True)
STUDENT_ARCH = dict(model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=12,
                    num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
CASES = {  # name -> overrides of the base config
    "params-heavy, b=2": {"train.batch_size": 2},
    "activations-heavy, b=16": {"train.batch_size": 16},
    "b=16, gradient checkpointing": {"train.batch_size": 16, "train.gradient_checkpointing": True},
    "b=8, dense loss": {"train.batch_size": 8, "loss.chunk_size": 0},
    "b=8, no teacher (CE)": {"train.batch_size": 8, "loss.kd_weight": 0, "loss.ce_weight": 1, "teacher.model": None},
    "b=4 x 2 accumulation": {"train.batch_size": 4, "train.grad_accum_steps": 2},
    "b=8, fp32": {"train.batch_size": 8, "train.precision": "fp32", "teacher.dtype": "float32"},
    "b=8, 2 processes (DDP)": {"train.batch_size": 8, "processes": 2},
    "b=2, 2 processes (FSDP2)": {"train.batch_size": 2, "train.sharding": "fsdp2", "processes": 2},
    "b=8, 2 processes (FSDP2)": {"train.batch_size": 8, "train.sharding": "fsdp2", "processes": 2},
    "b=2, 2 processes (ZeRO-3)": {"train.batch_size": 2, "train.sharding": "zero3", "processes": 2},
    "b=8, 2 processes (ZeRO-3)": {"train.batch_size": 8, "train.sharding": "zero3", "processes": 2},
}

RUNNER = r"""
import json, sys
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import torch
from torch.profiler import ProfilerActivity, profile
from distill.training import train
config = json.loads(sys.argv[1])
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    train(config)
    print("PEAK", torch.cuda.max_memory_allocated() - before, 0)
else:  # every CPU allocation and free the profiler saw, in time order: the peak of live tensor bytes
    before = rss("VmRSS:")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train(config)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    print("PEAK", peak, rss("VmHWM:") - before)  # per process: the caller takes the largest
"""


def base_config(out: Path, teacher: Path) -> dict:
    return {
        "teacher": {"model": str(teacher), "dtype": "bfloat16"},
        "student": {"config": dict(STUDENT_ARCH), "tokenizer": str(ASSETS / "tokenizer")},
        "data": {"train": str(ASSETS / "corpus" / "train.parquet"), "max_length": 512, "max_train_examples": 64},
        "loss": {"divergence": "forward_kl"},
        "train": {"output_dir": str(out), "max_steps": 2, "precision": "bf16", "tracker": "none", "progress": False,
                  "save_every": 0, "memory_gb": 0},
    }


def with_overrides(config: dict, overrides: dict) -> dict:
    config = json.loads(json.dumps(config))
    for key, value in overrides.items():
        if key == "processes":
            continue
        section, name = key.split(".")
        config[section][name] = value
    return config


def make_teacher(path: Path) -> None:
    if (path / "config.json").is_file():
        return
    from distill.models import student_from_config

    torch.manual_seed(0)
    model = student_from_config(dict(TEACHER_ARCH), vocab_size=8192, dtype=torch.bfloat16)
    model.save_pretrained(path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(ASSETS / "tokenizer").save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/plan-memory")
    parser.add_argument("--cases", nargs="*", default=None, help="run only these cases (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = out / "teacher"
    make_teacher(teacher)
    from distill.config import load_config
    from distill.plan import components, inputs_of

    runner = out / "runner.py"
    runner.write_text(RUNNER)
    rows = []
    for name, overrides in CASES.items():
        if args.cases and name not in args.cases:
            continue
        processes = overrides.get("processes", 1)
        config = with_overrides(base_config(out / "run", teacher), overrides)
        c = load_config(config)
        strategy = c.train.sharding if c.train.sharding in ("fsdp2", "zero3") else "ddp"
        plan = components(inputs_of(c), strategy=strategy, processes=processes,
                          checkpointing=c.train.gradient_checkpointing)
        subprocess.run(["rm", "-rf", str(out / "run")], check=True)
        tic = time.time()
        launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", "29533"] if processes > 1 else [sys.executable])
        done = subprocess.run(launch + [str(runner), json.dumps(config)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name}: the run failed:\n{done.stderr[-3000:]}")
        peaks = [[int(v) for v in line.split()[1:3]] for line in done.stdout.splitlines() if line.startswith("PEAK")]
        measured, resident = max(p[0] for p in peaks), max(p[1] for p in peaks)
        rows.append({"case": name, "plan_bytes": plan.total, "measured_bytes": measured, "rss_bytes": resident,
                     "ratio": plan.total / measured, "parts": plan.parts, "seconds": time.time() - tic})
        print(f"{name}: plan {plan.total / 2**20:,.0f} MiB, measured {measured / 2**20:,.0f} MiB "
              f"({plan.total / measured:.2f}x), resident {resident / 2**20:,.0f} MiB", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    meta = {"date": time.strftime("%Y-%m-%d"), "device": device, "torch": torch.__version__, "python": platform.python_version()}
    (out / "plan_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta}\n")
    print("| case | plan (MiB) | tensor peak (MiB) | plan ÷ peak | resident peak − imports (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['plan_bytes'] / 2**20:,.0f} | {r['measured_bytes'] / 2**20:,.0f} | {r['ratio']:.2f} "
              f"| {r['rss_bytes'] / 2**20:,.0f} |")


if __name__ == "__main__":
    main()
