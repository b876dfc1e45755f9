"""Host memory of loading a sharded teacher: every process reading it, against process 0 alone.

    python benchmarks/fsdp_teacher_load.py --out runs/fsdp-teacher-load [--processes 2]

A random bf16 Llama teacher (~370M parameters, 24 layers, 1024 wide, V = 32,000, untied) is saved
once. Each case runs ``--processes`` processes under ``torch.distributed.run`` (gloo on CPU). Each
process loads the teacher as ``distill train`` does under FSDP2 and shards it with
``sharding.shard_teacher``:

- "every process reads": each process reads the whole checkpoint (``from_pretrained``), then shards;
- "process 0 reads" (what distill does): process 0 reads it, the others build its shape on the meta
  device (``sharding.first_loads``) and receive their shards by broadcast, one tensor at a time.

Recorded per process: the peak resident memory (VmHWM) above the resident memory before loading,
the resident memory after sharding, the parameter bytes it holds, and the seconds taken. Prints a
Markdown table and saves ``fsdp_teacher_load.json``.
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

RUNNER = r"""
import gc, json, sys, time
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from distill import models, sharding

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

folder, mode = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()

def load(weights):
    if weights:
        return models.freeze(models.check_finite(models.load_causal_lm(folder, dtype=torch.bfloat16), "teacher"))
    return models.freeze(models.empty_causal_lm(folder, dtype=torch.bfloat16))

dist.barrier()
gc.collect()
before, tic = status("VmRSS:"), time.perf_counter()
teacher = sharding.first_loads(load) if mode == "first" else load(True)
sharding.shard_teacher(teacher, init_device_mesh("cpu", (dist.get_world_size(),)))
gc.collect()
seconds = time.perf_counter() - tic
here, whole = sharding.local_bytes(teacher)
print("ROW", json.dumps({"rank": rank, "peak": status("VmHWM:") - before, "after": status("VmRSS:") - before,
                         "held": here, "whole": whole, "seconds": seconds}), flush=True)
dist.barrier()
dist.destroy_process_group()
"""

ARCH = dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048)


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/fsdp-teacher-load")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = out / "teacher"
    if not (teacher / "config.json").is_file():
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        arch = dict(ARCH)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch),
                                         dtype=torch.bfloat16).save_pretrained(teacher)
    (out / "runner.py").write_text(RUNNER)
    rows = []
    for name, mode in (("every process reads", "every"), ("process 0 reads", "first")):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
                               "--master_port", "29571", str(out / "runner.py"), str(teacher), mode],
                              capture_output=True, text=True, check=True)
        for line in proc.stdout.splitlines():
            if line.startswith("ROW "):
                rows.append({"case": name, **json.loads(line[4:])})
    rows.sort(key=lambda r: (r["case"] != "every process reads", r["rank"]))
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "python": platform.python_version(), "processes": args.processes}
    (out / "fsdp_teacher_load.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"teacher: {mib(rows[0]['whole'])} MiB of bf16 parameters; {args.processes} processes; {meta}")
    print("| case | process | peak resident above start (MiB) | resident after sharding (MiB) | parameters held (MiB) | s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['rank']} | {mib(r['peak'])} | {mib(r['after'])} | {mib(r['held'])} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
