"""Cross-tokenizer distillation on the quickstart task: does the teacher help a student that does not
share its tokenizer?

    python benchmarks/cross_tokenizer.py --out runs/xtok-bench --seeds 0 1 2

The bundled teacher reads the bundled 8k byte-level BPE. A second byte-level BPE with 4096 tokens
is trained here on the same corpus (train split); its ids differ from the teacher's everywhere (a
``<pad>`` token comes first), so white-box KD refuses the pair. The quickstart student (same
architecture, its embedding sized to its own tokenizer) is trained by `distill train` for the
quickstart's steps, same seed, data files and schedule, in these arms:

- ``same-ce`` / ``same-kd``: on the teacher's tokenizer, cross-entropy only / forward KL (the
  quickstart's two runs): the reference gain;
- ``x-ce``: on the other tokenizer, cross-entropy only (the teacher only evaluated against);
- ``x-exact``: forward KL over the shared tokens only (``exact_weight 1, uld_weight 0``);
- ``x-uld``: ULD only (``exact_weight 0, uld_weight 1``, every token);
- ``x-hybrid``: both (ULD on the tokens outside the shared set).

KD arms use kd_weight 0.5 and ce_weight 0.5 (ULD alone carries no token identity, so a KD-only
ULD run would not be a fair arm; Boizard et al. also add CE). ULD arms use ``uld_top_k: 256`` (the 256
largest probabilities per side sorted, the rest as one tail difference): a full sort of both
vocabularies tripled the step time here. Perplexity is not comparable across
tokenizers, so every model is scored in **bits per byte** on the test split (the file split into
256-token windows with each tokenizer; nats of every predicted token, over the bytes those tokens
spell, / ln 2), and by the teacher's NLL of its samples (16 prompts, temperature 1, 64 new tokens,
the text re-tokenized by the teacher). The alignment's cost is ``time/align_s`` of the runs' metrics
against their wall time. Prints Markdown tables and saves ``cross_tokenizer.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.quickstart import CORPUS, STEPS_PER_5_MINUTES, TEACHER, student_config, train_student  # noqa: E402
from tests.tokenizer_zoo import train_tokenizer  # noqa: E402

MIXED = dict(divergence="forward_kl", temperature=1.0, kd_weight=0.5, ce_weight=0.5)
ARMS = {
    "same-ce": (False, {"kd_weight": 0.0, "ce_weight": 1.0}),
    "same-kd": (False, MIXED),
    "x-ce": (True, {"kd_weight": 0.0, "ce_weight": 1.0, "cross_tokenizer": {}}),
    "x-exact": (True, {**MIXED, "cross_tokenizer": {"exact_weight": 1.0, "uld_weight": 0.0}}),
    "x-uld": (True, {**MIXED, "cross_tokenizer": {"exact_weight": 0.0, "uld_weight": 1.0, "uld_tokens": "all",
                                                   "uld_top_k": 256}}),
    "x-hybrid": (True, {**MIXED, "cross_tokenizer": {"exact_weight": 1.0, "uld_weight": 1.0, "uld_top_k": 256}}),
}


def texts(split: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(CORPUS / f"{split}.parquet", columns=["text"]).column("text").to_pylist()


@torch.no_grad()
def bits_per_byte(model, tokenizer, docs: list[str], window: int = 256, batch: int = 16) -> dict:
    """Nats of every predicted token over the bytes those tokens spell, / ln 2 (and per token)."""
    from distill.losses.cross_tokenizer import token_bytes

    spelled = token_bytes(tokenizer)
    eos = tokenizer.eos_token_id
    windows = []
    for doc in docs:
        ids = [eos] + tokenizer(doc, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - 1, window - 1):  # windows overlap by one token: each token predicted once
            piece = ids[start:start + window]
            if len(piece) > 1:
                windows.append(piece)
    nats, tokens, nbytes = 0.0, 0, 0
    for i in range(0, len(windows), batch):
        rows = windows[i:i + batch]
        width = max(map(len, rows))
        x = torch.full((len(rows), width), eos)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            x[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits[..., :len(tokenizer)], -1).gather(-1, x[:, 1:, None]).squeeze(-1)
        keep = mask[:, 1:].bool()
        nats -= logp[keep].double().sum().item()
        tokens += int(keep.sum())
        nbytes += sum(len(spelled[t] or b"") for row in rows for t in row[1:])
    return {"bits_per_byte": nats / nbytes / math.log(2), "nats_per_token": nats / tokens, "tokens": tokens,
            "bytes": nbytes}


@torch.no_grad()
def generation(model, tokenizer, teacher, teacher_tok, prompt_texts: list[str], seed: int) -> dict:
    """Teacher NLL (nats per teacher token) of the model's samples, and the share that is valid Python."""
    from distill.evaluate import completion_is_valid_python, sample_completions, teacher_nll

    eos = tokenizer.eos_token_id
    prompts = [[eos] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompt_texts]
    outs = sample_completions(model, prompts, max_new_tokens=64, batch_size=16, seed=seed,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    completions = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in outs]
    t_eos = teacher_tok.eos_token_id
    t_prompts = [[t_eos] + teacher_tok(p, add_special_tokens=False)["input_ids"] for p in prompt_texts]
    t_completions = [teacher_tok(c, add_special_tokens=False)["input_ids"] for c in completions]
    total, count = teacher_nll(teacher, t_prompts, t_completions, vocab_size=len(teacher_tok),
                               pad_token_id=teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else t_eos)
    valid = sum(completion_is_valid_python(p, c) for p, c in zip(prompt_texts, completions)) / len(prompt_texts)
    return {"teacher_nll": total / max(count, 1), "valid_python": valid}


