"""Feature terms in causal-LM distillation, on the quickstart's setting: do hidden states (FitNets)
or MiniLM v2 relations add anything to token-level KD, and what do they cost per step?

    python benchmarks/lm_features.py --out runs/lm-features --seeds 0 1 2

The bundled teacher (6 layers, 256 wide, trained on the CPython standard library) and the
quickstart's student (2 layers, 128 wide, its tokenizer), the quickstart's objective (forward KL at
τ = 1, no CE), steps, schedule and data (``distill.quickstart.student_config``). Arms, with the
same data order, initialization and steps within a seed:

- ``kd``: the objective alone;
- ``kd+hidden``: + hidden states (MSE of student layers 0, 1 through a learned 128 -> 256
  projection against teacher layers 2, 5; weight 1);
- ``kd+hidden-cos``: the same with 1 − cosine instead of MSE (scale-free: a pre-norm decoder's
  residual stream is not normalized, and its MSE can be far larger than the KD term);
- ``kd+relations``: + MiniLM v2 q/k/v relations of the last layers (4 relation heads, weight 1).

``kd`` and ``kd+relations`` run on every seed (paired), the others on the first. Every student
is scored by `distill eval`'s likelihood metrics on the whole eval split (cross-entropy,
KL(teacher ‖ student), top-1 agreement); the step time is from the runs' logged time split.
Prints Markdown tables and saves ``lm_features.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from distill.evaluate import evaluate_models
from distill.quickstart import CORPUS, DISTILL_LOSS, STEPS_PER_5_MINUTES, TEACHER, student_config, train_student

ARMS = {"kd": None, "kd+hidden": {"hidden_weight": 1.0},
        "kd+hidden-cos": {"hidden_weight": 1.0, "hidden_kind": "cosine"},
        "kd+relations": {"relation_weight": 1.0, "relation_heads": 4}}
EVERY_SEED = ("kd", "kd+relations")  # the others on the first seed


def step_seconds(run: Path) -> float:
    """Mean seconds of an optimizer step (teacher + student forward and backward, the optimizer; no
    evaluation) over the run's logged windows, the first one left out (warmup)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "time/student_s" in r]
    steps = [b["step"] - a["step"] for a, b in zip(windows, windows[1:])]
    return sum(w["time/student_s"] + w["time/teacher_s"] for w in windows[1:]) / max(1, sum(steps))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/lm-features")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=STEPS_PER_5_MINUTES)
    args = p.parse_args()
    out = Path(args.out)
    runs = []
    for seed in args.seeds:
        for name, features in ARMS.items():
            if name not in EVERY_SEED and seed != args.seeds[0]:
                continue
            run = f"{name}-s{seed}"
            if not (out / run / "student").is_dir():
                loss = {**DISTILL_LOSS, **({"features": features} if features else {})}
                config = student_config(out, name=run, steps=args.steps, seed=seed, loss=loss)
                config["train"]["tracker"] = "none"
                r = train_student(config, progress=False)
                print(f"{run}: {r['wall_s']:.0f} s", flush=True)
            runs.append({"run": run, "name": name, "seed": seed})
    results = evaluate_models({r["run"]: str(out / r["run"] / "student") for r in runs}, str(CORPUS / "eval.parquet"),
                              teacher=str(TEACHER), max_length=256, num_prompts=0, speed=False, draft_prompts=0,
                              progress=False)
    models = results["models"]
    keys = ("eval_ce", "forward_kl", "top1_agreement")
    print("\n| run | eval CE | KL(teacher ‖ student) | top-1 agreement | s / step |\n|---|---|---|---|---|")
    print(f"| teacher | {models['teacher']['eval_ce']:.4f} | | | |")
    for r in runs:
        m = models[r["run"]]
        r.update({k: m[k] for k in keys}, step_s=step_seconds(out / r["run"]))
        print(f"| {r['run']} | {m['eval_ce']:.4f} | {m['forward_kl']:.4f} | {m['top1_agreement']:.4f} | "
              f"{r['step_s']:.3f} |")
    by = {(r["name"], r["seed"]): r for r in runs}
    paired = []
    for seed in args.seeds:
        a, b = by[("kd", seed)], by[("kd+relations", seed)]
        paired.append({"seed": seed, **{k: b[k] - a[k] for k in keys}, "step_ratio": b["step_s"] / a["step_s"]})
    print("\npaired, kd+relations − kd:")
    for d in paired:
        print(f"  seed {d['seed']}: eval CE {d['eval_ce']:+.4f}  KL {d['forward_kl']:+.4f}  "
              f"agreement {d['top1_agreement']:+.4f}  step time x{d['step_ratio']:.2f}")
    if len(paired) > 1:
        kl = [d["forward_kl"] for d in paired]
        print(f"  mean KL delta {statistics.mean(kl):+.4f} (sd {statistics.stdev(kl):.4f}), "
              f"{sum(d < 0 for d in kl)}/{len(kl)} seeds lower")
    result = {"steps": args.steps, "runs": runs, "paired": paired, "teacher_eval_ce": models["teacher"]["eval_ce"],
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()}, "date": time.strftime("%Y-%m-%d")}
    (out / "lm_features.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
