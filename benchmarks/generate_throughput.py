"""Throughput of `distill generate`'s teachers: the local one against a plain HF `generate` loop on the
same batches, and the HTTP one against llama-cpp-python's server at several concurrencies.

    python benchmarks/generate_throughput.py --out runs/generate-throughput

Local: the bundled teacher continues ``--prompts`` corpus prompts (whole lines, about 48 tokens),
exactly ``--max-new-tokens`` tokens per row (EOS suppressed on both sides, so both do the same
work), in batches of ``--batch-size`` sorted by length as `distill generate` batches them:
``LiveGenerator.generate`` (distill.generation.sample: per-row seeded Gumbel sampling, KV cache)
vs ``model.generate(do_sample=True, top_k=0)`` on the same left-padded batches; float32 and bf16
autocast. One warm-up batch each, then the best of ``--repeats``.

HTTP: the same prompts through ``HTTPTeacher`` against llama-cpp-python's server (a GGUF f16 of the
teacher) at concurrency 1, 4 and 16, with and without top-5 log-probs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import time
from pathlib import Path

import torch

from distill.quickstart import TEACHER


def prompts_of(n: int) -> list[str]:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from generate_seqkd import make_pairs

    return [p["prompt"] for p in make_pairs(n, seed=1)]


def local(prompts, *, max_new_tokens, batch_size, repeats, bf16) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.data.formats import _plain_ids, special_prefix
    from distill.generation import SamplingSettings, left_pad
    from distill.teachers.http import Request
    from distill.teachers.live import LiveGenerator

    tok = AutoTokenizer.from_pretrained(TEACHER)
    model = AutoModelForCausalLM.from_pretrained(TEACHER).eval()
    ids = [special_prefix(tok) + _plain_ids(tok, p) for p in prompts]
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else None
    settings = SamplingSettings(max_new_tokens=max_new_tokens, ignore_eos=True)
    ours = LiveGenerator(model, tok, settings=settings, batch_size=batch_size, autocast=autocast)
    requests = [Request(prompt=p, seed=i) for i, p in enumerate(ids)]
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    batches = [[ids[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]

    def hf_loop():
        n = 0
        for batch in batches:
            input_ids, mask = left_pad(batch, tok.eos_token_id, "cpu")
            with (autocast() if autocast else contextlib.nullcontext()), torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                     temperature=1.0, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                     pad_token_id=tok.eos_token_id)
            n += (out.shape[1] - input_ids.shape[1]) * out.shape[0]
        return n

    def ours_loop():
        return sum(r.completion_tokens for r in ours.generate(requests))

    result = {}
    for name, fn in (("distill", ours_loop), ("hf_generate", hf_loop)):
        LiveGenerator(model, tok, settings=SamplingSettings(max_new_tokens=4), autocast=autocast).generate(requests[:batch_size])
        best = None
        for _ in range(repeats):
            tic = time.perf_counter()
            tokens = fn()
            seconds = time.perf_counter() - tic
            best = min(best or seconds, seconds)
        result[name] = {"tokens": tokens, "seconds": best, "tokens_per_s": tokens / best,
                        "prompts_per_s": len(prompts) / best}
    result["ratio"] = result["distill"]["tokens_per_s"] / result["hf_generate"]["tokens_per_s"]
    return result


def http(prompts, *, max_new_tokens, out: Path) -> dict:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from generate_seqkd import start_llama_server

    from distill.export import export
    from distill.teachers.http import HTTPTeacher, Request

    gguf = out / "teacher-f16.gguf"
    if not gguf.exists():
        export(str(TEACHER), to="gguf", quant="f16", out=str(gguf), progress=False)
    proc, url = start_llama_server(gguf, out / "llama-server.log")
    result = {}
    try:
        for logprobs in (0, 5):
            for concurrency in (1, 4, 16):
                teacher = HTTPTeacher(url, concurrency=concurrency, logprobs=logprobs, max_new_tokens=max_new_tokens)
                teacher.generate([Request(prompt=prompts[0], seed=0)])  # warm-up
                tic = time.perf_counter()
                replies = teacher.generate([Request(prompt=p, seed=i) for i, p in enumerate(prompts)])
                seconds = time.perf_counter() - tic
                tokens = sum(r.completion_tokens or 0 for r in replies)
                result[f"logprobs{logprobs}_c{concurrency}"] = {
                    "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                    "prompts_per_s": len(prompts) / seconds, "retries": teacher.retries}
                print(f"http logprobs={logprobs} concurrency={concurrency}: {tokens / seconds:.0f} tok/s", flush=True)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/generate-throughput"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--http-prompts", type=int, default=32)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = prompts_of(args.prompts)
    results = {"local": {}, "experiment": {
        "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine()}}
    for bf16 in (False, True):
        key = "bf16" if bf16 else "fp32"
        results["local"][key] = local(prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                      repeats=args.repeats, bf16=bf16)
        r = results["local"][key]
        print(f"local {key}: distill {r['distill']['tokens_per_s']:.0f} tok/s, HF generate "
              f"{r['hf_generate']['tokens_per_s']:.0f} tok/s, ratio {r['ratio']:.3f}", flush=True)
    results["http"] = http(prompts[:args.http_prompts], max_new_tokens=args.max_new_tokens, out=args.out)
    (args.out / "generate_throughput.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
