"""The one configuration schema: YAML values, dotted ``key=value`` overrides, strict validation.

Every run is described by a :class:`Config`. Unknown keys are errors that suggest the nearest
valid name, values are type-checked and range-checked, and the resolved config is written next
to the results so a run can always be reproduced from its output directory.

Components never see this object: :mod:`distill.train` turns it into plain arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from distill.errors import ConfigError, UserError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class TeacherConfig:
    model: Optional[str] = None  # local path or hub id; required when loss.kd_weight > 0 (with 0, only evaluated against)
    revision: Optional[str] = None
    dtype: Dtype = "auto"  # "auto": the student's compute dtype (bf16 under precision=bf16)
    trust_remote_code: bool = False
    source: Literal["live", "cache", "http"] = "live"  # live: the model; cache: cache.dir's targets; http: teacher.http (distill generate)
    http: Optional[HTTPTeacherConfig] = None  # an OpenAI-compatible server (teacher.source: http)


@dataclass
class HTTPTeacherConfig:
    """An OpenAI-compatible server (vLLM, llama.cpp, SGLang, TGI, Ollama, a hosted API): `distill generate`."""

    url: str = ""  # base URL, e.g. http://127.0.0.1:8080/v1 ("/v1" is added when missing)
    model: Optional[str] = None  # the model name the server serves; default: the first of GET /v1/models
    api: Literal["completions", "chat"] = "completions"  # /v1/completions (text prompt) or /v1/chat/completions
    api_key_env: Optional[str] = None  # the environment variable that holds the API key (never written anywhere)
    concurrency: int = 4  # requests in flight
    timeout: float = 300.0  # seconds per request
    max_retries: int = 6  # tries after the first on 429, 5xx, timeouts, refused connections and malformed replies
    logprobs: int = 0  # top-k log-probabilities per generated token to ask for (0: none); kept as a teacher cache


@dataclass
class StudentConfig:
    model: Optional[str] = None  # pretrained student: local path or hub id
    config: Optional[dict] = None  # or an architecture: {model_type: llama, hidden_size: 64, ...}
    init_from_teacher_layers: Optional[list[int]] = None  # or copy these teacher layers (DistilBERT-style)
    tokenizer: Optional[str] = None  # default: student.model, else teacher.model
    revision: Optional[str] = None
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    train: Optional[str] = None  # local .jsonl/.json/.parquet/.txt (file, directory or glob) or hub dataset id
    eval: Optional[str] = None
    format: Literal["auto", "text", "prompt_completion", "chat", "prompt"] = "auto"  # prompt: prompt-only (on-policy)
    max_length: int = 512
    packing: bool = True  # text only: concatenate documents with EOS and cut fixed-length blocks
    train_split: str = "train"  # hub datasets only
    eval_split: str = "validation"
    text_field: str = "text"
    text_pair_field: Optional[str] = None  # task=classification: a second text per row (NLI, QA pairs)
    label_field: str = "label"  # task=classification: an int (class index) or a name per row
    labels: Optional[list[str]] = None  # task=classification: class names in index order (default: the teacher's, else the data's)
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None


@dataclass
class LossConfig:
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd | skew_kl | skew_reverse_kl | tvd | sampled_reverse_kl
    beta: Optional[float] = None  # jsd only, 0 < beta < 1 (default 0.5)
    alpha: Optional[float] = None  # skew_kl / skew_reverse_kl only, 0 <= alpha < 1 (default 0.1)
    temperature: float = 1.0
    scale_by_tau2: bool = True
    kd_weight: float = 1.0  # 0: plain supervised training (no teacher forward in training)
    ce_weight: float = 0.0
    chunk_size: int = 256  # tokens per chunk of the fused LM-head loss (see BENCHMARKS.md); 0 = dense logits
    compile: bool = False  # chunked loss: each chunk's objective under torch.compile (compiles in the first steps)
    sparse_mode: Optional[Literal["tail", "renormalized"]] = None  # teacher.source=cache only (default tail)
    discount: Optional[float] = None  # sampled_reverse_kl only: 0 (default) single-step, up to 1: the rest of the completion
    cross_tokenizer: Optional[CrossTokenizerConfig] = None  # a teacher with another tokenizer (aligned by bytes)
    features: Optional[FeatureConfig] = None  # hidden-state / attention / relation terms (every task)
    embedding: Optional[EmbeddingConfig] = None  # task=embedding (default: cosine of mean-pooled embeddings)


@dataclass
class EmbeddingConfig:
    """task=embedding: the student's pooled sentence embedding against the teacher's, per example;
    the relational terms (similarity matrix, RKD) compare the examples of each micro-batch."""

    pooling: Literal["mean", "cls"] = "mean"  # the teacher's and the student's
    kind: Literal["cosine", "mse"] = "cosine"  # 1 - cos(W e_s, e_t) or the mean squared difference
    weight: float = 1.0  # of that term (through a learned projection when widths differ; not exported)
    similarity_weight: float = 0.0  # the batch's cosine-similarity matrix (needs no projection)
    rkd_distance_weight: float = 0.0  # RKD distance (Park et al. 2019)
    rkd_angle_weight: float = 0.0  # RKD angle


@dataclass
class FeatureConfig:
    """Feature terms added to the logits objective (distill/losses/features.py), each with its own
    weight. Classifiers and encoders: per example, the mean over its real tokens and the mapped
    layers. Causal LMs: per position that predicts a supervised token, the mean over the mapped
    layers (divided by the step's supervised count, as KD is); relations are causal there."""

    hidden_weight: float = 0.0  # FitNets / TinyBERT hidden states (through a learned projection when widths differ)
    hidden_kind: Literal["mse", "cosine"] = "mse"
    layer_map: Optional[list[int]] = None  # teacher layer per student layer (-1: none); default uniform
    include_embeddings: bool = False  # also match the embedding outputs (hidden state 0), as TinyBERT does
    attention_weight: float = 0.0  # TinyBERT attention maps: KL per query (needs attention weights: eager attention)
    attention_heads: Literal["match", "average"] = "match"  # head counts differ: average
    relation_weight: float = 0.0  # MiniLM v2: q-q, k-k, v-v relation KL, last student layer
    relation_heads: int = 0  # relation heads (0: the student's attention heads)
    relation_layer: Optional[int] = None  # the teacher layer for the relations (default: its last)


@dataclass
class CrossTokenizerConfig:
    """A teacher and student with different tokenizers: per span of text both tokenizations end at the
    same byte, ``exact_weight`` x the divergence over the shared tokens (renormalised; merged spans:
    the span's probability) + ``uld_weight`` x ULD (L1 of sorted probabilities). See LOSSES.md."""

    exact_weight: float = 1.0
    uld_weight: float = 1.0
    uld_tokens: Literal["auto", "all", "unmatched"] = "auto"  # auto: unmatched (the non-shared tokens) when exact_weight > 0
    exact_mode: Literal["renormalized", "rest_bucket"] = "renormalized"  # shared tokens renormalised, or + a rest bucket per side
    uld_top_k: int = 0  # 0: ULD sorts every probability (exact); k: the k largest per side + |tail mass difference| (a lower bound, faster)


@dataclass
class GenerationConfig:
    """On-policy distillation: optimizer steps whose completions are sampled in the loop (GKD)."""

    lmbda: float = 0.0  # fraction of optimizer steps on the student's own samples (GKD's lambda); 0 = off-policy
    seq_kd: bool = False  # the other steps train on the teacher's samples instead of the data's completions
    max_new_tokens: int = 128
    temperature: float = 1.0  # the sampling temperature (loss.temperature is the distillation one)
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    num_generations: int = 1  # completions per prompt
    batch_size: Optional[int] = None  # rows per sampling call; default: the whole micro-batch
    log_samples: int = 2  # completions per sampled step written to samples.jsonl (0: none)


@dataclass
class CacheConfig:
    """`distill cache` writes the teacher's targets here; `teacher.source: cache` trains from them."""

    dir: Optional[str] = None  # the cache folder
    mode: Literal["topk", "sampled"] = "topk"
    k: Optional[int] = None  # topk only: ids per position (default 64)
    samples: Optional[int] = None  # sampled only: draws per position (default 64)
    temperature: float = 1.0  # the teacher distribution stored (training must use it unless renormalized)
    logprob_dtype: Optional[Literal["uint8", "uint16", "float32"]] = None  # topk only (default uint8)
    shard_size: int = 1024  # examples per shard
    batch_size: int = 8  # examples per teacher forward
    seed: int = 0  # sampled only


@dataclass
class CoTConfig:
    """Chain-of-thought distillation in `distill generate`: extract each trace's final answer, verify it."""

    answer_field: str = "answer"  # the reference answer's column in the data
    answer_pattern: str = r"####\s*(.+?)\s*$"  # a regex with one group; its LAST match in a trace is the answer
    verify: bool = True  # keep a trace only when its answer matches the reference (rejection sampling)
    keep: Literal["all", "first", "shortest", "likeliest"] = "all"  # of a prompt's verified (or, unverified, all) samples; likeliest: highest mean teacher log p per token
    train_on: Literal["trace", "answer"] = "trace"  # the completion written: the whole trace or the answer line only
    answer_format: str = "#### {answer}"  # the completion when train_on is answer


@dataclass
class SyntheticConfig:
    """Data-free distillation: the teacher writes the prompts too, from seed examples and topics."""

    num_prompts: int = 100  # prompts to keep (after near-duplicate removal)
    examples: list[str] = field(default_factory=list)  # seed examples shown to the teacher
    topics: list[str] = field(default_factory=list)  # optional: one is drawn per request, as {topic}
    template: str = ("Here are examples of tasks:\n\n{examples}\n\nWrite one new task{topic_clause}, different from "
                     "the examples.\n\n")  # {examples}, {topic}, {topic_clause} (" about TOPIC" or "")
    examples_per_request: int = 3
    separator: str = "\n\n"  # between examples in {examples}; a written prompt ends at its first occurrence
    max_new_tokens: int = 96
    temperature: float = 1.0
    max_requests: Optional[int] = None  # give up after this many teacher calls (default 4 x num_prompts)
    min_chars: int = 8  # shorter candidates are dropped
    ngram: int = 3  # near-duplicates: word n-grams of this length ...
    max_overlap: float = 0.6  # ... whose Jaccard overlap with a kept prompt (or an example) exceeds this


@dataclass
class GenerateConfig:
    """`distill generate`: the teacher writes completions of data.train's prompts (or synthetic ones)."""

    output: Optional[str] = None  # the output folder (re-running on it resumes)
    format: Literal["jsonl", "parquet"] = "jsonl"  # the file type of the dataset written
    output_format: Literal["auto", "prompt_completion", "chat"] = "auto"  # auto: chat for chat input or api, else prompt_completion
    template: str = "{prompt}"  # the prompt as the teacher sees it; {prompt} and any other column of the row
    num_samples: int = 1  # completions per prompt
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)  # a completion ends before the first of these strings
    keep_unfinished: bool = True  # keep completions cut by max_new_tokens (false: drop them, counted)
    batch_size: int = 8  # prompts per local teacher batch
    chunk_size: int = 64  # prompts per written chunk (the unit of resume)
    seed: int = 0
    max_prompts: Optional[int] = None  # use only the first N prompts
    cot: Optional[CoTConfig] = None
    synthetic: Optional[SyntheticConfig] = None


