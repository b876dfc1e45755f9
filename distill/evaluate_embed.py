"""`distill eval` for sentence encoders (what ``task: embedding`` trains): fidelity of each model's
sentence embeddings to the teacher's, a task score when the data has labels, latency, throughput
and size, side by side, for the report (``distill.report``).

Chosen automatically when a model is a sentence-transformers folder (modules.json, as `distill
train` saves an embedding student) or a bare encoder (a config whose architecture has no head); a
classifier among them (a classifier teacher, typically) is compared through its encoder. Each
model reads the text with its own tokenizer and pools as its ``1_Pooling/config.json`` says (mean
pooling when there is none).

Metrics (per model; N examples, cosines over L2-normalised embeddings):
    with a teacher: cosine_to_teacher, the mean cos(e_model, e_teacher) (only when the widths are
    equal: the training projection is not part of the student); similarity_mse, the mean over pairs
    i ≠ j of (cos_model(i, j) − cos_teacher(i, j))²; similarity_spearman, Spearman's ρ between the
    two models' cosines over the pairs i < j; neighbour_agreement, the share of examples whose
    nearest other example is the teacher's; neighbour_overlap_10, the mean share of the teacher's
    10 nearest neighbours among the model's 10.
    with labels (``--label-field`` present in the data): knn_accuracy, leave-one-out k-nearest
    neighbour classification (k = 10, votes weighted by cosine).
    latency_ms_p50 / _p95 at batch 1 and examples_per_s at batch 32 (``--no-speed`` skips them),
    params, size_mb, and the ratios of latency and size to the teacher's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from distill.data.classification import collate_classification, encode, raw_rows
from distill.data.sources import locate_rows
from distill.errors import UserError
from distill.evaluate import machine_info, weights_size
from distill.evaluate_classify import LATENCY_REPEATS, SPEED_EXAMPLES, THROUGHPUT_BATCH, measure_speed
from distill.losses.features import pool

KNN_K = 10
OVERLAP_K = 10
SAMPLE_PAIRS = 2000  # pair cosines kept for the report's scatter


def is_encoder(path: str) -> bool:
    """A sentence-transformers folder, or a Hugging Face folder whose architecture has no head."""
    from distill.models import architectures, has_head

    return (Path(path) / "modules.json").is_file() or (bool(architectures(path)) and not has_head(path))


def pooling_of(path: str) -> str:
    """The pooling a sentence-transformers folder declares ("cls" or "mean"); mean without one."""
    config = Path(path) / "1_Pooling" / "config.json"
    try:
        body = json.loads(config.read_text())
    except (OSError, ValueError):
        return "mean"
    if body.get("pooling_mode_cls_token"):
        return "cls"
    if body.get("pooling_mode_mean_tokens", True):
        return "mean"
    raise UserError(f"{config}: only mean and CLS pooling are supported")


@torch.no_grad()
def embed(model, rows: list[list[int]], *, pad_token_id: int, pooling: str, batch_size: int, device) -> Tensor:
    """(N, d) float32 pooled embeddings of the rows' token ids, in batches."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = collate_classification({"input_ids": chunk, "label": [0] * len(chunk)}, pad_token_id=pad_token_id,
                                       device=device)
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        out.append(pool(hidden.float(), batch["attention_mask"].bool(), pooling=pooling).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Metric functions (pure; the tests compare them with plain references)


def cosines(e: Tensor) -> Tensor:
    """(N, N) float64 cosine similarities."""
    x = torch.nn.functional.normalize(e.double(), dim=-1)
    return x @ x.T


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share the mean rank), float64."""
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() + 1) / 2  # 0-based mean rank of each run of ties
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(a: Tensor, b: Tensor) -> Optional[float]:
    """Spearman's ρ of two 1-D samples (Pearson of their average ranks); None when one is constant."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    return float((ra @ rb) / denom) if denom > 0 else None


