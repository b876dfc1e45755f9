"""On-policy vs off-policy distillation on the quickstart task, and on-policy throughput.

    python benchmarks/onpolicy.py grid  --out runs/onpolicy            # 5 objectives, seed 0
    python benchmarks/onpolicy.py seeds --out runs/onpolicy --settings off_fkl,on_rkl --seeds 0 1 2
    python benchmarks/onpolicy.py throughput --out runs/onpolicy      # distill's lambda=1 step, tokens/s

The task: write the body of a Python function given its signature and docstring (prompts cut from
the bundled CPython corpus by ``benchmarks/onpolicy_data.py``; ``train_pc.jsonl`` holds the real
bodies for the off-policy runs). Every run starts from one **base student**: the quickstart student
(``distill.quickstart.STUDENT_ARCH``) distilled off-policy with forward KL on the corpus text for
``--base-steps`` steps, as `distill quickstart` does; it is trained once. Each setting then trains
that base student for ``--steps`` optimizer steps (batch 8, the same LR schedule, data order and
seed), differing only in the objective and in who writes the completions:

- ``off_fkl``: forward KL on the data's completions (today's default);
- ``off_rkl``: reverse KL on the data's completions;
- ``on_rkl``: reverse KL on the student's own samples (lambda = 1);
- ``gkd``: JSD(beta 0.5), half the steps on the student's samples (lambda = 0.5);
- ``sampled``: the sampled-token objective (policy gradient with the per-token reverse-KL
  estimate as the advantage, lambda = 1).

Sampling in training and evaluation: temperature 1, no top-k / top-p, ``--max-new-tokens`` (64).
Evaluation is ``distill.evaluate.evaluate_models`` on the corpus eval split (held out from every
run): teacher NLL of each student's own generations (per token, on ``--prompts`` function prompts
of the eval split), valid-Python rate, distinct-2, perplexity and top-1 agreement with the teacher
(teacher-forced, on packed text). Runs that finished are skipped when a command is repeated.

The throughput command times `distill train` with lambda = 1 (JSD 0.5, AdamW lr 1e-4, batch 8, a
freshly initialised student, prompt-only data, bf16 autocast), the settings of
``benchmarks/trl_gkd_throughput.py`` for TRL's GKDTrainer: tokens/s = (generated + trained tokens) /
wall seconds of the steps after the first two.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onpolicy_data import write as write_data  # noqa: E402

from distill.quickstart import (CORPUS, DISTILL_LOSS, STEPS_PER_5_MINUTES, STUDENT_ARCH, TEACHER,  # noqa: E402
                                student_config, train_student)

SETTINGS = {
    "off_fkl": dict(loss={"divergence": "forward_kl"}, generation={}),
    "off_rkl": dict(loss={"divergence": "reverse_kl"}, generation={}),
    "on_rkl": dict(loss={"divergence": "reverse_kl"}, generation={"lmbda": 1.0}),
    "gkd": dict(loss={"divergence": "jsd", "beta": 0.5}, generation={"lmbda": 0.5}),
    "sampled": dict(loss={"divergence": "sampled_reverse_kl"}, generation={"lmbda": 1.0}),
}
KEYS = ("teacher_nll", "valid_python", "distinct_2", "completion_tokens", "perplexity", "top1_agreement")


def data_dir(out: Path) -> Path:
    d = out / "data"
    if not (d / "train_pc.jsonl").is_file():
        for split in ("train", "eval"):
            print(write_data(d, split=split, max_prompt_tokens=96, max_completion_tokens=160), flush=True)
    return d


def base_student(out: Path, steps: int) -> Path:
    """The quickstart's distilled student (forward KL on the corpus text), trained once."""
    done = out / "base" / "student" / "model.safetensors"
    if not done.is_file():
        print(f"== base student: {steps} steps of off-policy forward KL on the corpus text", flush=True)
        train_student(student_config(out, name="base", steps=steps, seed=0, loss=DISTILL_LOSS, max_eval_examples=8))
    return out / "base" / "student"