@dataclass
class QATConfig:
    """Quantization-aware training: fake-quantized int4 weights in the loss; the run's student is the
    torchao int4 build (distill/export/qat.py)."""

    bits: int = 4  # int4 weights (the only width: int8 loses too little to need QAT)
    group_size: int = 32  # one scale per this many input columns; must divide every linear's input width
    keep_float: bool = True  # also keep the float master weights as RUN/student-float (GGUF export reads it)


@dataclass
class TrainConfig:
    output_dir: str = "runs/distill"
    max_steps: Optional[int] = None  # optimizer steps; if unset, `epochs` decides
    epochs: float = 1.0
    batch_size: int = 8  # per process, per micro-batch
    grad_accum_steps: int = 1
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    schedule_steps: Optional[int] = None  # length of the LR schedule; default: the run's steps (set it to stop early)
    min_lr_ratio: float = 0.0  # cosine/linear decay floor as a fraction of lr
    max_grad_norm: float = 1.0  # 0 disables clipping
    nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf in teacher targets, loss or gradients: end the run, or drop the step
    max_skipped_steps: int = 5  # nonfinite=skip: stop when this many optimizer steps in a row are non-finite
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False  # causal_lm: recompute each decoder layer in backward (less memory, ~1/3 more compute)
    memory_gb: Optional[float] = None  # causal_lm: refuse before loading weights when `distill plan` exceeds this per process (default: the GPU's memory, else available RAM; 0: no check)
    sharding: Literal["auto", "ddp", "fsdp2", "zero3"] = "auto"  # causal_lm: ddp (a full copy per process), fsdp2 (student and teacher sharded) or zero3 (DeepSpeed ZeRO-3 student, FSDP2 teacher); auto: follows an Accelerate FSDP / DEEPSPEED launch config
    seed: int = 0
    eval_every: int = 0  # steps; 0 = only at the end
    eval_at_start: bool = False  # also evaluate the untrained student (step 0)
    eval_batch_size: Optional[int] = None
    save_every: int = 0  # steps; 0 = only at the end (and on Ctrl-C)
    keep_checkpoints: int = 2
    log_every: int = 10
    tracker: Literal["tensorboard", "wandb", "mlflow", "none"] = "tensorboard"
    progress: bool = True
    qat: Optional[QATConfig] = None  # e.g. {bits: 4, group_size: 32}: train the student for its int4 build


