"""A tiny synthetic language for demos and tests: no downloads, seconds on a CPU.

``python -m distill.toy OUT`` writes a word-level tokenizer, toy data from a small grammar and two
configs into OUT, trains a small teacher on the data (``kd_weight: 0``), then trains the same small
student twice from the same initialization, once with cross-entropy only and once distilled from
the teacher, and prints the three side by side. The real demo, on a bundled code model, is
``distill quickstart``; this one only shows the moving parts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import yaml

WORDS = ("the a one some every cat dog bird fish fox mouse horse sees likes eats chases finds follows "
         "red big small quick lazy old young happy and then but near under over river tree house "
         "field garden quietly fast slowly today").split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def make_tokenizer(path: Path, *, shuffle_seed: int | None = None):
    """A word-level tokenizer over WORDS, saved in Hugging Face format. ``shuffle_seed`` permutes
    the ids (same size, different mapping: a mismatched tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(WORDS)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(words)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(path)
    return tok


def llama_config(*, vocab_size: int, layers: int = 2, hidden: int = 32, tie: bool = False) -> dict:
    """Architecture of a tiny Llama, as the dict ``student.config`` takes."""
    return dict(model_type="llama", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=128, tie_word_embeddings=tie, bos_token_id=2, eos_token_id=3,
                pad_token_id=0)


def make_llama(path: Path, *, vocab_size: int, layers: int = 2, hidden: int = 32, seed: int = 0, tie: bool = False):
    """A tiny random Llama saved with safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    arch = llama_config(vocab_size=vocab_size, layers=layers, hidden=hidden, tie=tie)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch))
    model.save_pretrained(path)
    return model


def sentence(rng: random.Random) -> str:
    """One sentence of the toy grammar."""
    det = rng.choice(["the", "a", "one", "some", "every"])
    adj = rng.choice(["red", "big", "small", "quick", "lazy", "old", "young", "happy"])
    noun = rng.choice(["cat", "dog", "bird", "fish", "fox", "mouse", "horse"])
    verb = rng.choice(["sees", "likes", "eats", "chases", "finds", "follows"])
    obj = rng.choice(["cat", "dog", "bird", "fish", "fox", "mouse", "horse"])
    place = rng.choice(["river", "tree", "house", "field", "garden"])
    prep = rng.choice(["near", "under", "over"])
    adv = rng.choice(["quietly", "fast", "slowly", "today"])
    return f"{det} {adj} {noun} {verb} the {obj} {prep} the {place} {adv}"


def write_text(path: Path, n_docs: int, seed: int = 0) -> Path:
    """``{"text": ...}`` lines of one to four sentences."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n_docs):
            doc = " and then ".join(sentence(rng) for _ in range(rng.randint(1, 4)))
            f.write(json.dumps({"text": doc}) + "\n")
    return path


def write_prompt_completion(path: Path, n: int, seed: int = 0) -> Path:
    """``{"prompt", "completion"}`` lines whose completions have different lengths (1 to 3 sentences)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            completion = " and then ".join(sentence(rng) for _ in range(rng.randint(1, 3)))
            f.write(json.dumps({"prompt": sentence(rng) + " but", "completion": completion}) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.toy", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output directory")
    parser.add_argument("--steps", type=int, default=150, help="student training steps")
    parser.add_argument("--teacher-steps", type=int, default=300, help="teacher training steps")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from distill.training import train

    tok = make_tokenizer(out / "tokenizer")
    write_text(out / "train.jsonl", 2000, seed=0)
    write_text(out / "eval.jsonl", 200, seed=1)
    common_train = {"batch_size": 16, "warmup_steps": 10, "eval_every": 50, "tracker": "tensorboard"}
    data = {"train": str(out / "train.jsonl"), "eval": str(out / "eval.jsonl"), "max_length": 64}
    teacher_cfg = {
        "student": {"config": llama_config(vocab_size=len(tok), layers=4, hidden=64), "tokenizer": str(out / "tokenizer")},
        "data": data, "loss": {"kd_weight": 0.0, "ce_weight": 1.0},
        "train": {**common_train, "max_steps": args.teacher_steps, "lr": 3e-3, "output_dir": str(out / "teacher")},
    }
    student_arch = llama_config(vocab_size=len(tok), layers=1, hidden=32)
    baseline_cfg = {  # the teacher is named only so evaluation reports the baseline's fidelity to it
        "teacher": {"model": str(out / "teacher" / "student")},
        "student": {"config": student_arch},
        "data": data, "loss": {"kd_weight": 0.0, "ce_weight": 1.0},
        "train": {**common_train, "max_steps": args.steps, "lr": 3e-3, "output_dir": str(out / "baseline")},
    }
    distilled_cfg = {
        "teacher": {"model": str(out / "teacher" / "student")},
        "student": {"config": student_arch},
        "data": data, "loss": {"divergence": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.0},
        "train": {**common_train, "max_steps": args.steps, "lr": 3e-3, "output_dir": str(out / "distilled")},
    }
    results = {}
    for name, cfg in (("teacher", teacher_cfg), ("baseline", baseline_cfg), ("distilled", distilled_cfg)):
        (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        print(f"== distill train {out / f'{name}.yaml'}", flush=True)
        results[name] = train(out / f"{name}.yaml")
    print(f"\n{'model':<10} {'eval ce':>8} {'ppl':>8} {'KL to teacher':>14} {'top-1 agree':>12}")
    for name, r in results.items():
        kl = f"{r['eval/forward_kl']:14.4f}" if "eval/forward_kl" in r else f"{'-':>14}"
        agree = f"{r['eval/top1_agreement']:12.3f}" if "eval/top1_agreement" in r else f"{'-':>12}"
        print(f"{name:<10} {r['eval/ce']:8.4f} {r['eval/ppl']:8.3f} {kl} {agree}")
    print(f"\nconfigs, metrics.jsonl and students are in {out}/; tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
