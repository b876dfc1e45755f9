"""Write a Hugging Face causal LM folder as a GGUF file for llama.cpp.

The file is written with the ``gguf`` package's writer and its Hugging Face tensor-name map, from
the folder's ``config.json``, ``tokenizer.json`` and safetensors shards, one tensor at a time (the
model is never instantiated). Quantized types other than f32 / f16 / bf16 are made from that file
by llama.cpp's own quantizer (``llama_cpp.llama_model_quantize``), so a ``q4_k_m`` file is the one
llama.cpp's ``llama-quantize`` would make, k-quant mixes included.

Supported: the Llama family, ``model_type`` llama, mistral and qwen2, with a byte-level BPE
tokenizer whose pre-tokenizer llama.cpp implements (GPT-2's, Llama 3's, Qwen2's); RoPE plain,
linear-scaled or Llama 3-scaled. Anything else is refused with one line (``ExportError``) before a
byte is written.

Two conventions differ between the formats and are handled here:

- Llama and Mistral checkpoints on the Hub store q_proj / k_proj rows permuted for the
  "rotate half" RoPE of transformers; llama.cpp's ``llama`` architecture rotates interleaved pairs,
  so those rows are permuted back (as ``convert_hf_to_gguf.py`` does). Qwen2 uses llama.cpp's NEOX
  RoPE, which is rotate-half: no permutation.
- llama.cpp keeps 1-D tensors (norms, biases) in float32 whatever the file type.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from distill.errors import UserError


class ExportError(UserError):
    """The model cannot be exported as asked (architecture, tokenizer, quantization type)."""


# model_type -> (gguf architecture name, permute q/k rows back to interleaved RoPE)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}

WRITTEN_TYPES = ("f32", "f16", "bf16")  # written directly; the rest by llama.cpp's quantizer
QUANTIZED_TYPES = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0",
                   "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")
QUANT_TYPES = WRITTEN_TYPES + QUANTIZED_TYPES

# The pre-tokenizer regexes llama.cpp implements for byte-level BPE, as tokenizer.json spells them,
# and the name llama.cpp knows each by (src/llama-vocab.cpp).
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PRE_TOKENIZERS = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


@dataclass
class Tokenizer:
    """What the GGUF needs of a tokenizer: ``tokens[i]`` is token i as tokenizer.json spells it."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    ignore_merges: bool
    bos_token_id: Optional[int]
    eos_token_id: Optional[int]
    pad_token_id: Optional[int]
    add_bos: bool
    add_eos: bool
    chat_template: Optional[str]
    warnings: list[str]


def model_folder(src: str | os.PathLike) -> Path:
    """The HF model folder that ``src`` names: the folder itself, or a `distill train` run
    directory's ``student/``."""
    path = Path(src).expanduser()
    if not path.exists():
        raise UserError(f"not found: {src}")
    if (path / "config.json").is_file():
        return path
    if (path / "student" / "config.json").is_file():
        # A `train.qat` run's student is its int4 torchao build; builds are made from its float master.
        from distill.export.torchao_build import is_torchao_folder

        master = path / "student-float"
        return master if is_torchao_folder(path / "student") and (master / "config.json").is_file() else path / "student"
    if (path / "resolved_config.yaml").is_file() or (path / "checkpoints").is_dir():
        raise UserError(f"{src} is a run directory without a finished student/ folder: let the run finish "
                        "(re-running `distill train` on it resumes) and export again")
    raise UserError(f"{src}: not a model folder (no config.json) nor a run directory (no student/config.json)")


def check_quant(quant: str) -> str:
    q = quant.lower()
    if q not in QUANT_TYPES:
        raise ExportError(f"unknown GGUF type {quant!r}: choose one of {', '.join(QUANT_TYPES)}")
    return q


def read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{folder / 'config.json'}: cannot read it ({e})") from None


