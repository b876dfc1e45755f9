"""A PyTorch build with torchao-quantized linear weights, saved so that
``AutoModelForCausalLM.from_pretrained(folder)`` loads it (transformers' ``TorchAoConfig``, recorded
in ``config.json``'s ``quantization_config``; weights in safetensors).

Quantization types (every ``nn.Linear`` of the decoder; the embedding, and a head tied to it, stay
in the checkpoint's precision):

- ``int8``: int8 weights, per output channel (``Int8WeightOnlyConfig``);
- ``int8_dynamic``: int8 weights and activations quantized per token at run time
  (``Int8DynamicActivationInt8WeightConfig``);
- ``int4``: int4 weights in groups of ``group_size`` (32) along the input dimension, symmetric, one
  scale per group (``IntxWeightOnlyConfig``). Measured with torchao 0.18 on this CPU machine:
  ``Int4WeightOnlyConfig`` (packed int4 with a tinygemm kernel) needs CUDA; torchao's CPU int4
  kernels are not in its wheel, so the int4 values are stored one per int8 byte: the build has
  int4's accuracy, not its size or speed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from distill.errors import UserError

TORCHAO_TYPES = ("int8", "int8_dynamic", "int4")


def check_torchao_quant(quant: str) -> str:
    q = quant.lower()
    if q not in TORCHAO_TYPES:
        raise UserError(f"unknown torchao type {quant!r}: choose one of {', '.join(TORCHAO_TYPES)}")
    return q


def torchao_config(quant: str, group_size: int = 32):
    """The torchao config object for one of ``TORCHAO_TYPES``."""
    try:
        import torch
        from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                          IntxWeightOnlyConfig)
        from torchao.quantization.granularity import PerGroup
    except ImportError:
        raise UserError("torchao builds need torchao: pip install torchao (or pip install 'distill[export]')") from None
    if quant == "int8":
        return Int8WeightOnlyConfig()
    if quant == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))


def quantized_model(folder: Path, quant: str, group_size: int = 32):
    """The model of ``folder`` loaded with its linear weights quantized by torchao."""
    import torch
    from transformers import AutoModelForCausalLM, TorchAoConfig

    from distill.export.gguf_writer import source_dtype

    config = TorchAoConfig(quant_type=torchao_config(quant, group_size))
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=source_dtype(folder),
                                                use_safetensors=True).eval()


def export_torchao(folder: Path, target: Path, quant: str, *, group_size: int = 32, check: bool = True,
                   progress: bool = True) -> dict:
    """Write the torchao build of ``folder`` to the folder ``target`` (replaced whole, or not at
    all) and return a summary, also written to ``target/export.json``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from distill.export import CHECK_TEXT, weights_sha256, _write_json
    from distill.export.check import hf_logprobs, logprob_stats

    if not progress:
        hf_logging.disable_progress_bar()
    if group_size < 1 or (quant == "int4" and group_size & (group_size - 1)):
        raise UserError(f"--group-size must be a power of two, got {group_size}")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = quantized_model(folder, quant, group_size)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        summary = {"source": str(folder), "source_sha256": weights_sha256(folder), "to": "torchao", "quant": quant,
                   "group_size": group_size if quant == "int4" else None, "path": str(target),
                   "torchao_config": type(torchao_config(quant, group_size)).__name__,
                   "bytes": sum(f.stat().st_size for f in tmp.glob("*.safetensors")),
                   "source_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                   "warnings": [], "check": None}
        if check:  # the saved build, loaded as a user would, against the float model
            ids = list(tokenizer(CHECK_TEXT, add_special_tokens=True)["input_ids"])
            reloaded = AutoModelForCausalLM.from_pretrained(tmp)
            ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            summary["check"] = logprob_stats(hf_logprobs(ref, ids), hf_logprobs(reloaded, ids), ids)
        summary["seconds"] = round(time.perf_counter() - start, 2)
        _write_json(tmp / "export.json", summary)
        if target.exists():
            old = target.with_name(target.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def is_torchao_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an HF folder whose config records a torchao quantization."""
    config = Path(path) / "config.json"
    try:
        return (json.loads(config.read_text()).get("quantization_config") or {}).get("quant_method") == "torchao"
    except (OSError, json.JSONDecodeError):
        return False
