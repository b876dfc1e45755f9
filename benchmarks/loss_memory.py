"""Dense vs chunked distillation loss: peak memory above the inputs and time, forward + backward.

    python benchmarks/loss_memory.py                      # the table in BENCHMARKS.md
    python benchmarks/loss_memory.py --sizes 1024x32000 --chunk-sizes 256 1024 --dtypes float32

Each measurement runs in a fresh subprocess, so one case's allocations cannot hide in another's
peak. The child builds the inputs (student hidden (N, d) and head (V, d), both requiring grad;
teacher hidden (N, d) and head (V, d); labels (N,)), records its resident set size, runs one
forward + backward, and reports its VmHWM (the process's peak RSS; benchmarks/host.py) minus that: the
peak memory above the inputs, everything included (logits, loss temporaries, gradients, the
allocator's and oneDNN's scratch). It then times `--repeats` further forward + backward passes
and reports the median.

dense:   logits = h @ W.T for both models (teacher under no_grad), kd_loss, backward.
chunked: chunked_kd_loss on the hidden states and heads, backward.
Both use forward_kl, τ = 1, kd_weight 1, ce_weight 0 (CE is still computed, for logging).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import psutil
import torch

from distill.losses import chunked_kd_loss, kd_loss
from host import cpu_name, peak_rss_bytes  # benchmarks/host.py (the script's folder is on sys.path)


def make_inputs(n: int, vocab: int, hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = hidden**-0.5
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[: n // 16] = -100  # a prompt that is not supervised
    return dict(
        student_hidden=torch.randn(n, hidden, generator=g).requires_grad_(),
        student_weight=(scale * torch.randn(vocab, hidden, generator=g)).requires_grad_(),
        teacher_hidden=torch.randn(n, hidden, generator=g),
        teacher_weight=scale * torch.randn(vocab, hidden, generator=g),
        labels=labels,
    )


def dense_step(x: dict[str, torch.Tensor], autocast_dtype: torch.dtype | None) -> float:
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        with torch.no_grad():
            teacher_logits = x["teacher_hidden"] @ x["teacher_weight"].T  # (N, V)
        student_logits = x["student_hidden"] @ x["student_weight"].T  # (N, V)
        parts = kd_loss(student_logits, teacher_logits, x["labels"])
    parts.loss.backward()
    return parts.loss.item()


def chunked_step(x: dict[str, torch.Tensor], autocast_dtype: torch.dtype | None, chunk_size: int) -> float:
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        parts = chunked_kd_loss(
            x["student_hidden"],
            x["student_weight"],
            x["labels"],
            teacher_hidden=x["teacher_hidden"],
            teacher_weight=x["teacher_weight"],
            chunk_size=chunk_size,
        )
    parts.loss.backward()
    return parts.loss.item()


def child(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    x = make_inputs(args.n, args.vocab, args.hidden)
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16-autocast" else None

    def step() -> float:
        for key in ("student_hidden", "student_weight"):
            x[key].grad = None
        if args.method == "dense":
            return dense_step(x, autocast_dtype)
        return chunked_step(x, autocast_dtype, args.chunk_size)

    rss_inputs = psutil.Process().memory_info().rss
    start = time.perf_counter()
    loss = step()
    first = time.perf_counter() - start
    peak = peak_rss_bytes()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps(dict(peak_above_inputs=peak - rss_inputs, first_s=first,
                          median_s=statistics.median(times) if times else first, loss=loss)))


def run_case(n, vocab, hidden, method, dtype, chunk_size, repeats) -> dict:
    command = [sys.executable, __file__, "--child", "--n", str(n), "--vocab", str(vocab), "--hidden", str(hidden),
               "--method", method, "--dtype", dtype, "--chunk-size", str(chunk_size), "--repeats", str(repeats)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        return dict(error=(out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = cpu_name()
    return (f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), no GPU, "
            f"{datetime.date.today().isoformat()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1024x32000", "1024x128256", "4096x32000", "4096x128256"],
                        help="NxV cases")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk-sizes", nargs="+", type=int, default=[1024])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bf16-autocast"],
                        choices=["float32", "bf16-autocast"])
    parser.add_argument("--repeats", type=int, default=2, help="timed passes after the measured first one")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--method", choices=["dense", "chunked"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--chunk-size", type=int, default=1024)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    print(machine())
    print(f"command: python benchmarks/loss_memory.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    print("| N | V | dtype | method | peak above inputs (MiB) | vs dense | time (s) | vs dense | loss rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        n, vocab = (int(v) for v in size.split("x"))
        for dtype in args.dtypes:
            dense = run_case(n, vocab, args.hidden, "dense", dtype, 0, args.repeats)
            rows = [("dense", dense)]
            rows += [(f"chunked ({c})", run_case(n, vocab, args.hidden, "chunked", dtype, c, args.repeats))
                     for c in args.chunk_sizes]
            for method, r in rows:
                if "error" in r:
                    print(f"| {n} | {vocab} | {dtype} | {method} | failed: {r['error']} | | | | |", flush=True)
                    continue
                mib = r["peak_above_inputs"] / 2**20
                ratio = lambda key: f"{r[key] / dense[key]:.2f}×" if "error" not in dense else "n/a"  # noqa: E731
                diff = abs(r["loss"] - dense["loss"]) / abs(dense["loss"]) if "error" not in dense else float("nan")
                print(f"| {n} | {vocab} | {dtype} | {method} | {mib:,.0f} | {ratio('peak_above_inputs')} | "
                      f"{r['median_s']:.2f} | {ratio('median_s')} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