def align_share(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"time/wall_s"' in line]
    wall = sum(r["time/wall_s"] for r in rows)
    align = sum(r.get("time/align_s", 0.0) for r in rows)
    return {"align_s": align, "wall_s": wall, "share": align / wall if wall else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/xtok-bench"))
    parser.add_argument("--steps", type=int, default=STEPS_PER_5_MINUTES)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--seed-arms", nargs="+", default=["same-ce", "same-kd", "x-ce", "x-hybrid"],
                        help="arms run for every seed after the first (the rest: first seed only)")
    parser.add_argument("--prompts", type=int, default=16)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.evaluate import extract_prompts

    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        tic = time.perf_counter()
        train_tokenizer(texts("train"), "bpe", args.vocab, pad=True).save_pretrained(tok_dir)
        print(f"student tokenizer: {args.vocab} tokens in {time.perf_counter() - tic:.0f} s", flush=True)

    results = {"experiment": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                              "machine": platform.processor() or platform.machine()}, "runs": {}}
    for seed in args.seeds:
        for arm in args.arms if seed == args.seeds[0] else [a for a in args.arms if a in args.seed_arms]:
            cross, loss = ARMS[arm]
            name = f"{arm}-s{seed}"
            run = out / name
            if not (run / "student" / "model.safetensors").is_file():
                config = student_config(out, name=name, steps=args.steps, seed=seed, loss=loss, data_split="eval",
                                        max_eval_examples=2)  # in-training evals on 2 files: the scores are below
                if cross:
                    config["student"]["tokenizer"] = str(tok_dir)
                config["train"]["tracker"] = "none"
                wall = train_student(config, progress=False)["wall_s"]
                (run / "wall.json").write_text(json.dumps({"wall_s": wall}))
            results["runs"][name] = {"arm": arm, "seed": seed, "cross": cross,
                                     "train_s": json.loads((run / "wall.json").read_text())["wall_s"],
                                     **({"align": align_share(run)} if cross and loss.get("kd_weight") else {})}
            print(f"trained {name}", flush=True)

    teacher_tok = AutoTokenizer.from_pretrained(TEACHER)
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER).eval()
    test = texts("test")
    _, prompts = extract_prompts(test, teacher_tok, num_prompts=args.prompts, seed=0, max_prompt_tokens=192)
    prompt_texts = [p.text for p in prompts]
    results["teacher"] = {**bits_per_byte(teacher, teacher_tok, test),
                          **generation(teacher, teacher_tok, teacher, teacher_tok, prompt_texts, 0)}
    for name, r in results["runs"].items():
        model = AutoModelForCausalLM.from_pretrained(out / name / "student").eval()
        tok = AutoTokenizer.from_pretrained(out / name / "student")
        r.update(bits_per_byte(model, tok, test), **generation(model, tok, teacher, teacher_tok, prompt_texts, r["seed"]))
        print(name, {k: round(v, 4) for k, v in r.items() if isinstance(v, float)}, flush=True)
    (out / "cross_tokenizer.json").write_text(json.dumps(results, indent=1))

    print("\n| run | tokenizer | bits per byte (test) | nats per token | teacher NLL of samples | valid Python | train s |")
    print("|---|---|---|---|---|---|---|")
    t = results["teacher"]
    print(f"| teacher | 8k (teacher's) | {t['bits_per_byte']:.4f} | {t['nats_per_token']:.3f} | {t['teacher_nll']:.3f} "
          f"| {t['valid_python']:.0%} | - |")
    for name, r in results["runs"].items():
        print(f"| {name} | {'4k (other)' if r['cross'] else '8k (teacher)'} | {r['bits_per_byte']:.4f} | "
              f"{r['nats_per_token']:.3f} | {r['teacher_nll']:.3f} | {r['valid_python']:.0%} | {r['train_s']:.0f} |")
    print("\n| seed | same: CE - KD (bpb) | other tokenizer: CE - hybrid (bpb) | ratio |")
    print("|---|---|---|---|")
    for seed in args.seeds:
        get = lambda arm: results["runs"].get(f"{arm}-s{seed}", {}).get("bits_per_byte")  # noqa: E731
        if None in (get("same-ce"), get("same-kd"), get("x-ce"), get("x-hybrid")):
            continue
        same, cross = get("same-ce") - get("same-kd"), get("x-ce") - get("x-hybrid")
        print(f"| {seed} | {same:.4f} | {cross:.4f} | {cross / same:.2f} |")
    shares = [r["align"]["share"] for r in results["runs"].values() if "align" in r]
    if shares:
        print(f"\nalignment (re-tokenize + align, CPU) share of training wall time: "
              f"{min(shares):.1%} to {max(shares):.1%}")


if __name__ == "__main__":
    main()
