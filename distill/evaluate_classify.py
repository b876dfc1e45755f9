"""`distill eval` for sequence classifiers: task quality, calibration, fidelity to the teacher,
latency, throughput and size, side by side, for the report (``distill.report``).

Chosen automatically when the models are ``*ForSequenceClassification`` folders. Each model reads
the labelled data with its own tokenizer; the class names come from the teacher's ``id2label``
(else the first model's, else the data's), and a model whose names are the same set in another
order is compared class by class (its logits are reordered).

Metrics (per model):
    accuracy, macro_f1 (unweighted mean of the per-class F1), per_class {name: precision, recall,
    f1, support}, confusion [true][predicted] counts, eval_ce (nats per example), ece (15 equal-width
    confidence bins, ``distill.evaluate.calibration_bins``) and the bins for the reliability diagram;
    with a teacher: teacher_agreement (same argmax) and forward_kl KL(p_teacher ‖ p_model) at τ = 1,
    accuracy_share (accuracy / the teacher's); latency_ms_p50 / _p95 at batch 1 and
    examples_per_s at batch 32 (``--no-speed`` skips them), params, size_mb, and the ratios of
    latency and size to the teacher's.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
from torch import Tensor

from distill.data.classification import (class_names, collate_classification, encode, label_ids, meaningful_names,
                                         raw_rows)
from distill.data.sources import locate_rows
from distill.errors import UserError
from distill.evaluate import ECE_BINS, calibration_bins, ece_from_bins, machine_info, weights_size

SPEED_EXAMPLES = 128  # batch-1 latency: this many examples (after a warmup of 8), each timed alone
LATENCY_REPEATS = 3  # runs per example; its latency is the fastest
THROUGHPUT_BATCH = 32


def is_classifier(path: str) -> bool:
    """A Hugging Face folder whose config names a ``*ForSequenceClassification`` architecture."""
    from distill.models import architectures

    return any(a.endswith("ForSequenceClassification") for a in architectures(path))


# ---------------------------------------------------------------------------------------------
# Metric functions (pure; the tests compare them with plain references)


def confusion_matrix(predicted: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C, C) int64 counts: row = the true class, column = the predicted one."""
    index = labels.long() * num_classes + predicted.long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_scores(confusion: Tensor, names: Sequence[str]) -> dict:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where undefined)."""
    c = confusion.double()
    tp = c.diagonal()
    predicted, support = c.sum(0), c.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), 0.0)
    recall = torch.where(support > 0, tp / support.clamp_min(1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
    return {n: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                "support": int(support[i])} for i, n in enumerate(names)}


def classification_metrics(logits: Tensor, labels: Tensor, names: Sequence[str],
                           teacher_logits: Optional[Tensor] = None) -> dict:
    """Quality, calibration and (with ``teacher_logits``) fidelity of class logits (N, C) on labels (N,)."""
    logits = logits.double()
    log_p = torch.log_softmax(logits, -1)
    predicted = logits.argmax(-1)
    confidence = log_p.exp().max(-1).values
    confusion = confusion_matrix(predicted, labels, len(names))
    per_class = per_class_scores(confusion, names)
    bins = calibration_bins(confidence, predicted == labels, ECE_BINS)
    result = {"accuracy": float((predicted == labels).double().mean()),
              "macro_f1": sum(v["f1"] for v in per_class.values()) / len(names),
              "eval_ce": float(-log_p.gather(-1, labels[:, None].long()).mean()),
              "ece": ece_from_bins(bins), "examples": int(labels.numel()),
              "per_class": per_class, "confusion": confusion.tolist(),
              "reliability": [{"count": int(n), "confidence": float(c / n) if n else None,
                               "accuracy": float(a / n) if n else None} for n, c, a in bins.tolist()]}
    if teacher_logits is not None:
        log_t = torch.log_softmax(teacher_logits.double(), -1)
        result["teacher_agreement"] = float((predicted == teacher_logits.argmax(-1)).double().mean())
        result["forward_kl"] = float((log_t.exp() * (log_t - log_p)).sum(-1).mean())
    return result


# ---------------------------------------------------------------------------------------------
# Running the models


@torch.no_grad()
def class_logits(model, rows: list[list[int]], *, pad_token_id: int, batch_size: int, device) -> Tensor:
    """(N, C) float32 logits of the rows' token ids, in batches."""
    out = []
    for start in range(0, len(rows), batch_size):
        batch = collate_classification({"input_ids": rows[start:start + batch_size], "label": [0] * len(
            rows[start:start + batch_size])}, pad_token_id=pad_token_id, device=device)
        out.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().cpu())
    return torch.cat(out)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure_speed(model, rows: list[list[int]], *, pad_token_id: int, device) -> dict:
    """Latency at batch 1 (p50 / p95 over up to ``SPEED_EXAMPLES`` examples, each timed alone, the
    fastest of ``LATENCY_REPEATS`` runs) and
    throughput at batch ``THROUGHPUT_BATCH`` (examples per second over a few batches)."""
    def run(chunk):
        batch = collate_classification({"input_ids": chunk, "label": [0] * len(chunk)}, pad_token_id=pad_token_id,
                                       device=device)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    sample = rows[:SPEED_EXAMPLES]
    for r in rows[:8]:
        run([r])
    times = []
    for r in sample:  # each example's best of LATENCY_REPEATS: a scheduler hiccup does not count
        best = float("inf")
        for _ in range(LATENCY_REPEATS):
            _sync(device)
            tic = time.perf_counter()
            run([r])
            _sync(device)
            best = min(best, (time.perf_counter() - tic) * 1000.0)
        times.append(best)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(round(q * (len(times) - 1))))]  # noqa: E731
    batches = [rows[i:i + THROUGHPUT_BATCH] for i in range(0, min(len(rows), 8 * THROUGHPUT_BATCH), THROUGHPUT_BATCH)]
    run(batches[0])
    _sync(device)
    tic = time.perf_counter()
    for b in batches:
        run(b)
    _sync(device)
    seconds = time.perf_counter() - tic
    return {"latency_ms_p50": pick(0.5), "latency_ms_p95": pick(0.95),
            "examples_per_s": sum(len(b) for b in batches) / seconds}


