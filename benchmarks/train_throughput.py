"""Training throughput and peak memory: `distill train` vs a bare PyTorch loop vs TRL's GKD trainer.

    python benchmarks/train_throughput.py             # the table in BENCHMARKS.md (~10 min on 2 idle cores)
    python benchmarks/train_throughput.py --quick     # fewer steps, fp32, one pass (~2 min)
    python benchmarks/train_throughput.py --only bare distill-dense --precisions bf16
    python benchmarks/train_throughput.py --device cuda --arch 1b --seq-len 1024 --precisions bf16 \
        --only bare-chunked distill-chunked trl-liger        # the GPU comparison (benchmarks/gpu_efficiency.sh)

Everything is built in-process in a temporary folder (no network): a byte-level BPE tokenizer
trained with `tokenizers` on generated text (8192 tokens, a small chat template), a Llama teacher
(hidden 256, 4 layers) and a Llama student (hidden 128, 2 layers) saved with safetensors, and
chat data (one user turn, one assistant turn) in which every conversation is exactly
`--seq-len` tokens, so every contender sees B x T = 8 x 256 tokens per step, no padding.

Contenders, each in a fresh subprocess, all on the same models, tokenizer, data, batch size,
sequence length and objective (generalized JSD, beta 0.5, temperature 1, normalized by the
number of supervised tokens in the step), AdamW (torch.optim.AdamW, for-loop implementation),
gradient clipping at 1.0, no gradient checkpointing, no evaluation, no intermediate checkpoints:

- bare: a plain PyTorch loop over pre-collated batches: teacher forward under no_grad, student
  forward, `distill.losses.jsd` on the supervised positions, backward, clip, AdamW step. The floor.
- bare-chunked: the same loop calling `distill.losses.chunked_kd_loss` on the hidden states (distill's
  default chunk size): the floor for distill's default path.
- distill-dense / distill-chunked / distill-compiled: `distill.train(...)` with `data.format=chat`,
  `loss.divergence=jsd loss.beta=0.5`, `loss.chunk_size=0` (dense logits) or the config default
  (chunked LM-head loss; distill-compiled adds `loss.compile=true`), `train.tracker=none train.progress=false`.
- trl: `trl.experimental.gkd.GKDTrainer` with `lmbda=0` (no on-policy generation), `beta=0.5`,
  `seq_kd=False`, on the same chat data through its default collator (DataCollatorForChatML).
  Non-default settings, to do the same work as the others: `gradient_checkpointing=False` and
  `bf16` per run (SFTConfig defaults to True for both), `optim="adamw_torch"` (default: fused).
- trl-liger: the same with `use_liger_kernel=True`: GKDTrainer then runs the decoders only and
  Liger-Kernel's `LigerFusedLinearJSDLoss` (chunked, `compiled=False`) on the hidden states.

`--device cuda` trains every contender on the GPU (the step clock synchronises before each
timestamp; memory is `torch.cuda.max_memory_allocated`, and the table adds MFU = tokens/s ·
(6·N_student + 2·N_teacher) / the GPU's bf16 peak, N counting the parameters that multiply every
token). `--arch 1b` builds the GPU shapes instead: a Llama-3.2-1B-shaped teacher (1.24B) and a
Qwen2.5-0.5B-shaped Llama student (0.49B), tied embeddings, V = 128256 through a word-level
tokenizer (every generated word one token), saved in bf16 (random weights).

Throughput: a global optimizer step hook (`torch.optim.optimizer.register_optimizer_step_post_hook`)
timestamps every optimizer step in every contender; tokens/s = tokens in steps `warmup+1..N`
divided by the time from the end of step `warmup` to the end of step N, so model loading,
tokenization, warmup and the final save are excluded and everything each framework does per step
(data fetching, collation, logging, callbacks) is included. distill's own `tokens_per_s` from
metrics.jsonl is reported next to it as a cross-check.

Memory: `baseline` is the process's RSS after importing the contender's libraries (before any model
or data is loaded); `peak` is the process's `VmHWM` at the end of the run (the lifetime peak RSS; until
2026-12-07 this was `ru_maxrss`, which Linux floors at the parent's RSS at fork, see benchmarks/host.py); `peak - baseline` is what the run itself added: models, optimizer state,
data, activations, logits and loss temporaries, allocator caches.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from host import peak_rss_bytes, rss_bytes  # benchmarks/host.py (the script's folder is on sys.path)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve()
VOCAB_SIZE = 8192
TEACHER = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4)
STUDENT = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2)
# --arch 1b: the GPU shapes of the issue: a Llama-3.2-1B-shaped teacher (1.24B parameters) and a
# Qwen2.5-0.5B-shaped Llama student (0.49B), both with tied embeddings and Llama 3's 128256-token
# vocabulary (a word-level tokenizer: a BPE of that size cannot be learnt from generated text).
ARCHS = {
    "small": dict(teacher=TEACHER, student=STUDENT, vocab=VOCAB_SIZE, tied=False),
    "1b": dict(teacher=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                            num_key_value_heads=8),
               student=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                            num_key_value_heads=2),
               vocab=128256, tied=True),
}
SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CONTENDERS = ["bare", "bare-chunked", "distill-dense", "distill-chunked", "distill-compiled", "trl", "trl-liger"]
LR = 1e-4


# ---------------------------------------------------------------------------------------------
# Workspace: tokenizer, models, data (built once, in the parent)


class Lexicon:
    """A generated 'language': pronounceable words with Zipfian frequencies, so BPE has something
    to learn and text has realistic token/word ratios."""

    def __init__(self, seed: int = 0, size: int = 6000):
        rng = random.Random(seed)
        onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
                  "br", "cr", "dr", "st", "tr", "pl", "gr", "sh", "ch", "th"]
        vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
        codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]
        words = set()
        while len(words) < size:
            n = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
            words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(n)))
        self.words = sorted(words)
        rng.shuffle(self.words)
        self.cum_weights = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(self.words))))  # Zipf

    def sentence(self, rng: random.Random) -> str:
        words = rng.choices(self.words, cum_weights=self.cum_weights, k=rng.randint(5, 18))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2025)))
        text = " ".join(words)
        return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "?", "!", ";"])

    def words_stream(self, rng: random.Random, n_sentences: int) -> list[str]:
        return " ".join(self.sentence(rng) for _ in range(n_sentences)).split(" ")


def build_tokenizer(path: Path, lexicon: Lexicon):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(1)
    corpus = [" ".join(lexicon.sentence(rng) for _ in range(8)) for _ in range(6000)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 4096
    tok.save_pretrained(path)
    return tok


PUNCTUATION = [".", "?", "!", ";"]
NUMBERS = [str(i) for i in range(2026)]  # what Lexicon.sentence inserts


def build_word_tokenizer(path: Path, vocab_size: int, seed: int = 0):
    """A word-level tokenizer of exactly ``vocab_size`` entries (specials, punctuation, numbers, generated
    words) and the Lexicon whose text it covers: every word of that text is one token (lower-cased first)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS + ["<unk>"]
    lexicon = Lexicon(seed, size=vocab_size - len(specials) - len(PUNCTUATION) - len(NUMBERS))
    vocab = {t: i for i, t in enumerate(specials + PUNCTUATION + NUMBERS + lexicon.words)}
    assert len(vocab) == vocab_size, "generated words must be distinct from numbers and specials"
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 4096
    tok.save_pretrained(path)
    return tok, lexicon