TASKS = ("causal_lm", "classification", "embedding")
# Hinton's soft targets suit a few classes at a temperature above 1 (at T = 1 a confident teacher's
# distribution is nearly its hard label); the hard labels keep a smaller weight. See BENCHMARKS.md.
CLASSIFICATION_LOSS_DEFAULTS = {"temperature": 2.0, "kd_weight": 1.0, "ce_weight": 0.5}


@dataclass
class Config:
    task: Literal["causal_lm", "classification", "embedding"] = "causal_lm"  # classification: AutoModelForSequenceClassification; embedding: a sentence encoder (AutoModel + pooling)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building and validating


def load_config(source: Union[str, os.PathLike, dict, Config, None] = None,
                overrides: Optional[list[str]] = None, *, stage: str = "train") -> Config:
    """Build a validated :class:`Config` from a YAML path, a dict or a Config, plus overrides.

    ``overrides`` are ``"dotted.key=value"`` strings; values are parsed as YAML scalars
    (``train.lr=3e-4``, ``student.init_from_teacher_layers=[0,2]``, ``teacher.model=null``).
    Relative paths in a YAML file are resolved against the file's folder. ``stage``: "train" (also
    `distill cache`) or "generate", whose config needs no student and may name an HTTP teacher.
    """
    base_dir = None
    if source is None:
        raw: dict = {}
    elif isinstance(source, Config):
        raw = source.to_dict()
    elif isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({_one_line(e)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
        base_dir = path.resolve().parent
    raw = _deep_copy(raw)
    for item in overrides or []:
        _apply_override(raw, item)
    if raw.get("task") == "classification" and isinstance(raw.get("loss", {}), dict):
        loss = raw.setdefault("loss", {})  # what the user left out takes the classification defaults
        for key, value in CLASSIFICATION_LOSS_DEFAULTS.items():
            loss.setdefault(key, value)
    config = _build(Config, raw, "")
    if base_dir is not None:
        _resolve_paths(config, base_dir)
    if stage == "generate":
        validate_generate(config)
    else:
        validate(config)
    return config


def save_config(config: Config, path: Union[str, os.PathLike]) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    os.replace(tmp, path)


def validate_generate(c: Config) -> None:
    """The checks of a `distill generate` config (teacher, prompts, sampling, output)."""
    g, t = c.generate, c.teacher
    _check(bool(g.output), "generate.output is required (the folder the generated data is written to)")
    if t.source == "http":
        _check(t.http is not None and bool(t.http.url), "teacher.source=http needs teacher.http.url (e.g. "
               "http://127.0.0.1:8080/v1)")
        h = t.http
        _check(h.url.startswith(("http://", "https://")), f"teacher.http.url must start with http:// or https://, "
               f"got {h.url!r}")
        _check(h.concurrency > 0 and h.timeout > 0 and h.max_retries >= 0,
               "teacher.http.concurrency and timeout must be > 0, max_retries >= 0")
        _check(0 <= h.logprobs <= 20, "teacher.http.logprobs must be in [0, 20] (what OpenAI-compatible servers "
               "accept)")
    else:
        _check(t.source == "live", "distill generate: teacher.source must be live (teacher.model) or http "
               "(teacher.http), not cache")
        _check(bool(t.model), "distill generate needs teacher.model (a local model) or teacher.source=http")
        _check(t.http is None, "teacher.http is set but teacher.source is live: set teacher.source=http")
    if g.synthetic is None:
        _check(bool(c.data.train), "distill generate needs data.train (the prompts), or generate.synthetic")
    else:
        s = g.synthetic
        _check(s.num_prompts > 0 and s.examples_per_request >= 0 and s.max_new_tokens > 0,
               "generate.synthetic.num_prompts and max_new_tokens must be > 0")
        _check(bool(s.examples) or bool(s.topics), "generate.synthetic needs seed examples or topics")
        _check(s.max_requests is None or s.max_requests > 0, "generate.synthetic.max_requests must be > 0")
        _check(s.ngram > 0 and 0.0 < s.max_overlap <= 1.0, "generate.synthetic.ngram must be > 0 and max_overlap "
               "in (0, 1]")
        _check(s.temperature > 0, "generate.synthetic.temperature must be > 0")
        _check(bool(s.separator), "generate.synthetic.separator must not be empty")
    _check(g.num_samples > 0 and g.max_new_tokens > 0, "generate.num_samples and max_new_tokens must be > 0")
    _check(g.temperature > 0, "generate.temperature must be > 0")
    _check(g.top_k >= 0 and 0.0 < g.top_p <= 1.0, "generate.top_k must be >= 0 and generate.top_p in (0, 1]")
    _check(g.batch_size > 0 and g.chunk_size > 0, "generate.batch_size and chunk_size must be > 0")
    _check(g.max_prompts is None or g.max_prompts > 0, "generate.max_prompts must be > 0")
    _check(all(isinstance(x, str) and x for x in g.stop), "generate.stop must be non-empty strings")
    if g.cot is not None:
        import re

        try:
            groups = re.compile(g.cot.answer_pattern).groups
        except re.error as e:
            raise ConfigError(f"generate.cot.answer_pattern is not a valid regex: {e}") from None
        _check(groups == 1, f"generate.cot.answer_pattern needs exactly one group (the answer), it has {groups}")
        _check("{answer}" in g.cot.answer_format, "generate.cot.answer_format needs {answer}")
        _check(not (g.cot.keep == "likeliest" and t.source == "http" and not t.http.logprobs),
               "generate.cot.keep=likeliest with an HTTP teacher needs teacher.http.logprobs >= 1 (the server's "
               "log-probs of its tokens)")
    _check(c.data.max_length >= 2, "data.max_length must be >= 2")


def validate(c: Config) -> None:
    """Range and consistency checks beyond types. Raises ConfigError with one clear line."""
    from distill.losses import DIVERGENCES, divergence_params

    _check(c.teacher.source != "http", "teacher.source=http is for `distill generate` (a server writes text); to "
           "train on what it wrote, point data.train at the generated data (and teacher.source=cache at its cache)")

    loss = c.loss
    objectives = {*DIVERGENCES, "sampled_reverse_kl"}  # the last: a policy gradient on sampled tokens
    if loss.divergence not in objectives:
        raise ConfigError(f"loss.divergence: unknown divergence {loss.divergence!r}"
                          f"{_suggest(loss.divergence, objectives)}; valid: {', '.join(sorted(objectives))}")
    accepted = divergence_params(loss.divergence) if loss.divergence in DIVERGENCES else set()
    for name in ("beta", "alpha"):
        if getattr(loss, name) is not None and name not in accepted:
            users = sorted(d for d in DIVERGENCES if name in divergence_params(d))
            raise ConfigError(f"loss.{name} applies only to {', '.join(users)}, not to {loss.divergence}")
    if loss.beta is not None and not 0.0 < loss.beta < 1.0:
        raise ConfigError(f"loss.beta must be in (0, 1) for jsd, got {loss.beta}; for beta=0 or 1 use "
                          "divergence forward_kl or reverse_kl")
    if loss.alpha is not None and not 0.0 <= loss.alpha < 1.0:
        raise ConfigError(f"loss.alpha must be in [0, 1), got {loss.alpha}")
    _check(loss.temperature > 0, "loss.temperature must be > 0")
    _check(loss.kd_weight >= 0 and loss.ce_weight >= 0, "loss.kd_weight and loss.ce_weight must be >= 0")
    f = loss.features
    feature_weight = 0.0 if f is None else f.hidden_weight + f.attention_weight + f.relation_weight
    if c.task == "embedding":
        e = loss.embedding or EmbeddingConfig()
        weights = (e.weight, e.similarity_weight, e.rkd_distance_weight, e.rkd_angle_weight)
        _check(min(weights) >= 0, "loss.embedding weights must be >= 0")
        _check(sum(weights) + feature_weight > 0, "loss.embedding: every weight is 0: nothing to train")
        _check(bool(c.teacher.model), "task=embedding needs teacher.model (the sentence encoder to imitate)")
    else:
        _check(loss.embedding is None, "loss.embedding applies to task=embedding")
        _check(loss.kd_weight + loss.ce_weight + feature_weight > 0,
               "loss.kd_weight and loss.ce_weight are both 0: nothing to train")
    if f is not None:
        _check(loss.cross_tokenizer is None, "loss.features compare the two models position by position: they "
                                             "need the same tokenizer (loss.cross_tokenizer has none)")
        _check(min(f.hidden_weight, f.attention_weight, f.relation_weight) >= 0,
               "loss.features: hidden_weight, attention_weight and relation_weight must be >= 0")
        _check(f.layer_map is None or (bool(f.layer_map) and min(f.layer_map) >= -1),
               "loss.features.layer_map: one teacher layer index (or -1: none) per student layer")
        _check(f.relation_heads >= 0, "loss.features.relation_heads must be >= 0 (0: the student's attention heads)")
        _check(f.relation_layer is None or f.relation_layer >= 0, "loss.features.relation_layer must be >= 0")
        _check(bool(c.teacher.model) and c.teacher.source == "live", "loss.features needs the live teacher "
               "(teacher.model)")
    if c.task in ("classification", "embedding"):
        validate_classification(c)
    _check(loss.chunk_size >= 0, "loss.chunk_size must be >= 0 (0 = dense)")
    _check(not (loss.compile and loss.chunk_size == 0), "loss.compile compiles the chunked loss: it needs "
           "loss.chunk_size > 0")
    sampled = loss.divergence == "sampled_reverse_kl"
    if loss.discount is not None:
        _check(sampled, f"loss.discount applies only to sampled_reverse_kl, not to {loss.divergence}")
        _check(0.0 <= loss.discount <= 1.0, f"loss.discount must be in [0, 1], got {loss.discount}")
    if c.train.qat is not None:
        from distill.export.qat import check_settings

        try:
            check_settings(c.train.qat.bits, c.train.qat.group_size)
        except UserError as e:
            raise ConfigError(str(e)) from None
    g = c.generation
    _check(0.0 <= g.lmbda <= 1.0, f"generation.lmbda must be in [0, 1] (the fraction of on-policy steps), got {g.lmbda}")
    _check(g.max_new_tokens > 0 and g.num_generations > 0, "generation.max_new_tokens and num_generations must be > 0")
    _check(g.temperature > 0, "generation.temperature must be > 0")
    _check(g.top_k >= 0 and 0.0 < g.top_p <= 1.0, "generation.top_k must be >= 0 and generation.top_p in (0, 1]")
    _check(g.batch_size is None or g.batch_size > 0, "generation.batch_size must be > 0")
    _check(g.log_samples >= 0, "generation.log_samples must be >= 0")
    generating = g.lmbda > 0 or g.seq_kd
    if sampled:
        _check(g.lmbda == 1.0 and not g.seq_kd, "loss.divergence=sampled_reverse_kl is a policy gradient on the "
               "student's own samples: it needs generation.lmbda=1 (and seq_kd false); for mixed steps use "
               "reverse_kl or jsd")
        _check(loss.temperature == 1.0, "loss.divergence=sampled_reverse_kl estimates KL(q||p) at temperature 1 "
               "from the sampled tokens: set loss.temperature=1 (generation.temperature sets the sampling one)")
    if g.seq_kd:
        _check(g.lmbda < 1.0, "generation.seq_kd has no effect with generation.lmbda=1 (every step is on-policy)")

    from_cache = c.teacher.source == "cache"
    x = loss.cross_tokenizer
    if x is not None:
        _check(x.exact_weight >= 0 and x.uld_weight >= 0 and x.exact_weight + x.uld_weight > 0,
               "loss.cross_tokenizer: exact_weight and uld_weight must be >= 0 and not both 0")
        _check(x.uld_top_k >= 0, "loss.cross_tokenizer.uld_top_k must be >= 0 (0: exact ULD)")
        _check(not from_cache, "loss.cross_tokenizer needs the live teacher (teacher.source=live): a top-k cache holds "
                               "the teacher's targets on its own tokenizer's positions and cannot be re-aligned")
        _check(not sampled, "loss.cross_tokenizer does not support sampled_reverse_kl (it needs the teacher's "
                            "distributions at aligned spans); use reverse_kl or jsd")
        _check(bool(c.teacher.model), "loss.cross_tokenizer needs teacher.model (with loss.kd_weight 0 the teacher "
                                      "is only evaluated against, on the aligned spans)")
        _check(c.student.init_from_teacher_layers is None, "student.init_from_teacher_layers copies the teacher's "
               "embeddings, which do not fit another tokenizer: give student.config or student.model")
        _check(not c.generation.seq_kd, "generation.seq_kd samples from the teacher, whose tokens the student cannot "
                                        "read with loss.cross_tokenizer: distill generate writes its text instead")
        _check(bool(c.student.tokenizer or c.student.model), "loss.cross_tokenizer needs the student's own tokenizer "
               "(student.tokenizer or student.model)")
    if from_cache:
        _check(bool(c.cache.dir), "teacher.source=cache needs cache.dir (the folder `distill cache` wrote)")
        _check(loss.divergence == "forward_kl", f"teacher.source=cache: a top-k cache supports divergence "
                                                f"forward_kl only, got {loss.divergence}")
        _check(not generating, "generation.lmbda > 0 / seq_kd sample new text, which a cache has no targets for: "
                               "use teacher.source=live")
    elif loss.sparse_mode is not None:
        raise ConfigError("loss.sparse_mode applies only to teacher.source=cache")
    ca = c.cache
    if ca.mode == "topk":
        _check(ca.samples is None, "cache.samples applies only to cache.mode=sampled (topk uses cache.k)")
        _check(ca.k is None or ca.k > 0, "cache.k must be > 0")
    else:
        _check(ca.k is None and ca.logprob_dtype is None,
               "cache.k and cache.logprob_dtype apply only to cache.mode=topk (sampled uses cache.samples)")
        _check(ca.samples is None or 0 < ca.samples <= 65535, "cache.samples must be in [1, 65535]")
    _check(ca.temperature > 0, "cache.temperature must be > 0")
    _check(ca.shard_size > 0 and ca.batch_size > 0, "cache.shard_size and cache.batch_size must be > 0")

    if generating:
        _check(bool(c.teacher.model), "generation.lmbda > 0 / seq_kd needs teacher.model (it scores the samples)")
        # seq_kd alone with kd_weight 0 is Kim & Rush's sequence-level KD: CE on the teacher's samples.
        _check(loss.kd_weight > 0 or g.lmbda == 0, "generation.lmbda > 0 needs loss.kd_weight > 0 (the teacher "
               "grades the student's samples; CE alone on its own samples teaches it nothing new)")
    if loss.kd_weight > 0 and not c.teacher.model and not from_cache:
        raise ConfigError("teacher.model is required when loss.kd_weight > 0 (set loss.kd_weight=0 for "
                          "supervised training without a teacher)")
    s = c.student
    given = [n for n in ("model", "config", "init_from_teacher_layers") if getattr(s, n) is not None]
    if len(given) != 1:
        raise ConfigError("student: give exactly one of student.model (pretrained), student.config "
                          f"(architecture) or student.init_from_teacher_layers; got {given or 'none'}")
    if s.init_from_teacher_layers is not None:
        _check(bool(s.init_from_teacher_layers) and min(s.init_from_teacher_layers) >= 0,
               "student.init_from_teacher_layers must be a non-empty list of teacher layer indices")
        _check(bool(c.teacher.model), "student.init_from_teacher_layers needs teacher.model")
    if s.config is not None and "model_type" not in s.config:
        raise ConfigError("student.config needs a model_type (e.g. llama)")
    if not (s.tokenizer or s.model or c.teacher.model):
        raise ConfigError("no tokenizer: set student.tokenizer, student.model or teacher.model")

    d = c.data
    _check(bool(d.train), "data.train is required (a local file or a hub dataset id)")
    _check(d.max_length >= 2, "data.max_length must be >= 2")
    for name in ("max_train_examples", "max_eval_examples"):
        value = getattr(d, name)
        _check(value is None or value > 0, f"data.{name} must be > 0")

    t = c.train
    _check(t.max_steps is None or t.max_steps > 0, "train.max_steps must be > 0")
    _check(t.epochs > 0, "train.epochs must be > 0")
    _check(t.batch_size > 0 and t.grad_accum_steps > 0, "train.batch_size and train.grad_accum_steps must be > 0")
    _check(t.lr > 0, "train.lr must be > 0")
    _check(t.weight_decay >= 0, "train.weight_decay must be >= 0")
    _check(len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas),
           "train.adam_betas must be two numbers in [0, 1)")
    _check(t.warmup_steps >= 0 and 0 <= t.min_lr_ratio <= 1, "train.warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")
    _check(t.schedule_steps is None or t.schedule_steps > 0, "train.schedule_steps must be > 0")
    _check(t.max_grad_norm >= 0, "train.max_grad_norm must be >= 0 (0 disables clipping)")
    _check(t.max_skipped_steps > 0, "train.max_skipped_steps must be > 0")
    _check(t.memory_gb is None or t.memory_gb >= 0, "train.memory_gb must be >= 0 (0: no memory check)")
    for name in ("eval_every", "save_every"):
        _check(getattr(t, name) >= 0, f"train.{name} must be >= 0")
    _check(t.log_every > 0 and t.keep_checkpoints > 0, "train.log_every and train.keep_checkpoints must be > 0")
    _check(t.eval_batch_size is None or t.eval_batch_size > 0, "train.eval_batch_size must be > 0")


def validate_classification(c: Config) -> None:
    """What a sequence-classification run cannot combine with (token-level machinery)."""
    why = f"task={c.task} distils {'class logits' if c.task == 'classification' else 'sentence embeddings'}"
    _check(c.teacher.source == "live", f"{why} from the live teacher (teacher.model): teacher.source={c.teacher.source} "
                                       "is for causal LMs")
    _check(c.loss.divergence != "sampled_reverse_kl", f"{why}: sampled_reverse_kl samples tokens; use a divergence "
                                                      "(forward_kl, reverse_kl, jsd, ...)")
    for name, bad in (("loss.cross_tokenizer", c.loss.cross_tokenizer is not None),
                      ("loss.sparse_mode", c.loss.sparse_mode is not None), ("train.qat", c.train.qat is not None),
                      ("generation.lmbda > 0", c.generation.lmbda > 0), ("generation.seq_kd", c.generation.seq_kd)):
        _check(not bad, f"{name} applies to task=causal_lm only; a classifier's or encoder's teacher and student may "
                        "have different tokenizers without it (class logits and embeddings need no shared vocabulary)"
               if name == "loss.cross_tokenizer" else f"{name} applies to task=causal_lm only")
    d = c.data
    _check(bool(d.text_field) and bool(d.label_field), "data.text_field and data.label_field must not be empty")
    if d.labels is not None:
        _check(len(d.labels) >= 2, f"data.labels needs at least 2 class names, got {d.labels}")
        _check(len(set(d.labels)) == len(d.labels), f"data.labels has a name twice: {d.labels}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _build(cls, raw: Any, where: str):
    """Turn nested dicts into the dataclass ``cls``, checking keys and types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {_show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key {path!r}{_suggest(str(key), fields, prefix=where)}")
        values[key] = _coerce(hints[key], value, path)
    return cls(**values)


def _coerce(tp, value, path: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if value is None:
        raise ConfigError(f"{path}: a value is required, got null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {', '.join(map(str, args))}; got {_show(value)}"
                              f"{_suggest(str(value), [str(a) for a in args], prefix=None)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a string, got {_show(value)}")
        return str(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_show(value)}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_show(value)}")
        return dict(value)
    raise TypeError(f"unsupported config type {tp} at {path}")  # a bug in the schema, not user input


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            if i == 0:  # a section replaced by a scalar: let _build report it with its name
                break
            node[part] = child = {}
        node = child
    else:
        node[parts[-1]] = value
        return
    raise ConfigError(f"override {item!r}: {parts[0]!r} is not a section")


def _resolve_paths(config: Config, base: Path) -> None:
    """Make relative local paths in a YAML file relative to that file, when they exist there."""
    def fix(value: Optional[str]) -> Optional[str]:
        if value and not os.path.isabs(value) and not os.path.exists(value):
            candidate = base / value
            if candidate.exists() or any(candidate.parent.glob(candidate.name)):
                return str(candidate)
        return value

    config.teacher.model = fix(config.teacher.model)
    config.student.model = fix(config.student.model)
    config.student.tokenizer = fix(config.student.tokenizer)
    config.data.train = fix(config.data.train)
    config.data.eval = fix(config.data.eval)
    config.cache.dir = fix(config.cache.dir)


def _suggest(word: str, options, prefix: Optional[str] = "") -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    if not match:
        return ""
    name = f"{prefix}.{match[0]}" if prefix else match[0]
    return f" (did you mean {name!r}?)"


def _show(value) -> str:
    return f"{type(value).__name__} {value!r}"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _deep_copy(raw):
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw
