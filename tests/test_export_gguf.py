"""`distill export --to gguf`: the file loads in llama.cpp (llama-cpp-python, in process), tokenizes
exactly as the HF tokenizer does, and scores text like the HF model, per architecture and per
quantization type; unsupported input is refused with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import distill.export.gguf_writer as writer
from distill.export import TOKENIZER_TEST_STRINGS, export
from distill.export.gguf_writer import ExportError
from distill.export.check import log_softmax
from distill.export.llamacpp import GGUFModel
from distill.quickstart import TEACHER
from tests.helpers import run_cli

CORPUS = Path(TEACHER).parent / "corpus"
EXTRA_STRINGS = ("x = [1, 2, 3]\nprint(f'{x!r:>10}')\n", "  \n \n\t\n", "naïve café 🙂 日本 123", "a" * 300)


def corpus_text(n_docs: int = 3) -> str:
    return "\n".join(pq.read_table(CORPUS / "eval.parquet").column("text").to_pylist()[:n_docs])


def trained_tokenizer(kind: str, folder: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Llama 3's or Qwen2's pre-tokenizer regex, trained on the bundled
    corpus, saved to ``folder``."""
    regex = {"llama3": writer._LLAMA3_REGEX, "qwen2": writer._QWEN2_REGEX}[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = pq.read_table(CORPUS / "train.parquet").column("text").to_pylist()[:200]
    tok.train_from_iterator(texts + list(TOKENIZER_TEST_STRINGS[:3]), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


ARCHS = {
    "llama": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                    sliding_window=None),
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "llama3_rope": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64}),
}


def tiny_model(folder: Path, arch: str, tokenizer, seed: int = 0) -> Path:
    """A random 2-layer model of ``arch`` with weights large enough that its next-token
    distributions are far from uniform (a wrong RoPE layout or tensor map shows in the logits)."""
    spec = dict(ARCHS[arch])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, max_position_embeddings=256, initializer_range=0.2,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if model_type == "qwen2":  # its q/k/v biases start at zero: make them count
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def hf_logprobs(folder: Path, ids: list[int]) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()


def gguf_logprobs(path: Path, ids: list[int]) -> np.ndarray:
    model = GGUFModel(path, n_ctx=256)
    try:
        return log_softmax(model.logits(ids))
    finally:
        model.close()


def observed_delta(ref: np.ndarray, ours: np.ndarray, ids: list[int]) -> np.ndarray:
    """|Δ log p| of each observed next token: (T-1,)."""
    t = np.array(ids[1:])
    rows = np.arange(len(t))
    return np.abs(ref[:-1][rows, t] - ours[:-1][rows, t])


@pytest.fixture(scope="module")
def bundled_tokenizer():
    return AutoTokenizer.from_pretrained(TEACHER)


@pytest.mark.parametrize("kind", ["bundled", "llama3", "qwen2"])
def test_llama_cpp_tokenizes_like_hf(tmp_path, kind, bundled_tokenizer):
    tokenizer = bundled_tokenizer if kind == "bundled" else trained_tokenizer(kind, tmp_path / "tok")
    folder = tiny_model(tmp_path / "model", "llama", tokenizer)
    summary = export(str(folder), to="gguf", quant="f16", out=str(tmp_path / "m.gguf"))
    assert summary["pre_tokenizer"] == {"bundled": "gpt-2", "llama3": "llama-bpe", "qwen2": "qwen2"}[kind]
    assert summary["check"]["tokenizer_mismatches"] == []
    model = GGUFModel(tmp_path / "m.gguf")
    try:
        for text in TOKENIZER_TEST_STRINGS + EXTRA_STRINGS + (corpus_text(1)[:2000],):
            assert model.tokenize(text) == tokenizer(text, add_special_tokens=False)["input_ids"], repr(text)
    finally:
        model.close()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_f32_gguf_scores_like_the_hf_model(tmp_path, arch, bundled_tokenizer):
    folder = tiny_model(tmp_path / "model", arch, bundled_tokenizer)
    export(str(folder), to="gguf", quant="f32", out=str(tmp_path / "m.gguf"))
    ids = bundled_tokenizer(corpus_text(1))["input_ids"][:200]
    ref, ours = hf_logprobs(folder, ids), gguf_logprobs(tmp_path / "m.gguf", ids)
    assert ref.std(-1).mean() > 0.5  # peaked distributions: the comparison below can fail
    # llama.cpp keeps its KV cache in float16, hence the small differences; a wrong tensor map or
    # RoPE layout gives differences of several nats (the next test)
    diff = np.abs(ref - ours)
    assert diff.mean() < 5e-3 and diff.max() < 0.1, (diff.mean(), diff.max())  # measured: 0.0013, 0.019 (llama)


