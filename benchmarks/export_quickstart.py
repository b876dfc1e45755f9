"""What deployment builds cost the quickstart student, and what it is worth as the teacher's draft.

    distill quickstart --out runs/quickstart
    python benchmarks/export_quickstart.py --student runs/quickstart/distilled/student --out runs/export-bench

Exports the float student with `distill export` to GGUF f16 / q8_0 / q4_k_m (llama.cpp) and torchao
int8 / int4 (group 32), then evaluates the bundled teacher, the float student and every build together
with `distill eval`'s ``evaluate_models`` on ``--split``: size, perplexity, KL to the teacher,
agreement, α, batch-1 generation tokens/s (llama.cpp in process for GGUF, PyTorch otherwise), and the
teacher's assisted generation with each PyTorch model as its draft (measured acceptance, speedup).
Prints a Markdown table and saves it with the full results beside the builds.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from distill.quickstart import CORPUS, TEACHER

BUILDS = (("gguf", "f16"), ("gguf", "q8_0"), ("gguf", "q4_k_m"), ("torchao", "int8"), ("torchao", "int4"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/export-bench"))
    parser.add_argument("--split", default="eval")
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    from distill.evaluate import evaluate_models
    from distill.export import export

    args.out.mkdir(parents=True, exist_ok=True)
    models, exports = {"float": str(args.student)}, {}
    for to, quant in BUILDS:
        name = f"{to}-{quant}"
        target = args.out / (f"{name}.gguf" if to == "gguf" else name)
        if not target.exists():
            print(f"== export {name}", flush=True)
            exports[name] = export(str(args.student), to=to, quant=quant, out=str(target), progress=False)
        models[name] = str(target)
    tic = time.perf_counter()
    results = evaluate_models(models, str(CORPUS / f"{args.split}.parquet"), teacher=str(TEACHER), max_length=256,
                              max_examples=args.max_examples, num_prompts=args.prompts,
                              max_new_tokens=args.max_new_tokens, draft_prompts=args.prompts, progress=True)
    results["experiment"] = {"student": str(args.student), "split": args.split, "max_examples": args.max_examples,
                             "eval_s": time.perf_counter() - tic, "torch": torch.__version__,
                             "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
                             "exports": {k: v.get("check") for k, v in exports.items()}}
    (args.out / "export_quickstart.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "export_quickstart.md").write_text(table + "\n")
    print(table)


def markdown(results: dict) -> str:
    cols = [("size_mb", "size (MB)", "{:.2f}"), ("perplexity", "ppl", "{:.2f}"), ("forward_kl", "KL(p‖q)", "{:.4f}"),
            ("top1_agreement", "agreement", "{:.3f}"), ("draft_acceptance", "α", "{:.3f}"),
            ("generate_tokens_per_s_batch1", "tok/s batch 1", "{:.0f}"),
            ("spec_acceptance_measured", "measured acceptance", "{:.3f}"),
            ("spec_acceptance_z", "z", "{:+.2f}"), ("spec_tokens_per_step", "tokens/step", "{:.2f}"),
            ("spec_speedup", "assisted speedup", "{:.2f}×")]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---" + "|--:" * len(cols) + "|"]
    for name, m in results["models"].items():
        cells = [fmt.format(m[key]) if m.get(key) is not None else "-" for key, _, fmt in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
