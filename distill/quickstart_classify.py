"""`distill quickstart --task classify`: classifier distillation end to end, offline, on a CPU.

On the bundled Rotten Tomatoes snippets (``distill/assets/sentiment``, fresh / rotten, split by
movie; see its manifest): a WordPiece tokenizer is trained on the training split, a BERT teacher
is trained by `distill train` on the labels, then one small student architecture twice, with the
same data, steps, seed and initialization: on the labels alone (cross-entropy) and distilled
(Hinton's soft targets at temperature τ plus the labels). Teacher and students are evaluated on
the held-out test split by `distill eval` (accuracy, macro-F1, calibration, agreement, latency,
size), which writes ``report.html``; the summary goes to ``quickstart.json``.

Step counts are fixed numbers (scaled by ``--minutes``), so the same command gives the same models
on any machine.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Optional

DATA = Path(str(resources.files("distill") / "assets" / "sentiment"))
VOCAB_SIZE = 8000
MAX_LENGTH = 64
TEACHER_ARCH = dict(model_type="bert", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=4, max_position_embeddings=MAX_LENGTH)
STUDENT_ARCH = dict(model_type="bert", hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=MAX_LENGTH)
# The distillation objective, chosen by the experiment in BENCHMARKS.md ("Classifier distillation").
DISTILL_LOSS = dict(divergence="forward_kl", temperature=2.0, kd_weight=1.0, ce_weight=0.5)
DEFAULT_MINUTES = 5.0
TEACHER_STEPS = 500  # per 5 minutes (about 1.6 epochs); the students take STUDENT_STEPS each
STUDENT_STEPS = 500
TEACHER_LR, STUDENT_LR = 2e-4, 3e-4  # post-LN BERTs from scratch: at 1e-3 they stay at the majority class
BATCH_SIZE = 32


def train_tokenizer(path: Path, texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A BERT-style WordPiece tokenizer (lowercased, [CLS] text [SEP]) trained on ``texts``, saved at ``path``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                             show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(path)
    return fast


def run_config(out: Path, name: str, *, arch: Optional[dict] = None, teacher: Optional[str] = None, steps: int,
               seed: int, loss: dict, features: Optional[dict] = None, lr: float = STUDENT_LR,
               max_eval_examples: Optional[int] = None) -> dict:
    """One `distill train` config of the quickstart (task: classification)."""
    loss = {**loss, **({"features": features} if features else {})}
    return {
        "task": "classification",
        "teacher": {"model": teacher},
        "student": {"config": dict(arch), "tokenizer": str(out / "tokenizer")},
        "data": {"train": str(DATA / "train.parquet"), "eval": str(DATA / "eval.parquet"), "max_length": MAX_LENGTH,
                 "max_eval_examples": max_eval_examples},
        "loss": loss,
        "train": {"output_dir": str(out / name), "max_steps": steps, "batch_size": BATCH_SIZE, "lr": lr,
                  "warmup_steps": max(1, steps // 20), "schedule": "cosine", "min_lr_ratio": 0.05,
                  "weight_decay": 0.01, "precision": "bf16", "seed": seed, "eval_every": max(1, steps // 2),
                  "eval_at_start": True, "save_every": max(1, steps // 2), "log_every": max(1, steps // 30),
                  "tracker": "none"},
    }


def train_run(config: dict, progress: bool = True) -> dict:
    """One run, as the LM quickstart runs its students (config written beside it, wall time kept)."""
    from distill.quickstart import train_student

    return train_student(config, progress)


def quickstart_classify(out: str | os.PathLike = "runs/quickstart-classify", *, minutes: float = DEFAULT_MINUTES,
                        steps: Optional[int] = None, seed: int = 0, max_eval_examples: Optional[int] = None,
                        progress: bool = True) -> dict:
    """Tokenizer, teacher, CE-only and distilled students; `distill eval` of all three on the test split."""
    import pyarrow.parquet as pq

    from distill.errors import UserError
    from distill.evaluate_classify import evaluate_classifiers
    from distill.report import write_report

    if not (DATA / "train.parquet").is_file():
        raise UserError(f"the bundled sentiment data is missing from {DATA}; reinstall distill")
    out = Path(out)
    scale = minutes / DEFAULT_MINUTES
    teacher_steps = steps or max(1, round(TEACHER_STEPS * scale))
    student_steps = steps or max(1, round(STUDENT_STEPS * scale))
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        print("== tokenizer: WordPiece on the training split", flush=True)
        train_tokenizer(out / "tokenizer", pq.read_table(DATA / "train.parquet").column("text").to_pylist())
    runs = {}
    print(f"== teacher: {teacher_steps} steps, cross-entropy on the labels", flush=True)
    runs["teacher"] = train_run(run_config(out, "teacher", arch=TEACHER_ARCH, steps=teacher_steps, seed=seed,
                                           loss={"kd_weight": 0.0, "ce_weight": 1.0}, lr=TEACHER_LR,
                                           max_eval_examples=max_eval_examples), progress)
    teacher = str(out / "teacher" / "student")
    for name, loss in (("baseline", {"kd_weight": 0.0, "ce_weight": 1.0}), ("distilled", DISTILL_LOSS)):
        what = "cross-entropy only" if name == "baseline" else (
            f"{loss['divergence']} at temperature {loss['temperature']} + {loss['ce_weight']} x cross-entropy")
        print(f"== {name}: {student_steps} steps, {what}", flush=True)
        runs[name] = train_run(run_config(out, name, arch=STUDENT_ARCH, teacher=teacher, steps=student_steps,
                                          seed=seed, loss=loss, max_eval_examples=max_eval_examples), progress)
    print("== evaluating teacher and students on the test split", flush=True)
    results = evaluate_classifiers({n: str(out / n / "student") for n in ("baseline", "distilled")},
                                   str(DATA / "test.parquet"), teacher=teacher, max_length=MAX_LENGTH,
                                   max_examples=max_eval_examples, batch_size=64, progress=progress)
    results["runs"] = {n: {"steps": teacher_steps if n == "teacher" else student_steps, "wall_s": r["wall_s"],
                           "config": r["config"]} for n, r in runs.items()}
    json_path, html_path = write_report(results, out, runs={n: str(out / n) for n in runs})
    keys = ("params", "accuracy", "macro_f1", "ece", "teacher_agreement", "forward_kl", "accuracy_share",
            "latency_ms_p50", "latency_ms_p95", "examples_per_s", "size_mb")
    summary = {"steps": {"teacher": teacher_steps, "students": student_steps}, "seed": seed,
               "models": {n: {**{k: m.get(k) for k in keys}, "train_wall_s": runs[n]["wall_s"]}
                          for n, m in results["models"].items()}}
    tmp = out / "quickstart.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "quickstart.json")
    print(_table(summary))
    print(f"\nreport: {html_path}\nresults: {out / 'quickstart.json'} and {json_path}")
    return summary


def _table(summary: dict) -> str:
    rows = [("params", "{:,}", "params"), ("test accuracy", "{:.1%}", "accuracy"), ("macro-F1", "{:.3f}", "macro_f1"),
            ("calibration error (ECE)", "{:.3f}", "ece"), ("agreement w/ teacher", "{:.1%}", "teacher_agreement"),
            ("share of teacher accuracy", "{:.1%}", "accuracy_share"), ("latency p50 (ms)", "{:.2f}", "latency_ms_p50"),
            ("throughput (ex/s, b=32)", "{:,.0f}", "examples_per_s"), ("training wall-clock (s)", "{:.0f}", "train_wall_s")]
    names = list(summary["models"])
    lines = [f"{'':<28}" + "".join(f"{n:>12}" for n in names)]
    for label, fmt, key in rows:
        cells = [summary["models"][n].get(key) for n in names]
        lines.append(f"{label:<28}" + "".join(f"{fmt.format(c) if c is not None else '-':>12}" for c in cells))
    return "\n".join(lines)
