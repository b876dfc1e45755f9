"""Tiny tokenizers, models and data for the tests: built in-process, no network."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

WORDS = ("the a one some every cat dog bird fish fox mouse horse sees likes eats chases finds follows "
         "red big small quick lazy old young happy and then but near under over river tree house "
         "field garden quietly fast slowly today").split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def make_tokenizer(path: Path, *, shuffle_seed: int | None = None):
    """A word-level tokenizer over WORDS, saved in Hugging Face format. ``shuffle_seed`` permutes
    the ids (same size, different mapping: a mismatched tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    words = list(WORDS)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(words)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(path)
    return tok


def make_llama(path: Path, *, vocab_size: int, layers: int = 2, hidden: int = 32, seed: int = 0,
               tie: bool = False):
    """A tiny random Llama saved with safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=tie, bos_token_id=2, eos_token_id=3,
                      pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    return model


def sentence(rng: random.Random) -> str:
    """Sentences from a small grammar, so a model has structure to learn."""
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
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n_docs):
            doc = " and then ".join(sentence(rng) for _ in range(rng.randint(1, 4)))
            f.write(json.dumps({"text": doc}) + "\n")
    return path


def write_prompt_completion(path: Path, n: int, seed: int = 0) -> Path:
    """Prompt/completion pairs whose completions have different lengths (1 to 3 sentences)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            completion = " and then ".join(sentence(rng) for _ in range(rng.randint(1, 3)))
            f.write(json.dumps({"prompt": sentence(rng) + " but", "completion": completion}) + "\n")
    return path


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, launcher: list[str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``distill ARGS`` in a fresh process (or under ``launcher``), capturing output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = (launcher or [sys.executable, "-m", "distill"]) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
