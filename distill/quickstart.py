"""`distill quickstart`: the whole pipeline on the bundled teacher and corpus, offline, on a CPU.

The bundled teacher is a small Llama trained by `distill train` on the CPython 3.11 standard
library (examples/quickstart/teacher.yaml). The quickstart trains one student architecture twice,
with the same data, steps, seed and initialization: a baseline on cross-entropy alone and a
distilled student on the teacher's distributions. It then evaluates teacher and students on the
held-out eval split, prints a table, and writes ``quickstart.json`` and ``report.html``.

Step counts are fixed numbers (scaled by ``--minutes`` from a default that takes about 5 minutes
on a 2-core CPU), so the same command gives the same students on any machine.
"""

from __future__ import annotations

import json
import os
import time
from importlib import resources
from pathlib import Path
from typing import Optional

ASSETS = Path(str(resources.files("distill") / "assets"))
TEACHER = ASSETS / "teacher"
CORPUS = ASSETS / "corpus"

# The student everyone deploys offline in this story: 2 layers, 128 wide, the teacher's tokenizer.
STUDENT_ARCH = dict(model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                    tie_word_embeddings=True)
# The distillation objective, chosen by the experiment in BENCHMARKS.md ("Quickstart objectives").
DISTILL_LOSS = dict(divergence="forward_kl", temperature=1.0, kd_weight=1.0, ce_weight=0.0)
DEFAULT_MINUTES = 5.0
STEPS_PER_5_MINUTES = 250  # measured on the 2-core CPU of BENCHMARKS.md: about 4.5 minutes in all


def student_config(out: Path, *, name: str, steps: int, seed: int, loss: dict, init_from_teacher: Optional[list] = None,
                   data_split: str = "eval", batch_size: int = 16, lr: float = 3e-3,
                   max_eval_examples: Optional[int] = None) -> dict:
    """The config of one quickstart student run (a plain `distill train` config); in-training evals
    use 8 files of the split, or ``max_eval_examples`` if fewer."""
    student = ({"init_from_teacher_layers": init_from_teacher} if init_from_teacher
               else {"config": dict(STUDENT_ARCH), "tokenizer": str(TEACHER)})
    return {
        "teacher": {"model": str(TEACHER)},  # with kd_weight 0 only evaluated against
        "student": student,
        "data": {"train": str(CORPUS / "train.parquet"), "eval": str(CORPUS / f"{data_split}.parquet"),
                 "format": "text", "max_length": 256, "packing": True,
                 "max_eval_examples": min(8, max_eval_examples or 8)},  # in-training evals on a few files
        "loss": {**loss},
        "train": {"output_dir": str(out / name), "max_steps": steps, "batch_size": batch_size, "lr": lr,
                  "warmup_steps": max(1, steps // 20), "schedule": "cosine", "min_lr_ratio": 0.1,
                  "weight_decay": 0.1, "adam_betas": [0.9, 0.95], "precision": "bf16", "seed": seed,
                  "eval_every": max(1, steps // 2), "eval_at_start": True, "save_every": max(1, steps // 4),
                  "log_every": max(1, steps // 30), "tracker": "tensorboard"},
    }


def train_student(config: dict, progress: bool = True) -> dict:
    """Run one student; returns the train result plus its wall-clock seconds."""
    import yaml

    from distill.training import train

    out = Path(config["train"]["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({**config, "train": {**config["train"], "progress": progress}}, sort_keys=False))
    tic = time.perf_counter()
    result = train(path)
    return {**result, "wall_s": time.perf_counter() - tic, "config": str(path)}


def quickstart(out: str | os.PathLike = "runs/quickstart", *, minutes: float = DEFAULT_MINUTES,
               steps: Optional[int] = None, seed: int = 0, prompts: int = 16, max_new_tokens: int = 64,
               max_eval_examples: Optional[int] = None, progress: bool = True) -> dict:
    """Train a baseline and a distilled student, evaluate all three, write the JSON and the report."""
    from distill.errors import UserError
    from distill.evaluate import evaluate_models
    from distill.report import write_report

    if not (TEACHER / "model.safetensors").is_file():
        raise UserError(f"the bundled teacher is missing from {TEACHER}; reinstall distill")
    out = Path(out)
    steps = steps or max(1, round(STEPS_PER_5_MINUTES * minutes / DEFAULT_MINUTES))
    runs = {}
    for name, loss in (("baseline", {"kd_weight": 0.0, "ce_weight": 1.0}), ("distilled", DISTILL_LOSS)):
        print(f"== {name}: {steps} steps, {'cross-entropy only' if name == 'baseline' else _describe(loss)}",
              flush=True)
        runs[name] = train_student(student_config(out, name=name, steps=steps, seed=seed, loss=loss,
                                                  max_eval_examples=max_eval_examples), progress)

    print("== evaluating teacher and students on the eval split", flush=True)
    results = evaluate_models({name: str(out / name / "student") for name in runs}, str(CORPUS / "eval.parquet"),
                              teacher=str(TEACHER), max_length=256, max_examples=max_eval_examples,
                              num_prompts=prompts, max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    results["runs"] = {name: {"steps": steps, "wall_s": r["wall_s"], "config": r["config"]} for name, r in runs.items()}
    json_path, html_path = write_report(results, out, runs={name: str(out / name) for name in runs})

    summary = {"steps": steps, "seed": seed, "models": {}}
    for name, metrics in results["models"].items():
        summary["models"][name] = {
            "params": metrics["params"], "eval_loss": metrics["eval_ce"], "perplexity": metrics["perplexity"],
            "top1_agreement": metrics.get("top1_agreement"), "forward_kl": metrics.get("forward_kl"),
            "tokens_per_s": metrics.get("generate_tokens_per_s_batch1"),
            "train_wall_s": runs[name]["wall_s"] if name in runs else None,
        }
    _write_json(out / "quickstart.json", summary)
    print(_table(summary))
    print(f"\nreport: {html_path}\nresults: {out / 'quickstart.json'} and {json_path}")
    return summary


def _describe(loss: dict) -> str:
    extra = f", ce weight {loss['ce_weight']}" if loss.get("ce_weight") else ""
    return f"{loss['divergence']} at temperature {loss['temperature']}{extra}"


def _table(summary: dict) -> str:
    rows = [("params", "{:,}", "params"), ("eval loss (nats/token)", "{:.3f}", "eval_loss"),
            ("perplexity", "{:.2f}", "perplexity"), ("top-1 agreement w/ teacher", "{:.3f}", "top1_agreement"),
            ("KL(teacher || model)", "{:.3f}", "forward_kl"), ("generation tokens/s", "{:.0f}", "tokens_per_s"),
            ("training wall-clock (s)", "{:.0f}", "train_wall_s")]
    names = list(summary["models"])
    lines = [f"{'':<28}" + "".join(f"{n:>12}" for n in names)]
    for label, fmt, key in rows:
        cells = [summary["models"][n].get(key) for n in names]
        lines.append(f"{label:<28}" + "".join(f"{fmt.format(c) if c is not None else '-':>12}" for c in cells))
    return "\n".join(lines)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
