"""The fused LM-head JSD loss side by side with Liger-Kernel's ``LigerFusedLinearJSDLoss``.

    python benchmarks/liger_jsd_loss.py                                  # CPU table in BENCHMARKS.md
    python benchmarks/liger_jsd_loss.py --device cuda --hidden 4096 --dtype bf16   # Liger's own shape

What runs: one forward + backward of the generalized JSD (β 0.5, τ 1) on logits made from hidden
states and LM heads, the head fused into the loss, with the student's gradients (input and head);
Liger's benchmark shape by default: N = B·T = 8192 rows, V = 128256, teacher hidden ``--hidden``
(Liger: 4096), student hidden half of it, no bias, inputs ``torch.rand`` and heads initialised as
``nn.Linear`` (as Liger's ``benchmark_distill_jsd_loss.py`` builds them), the loss
``hard_weight · CE + soft_weight · JSD`` averaged over the rows (Liger's benchmark: 0.5 / 0.5).

Contenders, each in a fresh subprocess (so one case's allocations cannot hide in another's peak):

- dense: both logits tensors in full (teacher under no_grad), distill's ``kd_loss``, autograd.
- distill C: ``distill.losses.chunked_kd_loss`` with ``chunk_size`` C (256 is distill's default);
  distill C-compiled: the same with ``compiled=True`` (each chunk's objective under ``torch.compile``).
- liger / liger-eager: ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (chunk 1024) with
  ``compiled=True`` (its default: the per-chunk function under ``torch.compile``) and
  ``compiled=False`` (what TRL's ``GKDTrainer(use_liger_kernel=True)`` asks for).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed passes, reported whole (Liger's
11.1 GB at its shape on an H100 is this figure) and above the inputs; on CPU the process's peak RSS
above what it held once the inputs were built. Time: the median of ``--repeats`` passes after
``--warmup`` (compilation happens there), synchronised on CUDA. Agreement: every contender's loss
and gradient norms against the dense case (or the first contender run) at the benchmark shape, and,
before the table, a float64
check at a small shape (full gradients, every contender against a float64 autograd reference), so
both libraries are shown to compute the same function before they are timed.
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
from pathlib import Path

import torch

from host import cpu_name, peak_rss_bytes, rss_bytes  # benchmarks/host.py (the script's folder is on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.reference
from tests.reference import ref_jsd  # noqa: E402

CONTENDERS = ["dense", "distill-256", "distill-1024", "distill-256-compiled", "distill-1024-compiled", "liger",
              "liger-eager"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(n: int, vocab: int, hidden: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Liger's benchmark inputs: rand hidden states, nn.Linear-initialised heads, random labels (drawn on
    ``device``: the same seed gives other numbers on a GPU than on the CPU)."""
    g = torch.Generator(device).manual_seed(seed)
    student_hidden, teacher_hidden = hidden // 2, hidden

    def linear_weight(fan_in: int) -> torch.Tensor:  # nn.Linear's init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        return (torch.rand(vocab, fan_in, generator=g, device=device) * 2 - 1) * fan_in**-0.5

    return dict(
        student_input=torch.rand(n, student_hidden, generator=g, device=device).to(dtype).requires_grad_(),
        student_weight=linear_weight(student_hidden).to(dtype).requires_grad_(),
        teacher_input=torch.rand(n, teacher_hidden, generator=g, device=device).to(dtype),
        teacher_weight=linear_weight(teacher_hidden).to(dtype),
        labels=torch.randint(0, vocab, (n,), generator=g, device=device),
    )


