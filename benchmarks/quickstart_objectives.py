"""The quickstart experiment: which objective should `distill quickstart` use, and does it win?

    python benchmarks/quickstart_objectives.py grid   --out runs/objectives   # 5 objectives x 3 temperatures
    python benchmarks/quickstart_objectives.py init   --out runs/objectives   # teacher layers vs scratch
    python benchmarks/quickstart_objectives.py seeds  --out runs/objectives   # baseline vs distilled, 3 seeds

Every run is a plain `distill train` of the quickstart student (distill/quickstart.py) with the
same data, steps and initialization; only the objective (or seed, or init) changes. Finished runs
are skipped when the command is repeated. Then teacher and students are evaluated together with
`distill.evaluate` (likelihood metrics on the split given, generation quality on prompts from it),
and a Markdown table is printed and saved beside the runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from distill.quickstart import CORPUS, DISTILL_LOSS, STEPS_PER_5_MINUTES, TEACHER, student_config, train_student

OBJECTIVES = {"forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.5}, "skew_kl": {"alpha": 0.1}, "tvd": {}}
TEMPERATURES = (1.0, 2.0, 4.0)
WIDE_ARCH = {"hidden_size": 256, "intermediate_size": 768}  # the teacher's width, for the init comparison


def runs_for(what: str, steps: int) -> dict[str, dict]:
    """name -> (config kwargs, description) of every run an experiment needs."""
    runs = {}
    if what == "grid":
        for name, params in OBJECTIVES.items():
            for tau in TEMPERATURES:
                loss = {"divergence": name, **params, "temperature": tau, "kd_weight": 1.0, "ce_weight": 0.0}
                runs[f"{name}-t{tau:g}"] = dict(loss=loss, seed=0)
        runs["baseline"] = dict(loss={"kd_weight": 0.0, "ce_weight": 1.0}, seed=0)
    elif what == "init":
        runs["scratch-wide"] = dict(loss=DISTILL_LOSS, seed=0, arch=WIDE_ARCH)
        runs["teacher-layers-0-5"] = dict(loss=DISTILL_LOSS, seed=0, init=[0, 5])
    elif what == "seeds":
        for seed in (0, 1, 2):
            runs[f"baseline-s{seed}"] = dict(loss={"kd_weight": 0.0, "ce_weight": 1.0}, seed=seed)
            runs[f"distilled-s{seed}"] = dict(loss=DISTILL_LOSS, seed=seed)
    return runs


def train_all(out: Path, runs: dict, steps: int) -> dict[str, float]:
    walls = {}
    for name, spec in runs.items():
        done = out / name / "student" / "model.safetensors"
        if done.is_file():
            walls[name] = json.loads((out / name / "wall.json").read_text())["wall_s"]
            continue
        config = student_config(out, name=name, steps=steps, seed=spec["seed"], loss=spec["loss"],
                                init_from_teacher=spec.get("init"))
        if "arch" in spec:
            config["student"]["config"].update(spec["arch"])
        print(f"== {name}", flush=True)
        result = train_student(config, progress=False)
        walls[name] = result["wall_s"]
        (out / name / "wall.json").write_text(json.dumps({"wall_s": result["wall_s"]}))
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["grid", "init", "seeds"])
    parser.add_argument("--out", type=Path, default=Path("runs/objectives"))
    parser.add_argument("--steps", type=int, default=STEPS_PER_5_MINUTES)
    parser.add_argument("--split", default=None, help="eval split for the table (default: eval; seeds: test)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    from distill.evaluate import evaluate_models

    runs = runs_for(args.what, args.steps)
    walls = train_all(args.out, runs, args.steps)
    split = args.split or ("test" if args.what == "seeds" else "eval")
    tic = time.perf_counter()
    results = evaluate_models({name: str(args.out / name / "student") for name in runs}, str(CORPUS / f"{split}.parquet"),
                              teacher=str(TEACHER), max_length=256, num_prompts=args.prompts,
                              max_new_tokens=args.max_new_tokens, speed=False, progress=False)
    results["experiment"] = {"what": args.what, "steps": args.steps, "split": split, "runs": runs, "wall_s": walls,
                             "eval_s": time.perf_counter() - tic, "torch": torch.__version__,
                             "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}
    (args.out / f"{args.what}.json").write_text(json.dumps(results, indent=2))
    table = markdown(results, walls)
    (args.out / f"{args.what}.md").write_text(table + "\n")
    print(table)


def markdown(results: dict, walls: dict) -> str:
    cols = [("perplexity", "ppl", "{:.2f}"), ("top1_agreement", "agree", "{:.3f}"), ("forward_kl", "KL(p‖q)", "{:.3f}"),
            ("reverse_kl", "KL(q‖p)", "{:.3f}"), ("teacher_nll", "teacher NLL of samples", "{:.3f}"),
            ("valid_python", "valid Python", "{:.2f}"), ("distinct_2", "distinct-2", "{:.3f}")]
    lines = ["| run | " + " | ".join(c[1] for c in cols) + " | train s |", "|---" * (len(cols) + 2) + "|"]
    for name, m in results["models"].items():
        cells = [fmt.format(m[key]) if m.get(key) is not None else "-" for key, _, fmt in cols]
        wall = f"{walls[name]:.0f}" if name in walls else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