def check_architecture(config: dict) -> tuple[str, bool]:
    """(gguf architecture, permute q/k) for a config.json dict, or ExportError saying what is supported."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ExportError(f"GGUF export supports model_type {', '.join(ARCHITECTURES)}; this model is "
                          f"{model_type!r}")
    if model_type == "qwen2" and config.get("use_sliding_window"):
        raise ExportError("GGUF export: qwen2 with use_sliding_window is not supported (llama.cpp's qwen2 attends "
                          "to the full context)")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise ExportError(f"GGUF export: RoPE type {rope.get('rope_type')!r} is not supported (default, linear, "
                          "llama3 are)")
    return ARCHITECTURES[model_type]


def warnings_for(config: dict) -> list[str]:
    """What the GGUF will do differently from transformers, said once at export."""
    window = config.get("sliding_window")
    if config.get("model_type") == "mistral" and window and window < config.get("max_position_embeddings", 0):
        return [f"this mistral model attends within a {window}-token sliding window in transformers; llama.cpp's "
                "llama architecture attends to the whole context, so outputs differ past that length"]
    return []


def _rope(config: dict) -> dict:
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    return rope


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def read_tokenizer(folder: Path, vocab_size: int) -> Tokenizer:
    """The byte-level BPE tokenizer of ``folder`` (tokenizer.json), or ExportError."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{folder}: no tokenizer.json (a fast tokenizer) to export; save the model with its "
                          "tokenizer")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    if getattr(hf, "backend_tokenizer", None) is None:
        raise ExportError(f"{folder}: the tokenizer loads as a slow (Python) tokenizer; GGUF export needs a fast one")
    # What transformers actually runs, not tokenizer.json as written: for some model types (qwen2,
    # ...) transformers loads the tokenizer class of that model, which replaces the file's
    # pre-tokenizer with its own.
    spec = json.loads(hf.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError("GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 style); this "
                          f"tokenizer is {model.get('type')!r}" + (" with byte fallback (SentencePiece-style)"
                                                                  if model.get("byte_fallback") else ""))
    notes = []
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer == "NFC":  # Qwen2's: a no-op on text already in NFC form, the usual form
        notes.append("the HF tokenizer NFC-normalizes text and llama.cpp does not: text with decomposed accents "
                     "(not in NFC form) tokenizes differently")
    elif normalizer is not None:
        raise ExportError(f"GGUF export: the tokenizer has a normalizer ({normalizer}) that llama.cpp's byte-level "
                          "BPE would not apply")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    vocab = hf.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in hf.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):  # rows past the tokenizer (padded vocabularies) are unused
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        elif token in added:
            tokens.append(token)
            types.append(3 if added[token].special else 4)  # CONTROL / USER_DEFINED
        else:
            tokens.append(token)
            types.append(1)  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = hf("a", add_special_tokens=True)["input_ids"]
    plain = hf("a", add_special_tokens=False)["input_ids"]
    add_bos = hf.bos_token_id is not None and probe[:1] == [hf.bos_token_id] and plain[:1] != probe[:1]
    add_eos = hf.eos_token_id is not None and probe[-1:] == [hf.eos_token_id] and plain[-1:] != probe[-1:]
    template = hf.chat_template if isinstance(getattr(hf, "chat_template", None), str) else None
    return Tokenizer(tokens=tokens, token_types=types, merges=merges, pre=pre,
                     ignore_merges=bool(model.get("ignore_merges")), bos_token_id=hf.bos_token_id,
                     eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id, add_bos=add_bos, add_eos=add_eos,
                     chat_template=template, warnings=notes)


