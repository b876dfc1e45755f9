"""The quickstart student distilled from the live teacher vs from offline caches (issue #4).

    python benchmarks/quickstart_cache.py --out runs/objectives --live runs/objectives/distilled-s0

The live run is the quickstart's distilled student (seed 0; `quickstart_objectives.py seeds` makes
it). Each cache variant runs `distill cache` over the quickstart's train split with the bundled
teacher, then trains the same student, with the same steps, seed and init, from the cache
(`teacher.source: cache`, forward KL with the tail bucket). Everything is then evaluated together
on the eval split. Finished caches and runs are reused when the command is repeated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from distill.quickstart import CORPUS, DISTILL_LOSS, STEPS_PER_5_MINUTES, TEACHER, student_config

VARIANTS = {"top8": {"mode": "topk", "k": 8}, "top32": {"mode": "topk", "k": 32}, "top64": {"mode": "topk", "k": 64},
            "sampled64": {"mode": "sampled", "samples": 64}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/objectives"))
    parser.add_argument("--live", type=Path, default=Path("runs/objectives/distilled-s0"))
    parser.add_argument("--steps", type=int, default=STEPS_PER_5_MINUTES)
    args = parser.parse_args()
    from distill.evaluate import evaluate_models

    info = {}
    for name, spec in VARIANTS.items():
        run = f"cache-{name}"
        config = student_config(args.out, name=run, steps=args.steps, seed=0, loss=DISTILL_LOSS)
        config["teacher"]["source"] = "cache"
        config["cache"] = {"dir": str(args.out / f"{run}-targets"), "temperature": 1.0, "batch_size": 16, **spec}
        path = args.out / f"{run}-cache.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        # Each verb in its own process: Accelerate's state is per process (see the closing note of #4).
        tic = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "distill", "cache", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(done.stderr[-2000:])
        cache_s = time.perf_counter() - tic
        written = json.loads((args.out / f"{run}-targets" / "manifest.json").read_text())
        if not (args.out / run / "student" / "model.safetensors").is_file():
            print(f"== {run}", flush=True)
            tic = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "distill", "train", str(path), "train.progress=false"],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(done.stderr[-2000:])
            (args.out / run / "wall.json").write_text(json.dumps({"wall_s": time.perf_counter() - tic}))
        wall = json.loads((args.out / run / "wall.json").read_text())["wall_s"]
        info[run] = {"bytes_per_position": _bytes_per_position(written), "cache_s": cache_s, "train_s": wall}
    info["live"] = {"train_s": json.loads((args.live / "wall.json").read_text())["wall_s"]}
    models = {"live": str(args.live / "student"), **{run: str(args.out / run / "student") for run in info if run != "live"}}
    results = evaluate_models(models, str(CORPUS / "eval.parquet"), teacher=str(TEACHER), max_length=256,
                              num_prompts=0, speed=False, progress=False)
    lines = ["| teacher signal | eval ppl | agree | KL(p‖q) | bytes/position | cache write s (run that wrote it) | train s |",
             "|---|---|---|---|---|---|---|"]
    for name, m in results["models"].items():
        if name == "teacher":
            continue
        i = info[name]
        bpp = f"{i['bytes_per_position']:.0f}" if "bytes_per_position" in i else "-"
        cs = f"{i['cache_s']:.0f}" if "cache_s" in i else "-"
        lines.append(f"| {name} | {m['perplexity']:.2f} | {m['top1_agreement']:.3f} | {m['forward_kl']:.3f} | {bpp} | "
                     f"{cs} | {i['train_s']:.0f} |")
    table = "\n".join(lines)
    (args.out / "cache.md").write_text(table + "\n")
    (args.out / "cache.json").write_text(json.dumps({"results": results, "info": info}, indent=2))
    print(table)


def _bytes_per_position(manifest: dict) -> float:
    shards = manifest["shards"]
    return sum(s["bytes"] for s in shards) / max(1, sum(s["positions"] for s in shards))


if __name__ == "__main__":
    main()
