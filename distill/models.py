"""Load teacher and student models and their tokenizers.

Models load from local paths or the Hugging Face Hub, from safetensors only, and remote code runs
only when the caller passes ``trust_remote_code=True``. A student can be pretrained, built from an
architecture config, or initialized from a subset of the teacher's layers (DistilBERT-style).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedModel)

from distill.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Matches the layer index in parameter names of the common decoder stacks:
# model.layers.3. (Llama, Qwen, Mistral), transformer.h.3. (GPT-2), gpt_neox.layers.3., blocks.3.,
# bert.encoder.layer.3. (BERT, RoBERTa), distilbert.transformer.layer.3.
_LAYER_KEY = re.compile(r"^(.*?\.(?:layers|h|layer|blocks))\.(\d+)\.(.*)$")


def _check_local(name: str, what: str) -> None:
    """Refuse a path that is clearly local but missing, instead of asking the Hub for it."""
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep == "\\"
    if looks_local and not os.path.exists(os.path.expanduser(name)):
        raise UserError(f"{what} not found: {name}")


def load_tokenizer(name: str, *, revision: Optional[str] = None, trust_remote_code: bool = False):
    _check_local(name, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load a tokenizer from {name}: {_first_line(e)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # only used for padding; padded labels are -100
    return tokenizer


SPECIAL_TOKENS = ("bos", "eos", "pad")


def _agrees(value, token_id) -> bool:
    """A config's id (or list of ids: several stop tokens) agrees with the tokenizer's ``token_id``."""
    return token_id in value if isinstance(value, (list, tuple)) else value == token_id


def align_special_tokens(model: PreTrainedModel, tokenizer) -> list[str]:
    """Make ``model``'s config and generation config carry the tokenizer's BOS / EOS ids, and the
    generation config its pad id.

    The tokenizer is the truth: it is what llama.cpp, vLLM and every other consumer reads, and the
    ids the training loop uses. An id that already agrees is kept (a list of stop ids that contains
    the tokenizer's EOS stays a list). Where the tokenizer has no such token, a config id naming a
    token that is not special at all (Llama's default ``bos_token_id: 1`` in a BPE where 1 is ``!``)
    is cleared. Returns one description per change, e.g. ``"eos_token_id 2 ('\"') -> 0 ('<|endoftext|>')"``.
    """
    special = set(tokenizer.all_special_ids)
    changes = []
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is None:
            continue
        for kind in SPECIAL_TOKENS:
            key = f"{kind}_token_id"
            want = getattr(tokenizer, key, None)
            have = getattr(config, key, None)
            if kind == "pad" and config is model.config:
                # config.json's pad id becomes the embedding's padding_idx when the model is built,
                # which freezes that row's gradient: with pad = EOS (the usual case) EOS would stop
                # learning. So the pad id goes to generation_config.json only, and config.json's is
                # merely cleared when it names a token that is not special at all.
                want = None
            if want is not None and not _agrees(have, want):
                new = want
            elif want is None and have is not None and not isinstance(have, (list, tuple)) and have not in special:
                new = None
            else:
                continue
            setattr(config, key, new)
            text = f"{key} {have} ({_token(tokenizer, have)}) -> {new} ({_token(tokenizer, new)})"
            if text not in changes:
                changes.append(text)
    return changes


def _token(tokenizer, token_id) -> str:
    if token_id is None or isinstance(token_id, (list, tuple)):
        return "none" if token_id is None else "several"
    try:
        return repr(tokenizer.convert_ids_to_tokens(int(token_id)))
    except (IndexError, ValueError, TypeError):
        return "out of the vocabulary"


def load_causal_lm(name: str, *, dtype: torch.dtype = torch.float32, revision: Optional[str] = None,
                   trust_remote_code: bool = False) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` from safetensors, with user errors on one line."""
    _check_local(name, "model")
    try:
        return AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load a causal LM from {name} (safetensors only): {_first_line(e)}") from None


def empty_causal_lm(name: str, *, dtype: torch.dtype = torch.float32, revision: Optional[str] = None,
                    trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM of ``name``'s config with its parameters on the meta device (no storage, no
    weights read) and its buffers real (rotary frequencies are computed as usual), tied as the
    config says: the shape another process fills in (distill/sharding.py ``shard_teacher``)."""
    from accelerate import init_empty_weights

    _check_local(name, "model")
    try:
        hf_config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the model config of {name}: {_first_line(e)}") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    return model


def load_classifier(name: str, *, dtype: torch.dtype = torch.float32, revision: Optional[str] = None,
                    trust_remote_code: bool = False) -> PreTrainedModel:
    """``AutoModelForSequenceClassification.from_pretrained`` from safetensors, user errors on one line.

    A folder without a trained classification head (a plain encoder or LM) loads with a new head,
    and the warning transformers prints then says which weights are new."""
    _check_local(name, "model")
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            name, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load a sequence classifier from {name} (safetensors only): "
                        f"{_first_line(e)}") from None


def load_encoder(name: str, *, dtype: torch.dtype = torch.float32, revision: Optional[str] = None,
                 trust_remote_code: bool = False) -> PreTrainedModel:
    """``AutoModel.from_pretrained`` (the bare encoder, no head) from safetensors, user errors on one line."""
    from transformers import AutoModel

    from transformers.utils import logging as hf_logging

    _check_local(name, "model")
    before = hf_logging.get_verbosity()
    if has_head(name):  # a classifier's (or LM's) encoder: its head's weights go unused, as meant; no report
        hf_logging.set_verbosity_error()
    try:
        return AutoModel.from_pretrained(name, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                                         use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load an encoder from {name} (safetensors only): {_first_line(e)}") from None
    finally:
        hf_logging.set_verbosity(before)


def architectures(path: str) -> list[str]:
    """The ``architectures`` a local model folder's config.json names ([] when there is none)."""
    try:
        return [str(a) for a in json.loads((Path(path) / "config.json").read_text()).get("architectures") or []]
    except (OSError, ValueError, AttributeError):
        return []


def has_head(path: str) -> bool:
    """A local folder whose config names an architecture with a head (``*For...`` / ``*LMHeadModel``)."""
    return any("For" in a or a.endswith("LMHeadModel") for a in architectures(path))


def label_config(names: Sequence[str]) -> dict:
    """The config fields that name a classifier's classes (saved with the student)."""
    return {"num_labels": len(names), "id2label": {i: n for i, n in enumerate(names)},
            "label2id": {n: i for i, n in enumerate(names)}}


def set_labels(model: PreTrainedModel, names: Sequence[str]) -> None:
    """Write the class names into ``model.config`` (their number must be the head's)."""
    for key, value in label_config(names).items():
        setattr(model.config, key, value)


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Activation checkpointing of every decoder layer, non-reentrant (what FSDP and hooks need);
    transformers 5 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def student_from_config(arch: dict, *, vocab_size: int, dtype: torch.dtype = torch.float32,
                        labels: Optional[Sequence[str]] = None, encoder: bool = False) -> PreTrainedModel:
    """A freshly initialized student from an architecture dict such as ``{model_type: llama, ...}``:
    a causal LM, with ``labels`` (class names) a sequence classifier, with ``encoder`` the bare model."""
    config = arch_config(arch, vocab_size=vocab_size, labels=labels)
    from transformers import AutoModel

    auto = AutoModel if encoder else AutoModelForCausalLM if labels is None else AutoModelForSequenceClassification
    try:
        model = auto.from_config(config, dtype=dtype)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"student.config: could not build a {config.model_type} model: {_first_line(e)}") from None
    return model


def arch_config(arch: dict, *, vocab_size: int, labels: Optional[Sequence[str]] = None):
    """The transformers config of an architecture dict (``student.config``), vocabulary defaulted."""
    arch = dict(arch)
    model_type = arch.pop("model_type")
    arch.setdefault("vocab_size", vocab_size)
    if labels is not None:
        arch.update(label_config(labels))
    try:
        return AutoConfig.for_model(model_type, **arch)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"student.config: could not build a {model_type} model: {_first_line(e)}") from None


