"""`distill export --to torchao`: builds that a plain ``from_pretrained`` loads, with quantized
weights of the asked kind, scoring text within measured bounds of the float model."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.export import export
from distill.export.check import hf_logprobs, logprob_stats
from distill.quickstart import TEACHER
from tests.helpers import run_cli
from tests.test_export_gguf import _one_line_error, corpus_text

logging.getLogger("torchao").setLevel(logging.ERROR)

# Over 4 blocks of 256 eval-corpus tokens of the bundled teacher: bounds on the mean / 95th percentile
# / max |Δ log p| of the observed next token and the top-1 agreement with the float model. Measured
# (torchao 0.18): int8 0.0075 / 0.022 / 0.068, 99.3%; int8_dynamic 0.022 / 0.064 / 0.33, 98.3%;
# int4 (group 32) 0.107 / 0.33 / 1.24, 92.8%.
BOUNDS = {"int8": (0.02, 0.06, 0.25, 0.98), "int8_dynamic": (0.05, 0.15, 0.8, 0.96),
          "int4": (0.2, 0.6, 2.5, 0.88)}
WEIGHT = {"int8": ("Int8Tensor", [1, 256]), "int8_dynamic": ("Int8Tensor", [1, 256]),
          "int4": ("IntxUnpackedToInt8Tensor", [1, 32])}


@pytest.fixture(scope="module")
def reference():
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    ids = tokenizer(corpus_text(3))["input_ids"]
    blocks = [ids[i:i + 256] for i in range(0, 4 * 256, 256)]
    model = AutoModelForCausalLM.from_pretrained(TEACHER)
    return blocks, [hf_logprobs(model, b) for b in blocks]


@pytest.mark.parametrize("quant", list(BOUNDS))
def test_build_loads_with_from_pretrained_and_scores_within_bounds(tmp_path, quant, reference):
    out = tmp_path / f"teacher-{quant}"
    summary = export(str(TEACHER), to="torchao", quant=quant, out=str(out), progress=False)
    assert json.loads((out / "export.json").read_text())["quant"] == quant == summary["quant"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    model = AutoModelForCausalLM.from_pretrained(out)  # nothing but the folder
    weight = model.model.layers[0].mlp.up_proj.weight
    assert (type(weight).__name__, list(weight.block_size)) == WEIGHT[quant]
    assert type(model.model.embed_tokens.weight).__name__ in ("Parameter", "Tensor")  # embeddings stay float
    blocks, refs = reference
    stats = [logprob_stats(r, hf_logprobs(model, b), b) for r, b in zip(refs, blocks)]
    mean = np.mean([s["mean_abs_dlogp"] for s in stats])
    p95 = np.mean([s["p95_abs_dlogp"] for s in stats])
    top = max(s["max_abs_dlogp"] for s in stats)
    agree = np.mean([s["top1_agreement"] for s in stats])
    low_mean, low_p95, low_max, low_agree = BOUNDS[quant]
    assert mean < low_mean and p95 < low_p95 and top < low_max and agree > low_agree, (mean, p95, top, agree)
    assert mean > 1e-4  # the weights really are quantized


def test_int4_group_size_and_cli(tmp_path):
    result = run_cli("export", str(TEACHER), "--to", "torchao", "--quant", "int4", "--group-size", "64",
                     "--out", str(tmp_path / "t4"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done: " in result.stdout and "top-1 agreement" in result.stdout
    weight = AutoModelForCausalLM.from_pretrained(tmp_path / "t4").model.layers[0].mlp.up_proj.weight
    assert list(weight.block_size) == [1, 64] and weight.scale.shape[-1] == 256 // 64
    assert not list(tmp_path.glob("*.partial"))
    _one_line_error(run_cli("export", str(TEACHER), "--to", "torchao", "--quant", "int3"),
                    "unknown torchao type 'int3'")
    _one_line_error(run_cli("export", str(TEACHER), "--to", "torchao", "--quant", "int4", "--group-size", "48",
                            "--out", str(tmp_path / "bad")), "power of two")
