"""Teacher cache speed: writing it vs the teacher's plain forward, and training from it vs a live teacher.

    python benchmarks/cache_speed.py                 # the tables in BENCHMARKS.md
    python benchmarks/cache_speed.py --quick         # smaller model and data, a smoke run

Everything is built in a temporary folder (no network): a word-level tokenizer with ``--vocab``
tokens, text documents of Zipf-distributed words packed into ``--seq-len`` blocks, a random Llama
teacher (``--teacher-hidden``, ``--teacher-layers``) and a Llama student from a config
(hidden 128, 2 layers).

1. Write speed. In one process, on the same tokenized examples in the same batches
   (``--batch-size``): **plain forward** = ``teacher(input_ids, attention_mask).logits`` under
   no_grad (the full (B, T, V) logits, nothing else); **cache write** = ``write_cache`` (the
   `distill cache` shard loop: teacher trunk, LM head per 256-row chunk, top-k at τ = 1, tail,
   encoding, Parquet zstd shards written by a background thread, sha256 of every shard, manifest).
   Model loading, tokenization and the weights hash are outside both timings. tokens/s = input
   tokens / wall time; each is run twice and the faster run kept.
2. Training. `distill train` through the CLI, each in a fresh process, same student, data, batch
   and steps (AdamW, fp32, chunked loss): **live** = teacher.source=live (teacher forward every
   step), **cache** = teacher.source=cache on the cache from 1 (no teacher in memory). tokens/s is
   distill's own ``tokens_per_s`` of the last log window (the first window, with warmup, is
   dropped); peak RSS is the process's ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml


def make_workspace(root: Path, args) -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(args.vocab - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    rng = random.Random(0)
    weights = [1 / (i + 1) for i in range(args.vocab - len(specials))]
    words_needed = args.examples * args.seq_len
    with open(root / "train.jsonl", "w") as f:
        written = 0
        while written < words_needed * 1.05:
            doc = rng.choices(range(len(weights)), weights, k=500)
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in doc)}) + "\n")
            written += 500
    arch = dict(vocab_size=args.vocab, hidden_size=args.teacher_hidden,
                intermediate_size=int(2.75 * args.teacher_hidden),
                num_hidden_layers=args.teacher_layers, num_attention_heads=8, num_key_value_heads=4,
                max_position_embeddings=args.seq_len + 1, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **arch))
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    params = sum(p.numel() for p in model.parameters())
    return {
        "teacher": {"model": str(root / "teacher")},
        "student": {"config": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "max_position_embeddings": args.seq_len + 1}},
        "data": {"train": str(root / "train.jsonl"), "max_length": args.seq_len, "max_train_examples": None},
        "cache": {"dir": str(root / "cache"), "k": args.k, "shard_size": 32, "batch_size": args.batch_size},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "log_every": args.steps // 2,
                  "tracker": "none", "progress": False, "output_dir": str(root / "run")},
        "_teacher_params": params,
    }


def write_speed(config: dict, args) -> dict:
    """tokens/s of the teacher's plain forward and of write_cache, same examples, same batches."""
    from accelerate import Accelerator

    from distill import build, models
    from distill.cache.format import value_encoding, weights_sha256
    from distill.cache.writer import TargetSpec, make_header, write_cache
    from distill.config import load_config
    from distill.data import load_tokenized, tokenizer_fingerprint
    from distill.teachers import LiveTeacher

    cfg = load_config({k: v for k, v in config.items() if not k.startswith("_")})
    _, tokenizer = build.load_run_tokenizer(cfg)
    teacher = models.freeze(models.load_causal_lm(cfg.teacher.model))
    dataset = load_tokenized(cfg.data.train, **build.training_data_args(cfg, tokenizer))
    dataset = dataset.select(range(min(args.examples, len(dataset))))
    tokens = sum(len(x) for x in dataset["input_ids"])
    accelerator = Accelerator(cpu=True)

    def plain():
        with torch.no_grad():
            for start in range(0, len(dataset), args.batch_size):
                batch = build.fetch(dataset, list(range(start, min(start + args.batch_size, len(dataset)))),
                                       tokenizer.pad_token_id, "cpu")
                teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    spec = TargetSpec("topk", args.k, 1.0, value_encoding("topk", "uint8", None))
    header = make_header(teacher_info={"model": cfg.teacher.model, "revision": None, "dtype": "float32",
                                       "weights_sha256": weights_sha256(teacher)},
                         tokenizer_sha256=tokenizer_fingerprint(tokenizer), vocab_size=len(tokenizer),
                         dataset=dataset, data_info={}, spec=spec, shard_size=32, batch_size=args.batch_size)

    def cache(folder):
        write_cache(LiveTeacher(teacher, len(tokenizer)), dataset, folder, header=header, spec=spec,
                    vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, batch_size=args.batch_size,
                    shard_size=32, accelerator=accelerator)

    times = {"plain": [], "cache": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(2):
            for name, fn in (("plain", plain), ("cache", lambda: cache(Path(tmp) / f"c{repeat}"))):
                tic = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - tic)
        manifest = json.loads((Path(tmp) / "c0" / "manifest.json").read_text())
    return {"tokens": tokens, "plain": tokens / min(times["plain"]), "cache": tokens / min(times["cache"]),
            "bytes_per_position": manifest["totals"]["bytes_per_position"]}


