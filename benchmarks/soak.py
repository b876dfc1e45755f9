"""Long runs hold: 2,000 steps of `distill train` with eval and checkpoints every 100 steps.

Runs the real CLI in a child process on a tiny toy teacher and student (distill.toy) and, from the
parent, samples the child's resident memory (VmRSS) and the checkpoint folder every few milliseconds:

- RSS is recorded each time metrics.jsonl reports a step that is a multiple of 50;
- the claim: RSS after step 500 grows by no more than 5% to the end of the run (no leak);
- the checkpoint folder never holds more than ``keep_checkpoints`` step-* folders, and after every
  save it holds exactly ``min(saves, keep_checkpoints)``; no temporary or trashed folder is left.

    python benchmarks/soak.py                 # prints a table, exits 1 if a claim fails
    python benchmarks/soak.py --steps 400     # a shorter smoke run

Record the printed table and machine line in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.toy import llama_config, make_llama, make_tokenizer, write_text  # noqa: E402


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100, help="eval and checkpoint interval (100)")
    parser.add_argument("--sample-every", type=int, default=50, help="RSS recorded every this many steps (50)")
    parser.add_argument("--keep", type=int, default=2, help="train.keep_checkpoints (2)")
    parser.add_argument("--warm", type=int, default=500, help="RSS growth is measured from this step (500)")
    parser.add_argument("--max-growth", type=float, default=0.05)
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    root = Path(args.out or tempfile.mkdtemp(prefix="distill-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(root / "tok")
    make_llama(root / "teacher", vocab_size=len(tok), layers=2, hidden=48, seed=1)
    tok.save_pretrained(root / "teacher")
    write_text(root / "train.jsonl", 2000, seed=0)
    write_text(root / "eval.jsonl", 100, seed=1)
    run = root / "run"
    config = {
        "teacher": {"model": str(root / "teacher")},
        "student": {"config": llama_config(vocab_size=len(tok), layers=1, hidden=32)},
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_length": 32},
        "loss": {"divergence": "forward_kl"},
        "train": {"max_steps": args.steps, "batch_size": 8, "lr": 3e-3, "eval_every": args.every,
                  "save_every": args.every, "keep_checkpoints": args.keep, "log_every": args.sample_every,
                  "progress": False, "tracker": "tensorboard", "output_dir": str(run)},
    }
    (root / "soak.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "DISTILL_CACHE": str(root / "cache"), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "distill", "train", str(root / "soak.yaml")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    rss: dict[int, float] = {}
    most_checkpoints, after_save, seen_lines, samples = 0, {}, 0, 0
    metrics, ckpt_dir = run / "metrics.jsonl", run / "checkpoints"
    while child.poll() is None:
        samples += 1
        if ckpt_dir.is_dir():
            names = [p.name for p in ckpt_dir.iterdir() if p.name.startswith("step-")]
            most_checkpoints = max(most_checkpoints, len(names))
            newest = max((int(n.split("-")[1]) for n in names), default=0)
            if newest and newest not in after_save and (ckpt_dir / f"step-{newest:08d}" / "trainer_state.json").exists():
                after_save[newest] = len(names)
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            for line in lines[seen_lines:]:
                try:
                    step = json.loads(line)["step"]
                except (json.JSONDecodeError, KeyError):
                    break  # a line being written: read it next time
                if step % args.sample_every == 0 and step not in rss:
                    value = rss_mb(child.pid)
                    if value is not None:
                        rss[step] = value
                seen_lines += 1
        time.sleep(0.005)
    output = child.stdout.read()
    wall = time.perf_counter() - start
    if child.returncode != 0:
        print(output[-3000:])
        print(f"soak: the training run failed with exit code {child.returncode}")
        return 1

    steps = sorted(rss)
    warm = [s for s in steps if s >= args.warm]
    base = rss[warm[0]] if warm else float("nan")
    peak = max(rss[s] for s in warm) if warm else float("nan")
    growth = peak / base - 1
    expected = {s: min(i + 1, args.keep) for i, s in enumerate(range(args.every, args.steps + 1, args.every))}
    counts_ok = all(after_save.get(s, expected[s]) == expected[s] for s in expected) and most_checkpoints <= args.keep
    leftovers = [p.name for p in run.rglob(".t*") if p.name.startswith((".tmp", ".trash"))]
    final = sorted(p.name for p in ckpt_dir.iterdir())

    import torch
    import transformers
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores; python "
          f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{datetime.date.today()}")
    print(f"{args.steps} steps, eval + checkpoint every {args.every}, keep_checkpoints {args.keep}: {wall:.0f} s wall")
    print(f"\n{'step':>6} {'RSS (MB)':>9}")
    for s in steps:
        if s % (args.sample_every * 5) == 0 or s == steps[0]:
            print(f"{s:>6} {rss[s]:>9.1f}")
    print(f"\nRSS at step {warm[0] if warm else '-'}: {base:.1f} MB; highest after it: {peak:.1f} MB "
          f"({growth:+.2%}; limit +{args.max_growth:.0%})")
    print(f"checkpoint folders: at most {most_checkpoints} seen in {samples} samples (limit {args.keep}); after each "
          f"save {'as expected' if counts_ok else 'WRONG: ' + str(after_save)}; at the end {final}; "
          f"leftovers {leftovers or 'none'}")
    ok = growth <= args.max_growth and counts_ok and not leftovers
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