def _pre_tokenizer_name(pre: Optional[dict]) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or ExportError naming what it is."""
    if pre is None:
        raise ExportError("GGUF export: the tokenizer has no pre-tokenizer; llama.cpp needs a byte-level one")
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise ExportError("GGUF export: a ByteLevel pre-tokenizer with add_prefix_space is not supported by "
                              "llama.cpp")
        if pre.get("use_regex", True):
            return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        kinds = [s.get("type") for s in steps]
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) \
                and not steps[1].get("add_prefix_space"):
            regex = (steps[0].get("pattern") or {}).get("Regex")
            if regex in PRE_TOKENIZERS and steps[0].get("behavior") == "Isolated":
                return PRE_TOKENIZERS[regex]
            raise ExportError(f"GGUF export: pre-tokenizer regex {regex!r} is not one llama.cpp implements "
                              "(GPT-2's, Llama 3's and Qwen2's are supported)")
    raise ExportError(f"GGUF export: pre-tokenizer {json.dumps(pre)[:120]} is not one llama.cpp implements "
                      "(GPT-2's, Llama 3's and Qwen2's byte-level ones are)")


def permute_for_llama_cpp(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """q_proj / k_proj rows from transformers' rotate-half RoPE layout to llama.cpp's interleaved
    pairs: within each head, rows (0..d/2-1, d/2..d-1) -> (0, d/2, 1, d/2+1, ...). Shapes:
    (n_head·d, ...) -> same."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def llama3_rope_factors(rope: dict, dim: int) -> torch.Tensor:
    """The per-frequency divisors of Llama 3's RoPE scaling (``rope_freqs.weight``), as transformers'
    ``_compute_llama3_parameters`` applies them. Shapes: -> (dim/2,) float32."""
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder}: no .safetensors weights (distill exports safetensors checkpoints only)")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def source_dtype(folder: Path) -> torch.dtype:
    """The dtype of the checkpoint's 2-D weights (the first one found)."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                if len(t.get_shape()) == 2:
                    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(t.get_dtype(),
                                                                                                    torch.float32)
    return torch.float32


def write_gguf(folder: Path, out: Path, outtype: str, *, name: Optional[str] = None, progress: bool = False) -> dict:
    """Write ``folder`` (an HF causal LM) to ``out`` as GGUF with 2-D weights in ``outtype``
    (f32, f16 or bf16). Returns a summary (architecture, tensors, bytes)."""
    import gguf

    config = read_config(folder)
    arch, permute = check_architecture(config)
    vocab_size = config["vocab_size"]
    tok = read_tokenizer(folder, vocab_size)
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    dim = head_dim(config)
    rope = _rope(config)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype]

    writer = gguf.GGUFWriter(out, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or folder.name)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_rope_dimension_count(dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(vocab_size)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok.pre)
    writer.add_token_list(tok.tokens)
    writer.add_token_types(tok.token_types)
    writer.add_token_merges(tok.merges)
    for key, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("pad", tok.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(int(value))
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_eos_token(tok.add_eos)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    tied = config.get("tie_word_embeddings", False)
    count = 0
    for hf_name, tensor in _tensors(folder):
        if hf_name.endswith(".rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        if permute and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            tensor = permute_for_llama_cpp(tensor, n_head)
        elif permute and hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            tensor = permute_for_llama_cpp(tensor, n_kv)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"GGUF export: no GGUF name for tensor {hf_name!r} of this {config['model_type']} "
                              "model")
        _add(writer, gguf_name, tensor, outtype)
        count += 1
    if rope.get("rope_type") == "llama3":
        _add(writer, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(rope, dim), "f32")
        count += 1

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()
    return {"architecture": arch, "model_type": config["model_type"], "tensors": count,
            "pre_tokenizer": tok.pre, "bytes": out.stat().st_size, "warnings": tok.warnings}


def _add(writer, name: str, tensor: torch.Tensor, outtype: str) -> None:
    import gguf

    data = tensor.float()
    if data.ndim <= 1 or outtype == "f32":  # llama.cpp keeps 1-D tensors in float32
        writer.add_tensor(name, data.numpy().astype(np.float32))
    elif outtype == "f16":
        writer.add_tensor(name, data.numpy().astype(np.float16))
    else:  # bf16: the writer takes the raw bits
        raw = gguf.quants.quantize(data.numpy(), gguf.GGMLQuantizationType.BF16)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