def student_from_teacher_layers(teacher: PreTrainedModel, layers: Sequence[int]) -> PreTrainedModel:
    """A student with the teacher's embeddings, final norm and head (LM head, or pooler and
    classification head), and the listed teacher layers; of the teacher's own class.

    Student layer ``i`` is a copy of teacher layer ``layers[i]`` (DistilBERT initializes from every
    other layer: ``[0, 2, 4, ...]``). The teacher is not modified. A teacher with meta parameters
    gives a student with meta parameters (its shape; under FSDP2 process 0 sends the weights).
    """
    n_teacher = teacher.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if bad:
        raise UserError(f"student.init_from_teacher_layers: layers {bad} do not exist in a teacher "
                        f"with {n_teacher} layers")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds (sliding/full)
        config.layer_types = [config.layer_types[i] for i in layers]
    from accelerate import init_empty_weights

    empty = any(p.is_meta for p in teacher.parameters())  # a teacher of its shape only (sharding.first_loads)
    with init_empty_weights(include_buffers=False) if empty else contextlib.nullcontext():
        student = type(teacher)(config).to(teacher.dtype)
    targets = {}  # teacher layer index -> student positions (a layer listed twice fills both)
    for s, t in enumerate(layers):
        targets.setdefault(t, []).append(s)
    state = {}
    for key, value in teacher.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match is None:  # embeddings, final norm, head
            state[key] = value.clone()
            continue
        prefix, index, rest = match.groups()
        for s in targets.get(int(index), []):  # teacher layers not listed are dropped
            state[f"{prefix}.{s}.{rest}"] = value.clone()
    missing, unexpected = student.load_state_dict(state, strict=False, assign=empty)  # meta stays meta
    missing = [k for k in missing if k not in _tied_keys(student)]
    if missing or unexpected:  # a layout this function does not know: fail loudly, never half-copy
        raise UserError(f"student.init_from_teacher_layers: cannot map the teacher's parameters onto the "
                        f"student (missing {missing[:3]}, unexpected {unexpected[:3]})")
    student.tie_weights()
    return student


def _tied_keys(model: nn.Module) -> set:
    keys = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(keys, dict):
        keys = list(keys)
    return set(keys)


def check_finite(model: nn.Module, what: str) -> nn.Module:
    """Refuse a model with NaN or inf in its parameters or buffers (UserError naming the tensors).

    A damaged file or one saved after a diverged run would otherwise make every target or loss
    NaN, and training would carry on without a word."""
    bad = []
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            bad.append(f"{name} ({nan} NaN, {inf} inf of {tensor.numel()})")
    if bad:
        more = f" and {len(bad) - 2} more tensors" if len(bad) > 2 else ""
        raise UserError(f"{what} has non-finite weights: {', '.join(bad[:2])}{more}; the checkpoint is damaged or "
                        "was saved from a diverged run")
    return model


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
