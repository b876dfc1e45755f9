"""`distill train` with ``task: classification``: Hinton's soft targets on class logits, plus α·CE on
the labels and feature terms, for ``AutoModelForSequenceClassification`` teachers and students
(encoders such as BERT / RoBERTa / MiniLM, and decoders with a classification head); and with
``task: embedding``, sentence encoders (``AutoModel`` + mean or CLS pooling): the student's
embedding against the teacher's (cosine or MSE through a learned projection, the batch's
similarity matrix, RKD distance and angle), saved with the sentence-transformers files.

Per example i of an optimizer step's N examples (all micro-batches, all processes):

    loss = (1/N) Σ_i [ kd_weight · τ² · D(p_T(x_i), p_S(x_i); τ) + ce_weight · CE(y_i, p_S(x_i))
                       + hidden_weight · h_i + attention_weight · a_i + relation_weight · r_i ]

with D any registered divergence on the class logits (``distill.losses``), and the feature terms
``h_i`` (hidden states), ``a_i`` (attention maps), ``r_i`` (MiniLM v2 relations) each the mean
over the example's real tokens and the mapped layers (``distill.losses.features``). The learned
projections of the hidden-state term are trained with the student, saved in checkpoints and never
in the student.

The class logits need no shared vocabulary, so teacher and student may read different tokenizers
(each reads the text with its own); the token-level feature terms need the same tokenizer.

The loop mirrors ``distill.training``'s (its resume, checkpoint and non-finite rules are the same
functions): the batch order is a pure function of (seed, step), and each micro-batch's loss sum is
divided once by the step's global example count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from distill import faults, models
from distill.build import data_cache_dir, has_accelerator, teacher_dtype
from distill.config import Config, save_config
from distill.data.classification import (class_names, collate_classification, load_classification, meaningful_names,
                                         raw_rows)
from distill.data.sources import DataError
from distill.errors import UserError
from distill.losses import forward_kl, get_divergence, kd_loss
from distill.features import (Capture, FeatureSettings, check_attentions, check_relation_widths, feature_projections,
                              feature_settings, layer_modules, per_position_terms, qkv_modules, use_eager_attention)
from distill.losses.features import FeatureProjection, embedding_loss, pool, rkd_angle, rkd_distance, similarity_matrix_loss
from distill.training import (MetricsLog, _check_same_run, _flat, _number, _show, batch_indices, build_optimizer,
                              checkpoint_on_interrupt, checkpoints, clean_leftovers, nonfinite_problem,
                              save_checkpoint, save_student, settle_step)

log = logging.getLogger(__name__)

def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """(B, T) per-position values -> (B,) mean over each row's real positions."""
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp_min(1.0)