def loss_fn(method: str, hard: float, soft: float):
    """The contender as ``f(inputs) -> mean loss`` (a scalar carrying the student's gradients)."""
    if method == "dense":
        from distill.losses import kd_loss

        def dense(x):
            with torch.no_grad():
                teacher_logits = x["teacher_input"] @ x["teacher_weight"].T  # (N, V)
            student_logits = x["student_input"] @ x["student_weight"].T  # (N, V)
            parts = kd_loss(student_logits, teacher_logits, x["labels"], divergence="jsd", beta=0.5,
                            kd_weight=soft, ce_weight=hard)
            return parts.loss / parts.num_supervised

        return dense
    if method.startswith("distill-"):
        from distill.losses import chunked_kd_loss

        chunk, compiled = int(method.split("-")[1]), method.endswith("-compiled")

        def chunked(x):
            parts = chunked_kd_loss(x["student_input"], x["student_weight"], x["labels"],
                                    teacher_hidden=x["teacher_input"], teacher_weight=x["teacher_weight"],
                                    divergence="jsd", beta=0.5, kd_weight=soft, ce_weight=hard, chunk_size=chunk,
                                    compiled=compiled)
            return parts.loss / parts.num_supervised

        return chunked
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    liger = LigerFusedLinearJSDLoss(weight_hard_loss=hard, weight_soft_loss=soft, beta=0.5, temperature=1.0,
                                    compiled=method == "liger", chunk_size=1024)
    return lambda x: liger(x["student_input"], x["student_weight"], x["teacher_input"], x["teacher_weight"],
                           x["labels"])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def child(args) -> dict:
    """One contender in this process: warm-up, timed passes, peak memory, the result's fingerprint."""
    device, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(0)
    x = make_inputs(args.n, args.vocab, args.hidden, dtype, device)
    fn = loss_fn(args.method, args.hard_weight, args.soft_weight)

    def step() -> torch.Tensor:
        x["student_input"].grad = x["student_weight"].grad = None
        loss = fn(x)
        loss.backward()
        return loss.detach()

    sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    for _ in range(args.warmup):
        loss = step()
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes()  # VmHWM: ru_maxrss would carry the parent's RSS over (host.py)
    return dict(method=args.method, median_s=statistics.median(times), times_s=times, peak=peak,
                peak_above_inputs=peak - base, loss=loss.item(),
                grad_input_norm=x["student_input"].grad.float().norm().item(),
                grad_weight_norm=x["student_weight"].grad.float().norm().item())


def exactness(hard: float, soft: float, contenders: list[str]) -> dict:
    """Every contender against float64 autograd at a small shape, on the CPU (values and full gradients)."""
    import torch.nn.functional as F

    x = make_inputs(300, 1000, 64, torch.float64, "cpu", seed=1)
    ref_in = {k: (v.detach().clone().requires_grad_() if v.requires_grad else v) for k, v in x.items()}
    s = ref_in["student_input"] @ ref_in["student_weight"].T
    t = ref_in["teacher_input"] @ ref_in["teacher_weight"].T
    jsd = ref_jsd(s, t, beta=0.5)  # (N,): the tests' float64 reference, straight from LOSSES.md
    ref = soft * jsd.mean() + hard * F.cross_entropy(s, ref_in["labels"])
    ref.backward()
    out = {}
    for method in contenders:
        try:
            fn = loss_fn(method, hard, soft)
        except ImportError as e:
            out[method] = f"not installed ({e.name})"
            continue
        y = {k: (v.detach().clone().requires_grad_() if v.requires_grad else v) for k, v in x.items()}
        loss = fn(y)
        loss.backward()

        def rel(a, b):
            return ((a - b).norm() / b.norm()).item()

        out[method] = dict(loss=rel(loss.detach(), ref.detach()),
                           grad_input=rel(y["student_input"].grad, ref_in["student_input"].grad),
                           grad_weight=rel(y["student_weight"].grad, ref_in["student_weight"].grad))
    return out