def sample_pairs(n: int, count: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Up to ``count`` pairs i < j of ``n`` examples: all of them when there are that few, else drawn
    at random (seeded; with replacement), without building the (N, N) index."""
    if n * (n - 1) // 2 <= count:
        i, j = torch.triu_indices(n, n, 1)
        return i, j
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n, (count,), generator=g)
    j = torch.randint(0, n - 1, (count,), generator=g)
    j = j + (j >= i)  # any other example
    return torch.minimum(i, j), torch.maximum(i, j)


def pair_cosines(e: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """cos(e_i, e_j) for each listed pair, float64."""
    x = torch.nn.functional.normalize(e.double(), dim=-1)
    return (x[i] * x[j]).sum(-1)


def _neighbours(sim: Tensor, k: int) -> Tensor:
    """(N, k) indices of each example's k most similar other examples."""
    n = sim.shape[0]
    return sim.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf")).topk(min(k, n - 1), dim=-1).indices


def fidelity_metrics(e: Tensor, teacher: Tensor) -> dict:
    """The model's embeddings ``e`` (N, d) against the teacher's (N, d_t); see the module doc."""
    n = e.shape[0]
    if n < 2:
        raise UserError("embedding fidelity compares pairs of examples: the data needs at least 2")
    s, t = cosines(e), cosines(teacher)
    off = ~torch.eye(n, dtype=torch.bool)
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    k = min(OVERLAP_K, n - 1)
    ns, nt = _neighbours(s, k), _neighbours(t, k)
    overlap = (ns[:, :, None] == nt[:, None, :]).any(-1).double().sum(-1) / k
    out = {"similarity_mse": float((s - t).pow(2)[off].mean()),
           "similarity_spearman": spearman(s[upper], t[upper]),
           "neighbour_agreement": float((ns[:, 0] == nt[:, 0]).double().mean()),
           f"neighbour_overlap_{OVERLAP_K}": float(overlap.mean())}
    out["cosine_to_teacher"] = (float(torch.nn.functional.cosine_similarity(e.double(), teacher.double(), dim=-1).mean())
                                if e.shape[-1] == teacher.shape[-1] else None)
    return out


def knn_accuracy(e: Tensor, labels: Tensor, k: int = KNN_K) -> float:
    """Leave-one-out k-NN accuracy: each example's class is the cosine-weighted vote of its k
    nearest other examples (ties: the lowest class index)."""
    sim = cosines(e)
    idx = _neighbours(sim, k)  # (N, k)
    weights = sim.gather(1, idx).clamp_min(0.0) + 1e-12  # a negative cosine votes (almost) nothing
    num_classes = int(labels.max()) + 1
    votes = torch.zeros(len(labels), num_classes, dtype=torch.float64).scatter_add_(1, labels[idx], weights)
    return float((votes.argmax(-1) == labels).double().mean())


# ---------------------------------------------------------------------------------------------
# The evaluation


def evaluate_encoders(models: dict[str, str], data: str, *, teacher: Optional[str] = None, text_field: str = "text",
                      label_field: Optional[str] = "label", max_length: int = 256, max_examples: Optional[int] = None,
                      batch_size: int = 32, speed: bool = True, dtype: str = "float32", progress: bool = True) -> dict:
    """Evaluate sentence-encoder folders ``models`` (and ``teacher``, named "teacher", the reference)
    on the texts of ``data``. Returns ``{"task": "embedding", "data", "settings", "models": {name:
    metrics}, "machine"}`` (JSON-serializable); ``models[name]["similarity_sample"]`` holds up to 2,000
    (teacher, model) pair cosines for the report's scatter plot."""
    from distill import models as loading

    if teacher is not None and "teacher" in models:
        raise UserError("the model name 'teacher' is reserved for the teacher: rename that model")
    if dtype not in loading.DTYPES:
        raise UserError(f"dtype must be one of {', '.join(loading.DTYPES)}, got {dtype!r}")
    paths = ({"teacher": teacher} if teacher is not None else {}) | dict(models)
    from distill.evaluate_classify import is_classifier

    for name, path in paths.items():  # a classifier's encoder can be compared (as a teacher, typically)
        if not (is_encoder(path) or is_classifier(path)):
            raise UserError(f"model {name!r} at {path} is not a sentence encoder (no modules.json, and its config "
                            "names a model with a language-model head); evaluate language models and encoders "
                            "separately")
    raw, src = raw_rows(data, fields=[text_field], max_examples=max_examples)
    texts = list(raw[text_field])
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise UserError(f"{locate_rows(src, [bad])[0]}: the text field is not a string")
    labels = None
    if label_field and label_field in raw.column_names:
        values = list(raw[label_field])
        names = sorted({str(v) for v in values})
        labels = torch.tensor([names.index(str(v)) for v in values])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results, embeddings = {}, {}
    for name, path in paths.items():
        if progress:
            print(f"evaluating {name}", flush=True, file=sys.stderr)
        model = loading.freeze(loading.load_encoder(path, dtype=loading.DTYPES[dtype])).to(device)
        tokenizer = loading.load_tokenizer(path)
        if tokenizer.pad_token_id is None:
            raise UserError(f"the tokenizer of {path} has no pad token")
        rows = encode(tokenizer, texts, None, max_length)
        pooling = pooling_of(path)
        embeddings[name] = embed(model, rows, pad_token_id=tokenizer.pad_token_id, pooling=pooling,
                                 batch_size=batch_size, device=device)
        r = {"path": path, "pooling": pooling, "dim": embeddings[name].shape[-1],
             "params": sum(p.numel() for p in model.parameters()), "size_mb": weights_size(path) / 1e6}
        if labels is not None:
            r["knn_accuracy"] = knn_accuracy(embeddings[name], labels)
        if speed:
            if progress:
                print(f"timing {name}", flush=True, file=sys.stderr)
            r.update(measure_speed(model, rows, pad_token_id=tokenizer.pad_token_id, device=device))
        results[name] = r
        del model
    reference = embeddings.get("teacher")
    if reference is not None:
        t = results["teacher"]
        i, j = sample_pairs(len(texts), SAMPLE_PAIRS)
        for name, r in results.items():
            if name == "teacher":
                continue
            r.update(fidelity_metrics(embeddings[name], reference))
            r["similarity_sample"] = {"teacher": pair_cosines(reference, i, j).tolist(),
                                      "model": pair_cosines(embeddings[name], i, j).tolist()}
            if labels is not None and t.get("knn_accuracy"):
                r["knn_accuracy_share"] = r["knn_accuracy"] / t["knn_accuracy"]
            r["size_ratio"] = r["size_mb"] / t["size_mb"] if t["size_mb"] else None
            if speed:
                r["latency_ratio"] = r["latency_ms_p50"] / t["latency_ms_p50"]
    settings = {"teacher": teacher, "models": dict(models), "text_field": text_field,
                "label_field": label_field if labels is not None else None, "max_length": max_length,
                "max_examples": max_examples, "examples": len(texts), "batch_size": batch_size, "dtype": dtype,
                "speed": speed, "knn_k": KNN_K, "latency_examples": min(SPEED_EXAMPLES, len(texts)),
                "latency_repeats": LATENCY_REPEATS, "throughput_batch": THROUGHPUT_BATCH,
                "threads": torch.get_num_threads()}
    return {"task": "embedding", "data": str(data), "settings": settings, "models": results,
            "machine": machine_info(device)}


# Labels, better directions and descriptions of the metrics, for the report.
EMBED_METRICS: dict[str, tuple[str, Optional[str], str]] = {
    "dim": ("embedding width", None, "dimensions of the pooled embedding"),
    "params": ("parameters", "min", "number of parameters"),
    "size_mb": ("size on disk (MB)", "min", "bytes of the weight files / 1e6"),
    "size_ratio": ("size / teacher's", "min", "size on disk relative to the teacher"),
    "cosine_to_teacher": ("cosine to teacher", "max", "mean cos(e_model, e_teacher); equal widths only"),
    "similarity_spearman": ("similarity Spearman ρ", "max", "rank correlation of pair cosines with the teacher's"),
    "similarity_mse": ("similarity MSE", "min", "mean squared difference of pair cosines to the teacher's"),
    "neighbour_agreement": ("nearest neighbour agreement", "max", "same nearest other example as the teacher"),
    f"neighbour_overlap_{OVERLAP_K}": (f"top-{OVERLAP_K} neighbour overlap", "max",
                                       f"share of the teacher's {OVERLAP_K} nearest neighbours among the model's"),
    "knn_accuracy": (f"{KNN_K}-NN accuracy", "max", f"leave-one-out {KNN_K}-nearest-neighbour label accuracy"),
    "knn_accuracy_share": ("share of the teacher's k-NN accuracy", "max", "k-NN accuracy / the teacher's"),
    "latency_ms_p50": ("latency p50, batch 1", "min", "median milliseconds per example, one at a time"),
    "latency_ms_p95": ("latency p95, batch 1", "min", "95th-percentile milliseconds per example"),
    "latency_ratio": ("latency / teacher's", "min", "p50 latency relative to the teacher"),
    "examples_per_s": (f"throughput, batch {THROUGHPUT_BATCH}", "max", "examples per second"),
}
EMBED_GROUPS = [
    ("Fidelity to the teacher", ["cosine_to_teacher", "similarity_spearman", "similarity_mse", "neighbour_agreement",
                                 f"neighbour_overlap_{OVERLAP_K}"]),
    ("Task", ["knn_accuracy", "knn_accuracy_share"]),
    ("Speed and size", ["latency_ms_p50", "latency_ms_p95", "latency_ratio", "examples_per_s", "dim", "params",
                        "size_mb", "size_ratio"]),
]