class ClassifierStudent(nn.Module):
    """The student classifier and what is trained with it but never saved with it: the hidden-state
    projections. ``forward`` returns the class logits and each feature term per example, so every
    trained parameter is used inside one forward (what DDP needs)."""

    def __init__(self, model: nn.Module, features: FeatureSettings, *, teacher_width: int = 0):
        super().__init__()
        self.model = model
        self.features = features
        width = model.config.hidden_size
        self.projections = feature_projections(features, width, teacher_width)
        e = features.embedding
        self.embedding_projection = (FeatureProjection(width, teacher_width) if e is not None and e["weight"] > 0
                                     else None)
        self.capture = None
        if features.relations:
            self.capture = Capture(qkv_modules(layer_modules(model)[-1], "the student"))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, teacher: Optional[dict] = None):
        f = self.features
        if self.capture is not None:
            self.capture.clear()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=f.hidden,
                         output_attentions=f.attentions)
        terms = {}
        mask = attention_mask.bool()
        e = f.embedding
        result = out.logits if e is None else pool(out.last_hidden_state, mask, pooling=e["pooling"])  # (B, C) / (B, d)
        if teacher is None:
            return result, terms
        if e is not None:  # per example; the relational terms compare the micro-batch's examples
            t_emb = teacher["embedding"]
            if e["weight"] > 0:
                terms["embedding"] = embedding_loss(result, t_emb, kind=e["kind"], projection=self.embedding_projection)
            if e["similarity_weight"] > 0:
                terms["similarity"] = similarity_matrix_loss(result, t_emb)
            if e["rkd_distance_weight"] > 0:
                terms["rkd_distance"] = rkd_distance(result, t_emb)
            if e["rkd_angle_weight"] > 0:
                terms["rkd_angle"] = rkd_angle(result, t_emb)
        if f.any:  # each the mean over the example's real tokens and the mapped layers
            if f.attentions:
                check_attentions(out.attentions, "the student")
            mine = {"hidden": out.hidden_states, "attentions": out.attentions,
                    "qkv": self.capture.outputs if self.capture is not None else {}}
            terms.update({k: _masked_mean(v, mask) for k, v in
                          per_position_terms(f, self.projections, mine, teacher, mask).items()})
        return result, terms


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, batch: dict, features: FeatureSettings, capture: Optional[Capture]) -> dict:
    """The teacher's class logits (float32) and, when asked, its hidden states, attentions and q / k / v."""
    ids = batch.get("teacher_input_ids", batch["input_ids"])
    mask = batch.get("teacher_attention_mask", batch["attention_mask"])
    if capture is not None:
        capture.clear()
    out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=features.hidden,
                  output_attentions=features.attentions)
    if features.embedding is not None:
        result = {"embedding": pool(out.last_hidden_state, mask.bool(), pooling=features.embedding["pooling"]).float()}
    else:
        result = {"logits": out.logits.float()}
    if features.hidden:
        result["hidden"] = out.hidden_states
    if features.attentions:
        check_attentions(out.attentions, "the teacher")
        result["attentions"] = out.attentions
    if capture is not None:
        result["qkv"] = dict(capture.outputs)
    return result


@dataclass
class ClassificationLoss:
    divergence: str
    divergence_kwargs: dict
    temperature: float
    scale_by_tau2: bool
    kd_weight: float
    ce_weight: float
    features: FeatureSettings

    def weights(self) -> dict:
        f = self.features
        e = f.embedding or {}
        return {"embedding": e.get("weight", 0.0), "similarity": e.get("similarity_weight", 0.0),
                "rkd_distance": e.get("rkd_distance_weight", 0.0), "rkd_angle": e.get("rkd_angle_weight", 0.0),
                **f.weights()}


def micro_batch_loss(model: nn.Module, teacher: Optional[nn.Module], batch: dict, s: ClassificationLoss,
                     capture: Optional[Capture] = None):
    """(loss sum, {part: sum}, teacher_ok) of one micro-batch: KD + CE + weighted feature terms,
    summed over its examples. ``teacher_ok``: (B,) finite teacher logits, or None without a teacher."""
    t_out = teacher_outputs(teacher, batch, s.features, capture) if teacher is not None else None
    logits, terms = model(batch["input_ids"], batch["attention_mask"], teacher=t_out)
    if s.features.embedding is not None:  # task=embedding: the weighted terms alone
        loss, sums = torch.zeros((), device=logits.device), {}
        ok = torch.isfinite(t_out["embedding"]).all(-1)
    else:
        parts = kd_loss(logits.float(), t_out["logits"] if t_out is not None else None, batch["labels"],
                        divergence=s.divergence, temperature=s.temperature, scale_by_tau2=s.scale_by_tau2,
                        kd_weight=s.kd_weight if t_out is not None else 0.0, ce_weight=s.ce_weight,
                        **s.divergence_kwargs)
        loss, sums = parts.loss, {"kd": parts.kd, "ce": parts.ce}
        ok = torch.isfinite(t_out["logits"]).all(-1) if t_out is not None else None
    for name, weight in s.weights().items():
        if name in terms:
            total = terms[name].sum()
            loss = loss + weight * total
            sums[name] = total.detach()
    return loss, sums, ok


# ---------------------------------------------------------------------------------------------
# Evaluation during training


