"""Classifier distillation on the bundled sentiment task (Rotten Tomatoes snippets, fresh / rotten):
does Hinton's soft-target KD beat training on the labels, at which temperature, and do feature
terms add to it?

    python benchmarks/classify_kd.py --out runs/classify-bench --seeds 0 1 2

The setting is `distill quickstart --task classify`'s (its tokenizer, teacher, student
architecture, steps, schedule and data; the same functions build every config): a 4-layer,
256-wide BERT teacher trained once by `distill train` on the labels, and one 2-layer, 128-wide
student trained in these arms, each with the same data order, steps, seed and initialization:

- ``ce``: the labels only (the baseline);
- ``kd-T1`` .. ``kd-T8``: forward KL to the teacher at temperature T (τ² scaled) + 0.5 x CE;
- ``kd+hidden``: the best T + hidden states (MSE through a learned 128 -> 256 projection, student
  layer i <- teacher layer 2i + 1, weight 1);
- ``kd+relations``: the best T + MiniLM v2 q/k/v relations of the last layers (weight 1).

The temperature sweep runs on the first seed; the best temperature is the one with the highest
accuracy on the eval split (the runs' last in-training eval); ``ce``, that arm and the two feature
arms (at that temperature) run on every seed (paired: same seed, same initialization). Every model is scored by `distill eval` on the test
split (1,491 snippets from movies in no other split). Prints Markdown tables and saves
``classify_kd.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from distill.evaluate_classify import evaluate_classifiers
from distill.quickstart_classify import (DATA, MAX_LENGTH, STUDENT_ARCH, STUDENT_STEPS, TEACHER_ARCH, TEACHER_LR,
                                         TEACHER_STEPS, run_config, train_run, train_tokenizer)

TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
CE_WEIGHT = 0.5


def kd_loss(t: float) -> dict:
    return {"divergence": "forward_kl", "temperature": t, "kd_weight": 1.0, "ce_weight": CE_WEIGHT}


def eval_accuracy(run: Path) -> float:
    """The run's last in-training accuracy on the eval split."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval/accuracy" in r][-1]["eval/accuracy"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/classify-bench")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    out = Path(args.out)
    import pyarrow.parquet as pq

    if not (out / "tokenizer" / "tokenizer.json").is_file():
        train_tokenizer(out / "tokenizer", pq.read_table(DATA / "train.parquet").column("text").to_pylist())
    teacher = out / "teacher" / "student"
    if not teacher.is_dir():
        train_run(run_config(out, "teacher", arch=TEACHER_ARCH, steps=TEACHER_STEPS, seed=0,
                             loss={"kd_weight": 0.0, "ce_weight": 1.0}, lr=TEACHER_LR), progress=False)

    def arm(name: str, seed: int, loss: dict, features=None) -> dict:
        run = f"{name}-s{seed}"
        if not (out / run / "student").is_dir():
            tic = time.perf_counter()
            train_run(run_config(out, run, arch=STUDENT_ARCH, teacher=str(teacher), steps=STUDENT_STEPS, seed=seed,
                                 loss=loss, features=features), progress=False)
            print(f"{run}: {time.perf_counter() - tic:.0f} s", flush=True)
        return {"run": run, "name": name, "seed": seed}

    first = args.seeds[0]
    arms = [arm("ce", first, {"kd_weight": 0.0, "ce_weight": 1.0})]
    arms += [arm(f"kd-T{t:g}", first, kd_loss(t)) for t in TEMPERATURES]
    evaluated = evaluate_classifiers({a["run"]: str(out / a["run"] / "student") for a in arms},
                                     str(DATA / "test.parquet"), teacher=str(teacher), max_length=MAX_LENGTH,
                                     batch_size=64, progress=False)
    # The temperature is chosen on the eval split (the runs' last in-training eval), never on the test split.
    best_t = max(TEMPERATURES, key=lambda t: eval_accuracy(out / f"kd-T{t:g}-s{first}"))
    more = []
    for seed in args.seeds:
        if seed != first:
            more += [arm("ce", seed, {"kd_weight": 0.0, "ce_weight": 1.0}), arm(f"kd-T{best_t:g}", seed, kd_loss(best_t))]
        more += [arm("kd+hidden", seed, kd_loss(best_t), {"hidden_weight": 1.0}),
                 arm("kd+relations", seed, kd_loss(best_t), {"relation_weight": 1.0})]
    extra = evaluate_classifiers({a["run"]: str(out / a["run"] / "student") for a in more},
                                 str(DATA / "test.parquet"), teacher=str(teacher), max_length=MAX_LENGTH,
                                 batch_size=64, progress=False)
    models = {**evaluated["models"], **extra["models"]}
    t = models["teacher"]
    keys = ("accuracy", "macro_f1", "ece", "teacher_agreement", "forward_kl", "accuracy_share", "latency_ratio",
            "size_ratio")
    rows = [("teacher", t)] + [(a["run"], models[a["run"]]) for a in arms + more]
    print(f"\nteacher: {t['params']:,} params, latency p50 {t['latency_ms_p50']:.2f} ms, {t['size_mb']:.1f} MB; "
          f"students {models[arms[0]['run']]['params']:,} params\n")
    print("| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, m in rows:
        print(f"| {name} | " + " | ".join("" if m.get(k) is None else f"{m[k]:.4f}" for k in keys) + " |")
    best = f"kd-T{best_t:g}"
    paired = []
    for seed in args.seeds:
        ce, kd = models[f"ce-s{seed}"], models[f"{best}-s{seed}"]
        paired.append({"seed": seed, "ce_accuracy": ce["accuracy"], "kd_accuracy": kd["accuracy"],
                       "delta": kd["accuracy"] - ce["accuracy"], "ce_ece": ce["ece"], "kd_ece": kd["ece"]})
    print(f"\npaired, {best} vs ce (test accuracy):")
    for r in paired:
        print(f"  seed {r['seed']}: ce {r['ce_accuracy']:.4f}  {best} {r['kd_accuracy']:.4f}  delta {r['delta']:+.4f}")
    deltas = [r["delta"] for r in paired]
    if len(deltas) > 1:
        print(f"  mean delta {statistics.mean(deltas):+.4f} (sd {statistics.stdev(deltas):.4f}), "
              f"{sum(d > 0 for d in deltas)}/{len(deltas)} seeds better")
    features = {}  # each feature arm against KD alone at the same T, seed by seed
    for name in ("kd+hidden", "kd+relations"):
        rows_f = []
        for seed in args.seeds:
            f, kd = models[f"{name}-s{seed}"], models[f"{best}-s{seed}"]
            rows_f.append({"seed": seed, **{k: f[k] - kd[k] for k in ("accuracy", "ece", "teacher_agreement",
                                                                      "forward_kl")}})
        features[name] = rows_f
        print(f"\npaired, {name} vs {best} (test):")
        for r in rows_f:
            print(f"  seed {r['seed']}: accuracy {r['accuracy']:+.4f}  ECE {r['ece']:+.4f}  "
                  f"agreement {r['teacher_agreement']:+.4f}  KL {r['forward_kl']:+.4f}")
        if len(rows_f) > 1:
            acc = [r["accuracy"] for r in rows_f]
            print(f"  mean accuracy delta {statistics.mean(acc):+.4f} (sd {statistics.stdev(acc):.4f}), "
                  f"{sum(d > 0 for d in acc)}/{len(acc)} seeds better")
    result = {"teacher_steps": TEACHER_STEPS, "student_steps": STUDENT_STEPS, "best_temperature": best_t,
              "models": models, "paired": paired, "features_vs_kd": features, "machine": {"platform": platform.platform(),
                                                              "torch": torch.__version__,
                                                              "threads": torch.get_num_threads()},
              "date": time.strftime("%Y-%m-%d")}
    (out / "classify_kd.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