def train_speed(config: dict, source: str, root: Path) -> dict:
    run = {k: v for k, v in config.items() if not k.startswith("_")}
    run["teacher"] = {**run["teacher"], "source": source}
    run["train"] = {**run["train"], "output_dir": str(root / f"run-{source}")}
    path = root / f"{source}.yaml"
    path.write_text(yaml.safe_dump(run))
    code = ("import resource, sys; from distill.cli import main; rc = main(sys.argv[1:]); "
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, "train", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    rss = int(next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("MAXRSS")))
    logs = [json.loads(line) for line in (root / f"run-{source}" / "metrics.jsonl").read_text().splitlines()]
    return {"tokens_per_s": [m for m in logs if "tokens_per_s" in m][-1]["tokens_per_s"], "rss_mib": rss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.teacher_hidden, args.teacher_layers, args.examples, args.steps = 8000, 256, 2, 32, 4
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"Python {sys.version.split()[0]}, torch {torch.__version__}, {datetime.date.today()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["DISTILL_CACHE"] = str(root / "dc")
        config = make_workspace(root, args)
        print(f"teacher: Llama, hidden {args.teacher_hidden}, {args.teacher_layers} layers, V = {args.vocab} "
              f"({config['_teacher_params'] / 1e6:.1f}M parameters); batches {args.batch_size} x {args.seq_len}; "
              f"k = {args.k}, uint8 values\n")
        w = write_speed(config, args)
        print("| path | tokens/s | vs plain forward |\n|---|---|---|")
        print(f"| teacher plain forward (logits) | {w['plain']:,.0f} | 1.00x |")
        print(f"| distill cache (write_cache) | {w['cache']:,.0f} | {w['cache'] / w['plain']:.2f}x |")
        print(f"\n({w['tokens']:,} tokens; cache: {w['bytes_per_position']} bytes/position)\n", flush=True)
        from distill.cache.writer import cache as build
        build({k: v for k, v in config.items() if not k.startswith("_")})  # the cache the training run reads
        rows = {source: train_speed(config, source, root) for source in ("live", "cache")}
        print("| teacher source | train tokens/s | vs live | peak RSS (MiB) |\n|---|---|---|---|")
        for source, r in rows.items():
            print(f"| {source} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / rows['live']['tokens_per_s']:.2f}x | "
                  f"{r['rss_mib']:,.0f} |")


if __name__ == "__main__":
    main()