@torch.no_grad()
def evaluate(model: nn.Module, teacher: Optional[nn.Module], dataset, *, batch_size: int, pad_token_id: int,
             teacher_pad_token_id: int, accelerator: Accelerator, s: ClassificationLoss) -> dict:
    """Accuracy, CE and, with a teacher, agreement with it and KL(teacher ‖ student) at temperature 1
    and the training divergence, over ``dataset``; sums reduced over processes."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    div = get_divergence(s.divergence)
    sums = torch.zeros(6, dtype=torch.float64, device=accelerator.device)  # n, correct, ce, fkl, div, agree
    indices = list(range(rank, len(dataset), world))
    student = accelerator.unwrap_model(model).model
    for start in range(0, len(indices), batch_size):
        batch = collate_classification(dataset[indices[start:start + batch_size]], pad_token_id=pad_token_id,
                                       teacher_pad_token_id=teacher_pad_token_id, device=accelerator.device)
        with accelerator.autocast():
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            t_logits = (teacher(input_ids=batch.get("teacher_input_ids", batch["input_ids"]),
                                attention_mask=batch.get("teacher_attention_mask", batch["attention_mask"])).logits.float()
                        if teacher is not None else None)
        labels = batch["labels"]
        sums[0] += labels.numel()
        sums[1] += (logits.argmax(-1) == labels).sum()
        sums[2] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        if t_logits is not None:
            sums[3] += forward_kl(logits, t_logits).double().sum()
            sums[4] += div(logits, t_logits, **s.divergence_kwargs).double().sum()
            sums[5] += (logits.argmax(-1) == t_logits.argmax(-1)).sum()
    model.train()
    n, correct, ce, fkl, dv, agree = accelerator.reduce(sums, reduction="sum").tolist()
    result = {"eval/accuracy": correct / n, "eval/ce": ce / n, "eval/examples": int(n)}
    if teacher is not None:
        result.update({"eval/forward_kl": fkl / n, f"eval/{s.divergence}": dv / n, "eval/teacher_agreement": agree / n})
    return result


@torch.no_grad()
def evaluate_embeddings(model: nn.Module, teacher: nn.Module, dataset, *, batch_size: int, pad_token_id: int,
                        teacher_pad_token_id: int, accelerator: Accelerator, s: ClassificationLoss) -> dict:
    """Fidelity of the student's sentence embeddings to the teacher's over the whole ``dataset``
    (every process computes all of it: the neighbour metrics need every pair):

    eval/cosine: mean cos(W·e_s, e_t) (W the learned projection where the widths differ);
    eval/similarity_mse: mean over pairs i ≠ j of (cos_s(i, j) − cos_t(i, j))²;
    eval/neighbour_agreement: share of examples whose nearest other example is the same for both."""
    model.eval()
    wrapped = accelerator.unwrap_model(model)
    pooling = s.features.embedding["pooling"]
    s_all, t_all = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate_classification(dataset[start:start + batch_size], pad_token_id=pad_token_id,
                                       teacher_pad_token_id=teacher_pad_token_id, device=accelerator.device)
        with accelerator.autocast():
            out = wrapped.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            t_out = teacher(input_ids=batch.get("teacher_input_ids", batch["input_ids"]),
                            attention_mask=batch.get("teacher_attention_mask", batch["attention_mask"]))
        s_all.append(pool(out.last_hidden_state.float(), batch["attention_mask"].bool(), pooling=pooling))
        t_all.append(pool(t_out.last_hidden_state.float(), batch.get("teacher_attention_mask",
                                                                      batch["attention_mask"]).bool(), pooling=pooling))
    model.train()
    e_s, e_t = torch.cat(s_all).double(), torch.cat(t_all).double()
    result = {"eval/examples": len(dataset)}
    proj = wrapped.embedding_projection
    if proj is not None or e_s.shape[-1] == e_t.shape[-1]:
        mapped = proj(e_s.float()).double() if proj is not None else e_s
        result["eval/cosine"] = float(torch.nn.functional.cosine_similarity(mapped, e_t, dim=-1).mean())
    gram = lambda x: torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(x, dim=-1).T  # noqa: E731
    g_s, g_t = gram(e_s), gram(e_t)
    n = len(dataset)
    off = ~torch.eye(n, dtype=torch.bool, device=g_s.device)
    result["eval/similarity_mse"] = float((g_s - g_t).pow(2)[off].mean()) if n > 1 else None
    eye = torch.eye(n, dtype=torch.bool, device=g_s.device)
    agree = g_s.masked_fill(eye, -2).argmax(-1) == g_t.masked_fill(eye, -2).argmax(-1)
    result["eval/neighbour_agreement"] = float(agree.double().mean()) if n > 1 else None
    return result


def save_sentence_transformer_files(folder: Path, *, width: int, pooling: str, max_length: int) -> None:
    """The files that make ``folder`` (a saved AutoModel + tokenizer) load as a sentence-transformers
    model with the run's pooling: modules.json, 1_Pooling/config.json, sentence_bert_config.json."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": width, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2) + "\n")
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length,
                                                                  "do_lower_case": False}, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Building the run


