"""DDP against FSDP2 and ZeRO-3 in `distill train`: step time and the parameter bytes each process holds.

    python benchmarks/fsdp_step.py --out runs/fsdp-step [--steps 8] [--cases NAME ...]

The models and data are plan_memory.py's: a 43.8M-parameter student built from a config, a random
56.6M-parameter bf16 teacher (tied embeddings), 512-token packed rows of the bundled corpus, bf16
autocast, AdamW, the chunked loss. Each case is a real `distill train` run with the same global
batch (8 rows per optimizer step); the 2-process cases run under `torch.distributed.run` (gloo on
CPU, NCCL on GPU). Step time is the median of the logged per-step wall time after the first two
steps (log_every 1). The held bytes are those FSDP2 / ZeRO-3 print at start (every process holds
whole models under DDP). The ZeRO-3 case needs deepspeed (``pip install -e '.[deepspeed]'``) and runs
with DeepSpeed's default settings (parameters under 1e5 elements, the norms, stay whole). Prints a Markdown table and saves ``fsdp_step.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan_memory import base_config, make_teacher  # noqa: E402

CASES = {  # name -> (processes, overrides)
    "1 process, b=8": (1, {"train.batch_size": 8}),
    "2 processes DDP, b=4 each": (2, {"train.batch_size": 4, "train.sharding": "ddp"}),
    "2 processes FSDP2, b=4 each": (2, {"train.batch_size": 4, "train.sharding": "fsdp2"}),
    "2 processes FSDP2 + checkpointing, b=4 each": (2, {"train.batch_size": 4, "train.sharding": "fsdp2",
                                                       "train.gradient_checkpointing": True}),
    "2 processes ZeRO-3, b=4 each": (2, {"train.batch_size": 4, "train.sharding": "zero3"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/fsdp-step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cases", nargs="*", default=None, help="run only these cases (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = out / "teacher"
    make_teacher(teacher)
    rows = []
    for name, (processes, overrides) in CASES.items():
        if args.cases and name not in args.cases:
            continue
        config = base_config(out / "run", teacher)
        config["train"].update(max_steps=args.steps, log_every=1, save_every=0, memory_gb=0)
        config["data"]["max_train_examples"] = 8 * args.steps
        for key, value in overrides.items():
            section, field = key.split(".")
            config[section][field] = value
        path = out / "config.json"
        path.write_text(json.dumps(config))
        subprocess.run(["rm", "-rf", str(out / "run")], check=True)
        launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", "29547"] if processes > 1 else [sys.executable])
        done = subprocess.run(launch + ["-m", "distill", "train", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name}: the run failed:\n{done.stderr[-3000:]}")
        logs = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        steps = [m["time/wall_s"] for m in logs if "loss" in m][2:]
        held = re.search(r"student ([\d,]+) of ([\d,]+); teacher ([\d,]+) of ([\d,]+)", done.stdout)
        numbers = [int(v.replace(",", "")) for v in held.groups()] if held else None
        row = {"case": name, "processes": processes, "step_s": statistics.median(steps),
               "tokens_per_s": 8 * 512 / statistics.median(steps),
               "student_held": numbers[0] if numbers else None, "student_whole": numbers[1] if numbers else None,
               "teacher_held": numbers[2] if numbers else None, "teacher_whole": numbers[3] if numbers else None,
               "final_loss": [m["loss"] for m in logs if "loss" in m][-1]}
        rows.append(row)
        print(f"{name}: {row['step_s']:.2f} s/step", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    meta = {"date": time.strftime("%Y-%m-%d"), "device": device, "torch": torch.__version__,
            "python": platform.python_version()}
    (out / "fsdp_step.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta}\n")
    print("| case | s / step | tokens / s | student params held (MiB) | teacher params held (MiB) | loss at the end |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        mib = (lambda k: f"{r[k] / 2**20:,.1f}") if r["student_held"] is not None else None
        s_held = f"{mib('student_held')} of {mib('student_whole')}" if mib else "all"
        t_held = f"{mib('teacher_held')} of {mib('teacher_whole')}" if mib else "all"
        print(f"| {r['case']} | {r['step_s']:.2f} | {r['tokens_per_s']:,.0f} | {s_held} | {t_held} "
              f"| {r['final_loss']:.4f} |")


if __name__ == "__main__":
    main()
