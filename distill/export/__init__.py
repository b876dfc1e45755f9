"""`distill export`: a student (or any supported HF causal LM folder) as a deployable build.

- ``--to gguf --quant f16|q8_0|q4_k_m|...``: a GGUF file for llama.cpp (``gguf_writer``), checked
  before it is kept: llama.cpp must tokenize a varied test set exactly as the HF tokenizer does, and
  its next-token log-probabilities on a test text are compared with the HF model's (reported, and
  written to ``<file>.json`` beside the GGUF with the source and settings).
- ``--to torchao --quant int8|int8_dynamic|int4``: a PyTorch build with torchao quantized weights
  that ``AutoModelForCausalLM.from_pretrained`` loads (``torchao_build``).

Every file is written under a temporary name and renamed when complete: a killed export leaves
either the previous file or none, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

from distill.errors import UserError
from distill.export.gguf_writer import (ExportError, QUANT_TYPES, WRITTEN_TYPES, check_architecture, check_quant,
                                        model_folder, read_config, read_tokenizer, source_dtype, warnings_for,
                                        write_gguf)

TARGETS = ("gguf", "torchao")

# Strings on which llama.cpp must tokenize exactly as the HF tokenizer does (the export's check and
# the tests'): ASCII prose, code indentation and tabs, digits, accented letters, CJK, emoji, a
# special token in the text, runs of spaces and newlines, contractions.
TOKENIZER_TEST_STRINGS = (
    "Hello, world! This is a test.",
    "def f(x):\n    return x ** 2  # square\n\n\tif x:\n\t\tpass\n",
    "3.14159 2026-12-03 1234567890 0x1F 1e-6 100%",
    "Café crème, naïve façade, Ångström, Straße, Ελληνικά, Русский",
    "日本語のテキスト、中文文本和한국어 텍스트。",
    "emoji: 🙂🚀👩‍💻 ✓ ∑ → ≠",
    "end of one document<|endoftext|>start of another",
    "   leading spaces, trailing spaces   \n\n\n  mixed \t whitespace ",
    "I'm sure they'll say it's fine; we've done what we'd planned. DON'T SHOUT",
    "",
)

CHECK_TEXT = (
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n\n\nclass Counter(dict):\n    def __missing__(self, key):\n"
    "        return 0\n\n    def most_common(self, n=None):\n        items = sorted(self.items(), key=lambda kv: kv[1],"
    " reverse=True)\n        return items if n is None else items[:n]\n"
)


def default_output(src: str, folder: Path, to: str, quant: str) -> Path:
    """A run directory's builds go to ``RUN/export/``; an HF folder's beside it."""
    src_path = Path(src).expanduser()
    suffix = ".gguf" if to == "gguf" else ""
    if folder != src_path:  # a run directory: folder is RUN/student
        return src_path / "export" / f"{folder.name}-{quant}{suffix}"
    return folder.parent / f"{folder.name}-{quant}{suffix}"


def export(src: str, *, to: str, quant: str, out: Optional[str] = None, check: bool = True,
           group_size: int = 32, progress: bool = True) -> dict:
    """Export ``src`` (an HF model folder or a `distill train` run directory) and return a summary
    dict (also written as JSON beside the build). Raises UserError / ExportError for what cannot be
    exported, before anything is written."""
    if to not in TARGETS:
        raise UserError(f"unknown export target {to!r}: choose one of {', '.join(TARGETS)}")
    folder = model_folder(src)
    from distill.export.torchao_build import is_torchao_folder

    if is_torchao_folder(folder):
        raise UserError(f"{folder} is already a torchao build: export its float weights (a train.qat run keeps them "
                        "in RUN/student-float with train.qat.keep_float, the default)")
    if to == "torchao":
        from distill.export.torchao_build import check_torchao_quant, export_torchao

        quant = check_torchao_quant(quant)
        target = Path(out).expanduser() if out else default_output(src, folder, to, quant)
        return export_torchao(folder, target, quant, group_size=group_size, check=check, progress=progress)
    quant = check_quant(quant)
    config = read_config(folder)
    check_architecture(config)
    read_tokenizer(folder, config["vocab_size"])  # refuse an unsupported tokenizer before writing
    llama_cpp = _llama_cpp(needed_for=None if quant in WRITTEN_TYPES else f"GGUF type {quant}")
    target = Path(out).expanduser() if out else default_output(src, folder, to, quant)
    if target.suffix != ".gguf":
        raise UserError(f"--out {target}: a GGUF file name ends in .gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    warnings = warnings_for(config)
    start = time.perf_counter()
    partial = target.with_name(target.name + ".partial")
    base = target.with_name(target.name + ".base.partial") if quant not in WRITTEN_TYPES else partial
    try:
        written = write_gguf(folder, base, _base_type(folder, quant), name=folder.name, progress=False)
        if quant not in WRITTEN_TYPES:
            from distill.export.llamacpp import quantize

            quantize(base, partial, quant)
        summary = {"source": str(folder), "source_sha256": weights_sha256(folder), "to": "gguf", "quant": quant,
                   "path": str(target), "architecture": written["architecture"],
                   "model_type": written["model_type"], "pre_tokenizer": written["pre_tokenizer"],
                   "tensors": written["tensors"], "bytes": partial.stat().st_size,
                   "source_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                   "warnings": warnings + written["warnings"], "check": None}
        summary["tensor_types"] = tensor_types(partial)
        fallback = fallback_warning(quant, summary["tensor_types"])
        if fallback:
            summary["warnings"].append(fallback)
        if llama_cpp is not None and check:
            from distill.export.llamacpp import compare_with_hf

            summary["check"] = compare_with_hf(partial, folder, TOKENIZER_TEST_STRINGS, CHECK_TEXT)
            bad = summary["check"]["tokenizer_mismatches"]
            if bad:
                raise ExportError(f"llama.cpp tokenizes {len(bad)} of {len(TOKENIZER_TEST_STRINGS)} test strings "
                                  f"differently from the HF tokenizer (first: {bad[0]!r}); the GGUF was not kept")
        summary["seconds"] = round(time.perf_counter() - start, 2)
        os.replace(partial, target)
    finally:
        for leftover in {partial, base}:
            leftover.unlink(missing_ok=True)
    _write_json(target.with_name(target.name + ".json"), summary)
    return summary


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the GGUF file at ``path`` holds."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def fallback_warning(quant: str, types: dict[str, int]) -> Optional[str]:
    """A line when llama.cpp stored no tensor in the asked k-quant (it falls back to Q5_0 / Q8_0 ... for
    rows that are not a multiple of its 256-value super-blocks), else None."""
    if not quant.startswith(("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")):
        return None
    base = quant[:4].upper()  # Q4_K for q4_k_m
    quantized = {t: n for t, n in types.items() if t not in ("F32", "F16", "BF16")}
    if not quantized or any(t.startswith(base) for t in quantized):
        return None
    got = ", ".join(f"{n} {t}" for t, n in quantized.items())
    return (f"llama.cpp stored no tensor as {base} ({got}): k-quants need rows that are a multiple of 256 "
            f"values and this model's are not; the file is as large and as accurate as those types make it")


def _base_type(folder: Path, quant: str) -> str:
    """The type written by us: the asked one, or, before llama.cpp quantizes, the source's precision
    (f32 stays f32; a bf16 or f16 checkpoint is written as such, losing nothing)."""
    if quant in WRITTEN_TYPES:
        return quant
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "f16"}.get(source_dtype(folder), "f32")


def _llama_cpp(needed_for: Optional[str]):
    try:
        import llama_cpp
    except ImportError:
        if needed_for is not None:
            raise UserError(f"{needed_for} is made by llama.cpp's quantizer: pip install llama-cpp-python "
                            "(or pip install 'distill[export]')") from None
        return None
    return llama_cpp


def weights_sha256(folder: Path) -> str:
    """One SHA-256 over the folder's safetensors files, in name order."""
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


__all__ = ["ExportError", "QUANT_TYPES", "TARGETS", "TOKENIZER_TEST_STRINGS", "export", "model_folder"]