def test_without_the_rope_permutation_llama_scores_differently(tmp_path, bundled_tokenizer, monkeypatch):
    """The q/k row permutation is what makes llama match: exporting without it must fail the bound."""
    folder = tiny_model(tmp_path / "model", "llama", bundled_tokenizer)
    monkeypatch.setitem(writer.ARCHITECTURES, "llama", ("llama", False))
    export(str(folder), to="gguf", quant="f32", out=str(tmp_path / "m.gguf"), check=False)
    ids = bundled_tokenizer(corpus_text(1))["input_ids"][:200]
    diff = np.abs(hf_logprobs(folder, ids) - gguf_logprobs(tmp_path / "m.gguf", ids))
    assert diff.mean() > 0.05 and diff.max() > 1.0


# Bounds on the bundled teacher over 4 blocks of 256 eval-corpus tokens: |Δ log p| of the observed
# next token (mean, 95th percentile, max) and top-1 agreement with the HF model. Measured
# (llama-cpp-python 0.3.36): f16 0.0007 / 0.0020 / 0.008, 99.9%; q8_0 0.016 / 0.047 / 0.10, 99.0%;
# q4_k_m 0.083 / 0.25 / 0.72, 94.1%. The bounds leave room for other llama.cpp kernels, not for a
# broken export (a wrong tensor map or RoPE layout gives |Δ| of several nats).
BOUNDS = {"f16": (0.002, 0.006, 0.03, 0.995), "q8_0": (0.04, 0.12, 0.35, 0.97),
          "q4_k_m": (0.16, 0.5, 1.5, 0.9)}


@pytest.fixture(scope="module")
def teacher_blocks(bundled_tokenizer):
    ids = bundled_tokenizer(corpus_text(3))["input_ids"]
    blocks = [ids[i:i + 256] for i in range(0, 4 * 256, 256)]
    assert all(len(b) == 256 for b in blocks)
    return blocks, [hf_logprobs(TEACHER, b) for b in blocks]


@pytest.mark.parametrize("quant", list(BOUNDS))
def test_quantized_teacher_within_bounds(tmp_path, quant, teacher_blocks):
    blocks, refs = teacher_blocks
    summary = export(str(TEACHER), to="gguf", quant=quant, out=str(tmp_path / f"t-{quant}.gguf"))
    assert summary["quant"] == quant and summary["check"]["tokenizer_mismatches"] == []
    model = GGUFModel(tmp_path / f"t-{quant}.gguf", n_ctx=256)
    try:
        deltas, agree = [], []
        for ids, ref in zip(blocks, refs):
            ours = log_softmax(model.logits(ids))
            deltas.append(observed_delta(ref, ours, ids))
            agree.append(ref.argmax(-1) == ours.argmax(-1))
    finally:
        model.close()
    d, a = np.concatenate(deltas), np.concatenate(agree).mean()
    mean, p95, top, min_agree = BOUNDS[quant]
    assert d.mean() < mean and np.quantile(d, 0.95) < p95 and d.max() < top and a > min_agree, \
        (d.mean(), np.quantile(d, 0.95), d.max(), a)
    sizes = {"f16": 0.55, "q8_0": 0.3, "q4_k_m": 0.2}  # of the float32 safetensors
    assert summary["bytes"] < sizes[quant] * summary["source_bytes"]
    stored = {"f16": "F16", "q8_0": "Q8_0", "q4_k_m": "Q4_K"}[quant]  # the teacher's rows are 256 wide
    assert summary["tensor_types"].get(stored, 0) > 0 and not any("k-quants" in w for w in summary["warnings"])


def test_a_k_quant_that_llama_cpp_could_not_apply_is_named():
    from distill.export import fallback_warning

    # The quickstart student (rows of 128): llama.cpp's q4_k_m stored these types.
    line = fallback_warning("q4_k_m", {"F32": 5, "Q5_0": 12, "Q8_0": 3})
    assert line and "no tensor as Q4_K" in line and "12 Q5_0, 3 Q8_0" in line
    assert fallback_warning("q4_k_m", {"F32": 5, "Q4_K": 10, "Q6_K": 2}) is None
    assert fallback_warning("q8_0", {"F32": 5, "Q8_0": 15}) is None


def test_f16_greedy_decoding_matches_hf(tmp_path, bundled_tokenizer):
    export(str(TEACHER), to="gguf", quant="f16", out=str(tmp_path / "t.gguf"), check=False)
    hf = AutoModelForCausalLM.from_pretrained(TEACHER)
    model = GGUFModel(tmp_path / "t.gguf")
    try:
        for prompt in ("def read_config(path):\n    ", "import os\nimport sys\n\n\nclass ", "    for i in range("):
            ids = bundled_tokenizer(prompt)["input_ids"]
            with torch.inference_mode():
                ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
            assert model.greedy(ids, 20) == ref, prompt
    finally:
        model.close()