def _order(model_names: Optional[list[str]], names: list[str], who: str, num_labels: int) -> Optional[list[int]]:
    """Column order that puts a model's classes in the run's order (None: as they are)."""
    if model_names is None:
        if num_labels != len(names):
            raise UserError(f"{who} has {num_labels} classes, the data {len(names)} ({', '.join(names)})")
        return None
    if sorted(model_names) != sorted(names):
        raise UserError(f"{who}'s classes {model_names} are not the data's {names}")
    return None if model_names == names else [model_names.index(n) for n in names]


def evaluate_classifiers(models: dict[str, str], data: str, *, teacher: Optional[str] = None, text_field: str = "text",
                         text_pair_field: Optional[str] = None, label_field: str = "label", max_length: int = 256,
                         max_examples: Optional[int] = None, batch_size: int = 32, speed: bool = True,
                         dtype: str = "float32", progress: bool = True) -> dict:
    """Evaluate classifier folders ``models`` (and ``teacher``, named "teacher", the reference) on the
    labelled ``data``. Returns ``{"task": "classification", "data", "settings", "labels", "models":
    {name: metrics}, "machine"}`` (JSON-serializable)."""
    import sys

    from distill import models as loading

    if teacher is not None and "teacher" in models:
        raise UserError("the model name 'teacher' is reserved for the teacher: rename that model")
    if dtype not in loading.DTYPES:
        raise UserError(f"dtype must be one of {', '.join(loading.DTYPES)}, got {dtype!r}")
    paths = ({"teacher": teacher} if teacher is not None else {}) | dict(models)
    for name, path in paths.items():
        if not is_classifier(path):
            raise UserError(f"model {name!r} at {path} is not a sequence classifier (its config.json names no "
                            "*ForSequenceClassification architecture); evaluate language models and classifiers "
                            "separately")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fields = [text_field, label_field] + ([text_pair_field] if text_pair_field else [])
    raw, src = raw_rows(data, fields=fields, max_examples=max_examples)
    loaded = {n: loading.freeze(loading.load_classifier(p, dtype=loading.DTYPES[dtype])).to(device)
              for n, p in paths.items()}
    first = next(iter(loaded.values()))
    names = class_names(raw[label_field], teacher=meaningful_names(first.config), where=src.describe())
    labels = torch.tensor(label_ids(raw[label_field], names, field=label_field,
                                    locate=lambda rows: locate_rows(src, rows)))
    texts = list(raw[text_field])
    pairs = list(raw[text_pair_field]) if text_pair_field else None
    bad = next((i for i, t in enumerate(texts + (pairs or [])) if not isinstance(t, str)), None)
    if bad is not None:
        raise UserError(f"{locate_rows(src, [bad % len(texts)])[0]}: a text field is not a string")

    results, logits = {}, {}
    for name, model in loaded.items():
        if progress:
            print(f"evaluating {name}", flush=True, file=sys.stderr)
        tokenizer = loading.load_tokenizer(paths[name])
        rows = encode(tokenizer, texts, pairs, max_length)
        order = _order(meaningful_names(model.config), names, f"model {name!r}", model.config.num_labels)
        z = class_logits(model, rows, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size, device=device)
        logits[name] = z if order is None else z[:, order]
        r = {"path": paths[name], "params": sum(p.numel() for p in model.parameters()),
             "size_mb": weights_size(paths[name]) / 1e6}
        if speed:
            if progress:
                print(f"timing {name}", flush=True, file=sys.stderr)
            r.update(measure_speed(model, rows, pad_token_id=tokenizer.pad_token_id, device=device))
        results[name] = r
    reference = logits.get("teacher")
    for name, r in results.items():
        r.update(classification_metrics(logits[name], labels, names,
                                        teacher_logits=reference if name != "teacher" else None))
    if reference is not None:
        t = results["teacher"]
        for name, r in results.items():
            if name == "teacher":
                continue
            r["accuracy_share"] = r["accuracy"] / t["accuracy"] if t["accuracy"] else None
            r["size_ratio"] = r["size_mb"] / t["size_mb"] if t["size_mb"] else None
            if speed:
                r["latency_ratio"] = r["latency_ms_p50"] / t["latency_ms_p50"]
    settings = {"teacher": teacher, "models": dict(models), "text_field": text_field, "text_pair_field": text_pair_field,
                "label_field": label_field, "max_length": max_length, "max_examples": max_examples,
                "batch_size": batch_size, "dtype": dtype, "speed": speed, "ece_bins": ECE_BINS,
                "latency_examples": min(SPEED_EXAMPLES, len(texts)), "latency_repeats": LATENCY_REPEATS, "throughput_batch": THROUGHPUT_BATCH,
                "threads": torch.get_num_threads()}
    return {"task": "classification", "data": str(data), "settings": settings, "labels": names, "models": results,
            "machine": machine_info(device)}


