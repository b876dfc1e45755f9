"""Does quantization-aware distillation recover what post-training int4 loses? (issue 10)

    distill quickstart --out runs/quickstart                       # the float student to start from
    python benchmarks/qat_kd.py --start runs/quickstart/distilled/student --out runs/qat --steps 100

From the same float student, for each seed (the seed sets the data order), two continuations of
``--steps`` optimizer steps with the quickstart's objective (forward KL to the bundled teacher),
data, batch and schedule, at ``--lr``:

- ``float-sS``: plain KD, then post-training int4 (``distill export --to torchao --quant int4``,
  ``--group-size``, 32 by default) of the result: ``float-sS-ptq``;
- ``qat-sS``: the same steps with ``train.qat: {bits: 4, group_size: G}``; its student is the int4
  build of the same quantizer.

Also the start itself and its int4 build (``start``, ``start-ptq``). Everything is evaluated together
with ``distill.evaluate`` on ``--split`` (perplexity, KL to the teacher, agreement). Per seed, the
share of the int4 loss that QAT recovers is (ppl(float-ptq) − ppl(qat)) / (ppl(float-ptq) −
ppl(float)): the same steps, the same data, paired. Finished runs are skipped on a repeat.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from distill.quickstart import CORPUS, DISTILL_LOSS, TEACHER, student_config, train_student


def run(out: Path, name: str, start: Path, *, steps: int, seed: int, lr: float, qat: bool, group_size: int) -> float:
    done = out / name / "student" / "config.json"
    if done.is_file():
        return json.loads((out / name / "wall.json").read_text())["wall_s"]
    config = student_config(out, name=name, steps=steps, seed=seed, loss=DISTILL_LOSS)
    config["student"] = {"model": str(start)}
    config["train"].update(lr=lr, eval_every=0, eval_at_start=False, save_every=0, tracker="none")
    if qat:
        config["train"]["qat"] = {"bits": 4, "group_size": group_size, "keep_float": True}
    print(f"== {name}: {steps} steps, seed {seed}{', QAT int4' if qat else ''}", flush=True)
    result = train_student(config, progress=False)
    (out / name / "wall.json").write_text(json.dumps({"wall_s": result["wall_s"]}))
    return result["wall_s"]


def ptq(folder: Path, target: Path, group_size: int) -> Path:
    from distill.export.torchao_build import export_torchao

    if not (target / "config.json").is_file():
        export_torchao(folder, target, "int4", group_size=group_size, progress=False)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=Path, required=True, help="the float student (an HF folder)")
    parser.add_argument("--out", type=Path, default=Path("runs/qat"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--group-size", type=int, default=32, help="int4 group size of both arms (32)")
    parser.add_argument("--split", default="eval")
    parser.add_argument("--max-examples", type=int, default=None, help="eval documents (default: all)")
    args = parser.parse_args()
    from distill.evaluate import evaluate_models

    args.out.mkdir(parents=True, exist_ok=True)
    models = {"start": str(args.start), "start-ptq": str(ptq(args.start, args.out / "start-ptq", args.group_size))}
    walls = {}
    for seed in args.seeds:
        for arm, qat in (("float", False), ("qat", True)):
            name = f"{arm}-s{seed}"
            walls[name] = run(args.out, name, args.start, steps=args.steps, seed=seed, lr=args.lr, qat=qat,
                               group_size=args.group_size)
        models[f"float-s{seed}"] = str(args.out / f"float-s{seed}" / "student")
        models[f"float-s{seed}-ptq"] = str(ptq(args.out / f"float-s{seed}" / "student", args.out / f"float-s{seed}-ptq",
                                                  args.group_size))
        models[f"qat-s{seed}"] = str(args.out / f"qat-s{seed}" / "student")
    tic = time.perf_counter()
    results = evaluate_models(models, str(CORPUS / f"{args.split}.parquet"), teacher=str(TEACHER), max_length=256,
                              max_examples=args.max_examples, num_prompts=0, speed=False, progress=False)
    results["experiment"] = {"start": str(args.start), "steps": args.steps, "lr": args.lr, "seeds": args.seeds, "group_size": args.group_size,
                             "split": args.split, "max_examples": args.max_examples, "wall_s": walls,
                             "eval_s": time.perf_counter() - tic, "torch": torch.__version__,
                             "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}
    (args.out / "qat_kd.json").write_text(json.dumps(results, indent=2))
    table = markdown(results, args.seeds)
    (args.out / "qat_kd.md").write_text(table + "\n")
    print(table)


def markdown(results: dict, seeds: list[int]) -> str:
    m = results["models"]
    cols = [("perplexity", "ppl", "{:.2f}"), ("forward_kl", "KL(p‖q)", "{:.4f}"),
            ("top1_agreement", "agreement", "{:.3f}"), ("draft_acceptance", "α", "{:.3f}")]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, metrics in m.items():
        cells = [fmt.format(metrics[key]) if metrics.get(key) is not None else "-" for key, _, fmt in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| seed | ppl float | ppl float → PTQ int4 | ppl QAT int4 | int4 loss recovered by QAT |",
              "|---|--:|--:|--:|--:|"]
    shares = []
    for seed in seeds:
        f, p, q = (m[f"{k}"]["perplexity"] for k in (f"float-s{seed}", f"float-s{seed}-ptq", f"qat-s{seed}"))
        shares.append((p - q) / (p - f) if p != f else float("nan"))
        lines.append(f"| {seed} | {f:.2f} | {p:.2f} | {q:.2f} | {100 * shares[-1]:.0f}% |")
    if len(shares) > 1:
        lines.append(f"| mean ± sd | | | | {100 * statistics.mean(shares):.0f}% ± {100 * statistics.stdev(shares):.0f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