def test_cli_exports_a_run_directory(tmp_path, bundled_tokenizer):
    run = tmp_path / "run"
    tiny_model(run / "student", "llama", bundled_tokenizer)
    (run / "resolved_config.yaml").write_text("{}\n")
    result = run_cli("export", str(run), "--to", "gguf", "--quant", "q8_0")
    assert result.returncode == 0, result.stderr[-2000:]
    target = run / "export" / "student-q8_0.gguf"
    assert target.is_file() and f"done: {target}" in result.stdout
    assert "tokenizes all 10 test strings as the HF tokenizer does" in result.stdout
    summary = json.loads((run / "export" / "student-q8_0.gguf.json").read_text())
    assert summary["quant"] == "q8_0" and summary["architecture"] == "llama" and len(summary["source_sha256"]) == 64
    assert summary["check"]["top1_agreement"] > 0.9
    assert not list((run / "export").glob("*.partial"))


def _one_line_error(result, *needles):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distill: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_refusals_are_one_line(tmp_path, bundled_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(bundled_tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    bundled_tokenizer.save_pretrained(gpt2)
    _one_line_error(run_cli("export", str(gpt2), "--to", "gguf", "--quant", "f16"), "model_type", "'gpt2'")
    _one_line_error(run_cli("export", str(TEACHER), "--to", "gguf", "--quant", "q9_z"), "unknown GGUF type 'q9_z'")
    _one_line_error(run_cli("export", str(tmp_path / "missing"), "--to", "gguf", "--quant", "f16"), "not found")
    spm = tmp_path / "spm"
    shutil.copytree(TEACHER, spm)
    spec = json.loads((spm / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = True
    (spm / "tokenizer.json").write_text(json.dumps(spec))
    _one_line_error(run_cli("export", str(spm), "--to", "gguf", "--quant", "f16"), "byte fallback")
    assert not list(tmp_path.glob("*.gguf"))


def test_a_failed_check_keeps_nothing(tmp_path, monkeypatch):
    """A GGUF that llama.cpp would tokenize differently is not kept, and a previous file survives."""
    import distill.export.llamacpp as llamacpp

    target = tmp_path / "t.gguf"
    target.write_bytes(b"previous")
    real = llamacpp.compare_with_hf
    monkeypatch.setattr(llamacpp, "compare_with_hf",
                        lambda *a: {**real(*a), "tokenizer_mismatches": ["Hello, world! This is a test."]})
    with pytest.raises(ExportError, match="differently from the HF tokenizer"):
        export(str(TEACHER), to="gguf", quant="q8_0", out=str(target))
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf"]


def test_eval_scores_gguf_and_torchao_builds_beside_the_float_model(tmp_path, bundled_tokenizer):
    from distill.evaluate import evaluate_models

    gguf = tmp_path / "t-q8_0.gguf"
    export(str(TEACHER), to="gguf", quant="q8_0", out=str(gguf), check=False)
    export(str(TEACHER), to="torchao", quant="int8", out=str(tmp_path / "t-int8"), check=False, progress=False)
    r = evaluate_models({"q8_0": str(gguf), "int8": str(tmp_path / "t-int8")}, str(CORPUS / "eval.parquet"),
                        teacher=str(TEACHER), max_length=64, max_examples=1, num_prompts=2, max_new_tokens=8,
                        batch_size=4, progress=False)["models"]
    t, q, i = r["teacher"], r["q8_0"], r["int8"]
    assert q["format"] == "gguf" and q["size_bytes"] == gguf.stat().st_size and q["params"] == t["params"]
    assert i["size_bytes"] < 0.6 * t["size_bytes"]
    for m in (q, i):
        assert m["status"] == "ok" and abs(m["eval_ce"] - t["eval_ce"]) < 0.02
        assert m["top1_agreement"] > 0.95 and 0 < m["forward_kl"] < 0.01 and m["draft_acceptance"] > 0.95
        assert m["generate_tokens_per_s_batch1"] > 0 and m["forward_tokens_per_s"] > 0
        assert m["completion_tokens"] > 0 and m["teacher_nll"] is not None
    assert q["generate_tokens_per_s_batched"] is None


def test_eval_refuses_a_gguf_with_another_tokenizer(tmp_path):
    tokenizer = trained_tokenizer("llama3", tmp_path / "tok")
    folder = tiny_model(tmp_path / "model", "llama", tokenizer)
    export(str(folder), to="gguf", quant="f16", out=str(tmp_path / "other.gguf"), check=False)
    data = str(CORPUS / "eval.parquet")
    _one_line_error(run_cli("eval", "--teacher", str(TEACHER), "--model", f"other={tmp_path / 'other.gguf'}",
                            "--data", data, "--max-examples", "1", "--prompts", "0", "--no-speed",
                            "--out", str(tmp_path / "ev")), "tokenizer differs")
    _one_line_error(run_cli("eval", "--teacher", str(tmp_path / "other.gguf"), "--model", f"m={TEACHER}",
                            "--data", data, "--out", str(tmp_path / "ev")), "teacher must be a Hugging Face")
