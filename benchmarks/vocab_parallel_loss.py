"""The chunked loss with sharded LM heads: gather the heads once per micro-batch, or compute per shard?

Each of P gloo processes holds rows vocab_slice(V, rank, P) of the student's head (float32, the
FSDP2 master weights) and of the teacher's (bfloat16), and its own N tokens' last hidden states.

- "gather": what `distill train` does under FSDP2 / ZeRO-3: the student's head is all-gathered
  (FSDP2's root unit), the teacher's head is whole on every process (kept out of its sharding),
  ``chunked_kd_loss`` runs on the process's tokens, and the head's gradient is reduce-scattered.
- "per shard": ``vocab_parallel_kd_loss`` on the head slices: the hidden states are gathered
  instead, the normalizers all-reduced per chunk, the hidden states' gradient reduce-scattered.

Per process it prints the step time (median after a warm-up), the peak of live tensor bytes during
the step above what the process holds before it (the profiler's every allocation and free), the
bytes it holds of the two heads between steps, and the bytes moved per step: what it receives
by the gathers plus what it sends by the reduce-scatters, from their sizes (the per-shard loss's
all-reduces, a few floats per row and chunk, are left out). Both cases' losses and gradients are compared, so the table is of one objective.

    python benchmarks/vocab_parallel_loss.py [--processes 2] [--tokens 2048] [--vocab 128256] ...
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.losses import chunked_kd_loss  # noqa: E402
from distill.losses.vocab_parallel import vocab_parallel_kd_loss, vocab_slice  # noqa: E402

MiB = 2**20


def inputs(args, rank):
    g = torch.Generator().manual_seed(0)
    student_head = torch.randn(args.vocab, args.student_hidden, generator=g) / args.student_hidden**0.5  # (V, d_s)
    teacher_head = (torch.randn(args.vocab, args.teacher_hidden, generator=g) / args.teacher_hidden**0.5).bfloat16()
    g = torch.Generator().manual_seed(1 + rank)
    hidden = torch.randn(args.tokens, args.student_hidden, generator=g)  # (N, d_s)
    teacher_hidden = torch.randn(args.tokens, args.teacher_hidden, generator=g).bfloat16()  # (N, d_t)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g)  # (N,)
    return student_head, teacher_head, hidden, teacher_hidden, labels


def gather_step(args, world, shard, teacher_head, hidden, teacher_hidden, labels):
    """FSDP2's way: all-gather the head, the chunked loss on whole heads, reduce-scatter the head's gradient."""
    full = shard.new_empty((shard.shape[0] * world, shard.shape[1]))
    dist.all_gather_single(full, shard)
    full.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = chunked_kd_loss(hidden, full, labels, teacher_hidden=teacher_hidden, teacher_weight=teacher_head,
                                vocab_size=args.vocab, ce_weight=0.5, chunk_size=args.chunk_size)
    parts.loss.backward()
    grad = full.grad.new_empty(shard.shape)
    dist.reduce_scatter_single(grad, full.grad)
    return parts.loss.detach(), grad


def shard_step(args, shard, teacher_shard, hidden, teacher_hidden, labels):
    """The per-shard loss on the process's real rows of the head (the shard's padding dropped)."""
    rows = shard[: teacher_shard.shape[0]].detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = vocab_parallel_kd_loss(hidden, rows, labels, vocab_size=args.vocab, teacher_hidden=teacher_hidden,
                                       teacher_weight=teacher_shard, ce_weight=0.5,
                                       chunk_size=args.chunk_size * args.shard_chunk_factor)
    parts.loss.backward()
    return parts.loss.detach(), rows.grad


def measure(step, repeats):
    """(median seconds, peak live tensor bytes above the start, result of the last call)."""
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = step()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return statistics.median(times), peak, result


def worker(rank, args, store):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.processes))
    world = args.processes
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    student_head, teacher_head, hidden, teacher_hidden, labels = inputs(args, rank)
    per = -(-args.vocab // world)
    padded = torch.zeros(per * world, args.student_hidden)
    padded[: args.vocab] = student_head
    shard = padded[rank * per: (rank + 1) * per].clone()  # FSDP2's dim-0 shard (padded rows past V)
    rows = vocab_slice(args.vocab, rank, world)
    teacher_shard = teacher_head[rows].clone()
    hidden.requires_grad_()
    bytes_per = {"f32": 4, "bf16": 2}

    def gather():
        hidden.grad = None
        loss, grad = gather_step(args, world, shard, teacher_head, hidden, teacher_hidden, labels)
        return loss, grad, hidden.grad.clone()

    def per_shard():
        hidden.grad = None
        loss, grad = shard_step(args, shard, teacher_shard, hidden, teacher_hidden, labels)
        return loss, grad, hidden.grad.clone()

    results = {}
    for name, step, held in [
        ("gather", gather, shard.numel() * 4 + teacher_head.numel() * 2),
        ("per shard", per_shard, shard.numel() * 4 + teacher_shard.numel() * 2),
    ]:
        seconds, peak, result = measure(step, args.repeats)
        results[name] = (seconds, peak, held, result)
    others = world - 1
    moved = {  # bytes in + out of this process per step, from the collectives' sizes
        "gather": 2 * others * per * args.student_hidden * bytes_per["f32"],
        "per shard": others * args.tokens * (args.student_hidden * bytes_per["f32"] * 2
                                             + args.teacher_hidden * bytes_per["bf16"] + 8),
    }
    (loss_g, grad_g, hgrad_g), (loss_s, grad_s, hgrad_s) = results["gather"][3], results["per shard"][3]
    def relative(a, b):
        return float((a - b).abs().max() / b.abs().max())

    agree = (abs(float(loss_g - loss_s)) / abs(float(loss_g)), relative(grad_s, grad_g[: grad_s.shape[0]]),
             relative(hgrad_s, hgrad_g))
    rows_out = [(name, *results[name][:3], moved[name]) for name in results]
    gathered = [None] * world
    dist.all_gather_object(gathered, (rank, rows_out, agree, float(loss_g)))
    if rank == 0:
        report(args, gathered)
    dist.destroy_process_group()


def report(args, gathered):
    cpu = platform.processor() or "CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {args.processes} gloo processes, "
          f"{datetime.date.today().isoformat()}")
    print(f"V={args.vocab}, d_student={args.student_hidden}, d_teacher={args.teacher_hidden}, {args.tokens} tokens per "
          f"process, bf16 autocast, forward KL + 0.5 CE, chunk {args.chunk_size} rows (gather) / "
          f"{args.chunk_size * args.shard_chunk_factor} rows of all processes' tokens (per shard)")
    print("| case | process | s / step | peak during step (MiB) | heads held between steps (MiB) | moved per step (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for rank, rows, agree, loss in sorted(gathered):
        for name, seconds, peak, held, moved in rows:
            print(f"| {name} | {rank} | {seconds:.2f} | {peak / MiB:,.0f} | {held / MiB:,.0f} | {moved / MiB:,.0f} |")
    for rank, rows, agree, loss in sorted(gathered):
        print(f"process {rank}: loss {loss:.4f}; per shard vs gather: loss rel. diff {agree[0]:.1e}, "
              f"head grad max |diff| / max |grad| {agree[1]:.1e}, hidden grad {agree[2]:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per process per micro-batch")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--student-hidden", type=int, default=512)
    parser.add_argument("--teacher-hidden", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--shard-chunk-factor", type=int, default=None,
                        help="per-shard chunk = chunk-size × this (default: processes, the same logits per chunk)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.shard_chunk_factor is None:
        args.shard_chunk_factor = args.processes
    store = Path(f"/tmp/vocab-parallel-{os.getpid()}")
    try:
        mp.start_processes(worker, args=(args, str(store)), nprocs=args.processes, start_method="spawn")
    finally:
        store.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