def setting_config(out: Path, name: str, seed: int, *, steps: int, max_new_tokens: int, base: Path) -> dict:
    s = SETTINGS[name]
    d = data_dir(out)
    return {
        "teacher": {"model": str(TEACHER)},
        "student": {"model": str(base)},
        "data": {"train": str(d / "train_pc.jsonl"), "format": "prompt_completion", "max_length": 256},
        "loss": {"temperature": 1.0, "kd_weight": 1.0, "ce_weight": 0.0, **s["loss"]},
        "generation": {"max_new_tokens": max_new_tokens, "temperature": 1.0, "log_samples": 2, **s["generation"]},
        "train": {"output_dir": str(out / f"{name}-s{seed}"), "max_steps": steps, "batch_size": 8, "lr": 1e-3,
                  "warmup_steps": max(1, steps // 20), "schedule": "cosine", "min_lr_ratio": 0.1,
                  "weight_decay": 0.1, "adam_betas": [0.9, 0.95], "precision": "bf16", "seed": seed,
                  "log_every": max(1, steps // 20), "save_every": steps, "eval_every": 0},
    }


def run_settings(out: Path, names: list[str], seeds: list[int], args) -> dict:
    base = base_student(out, args.base_steps)
    walls = {}
    for seed in seeds:
        for name in names:
            run = out / f"{name}-s{seed}"
            wall_file = run / "wall_s.json"
            if not (run / "student" / "model.safetensors").is_file():
                print(f"== {name}, seed {seed}: {args.steps} steps", flush=True)
                result = train_student(setting_config(out, name, seed, steps=args.steps,
                                                      max_new_tokens=args.max_new_tokens, base=base))
                wall_file.write_text(json.dumps({"wall_s": result["wall_s"]}))
            walls[(name, seed)] = json.loads(wall_file.read_text())["wall_s"] if wall_file.is_file() else None
    return walls


def evaluate_seed(out: Path, names: list[str], seed: int, args) -> dict:
    """All settings of one seed (and the base student) evaluated together, sampling with that seed."""
    from distill.evaluate import evaluate_models

    path = out / f"eval-s{seed}-{'+'.join(names)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    models = {"base": str(out / "base" / "student"), **{n: str(out / f"{n}-s{seed}" / "student") for n in names}}
    result = evaluate_models(models, str(CORPUS / "eval.parquet"), teacher=str(TEACHER), max_length=256,
                             max_examples=args.eval_docs, num_prompts=args.prompts,
                             max_new_tokens=args.max_new_tokens, seed=seed, speed=False)
    path.write_text(json.dumps(result, indent=1))
    return result


def fmt(x, digits=3):
    return "—" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def table(results: dict[int, dict], names: list[str], walls: dict) -> str:
    lines = ["| setting | seed | " + " | ".join(KEYS) + " | train wall s |", "|" + "---|" * (len(KEYS) + 3)]
    for seed, result in results.items():
        for name in ["teacher", "base", *names]:
            m = result["models"][name]
            lines.append(f"| {name} | {seed} | " + " | ".join(fmt(m.get(k)) for k in KEYS)
                         + f" | {fmt(walls.get((name, seed)), 0)} |")
    return "\n".join(lines)


def paired(results: dict[int, dict], a: str, b: str) -> str:
    """Per-seed differences b - a of every metric, their mean and a t interval."""
    lines = [f"paired differences {b} - {a} over seeds {sorted(results)}:"]
    for key in KEYS:
        diffs = [r["models"][b][key] - r["models"][a][key] for r in results.values()
                 if r["models"][b].get(key) is not None and r["models"][a].get(key) is not None]
        if len(diffs) < 2:
            continue
        mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
        t = {2: 12.71, 3: 4.303, 4: 3.182, 5: 2.776}.get(len(diffs), 2.0)
        half = t * sd / math.sqrt(len(diffs))
        lines.append(f"  {key}: " + ", ".join(f"{d:+.4f}" for d in diffs)
                     + f"; mean {mean:+.4f}, 95% CI [{mean - half:+.4f}, {mean + half:+.4f}]")
    return "\n".join(lines)


def throughput(out: Path, args) -> dict:
    import yaml

    from distill.training import train

    d = data_dir(out)
    run = out / f"throughput-{args.precision}"
    config = {
        "teacher": {"model": str(TEACHER)},
        "student": {"config": dict(STUDENT_ARCH), "tokenizer": str(TEACHER)},
        "data": {"train": str(d / "train_prompts.jsonl"), "format": "prompt", "max_length": 256},
        "loss": {"divergence": "jsd", "beta": 0.5, "temperature": 1.0, "kd_weight": 1.0, "ce_weight": 0.0},
        "generation": {"lmbda": 1.0, "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "log_samples": 0},
        "train": {"output_dir": str(run), "max_steps": args.throughput_steps, "batch_size": 8, "lr": 1e-4,
                  "schedule": "constant", "warmup_steps": 0, "precision": args.precision, "seed": 0,
                  "log_every": 1, "save_every": 0, "eval_every": 0, "progress": False},
    }
    if run.exists():  # a fresh run every time: a finished one would be resumed, not re-timed
        import shutil
        shutil.rmtree(run)
    path = out / f"throughput-{args.precision}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    train(path)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r][2:]  # the first two steps warm up
    wall = sum(r["time/wall_s"] for r in rows)
    generated = sum(r["generated_tokens"] for r in rows)
    trained = sum(r["supervised_tokens"] for r in rows)
    result = {"steps_timed": len(rows), "generated_tokens": generated, "trained_tokens": trained,
              "wall_s": round(wall, 3), "tokens_per_s": round((generated + trained) / wall, 1),
              "generated_tokens_per_s": round(generated / sum(r["time/generation_s"] for r in rows), 1),
              "split_s": {k: round(sum(r[f"time/{k}_s"] for r in rows), 3) for k in ("generation", "teacher", "student")},
              "precision": args.precision, "max_new_tokens": args.max_new_tokens}
    print(json.dumps(result), flush=True)
    return result


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["grid", "seeds", "throughput"])
    p.add_argument("--out", type=Path, default=Path("runs/onpolicy"))
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--base-steps", type=int, default=STEPS_PER_5_MINUTES)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=64, help="eval prompts (function signatures + docstrings)")
    p.add_argument("--eval-docs", type=int, default=8, help="eval documents for perplexity and agreement")
    p.add_argument("--throughput-steps", type=int, default=20)
    p.add_argument("--precision", default="bf16")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(machine(), flush=True)
    if args.what == "throughput":
        throughput(args.out, args)
        return
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = set(names) - set(SETTINGS)
    if unknown:
        p.error(f"unknown settings {sorted(unknown)}: use {', '.join(SETTINGS)}")
    seeds = [0] if args.what == "grid" else args.seeds
    walls = run_settings(args.out, names, seeds, args)
    results = {seed: evaluate_seed(args.out, names, seed, args) for seed in seeds}
    text = table(results, names, walls)
    if args.what == "seeds" and len(names) == 2:
        text += "\n\n" + paired(results, names[0], names[1])
    print(text)
    (args.out / f"{args.what}-{'+'.join(names)}.md").write_text(machine() + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