def machine(device: str) -> str:
    cpu = cpu_name()
    versions = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    try:
        from importlib.metadata import version

        versions += f", liger-kernel {version('liger-kernel')}"
    except Exception:  # noqa: BLE001 - not installed: the liger rows say so
        versions += ", liger-kernel not installed"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; {versions}; {datetime.date.today().isoformat()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int, default=8192, help="rows (B·T)")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=1024, help="teacher hidden size; the student's is half (Liger: 4096)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="inputs and heads (Liger: bf16)")
    p.add_argument("--hard-weight", type=float, default=0.5, help="CE weight (Liger's benchmark 0.5; TRL's GKD 0)")
    p.add_argument("--soft-weight", type=float, default=0.5, help="JSD weight (Liger's benchmark 0.5; TRL's GKD 1)")
    p.add_argument("--only", nargs="+", default=CONTENDERS, choices=CONTENDERS)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None, help="also write every result to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.method = args.child
        print(json.dumps(child(args)))
        return

    print(machine(args.device))
    print(f"command: python benchmarks/liger_jsd_loss.py {' '.join(sys.argv[1:])}".rstrip(), flush=True)
    check = exactness(args.hard_weight, args.soft_weight, args.only)
    print("float64 check (N=300, V=1000, hidden 64/32), relative error vs float64 autograd:")
    for method, r in check.items():
        print(f"  {method:12s} " + (r if isinstance(r, str) else
                                   f"loss {r['loss']:.1e}  grad input {r['grad_input']:.1e}  "
                                   f"grad head {r['grad_weight']:.1e}"), flush=True)

    results = {}
    for method in args.only:
        if isinstance(check.get(method), str):
            continue  # not installed
        cmd = [sys.executable, __file__, "--child", method, "--device", args.device, "--n", str(args.n),
               "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--dtype", args.dtype,
               "--hard-weight", str(args.hard_weight), "--soft-weight", str(args.soft_weight),
               "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            results[method] = dict(error=tail)
            print(f"  {method}: failed: {tail}", flush=True)
            continue
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[method]  # printed as it comes: a run cut short by a time limit keeps what it measured
        print(f"  {method}: {r['median_s']:.3f} s, peak {r['peak'] / 2**20:,.0f} MiB ({r['peak_above_inputs'] / 2**20:,.0f} "
              f"above inputs), loss {r['loss']:.5f} [{time.time() - start:.0f}s with start-up]", flush=True)

    flops = 2 * args.n * args.vocab * (args.hidden + args.hidden // 2) + 4 * args.n * args.vocab * (args.hidden // 2)
    print()
    print(f"N={args.n}, V={args.vocab}, hidden {args.hidden} (teacher) / {args.hidden // 2} (student), {args.dtype}, "
          f"{args.device}; loss = {args.hard_weight}·CE + {args.soft_weight}·JSD(β=0.5); median of {args.repeats} "
          f"after {args.warmup} warm-up; matmul work {flops / 1e12:.1f} TFLOP per pass")
    # agreement against the dense path, or the first contender when dense is not run (its logits need 2·4·N·V
    # bytes and the loss's temporaries several times that: ~25 GB at N=8192, V=128256)
    ref_name = "dense" if "dense" in results else next(iter(results), "")
    print(f"| contender | time (ms) | vs liger | TFLOP/s | peak (MiB) | peak above inputs (MiB) | vs liger | "
          f"loss | loss, ‖grad input‖, ‖grad head‖ vs {ref_name} (rel.) |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|---|")
    dense, liger = results.get(ref_name, {}), results.get("liger", {})
    for method, r in results.items():
        if "error" in r:
            print(f"| {method} | failed: {r['error']} | | | | | | | |")
            continue
        vs_t = f"{r['median_s'] / liger['median_s']:.2f}×" if "median_s" in liger else "–"
        vs_m = f"{r['peak_above_inputs'] / liger['peak_above_inputs']:.2f}×" if "peak" in liger else "–"
        if "loss" in dense:
            agree = (f"{abs(r['loss'] - dense['loss']) / abs(dense['loss']):.1e}, "
                     f"{abs(r['grad_input_norm'] - dense['grad_input_norm']) / dense['grad_input_norm']:.1e}, "
                     f"{abs(r['grad_weight_norm'] - dense['grad_weight_norm']) / dense['grad_weight_norm']:.1e}")
        else:
            agree = "–"
        print(f"| {method} | {r['median_s'] * 1e3:,.0f} | {vs_t} | {flops / r['median_s'] / 1e12:.2f} | "
              f"{r['peak'] / 2**20:,.0f} | {r['peak_above_inputs'] / 2**20:,.0f} | {vs_m} | {r['loss']:.5f} | {agree} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine(args.device), args=vars(args), exactness=check, results=results), f, indent=1)


if __name__ == "__main__":
    main()