def load_tokenizer(name: str, *, revision=None, trust_remote_code=False):
    tokenizer = models.load_tokenizer(name, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        raise UserError(f"the tokenizer of {name} has no pad token and no EOS to pad with: set its pad_token")
    return tokenizer


def give_pad_id(model: nn.Module, tokenizer) -> None:
    """A classifier's config carries the tokenizer's pad id: a decoder head reads the last non-pad token."""
    model.config.pad_token_id = tokenizer.pad_token_id


def build_models(config: Config):
    """(tokenizer, teacher_tokenizer, teacher or None, student, class names, data rows' names source)."""
    d = config.data
    if config.task == "embedding":
        return build_encoders(config)
    teacher = None
    if config.teacher.model:
        teacher = models.freeze(models.check_finite(models.load_classifier(
            config.teacher.model, dtype=teacher_dtype(config), revision=config.teacher.revision,
            trust_remote_code=config.teacher.trust_remote_code), f"the teacher {config.teacher.model}"))
    tok_name = config.student.tokenizer or config.student.model or config.teacher.model
    tokenizer = load_tokenizer(tok_name, revision=config.student.revision,
                               trust_remote_code=config.student.trust_remote_code)
    teacher_tokenizer = None
    if teacher is not None:
        teacher_tokenizer = (tokenizer if tok_name == config.teacher.model else load_tokenizer(
            config.teacher.model, revision=config.teacher.revision, trust_remote_code=config.teacher.trust_remote_code))
    # The class names, decided once: data.labels, the teacher's, the student's (pretrained), the data's.
    fields = [d.label_field]
    raw, src = raw_rows(d.train, split=d.train_split, fields=fields, max_examples=d.max_train_examples,
                        cache_dir=data_cache_dir())
    known = None
    if teacher is not None:
        known = meaningful_names(teacher.config)
    student_model = None
    if config.student.model:
        student_model = models.check_finite(models.load_classifier(
            config.student.model, revision=config.student.revision,
            trust_remote_code=config.student.trust_remote_code), f"the student {config.student.model}")
        known = known or meaningful_names(student_model.config)
    names = class_names(raw[d.label_field], given=d.labels, teacher=known, where=src.describe())
    for m, what in ((teacher, "the teacher"), (student_model, "the student")):
        if m is not None and m.config.num_labels != len(names):
            raise UserError(f"{what} has {m.config.num_labels} classes but the run has {len(names)} "
                            f"({', '.join(names)})")
    if student_model is not None:
        student = student_model
    elif config.student.config is not None:
        student = models.student_from_config(config.student.config, vocab_size=len(tokenizer), labels=names)
    else:
        if tok_name != config.teacher.model and config.student.tokenizer:
            raise UserError("student.init_from_teacher_layers copies the teacher's embeddings: the student must read "
                            "the teacher's tokenizer (leave student.tokenizer out)")
        student = models.student_from_teacher_layers(teacher, config.student.init_from_teacher_layers).float()
        student.requires_grad_(True)
        student.train()
    models.set_labels(student, names)
    give_pad_id(student, tokenizer)
    if teacher is not None:
        give_pad_id(teacher, teacher_tokenizer)
    return tokenizer, teacher_tokenizer, teacher, student, names


def build_encoders(config: Config):
    """task=embedding: (tokenizer, teacher tokenizer, teacher, student, None) as bare encoders (AutoModel)."""
    t, st = config.teacher, config.student
    teacher = models.freeze(models.check_finite(models.load_encoder(
        t.model, dtype=teacher_dtype(config), revision=t.revision, trust_remote_code=t.trust_remote_code),
        f"the teacher {t.model}"))
    tok_name = st.tokenizer or st.model or t.model
    tokenizer = load_tokenizer(tok_name, revision=st.revision, trust_remote_code=st.trust_remote_code)
    teacher_tokenizer = tokenizer if tok_name == t.model else load_tokenizer(
        t.model, revision=t.revision, trust_remote_code=t.trust_remote_code)
    if st.model:
        student = models.check_finite(models.load_encoder(st.model, revision=st.revision,
                                                          trust_remote_code=st.trust_remote_code),
                                      f"the student {st.model}")
    elif st.config is not None:
        student = models.student_from_config(st.config, vocab_size=len(tokenizer), encoder=True)
    else:
        if st.tokenizer and tok_name != t.model:
            raise UserError("student.init_from_teacher_layers copies the teacher's embeddings: the student must read "
                            "the teacher's tokenizer (leave student.tokenizer out)")
        student = models.student_from_teacher_layers(teacher, st.init_from_teacher_layers).float()
        student.requires_grad_(True)
        student.train()
    give_pad_id(student, tokenizer)
    give_pad_id(teacher, teacher_tokenizer)
    return tokenizer, teacher_tokenizer, teacher, student, None


def _same_tokenizer(a, b) -> bool:
    """The two tokenizers turn text into the same ids (call-time truncation / padding settings that a
    saved tokenizer.json may carry aside)."""
    def key(tok):
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            return (type(tok).__name__, sorted(tok.get_vocab().items()), tok.all_special_ids)
        body = json.loads(backend.to_str())
        body.pop("truncation", None)
        body.pop("padding", None)
        return (json.dumps(body, sort_keys=True), tok.all_special_ids)

    return a is b or key(a) == key(b)


# ---------------------------------------------------------------------------------------------
# The run


def train_classifier(config: Config) -> dict:
    """`distill train` for ``task: classification`` (see the module doc); returns the final metrics."""
    t, L = config.train, config.loss
    out = Path(t.output_dir)
    accelerator = Accelerator(cpu=not has_accelerator(), mixed_precision={"fp32": "no"}.get(t.precision, t.precision),
                              log_with=None if t.tracker == "none" else t.tracker, project_dir=str(out))
    main = accelerator.is_main_process
    if main and out.is_dir():
        clean_leftovers(out, t.keep_checkpoints)
    accelerator.wait_for_everyone()
    resume_from = checkpoints(out)[-1] if checkpoints(out) else None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            _check_same_run(out / "config.yaml", config)
        save_config(config, out / "config.yaml")
    set_seed(t.seed)

    tokenizer, teacher_tokenizer, teacher, student, names = build_models(config)  # names: None for embedding
    features = feature_settings(config, student, teacher)
    separate = teacher is not None and not _same_tokenizer(tokenizer, teacher_tokenizer)
    if separate and (features.hidden or features.attentions or features.relations):
        raise UserError("loss.features compare the two models token by token: the teacher and the student must read "
                        "the same tokenizer (class-logit KD alone works across tokenizers)")
    if features.attentions:
        use_eager_attention(student, "the student")
        use_eager_attention(teacher, "the teacher")
    t_capture = None
    if features.relations:
        t_capture = Capture(qkv_modules(layer_modules(teacher)[features.relation_layer], "the teacher"))
        check_relation_widths(features, student, teacher)
    wrapped = ClassifierStudent(student, features,
                                teacher_width=teacher.config.hidden_size if teacher is not None else 0)
    settings = ClassificationLoss(
        divergence=L.divergence, temperature=L.temperature, scale_by_tau2=L.scale_by_tau2, kd_weight=L.kd_weight,
        ce_weight=L.ce_weight, features=features,
        divergence_kwargs={k: v for k, v in (("beta", L.beta), ("alpha", L.alpha)) if v is not None})

    # Data.
    d = config.data
    data_args = dict(tokenizer=tokenizer, names=names, text_field=d.text_field, text_pair_field=d.text_pair_field,
                     label_field=d.label_field, max_length=d.max_length,
                     teacher_tokenizer=teacher_tokenizer if separate else None, cache_dir=data_cache_dir())
    with accelerator.main_process_first():
        train_set = load_classification(d.train, split=d.train_split, max_examples=d.max_train_examples, **data_args)
        eval_set = (load_classification(d.eval, split=d.eval_split, max_examples=d.max_eval_examples, **data_args)
                    if d.eval else None)
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = t.batch_size * t.grad_accum_steps * world
    if len(train_set) < global_batch:
        raise UserError(f"data.train has {len(train_set)} examples, fewer than one global batch ({t.batch_size} x "
                        f"{t.grad_accum_steps} accumulation x {world} processes = {global_batch})")
    max_steps = t.max_steps or max(1, int(t.epochs * (len(train_set) // global_batch)))
    e = features.embedding or {}
    if (e.get("rkd_angle_weight", 0) > 0 and t.batch_size < 3) or (
            e.get("rkd_distance_weight", 0) + e.get("similarity_weight", 0) > 0 and t.batch_size < 2):
        raise UserError(f"loss.embedding: the relational terms compare the examples of a micro-batch; "
                        f"train.batch_size={t.batch_size} is too small (RKD angle needs 3, the others 2)")
    optimizer, scheduler = build_optimizer(wrapped.parameters(), t, max_steps)
    model, optimizer = accelerator.prepare(wrapped, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if teacher is not None:
        teacher.to(accelerator.device)
    embedding = features.embedding is not None
    loss_teacher = teacher if (embedding or L.kd_weight > 0 or features.hidden or features.attentions
                               or features.relations) else None
    pad, t_pad = tokenizer.pad_token_id, (teacher_tokenizer or tokenizer).pad_token_id

    metrics = MetricsLog(out / "metrics.jsonl", enabled=main)
    parts_names = ([] if embedding else ["kd", "ce"]) + [k for k, w in settings.weights().items() if w > 0]
    run_eval = evaluate_embeddings if embedding else evaluate
    state = {"step": 0, "window": {"loss": 0.0, "examples": 0, **{k: 0.0 for k in parts_names}},
             "skipped_steps": 0, "consecutive_skips": 0, "labels": names}
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = {**state, **json.loads((resume_from / "trainer_state.json").read_text())}
        metrics.truncate_after(state["step"])
        accelerator.print(f"resuming from {resume_from} (step {state['step']} of {max_steps})")
    if main and t.tracker != "none":
        accelerator.init_trackers("distill", config={k: v for k, v in _flat(config.to_dict()).items()
                                                      if isinstance(v, (int, float, str, bool))})
    eval_args = dict(batch_size=t.eval_batch_size or t.batch_size, pad_token_id=pad, teacher_pad_token_id=t_pad,
                     accelerator=accelerator, s=settings)
    model.train()
    progress = tqdm(total=max_steps, initial=state["step"], disable=not (main and t.progress), unit="step",
                    dynamic_ncols=True)
    eval_result: dict = {}
    if eval_set is not None and t.eval_at_start and state["step"] == 0:
        metrics.write({"step": 0, **run_eval(model, teacher, eval_set, **eval_args)})
    tic = time.perf_counter()
    with checkpoint_on_interrupt(accelerator, out, state, t.keep_checkpoints, progress):
        while state["step"] < max_steps:
            step = state["step"]
            index_of = lambda r, m: batch_indices(step, m, n=len(train_set), batch_size=t.batch_size,  # noqa: E731
                                                  accum=t.grad_accum_steps, world=world, rank=r, seed=t.seed)
            batches = [collate_classification(train_set[index_of(rank, m)], pad_token_id=pad, teacher_pad_token_id=t_pad,
                                              device=accelerator.device) for m in range(t.grad_accum_steps)]
            n_global = world * t.grad_accum_steps * t.batch_size  # every example is supervised
            sums = torch.zeros(1 + len(parts_names), dtype=torch.float64, device=accelerator.device)
            bad = torch.zeros(world, len(batches), 2, dtype=torch.float64, device=accelerator.device)
            for m, batch in enumerate(batches):
                sync = accelerator.no_sync(model) if m < len(batches) - 1 else contextlib.nullcontext()
                with sync:
                    with accelerator.autocast():
                        loss, parts, teacher_ok = micro_batch_loss(model, loss_teacher, batch, settings, t_capture)
                    accelerator.backward(loss * (world / n_global))
                if teacher_ok is not None:
                    bad[rank, m, 0] = float(not bool(teacher_ok.all()))
                bad[rank, m, 1] = float(not bool(torch.isfinite(loss.detach())))
                sums += torch.stack([loss.detach().double()] + [parts[k].double() for k in parts_names])
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or float("inf"))
            grad_bad = (~torch.isfinite(grad_norm)).double().view(1) * (accelerator.scaler is None) / world
            reduced = accelerator.reduce(torch.cat([sums, grad_bad, bad.flatten()]), reduction="sum").tolist()
            k = len(sums)
            problem = nonfinite_problem(reduced[k] > 0, torch.tensor(reduced[k + 1:]).view(world, len(batches), 2),
                                        index_of)
            lr = scheduler.get_last_lr()[0]
            settle_step(problem, step=step, state=state, optimizer=optimizer, scheduler=scheduler,
                        accelerator=accelerator, progress=progress, out=out, t=t)
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            w = state["window"]
            if problem is None:
                w["loss"] += reduced[0]
                w["examples"] += n_global
                for i, name in enumerate(parts_names):
                    w[name] += reduced[1 + i]
            progress.update(1)
            if step % t.log_every == 0 or step == max_steps:
                n = w["examples"]
                per = (lambda x: x / n) if n else (lambda x: None)
                elapsed = time.perf_counter() - tic
                record = {"step": step, "loss": per(w["loss"]), **{name: per(w[name]) for name in parts_names},
                          "lr": lr, "grad_norm": _number(grad_norm), "examples": n,
                          "examples_per_s": n / max(elapsed, 1e-9), "skipped_steps": state["skipped_steps"]}
                metrics.write(record)
                accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
                progress.set_postfix(loss=_show(record["loss"]))
                state["window"] = {"loss": 0.0, "examples": 0, **{name: 0.0 for name in parts_names}}
                tic = time.perf_counter()
            if eval_set is not None and ((t.eval_every and step % t.eval_every == 0) or step == max_steps):
                eval_result = run_eval(model, teacher, eval_set, **eval_args)
                metrics.write({"step": step, **eval_result})
                accelerator.log(eval_result, step=step)
                progress.write(f"step {step}: " + ", ".join(f"{k[5:]} {_show(v)}" for k, v in eval_result.items()))
            faults.point("step")
            if (t.save_every and step % t.save_every == 0) or step == max_steps:
                save_checkpoint(accelerator, out, state, t.keep_checkpoints)
    progress.close()
    final = out / "student"
    if main:  # the classifier alone, with its class names; the projections stay in the checkpoints
        student_out = accelerator.unwrap_model(model).model
        save_student(student_out, tokenizer, out)
        if embedding:
            save_sentence_transformer_files(final, width=student_out.config.hidden_size,
                                            pooling=features.embedding["pooling"], max_length=config.data.max_length)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": state["step"], "output_dir": str(out), "student": str(final), "labels": names, **eval_result}


__all__ = ["ClassifierStudent", "micro_batch_loss", "train_classifier", "DataError"]
