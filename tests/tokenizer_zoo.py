"""Real tokenizers of different kinds, trained here with `tokenizers` (no downloads), for
cross-tokenizer tests and the cross-tokenizer benchmark.

- ``bpe``: byte-level BPE like the bundled 8k tokenizer (GPT-2 / Llama 3 / Qwen style), any size;
- ``unigram``: SentencePiece-style unigram with ``▁`` for spaces and ``<0xNN>`` byte fallback (Llama 2,
  Gemma, T5 style), with a BOS token added in front of every sequence;
- ``wordpiece``: BERT-style WordPiece (``##`` continuations, whitespace dropped, lowercase off).

All are wrapped as ``PreTrainedTokenizerFast`` (fast: offsets available).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BYTES = [f"<0x{b:02X}>" for b in range(256)]


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int, *, pad: bool = False) -> PreTrainedTokenizerFast:
    """``pad`` (bpe): a separate ``<pad>`` token first, so every id differs from a tokenizer without it."""
    texts = list(texts)
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<pad>", "<|endoftext|>"] if pad else ["<|endoftext|>"]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                       pad_token=specials[0])
    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                          unk_token="<unk>", initial_alphabet=[], show_progress=False,
                                          max_piece_length=12)
        tok.train_from_iterator(texts, trainer)
        tok.add_tokens([t for t in BYTES if tok.token_to_id(t) is None])
        tok.model = models.Unigram([(p, s) for p, s in _pieces(tok)], unk_id=tok.token_to_id("<unk>"), byte_fallback=True)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>")
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                                            show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[SEP]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    raise ValueError(kind)


def _pieces(tok: Tokenizer):
    """The unigram model's pieces and scores, byte tokens appended with a low score."""
    import json

    model = json.loads(tok.to_str())["model"]
    pieces = [(p, s) for p, s in model["vocab"]]
    have = {p for p, _ in pieces}
    low = min(s for _, s in pieces) - 10.0
    return pieces + [(b, low) for b in BYTES if b not in have]


def corpus_texts(limit_chars: int = 400_000) -> list[str]:
    """Text of the bundled CPython corpus (train split), up to ``limit_chars``."""
    import pyarrow.parquet as pq

    path = Path(__file__).resolve().parents[1] / "distill" / "assets" / "corpus" / "train.parquet"
    out, total = [], 0
    for text in pq.read_table(path, columns=["text"]).column("text").to_pylist():
        out.append(text)
        total += len(text)
        if total >= limit_chars:
            break
    return out


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] | trim }} [/INST]"
        "{% else %} {{ m['content'] | trim }}{{ eos_token }}{% endif %}{% endfor %}")


def with_chat_template(tok: PreTrainedTokenizerFast, style: str) -> PreTrainedTokenizerFast:
    """A copy of ``tok`` with a chat template: "chatml" (``<|im_start|>`` / ``<|im_end|>`` added as special
    tokens, Qwen-style) or "inst" (plain-text ``[INST]`` markers, contents trimmed, EOS after each answer,
    Llama-2-style)."""
    import copy

    tok = copy.deepcopy(tok)
    if style == "chatml":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML
    elif style == "inst":
        tok.chat_template = INST
    else:
        raise ValueError(style)
    return tok
