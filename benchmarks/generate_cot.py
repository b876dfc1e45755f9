"""Chain-of-thought distillation at small scale: do verified teacher traces beat answers alone?

    python benchmarks/generate_cot.py --out runs/cot-bench --seeds 0 1 2

The task has exact answers and is generated here: the sum of two random 3-digit numbers. A worked
solution adds digit by digit from the right, with carries, then gives the answer as "#### N":

    Q: 347+598
    7+8=15 c1
    4+9+1=14 c1
    3+5+1=9 c0
    #### 945

A character-level tokenizer is trained with `tokenizers`. A teacher (4 layers, 128 wide) is
trained by `distill train` on worked solutions of its own problems. On 4000 other problems,
`distill generate` samples two traces per problem from it (temperature 1) and verifies each
trace's final answer against the true sum. Students (2 layers, 64 wide; same init, steps, batch and
seed in every arm) are trained by `distill train` (cross-entropy) on:

- ``answers``: the true answer alone ("#### 945") for every problem, no reasoning;
- ``verified``: the teacher's traces whose answer is right (rejection sampling);
- ``unverified``: all the teacher's traces, right or wrong;
- ``gold``: the worked solutions themselves (the reference: what a perfect teacher would write).

Each student answers 500 held-out problems greedily; the score is exact match of the extracted
answer. Prints a Markdown table (mean and per seed) and saves the results.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

ARMS = ("answers", "verified", "unverified", "gold")
PATTERN = r"####\s*(.+?)\s*$"


def problem(rng: random.Random) -> tuple[int, int]:
    return rng.randint(100, 999), rng.randint(100, 999)


def worked(a: int, b: int) -> str:
    lines, carry = [], 0
    for x, y in zip(reversed(str(a)), reversed(str(b))):
        s = int(x) + int(y) + carry
        lines.append(f"{x}+{y}{'+1' if carry else ''}={s} c{s // 10}")
        carry = s // 10
    return "\n".join(lines) + f"\n#### {a + b}\n"


def prompt_of(a: int, b: int) -> str:
    return f"Q: {a}+{b}\n"


def make_tokenizer(path: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("0123456789+=#Qc: \n"))
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.save_pretrained(path)
    return tok


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def arch(layers: int, hidden: int, vocab: int) -> dict:
    return dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                bos_token_id=1, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)


def train_config(out: Path, data: str, tok: str, model: dict, steps: int, seed: int, lr: float) -> dict:
    return {"student": {"config": model, "tokenizer": tok},
            "data": {"train": data, "max_length": 96},
            "loss": {"kd_weight": 0.0, "ce_weight": 1.0},
            "train": {"output_dir": str(out), "max_steps": steps, "batch_size": 64, "lr": lr,
                      "warmup_steps": steps // 20, "schedule": "cosine", "min_lr_ratio": 0.05, "weight_decay": 0.0,
                      "precision": "bf16", "seed": seed, "eval_every": 0, "tracker": "none", "progress": False,
                      "log_every": max(1, steps // 10)}}


@torch.no_grad()
def accuracy(model_dir: Path, problems: list[tuple[int, int]], batch_size: int = 100) -> float:
    """Exact match of the greedy answer (``distill.traces.verdict``) on ``problems``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.generation import left_pad
    from distill.traces import verdict

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    right = 0
    for start in range(0, len(problems), batch_size):
        part = problems[start:start + batch_size]
        ids, mask = left_pad([tok(prompt_of(a, b))["input_ids"] for a, b in part], tok.pad_token_id, "cpu")
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=64,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for (a, b), row in zip(part, out[:, ids.shape[1]:]):
            text = tok.decode(row, skip_special_tokens=True)
            right += verdict(text, str(a + b), PATTERN)[0] == "correct"
    return right / len(problems)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/cot-bench"))
    parser.add_argument("--teacher-problems", type=int, default=20000)
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--student-problems", type=int, default=4000)
    parser.add_argument("--student-steps", type=int, default=600)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--test-problems", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    from distill.generate import generate
    from distill.training import train

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out / "tokenizer")
    rng = random.Random(1234)
    seen, pools = set(), {}
    for name, n in (("teacher", args.teacher_problems), ("student", args.student_problems), ("test", args.test_problems)):
        pool = []
        while len(pool) < n:
            p = problem(rng)
            if p not in seen:
                seen.add(p)
                pool.append(p)
        pools[name] = pool
    results = {"experiment": vars(args) | {"out": str(out), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                          "machine": platform.processor() or platform.machine()}, "arms": {}}

    # The teacher, on worked solutions of its own problems.
    teacher_dir = out / "teacher"
    if not (teacher_dir / "student" / "model.safetensors").exists():
        data = write_jsonl(out / "teacher_train.jsonl", ({"prompt": prompt_of(a, b), "completion": worked(a, b)}
                                                          for a, b in pools["teacher"]))
        tic = time.perf_counter()
        train(train_config(teacher_dir, data, str(out / "tokenizer"), arch(4, 128, len(tok)), args.teacher_steps, 0, 3e-3))
        results["teacher_train_s"] = time.perf_counter() - tic
    results["teacher_accuracy"] = accuracy(teacher_dir / "student", pools["test"])
    print(f"teacher exact match on {len(pools['test'])} held-out problems: {results['teacher_accuracy']:.1%}", flush=True)

    # Its traces of the students' problems, verified.
    problems = write_jsonl(out / "student_problems.jsonl", ({"prompt": prompt_of(a, b), "answer": str(a + b)}
                                                             for a, b in pools["student"]))
    data = {}
    for arm, verify in (("verified", True), ("unverified", False)):
        m = generate({"teacher": {"model": str(teacher_dir / "student")}, "data": {"train": problems, "max_length": 96},
                      "generate": {"output": str(out / f"gen-{arm}"), "num_samples": args.samples, "max_new_tokens": 64,
                                   "temperature": 1.0, "batch_size": 128, "chunk_size": 1000, "keep_unfinished": False,
                                   "cot": {"verify": verify, "keep": "all"}}}, progress=True)
        data[arm] = str(out / f"gen-{arm}" / "data.jsonl")
        results[f"generate_{arm}"] = {"counts": m["counts"], "run": m["run"]}
    c = results["generate_verified"]["counts"]
    print(f"teacher traces: {c['correct']} correct, {c['wrong']} wrong, {c['unparseable']} without an answer", flush=True)
    data["answers"] = write_jsonl(out / "answers.jsonl", ({"prompt": prompt_of(a, b), "completion": f"#### {a + b}\n"}
                                                          for a, b in pools["student"]))
    data["gold"] = write_jsonl(out / "gold.jsonl", ({"prompt": prompt_of(a, b), "completion": worked(a, b)}
                                                    for a, b in pools["student"]))
    for arm in ARMS:
        results["arms"][arm] = {"rows": sum(1 for _ in open(data[arm]))}

    for seed in args.seeds:
        for arm in ARMS:
            run = out / f"{arm}-s{seed}"
            if not (run / "student" / "model.safetensors").exists():
                train(train_config(run, data[arm], str(out / "tokenizer"), arch(2, 64, len(tok)), args.student_steps,
                                   seed, 3e-3))
            acc = accuracy(run / "student", pools["test"])
            results["arms"][arm].setdefault("accuracy", {})[seed] = acc
            print(f"{arm} seed {seed}: exact match {acc:.1%}", flush=True)
    (out / "generate_cot.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = ["| arm | training rows | exact match, mean | per seed |", "|---|---|---|---|"]
    for arm, r in results["arms"].items():
        accs = list(r["accuracy"].values())
        lines.append(f"| {arm} | {r['rows']:,} | {sum(accs) / len(accs):.1%} | "
                     + ", ".join(f"{a:.1%}" for a in accs) + " |")
    lines.append(f"| teacher | - | {results['teacher_accuracy']:.1%} | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