def matmul_params(model) -> int:
    """Parameters that multiply every token: all but the input embedding table, the (tied) LM head counted once."""
    n = sum(p.numel() for p in model.parameters())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return n if embed is head else n - embed.numel()


def build_model(path: Path, arch: dict, tokenizer, seed: int, *, tied: bool = False, dtype=None,
                device: str = "cpu") -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=tied,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, **arch)
    with torch.device(device):  # a 1.2B model initialises in seconds on a GPU, in minutes on 2 CPU cores
        model = AutoModelForCausalLM.from_config(cfg)
    info = {"params": sum(p.numel() for p in model.parameters()), "matmul_params": matmul_params(model)}
    if dtype is not None:
        model.to(dtype)  # random weights: bf16 on disk halves the write and every contender's read
    model.save_pretrained(path)  # safetensors
    tokenizer.save_pretrained(path)
    return info


def build_chat_data(path: Path, tokenizer, lexicon: Lexicon, *, n: int, seq_len: int, seed: int = 2) -> dict:
    """``n`` conversations (user, assistant) that render to exactly ``seq_len`` tokens each."""
    rng = random.Random(seed)
    rows, prompt_lens = [], []

    def length(messages):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    while len(rows) < n:
        user = " ".join(lexicon.sentence(rng) for _ in range(rng.randint(1, 3)))
        words = lexicon.words_stream(rng, 40 + seq_len // 8)
        lo, hi = 1, len(words)  # the largest number of assistant words that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": " ".join(words[:mid])}]
            lo, hi = (mid, hi) if length(msgs) <= seq_len else (lo, mid - 1)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": " ".join(words[:lo])}]
        if length(messages) != seq_len:
            continue  # the next word adds more than one token; draw another conversation
        prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        prompt_lens.append(len(tokenizer(prompt, add_special_tokens=False)["input_ids"]))
        rows.append({"messages": messages})
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return {"examples": n, "mean_prompt_tokens": statistics.mean(prompt_lens)}


def build_workspace(root: Path, *, n_examples: int, seq_len: int, arch: str = "small", device: str = "cpu") -> dict:
    a = ARCHS[arch]
    if arch == "small":
        lexicon = Lexicon()
        tok = build_tokenizer(root / "tokenizer", lexicon)
        dtype = None
    else:
        import torch

        tok, lexicon = build_word_tokenizer(root / "tokenizer", a["vocab"])
        dtype = torch.bfloat16
    teacher = build_model(root / "teacher", a["teacher"], tok, seed=1, tied=a["tied"], dtype=dtype, device=device)
    student = build_model(root / "student", a["student"], tok, seed=2, tied=a["tied"], dtype=dtype, device=device)
    info = {
        "arch": arch, "vocab": len(tok),
        "teacher_params": teacher["params"], "student_params": student["params"],
        "teacher_matmul_params": teacher["matmul_params"], "student_matmul_params": student["matmul_params"],
    }
    info.update(build_chat_data(root / "chat.jsonl", tok, lexicon, n=n_examples, seq_len=seq_len))
    return info


def check_correspondence(root: Path, seq_len: int, device: str = "cpu", rows_checked: int = 8) -> dict:
    """distill's chat tokenization == TRL's collator (ids and supervised positions), and distill's jsd
    (dense and chunked) == TRL's generalized_jsd_loss on one real batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.data import collate, load_tokenized
    from distill.losses import chunked_kd_loss, kd_loss

    tok = AutoTokenizer.from_pretrained(root / "student")
    ds = load_tokenized(str(root / "chat.jsonl"), tokenizer=tok, format="chat", max_length=seq_len,
                        cache_dir=root / "cache-check")
    rows = [json.loads(line) for line in (root / "chat.jsonl").read_text().splitlines()]
    out = {"distill_examples": len(ds), "distill_supervised_per_example": None}
    supervised = [sum(1 for x in labels[1:] if x != -100) for labels in ds["labels"]]
    out["distill_supervised_per_example"] = statistics.mean(supervised)
    k = rows_checked
    batch = collate([dict(input_ids=i, labels=l) for i, l in zip(ds[:k]["input_ids"], ds[:k]["labels"])],
                    pad_token_id=tok.pad_token_id)
    try:
        from trl.experimental.gkd import GKDTrainer
        from trl.experimental.utils import DataCollatorForChatML
    except ImportError:
        out["trl"] = "not installed: correspondence not checked"
        return out
    collator = DataCollatorForChatML(tokenizer=tok, max_length=seq_len)
    same_ids = same_labels = True
    for start in range(0, len(rows), 64):
        trl_batch = collator(rows[start:start + 64])
        ours = collate([dict(input_ids=i, labels=l) for i, l in
                        zip(ds[start:start + 64]["input_ids"], ds[start:start + 64]["labels"])],
                       pad_token_id=tok.pad_token_id)
        same_ids &= torch.equal(trl_batch["input_ids"], ours["input_ids"])
        same_labels &= torch.equal(trl_batch["labels"], ours["labels"])
    out["same_input_ids_as_trl"] = bool(same_ids)
    out["same_labels_as_trl"] = bool(same_labels)

    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=torch.float32).to(device)
    student = AutoModelForCausalLM.from_pretrained(root / "student", dtype=torch.float32).to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    with torch.no_grad():
        s_logits = student(**inputs).logits[:, :-1]
        t_logits = teacher(**inputs).logits[:, :-1]
        s_hidden = student.model(**inputs).last_hidden_state[:, :-1][mask]
        t_hidden = teacher.model(**inputs).last_hidden_state[:, :-1][mask]
    trl_loss = GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels=labels, beta=0.5).item()
    n = mask.sum().item()
    dense = kd_loss(s_logits, t_logits, labels, divergence="jsd", beta=0.5).loss.item() / n
    chunked = chunked_kd_loss(s_hidden, student.lm_head.weight.detach(), labels[mask], teacher_hidden=t_hidden,
                              teacher_weight=teacher.lm_head.weight, divergence="jsd", beta=0.5).loss.item() / n
    out.update(trl_jsd=trl_loss, distill_dense_jsd=dense, distill_chunked_jsd=chunked)
    return out


# ---------------------------------------------------------------------------------------------
# Workers: one contender per fresh process


def cpu_snapshot() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, CPU seconds used by this process), both since boot/start."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    busy = sum(values) - values[3] - values[4]  # all but idle and iowait
    me = resource.getrusage(resource.RUSAGE_SELF)
    return busy / os.sysconf("SC_CLK_TCK"), me.ru_utime + me.ru_stime


class StepClock:
    """Timestamps the end of every optimizer step, whoever calls it (a global torch hook), and how much
    CPU other processes used meanwhile."""

    def __init__(self, warmup: int, cuda: bool = False):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.warmup = warmup
        self.cuda = cuda
        self.times: list[float] = []
        self.cpu_start = self.cpu_end = None
        register_optimizer_step_post_hook(self._hook)

    def _hook(self, *_):
        if self.cuda:  # the step's kernels are queued, not done: wait for them
            import torch

            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if len(self.times) == self.warmup:
            self.cpu_start = cpu_snapshot()
        elif len(self.times) > self.warmup:
            self.cpu_end = cpu_snapshot()

    def summary(self, tokens_per_step: int, supervised_per_step: float) -> dict:
        t, warmup = self.times, self.warmup
        if warmup < 1 or len(t) <= warmup:
            raise RuntimeError(f"only {len(t)} optimizer steps were seen (warmup {warmup}, at least 1)")
        steps = len(t) - warmup
        elapsed = t[-1] - t[warmup - 1]
        per_step = [b - a for a, b in zip(t[warmup - 1:], t[warmup:])]
        machine = self.cpu_end[0] - self.cpu_start[0]
        mine = self.cpu_end[1] - self.cpu_start[1]
        return {"steps_seen": len(t), "timed_steps": steps, "s_per_step": elapsed / steps,
                "s_per_step_median": statistics.median(per_step),
                "tokens_per_s": tokens_per_step * steps / elapsed,
                "supervised_tokens_per_s": supervised_per_step * steps / elapsed,
                "cpu_mine": mine / (elapsed * os.cpu_count()),
                "cpu_others": max(0.0, machine - mine) / (elapsed * os.cpu_count())}


def worker_bare(args, clock: StepClock) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.data import collate, load_tokenized
    from distill.losses import chunked_kd_loss, jsd

    root, device = Path(args.workspace), args.device
    bf16 = args.precision == "bf16"
    tok = AutoTokenizer.from_pretrained(root / "student")
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=torch.bfloat16 if bf16 else torch.float32)
    teacher.to(device).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(root / "student", dtype=torch.float32)
    student.to(device).train()
    ds = load_tokenized(str(root / "chat.jsonl"), tokenizer=tok, format="chat", max_length=args.seq_len,
                        cache_dir=Path(args.out) / "cache")
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(ds), generator=g).tolist()
    batches = []
    for step in range(args.steps):
        idx = [order[(step * args.batch_size + i) % len(ds)] for i in range(args.batch_size)]
        rows = ds[idx]
        batch = collate([dict(input_ids=i, labels=l) for i, l in zip(rows["input_ids"], rows["labels"])],
                        pad_token_id=tok.pad_token_id)
        batches.append({k: v.to(device) for k, v in batch.items()})
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR)
    losses = []
    for batch in batches:
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = batch["labels"][:, 1:] != -100  # (B, T-1)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            if args.chunk_size:  # distill's fused LM-head loss, called directly
                with torch.no_grad():
                    t_hidden = teacher.model(**inputs).last_hidden_state[:, :-1][mask]  # (N, d_t)
                hidden = student.model(**inputs).last_hidden_state[:, :-1][mask]  # (N, d)
                loss = chunked_kd_loss(hidden, student.lm_head.weight, batch["labels"][:, 1:][mask],
                                       teacher_hidden=t_hidden, teacher_weight=teacher.lm_head.weight,
                                       divergence="jsd", beta=0.5, chunk_size=args.chunk_size).loss / mask.sum()
            else:
                with torch.no_grad():
                    t_logits = teacher(**inputs).logits[:, :-1][mask]  # (N, V)
                s_logits = student(**inputs).logits[:, :-1][mask]  # (N, V)
                loss = jsd(s_logits, t_logits, beta=0.5).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"first_loss": losses[0], "last_loss": losses[-1], "chunk_size": args.chunk_size or 0}


def worker_distill(args, clock: StepClock) -> dict:
    import distill

    root, out = Path(args.workspace), Path(args.out)
    os.environ["DISTILL_CACHE"] = str(out / "cache")
    overrides = [
        f"teacher.model={root / 'teacher'}", f"student.model={root / 'student'}",
        f"data.train={root / 'chat.jsonl'}", "data.format=chat", f"data.max_length={args.seq_len}",
        "loss.divergence=jsd", "loss.beta=0.5", "loss.temperature=1.0", "loss.kd_weight=1.0", "loss.ce_weight=0.0",
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.lr={LR}",
        f"train.precision={args.precision}", "train.tracker=none", "train.progress=false",
        f"train.log_every={args.warmup}", "train.max_grad_norm=1.0", f"train.output_dir={out / 'run'}",
    ]
    if args.chunk_size is not None:
        overrides.append(f"loss.chunk_size={args.chunk_size}")
    if args.compile:
        overrides.append("loss.compile=true")
    distill.train(None, overrides)
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "tokens_per_s" in r]
    steady = train[1:]  # the first window holds the warmup steps
    own = (sum(r["tokens_per_s"] for r in steady) / len(steady)) if steady else None
    config = (out / "run" / "config.yaml").read_text()
    chunk = next(line.split(":")[1].strip() for line in config.splitlines() if "chunk_size" in line)
    return {"first_loss": train[0]["loss"], "last_loss": train[-1]["loss"], "own_tokens_per_s": own,
            "chunk_size": int(chunk)}


def worker_trl(args, clock: StepClock) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    root, out = Path(args.workspace), Path(args.out)
    rows = [json.loads(line) for line in (root / "chat.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(root / "student")
    # On CUDA the teacher is held in bf16 under bf16, as distill and the bare loop hold it (the CPU table
    # was measured with a float32 teacher under bf16 autocast: the same matmuls, more memory).
    teacher_dtype = torch.bfloat16 if args.precision == "bf16" and args.device == "cuda" else torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=teacher_dtype)
    student = AutoModelForCausalLM.from_pretrained(root / "student", dtype=torch.float32)
    config = GKDConfig(
        output_dir=str(out / "run"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0,
        max_grad_norm=1.0, weight_decay=0.0, optim="adamw_torch", bf16=args.precision == "bf16", fp16=False,
        gradient_checkpointing=False, use_cpu=args.device == "cpu", use_liger_kernel=args.liger,
        max_length=args.seq_len, lmbda=0.0, beta=0.5,
        temperature=1.0, seq_kd=False, logging_steps=args.warmup, save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                         processing_class=tok)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return {"first_loss": logs[0]["loss"] if logs else None, "last_loss": logs[-1]["loss"] if logs else None,
            "trl_settings": {k: getattr(config, k) for k in ("optim", "gradient_checkpointing", "bf16", "lmbda",
                                                              "beta", "temperature", "seq_kd", "max_length",
                                                              "use_liger_kernel")}}


WORKERS = {"bare": worker_bare, "distill": worker_distill, "trl": worker_trl}


def run_worker(args) -> None:
    import torch  # noqa: F401  (baseline includes torch and the contender's libraries)

    if args.worker == "distill":
        import distill.training  # noqa: F401
    elif args.worker == "trl":
        import trl.experimental.gkd  # noqa: F401
    else:
        import transformers  # noqa: F401
        import distill.losses  # noqa: F401
        import distill.data  # noqa: F401
    baseline = rss_bytes()
    cuda = args.device == "cuda"
    clock = StepClock(args.warmup, cuda=cuda)
    extra = WORKERS[args.worker](args, clock)
    result = {"precision": args.precision, "device": args.device, "threads": torch.get_num_threads(),
              "baseline_rss": baseline, "peak_rss": peak_rss_bytes(), **extra}
    if cuda:  # every tensor the run held at its worst moment (models, optimizer state, activations, loss)
        result["cuda_peak"] = torch.cuda.max_memory_allocated()
    tokens_per_step = args.batch_size * args.seq_len
    result.update(clock.summary(tokens_per_step, args.supervised_per_example * args.batch_size))
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The parent: build, check, run each contender in its own process, print the table


def cpu_busy(seconds: float = 2.0) -> float:
    """Fraction of all cores busy (user + system) over ``seconds``, from /proc/stat."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_quiet(limit: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until other processes keep less than ``limit`` of the CPU busy."""
    start = time.time()
    busy = cpu_busy()
    while busy > limit and time.time() - start < max_wait:
        busy = cpu_busy(5.0)
    return busy


def run_one(name: str, precision: str, out: Path, args, steps: int, warmup: int, supervised: float) -> dict | None:
    if args.reuse and (out / "result.json").exists():  # a finished run of an earlier invocation
        r = json.loads((out / "result.json").read_text())
        if "name" in r:
            print(f"  {name:16s} {precision}: {r['tokens_per_s']:6.0f} tok/s (reused {out.name}), "
                  f"others {r['cpu_others']:.0%}", flush=True)
            return r
    busy = wait_for_quiet(args.max_busy, args.max_wait)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(HERE), "--worker", name.split("-")[0], "--workspace", str(out.parent),
           "--out", str(out), "--result", str(out / "result.json"), "--precision", precision,
           "--steps", str(steps), "--warmup", str(warmup), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--supervised-per-example", str(supervised), "--device", args.device]
    if name == "trl-liger":
        cmd.append("--liger")
    if name == "distill-compiled":
        cmd.append("--compile")
    if name == "distill-dense":
        cmd += ["--chunk-size", "0"]
    elif name == "bare-chunked":
        from distill.config import LossConfig

        cmd += ["--chunk-size", str(LossConfig().chunk_size)]  # what distill train uses by default
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {name} {precision}: FAILED\n{proc.stderr[-4000:]}", flush=True)
        return None
    r = json.loads((out / "result.json").read_text())
    r.update(name=name, cpu_busy_before=busy, wall_s=time.time() - start)
    (out / "result.json").write_text(json.dumps(r))
    cuda_peak = f"peak CUDA {mib(r['cuda_peak'])} MiB  " if "cuda_peak" in r else ""
    print(f"  {name:16s} {precision}: {r['tokens_per_s']:6.0f} tok/s  {r['s_per_step']:.3f} s/step  {cuda_peak}"
          f"peak RSS {mib(r['peak_rss'])} MiB (+{mib(r['peak_rss'] - r['baseline_rss'])} over imports)  "
          f"CPU while timed: this run {r['cpu_mine']:.0%}, others {r['cpu_others']:.0%}  [{r['wall_s']:.0f}s]",
          flush=True)
    return r


def machine_info() -> dict:
    import accelerate
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version

        liger_version = version("liger-kernel")
    except ImportError:
        liger_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "liger_kernel": liger_version,
            "bf16_isa": [f for f in ("avx512_bf16", "amx_bf16", "avx512f") if f in flags],
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "trl": trl_version,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes")}


def mib(x: float) -> str:
    return f"{x / 2**20:.0f}"


# the bare loop on the same loss path: dense logits, or a fused chunked head
BARE_OF = {"bare": "bare", "distill-dense": "bare", "trl": "bare", "bare-chunked": "bare-chunked",
           "distill-chunked": "bare-chunked", "distill-compiled": "bare-chunked", "trl-liger": "bare-chunked"}


def contender_label(name: str, r: dict) -> str:
    if name.startswith("trl"):
        return name
    loss = f"chunked {r['chunk_size']}" if r.get("chunk_size") else "dense"
    return f"{name.split('-')[0]}, {loss}" + (", compiled" if name.endswith("compiled") else "")


def table(best: dict, precisions: list[str], flops_per_token: float | None = None,
          peak_flops: float | None = None) -> list[str]:
    """The results as a Markdown table; ratios against the bare loop on the same loss path and against TRL
    (with Liger where it ran) at the same precision.

    On a GPU (``peak_flops`` given) memory is ``torch.cuda.max_memory_allocated`` and an MFU column is added:
    tokens/s · ``flops_per_token`` / ``peak_flops``; on the CPU memory is peak RSS, whole and above imports."""
    gpu = bool(peak_flops)
    head = (["precision", "contender", "tokens/s"] + ["MFU"] * gpu + ["s/step", "÷ bare", "÷ TRL"]
            + (["peak CUDA memory (MiB)"] if gpu else ["peak RSS (MiB)", "peak − imports (MiB)"])
            + ["÷ TRL", "loss, first → last window"] + ["CPU used by others"] * (not gpu))

    def memory(r: dict) -> float:
        return r["cuda_peak"] if gpu else r["peak_rss"] - r["baseline_rss"]

    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if h in ("precision", "contender") or
                                                          h.startswith("loss") else "--:" for h in head) + "|"]
    order = sorted(best, key=lambda k: (precisions.index(k[0]), CONTENDERS.index(k[1])))
    for precision, name in order:
        r = best[(precision, name)]
        bare = best.get((precision, BARE_OF[name]))
        trl = best.get((precision, "trl-liger")) or best.get((precision, "trl"))
        cells = [precision, contender_label(name, r), f"{r['tokens_per_s']:,.0f}"]
        if gpu:
            cells.append(f"{r['tokens_per_s'] * flops_per_token / peak_flops:.1%}")
        cells += [f"{r['s_per_step']:.3f}", f"{r['tokens_per_s'] / bare['tokens_per_s']:.2f}" if bare else "–",
                  f"{r['tokens_per_s'] / trl['tokens_per_s']:.2f}" if trl else "–"]
        cells += [mib(r["cuda_peak"])] if gpu else [mib(r["peak_rss"]), mib(memory(r))]
        cells += [f"{memory(r) / memory(trl):.2f}" if trl else "–",
                  f"{r['first_loss']:.4f} → {r['last_loss']:.4f}" if r.get("first_loss") is not None else "–"]
        if not gpu:
            cells.append(f"{r['cpu_others']:.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps, fp32 only")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run, warmup included (default 15)")
    p.add_argument("--warmup", type=int, default=None, help="steps excluded from timing (default 3)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16"])
    p.add_argument("--only", nargs="+", default=CONTENDERS, choices=CONTENDERS)
    p.add_argument("--repeats", type=int, default=None, help="run the whole set this many times (interleaved), "
                   "keep the fastest (default 2, --quick 1)")
    p.add_argument("--max-busy", type=float, default=0.15, help="before each run, wait (up to --max-wait s) "
                   "until other processes keep less than this fraction of the CPU busy")
    p.add_argument("--max-wait", type=float, default=300)
    p.add_argument("--max-others", type=float, default=0.05, help="rerun a contender (up to --retries times) when "
                   "other processes used more than this fraction of the CPU while it was timed")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--workdir", default=None, help="keep the workspace here (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true", help="with --workdir: keep the results of runs that an "
                   "earlier invocation finished there (same settings assumed)")
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every contender trains")
    p.add_argument("--arch", default="small", choices=sorted(ARCHS), help="models and vocabulary: 'small' (the "
                   "CPU table) or '1b' (1.24B teacher, 0.49B student, V=128256: the GPU shapes)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak for MFU "
                   "(default: 989 on an H100 or H200, the SXM datasheet figure)")
    # worker mode (internal)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--workspace", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--supervised-per-example", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--liger", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return run_worker(args)

    steps = args.steps or (8 if args.quick else 15)
    args.repeats = args.repeats or (1 if args.quick else 2)
    warmup = args.warmup or (2 if args.quick else 3)
    precisions = args.precisions or (["fp32"] if args.quick else ["fp32", "bf16"])
    tmp = None
    if args.workdir:
        root = Path(args.workdir)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="distill-bench-")
        root = Path(tmp.name)

    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), GPU {info['gpu']}, "
          f"bf16 ISA: {info['bf16_isa'] or 'none'}; torch {info['torch']}, transformers {info['transformers']}, "
          f"accelerate {info['accelerate']}, trl {info['trl']}, liger-kernel {info['liger_kernel']}; {info['date']}", flush=True)
    t0 = time.time()
    if not (root / "chat.jsonl").exists():
        ws = build_workspace(root, n_examples=args.examples, seq_len=args.seq_len, arch=args.arch, device=args.device)
        (root / "workspace.json").write_text(json.dumps(ws))
    ws = json.loads((root / "workspace.json").read_text())
    check = check_correspondence(root, args.seq_len, device=args.device, rows_checked=8 if args.arch == "small" else 2)
    print(f"workspace ({time.time() - t0:.0f}s): vocab {ws['vocab']}, teacher {ws['teacher_params'] / 1e6:.2f}M "
          f"params, student {ws['student_params'] / 1e6:.2f}M, {ws['examples']} chat examples x {args.seq_len} "
          f"tokens (prompt {ws['mean_prompt_tokens']:.1f} on average)", flush=True)
    print("correspondence:", json.dumps(check), flush=True)
    supervised = check["distill_supervised_per_example"]

    runs = []
    for precision in precisions:
        for name in args.only:
            if (name.startswith("trl") and info["trl"] is None) or (name == "trl-liger" and info["liger_kernel"] is None):
                continue
            if name == "trl-liger" and args.device == "cpu":  # use_liger_kernel also swaps in Triton kernels
                print("  trl-liger: skipped on the CPU (use_liger_kernel patches the model with Triton GPU kernels)")
                continue
            runs.append((precision, name))
    results = []
    for repeat in range(args.repeats):
        for precision, name in runs:
            for attempt in range(1 + args.retries):
                r = run_one(name, precision, root / f"out-{name}-{precision}-{repeat}-{attempt}", args, steps,
                            warmup, supervised)
                if r is None:
                    break
                r.update(repeat=repeat, attempt=attempt)
                results.append(r)
                if r["cpu_others"] <= args.max_others:
                    break
                print(f"    other processes used {r['cpu_others']:.0%} of the CPU while it was timed: again",
                      flush=True)

    best = {}
    for r in results:  # the fastest of the repeats (interference only ever slows a run down)
        key = (r["precision"], r["name"])
        if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = r
    print()
    print(f"{steps} steps of {args.batch_size} x {args.seq_len} tokens, the first {warmup} not timed, best of "
          f"{args.repeats}; {supervised:.1f} of the {args.seq_len - 1} predicted positions per example supervised")
    peak_flops = None
    if args.device == "cuda":
        gpu = info["gpu"] or ""
        peak_flops = 1e12 * (args.peak_tflops or (989.0 if ("H100" in gpu or "H200" in gpu) else float("nan")))
    flops_per_token = 6 * ws["student_matmul_params"] + 2 * ws["teacher_matmul_params"]
    if peak_flops:
        print(f"MFU = tokens/s x (6 N_student + 2 N_teacher) / {peak_flops / 1e12:.0f} TFLOP/s, N = parameters "
              f"multiplying every token (student {ws['student_matmul_params'] / 1e6:.0f}M, teacher "
              f"{ws['teacher_matmul_params'] / 1e6:.0f}M): {flops_per_token / 1e9:.2f} GFLOP per token, "
              f"attention's own FLOPs not counted")
    print("\n".join(table(best, precisions, flops_per_token, peak_flops)))
    own = [(k, r["own_tokens_per_s"]) for k, r in best.items() if r.get("own_tokens_per_s")]
    if own:
        print("distill's own metrics.jsonl tokens_per_s (windows after the first): "
              + ", ".join(f"{n} {p}: {v:.0f}" for (p, n), v in own))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "workspace": ws, "correspondence": check,
                                               "steps": steps, "warmup": warmup, "results": results}, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