# Labels, better directions and descriptions of the metrics, for the report.
CLASS_METRICS: dict[str, tuple[str, Optional[str], str]] = {
    "params": ("parameters", "min", "number of parameters"),
    "size_mb": ("size on disk (MB)", "min", "bytes of the weight files / 1e6"),
    "size_ratio": ("size / teacher's", "min", "size on disk relative to the teacher"),
    "accuracy": ("accuracy", "max", "argmax class equals the label"),
    "macro_f1": ("macro-F1", "max", "unweighted mean of the per-class F1"),
    "accuracy_share": ("share of the teacher's accuracy", "max", "accuracy / the teacher's accuracy"),
    "eval_ce": ("cross-entropy", "min", "nats per example on the labels"),
    "ece": ("calibration error (ECE)", "min", f"expected calibration error of the top-1 class, {ECE_BINS} bins"),
    "teacher_agreement": ("agreement with teacher", "max", "same argmax class as the teacher"),
    "forward_kl": ("KL to teacher", "min", "KL(p_teacher‖p_model) per example, τ = 1"),
    "latency_ms_p50": ("latency p50, batch 1", "min", "median milliseconds per example, one at a time"),
    "latency_ms_p95": ("latency p95, batch 1", "min", "95th-percentile milliseconds per example"),
    "latency_ratio": ("latency / teacher's", "min", "p50 latency relative to the teacher"),
    "examples_per_s": (f"throughput, batch {THROUGHPUT_BATCH}", "max", "examples per second"),
}
CLASS_GROUPS = [
    ("Task", ["accuracy", "macro_f1", "accuracy_share", "eval_ce", "ece"]),
    ("Fidelity to the teacher", ["teacher_agreement", "forward_kl"]),
    ("Speed and size", ["latency_ms_p50", "latency_ms_p95", "latency_ratio", "examples_per_s", "params", "size_mb",
                        "size_ratio"]),
]
