"""Quantization-aware distillation (`train.qat`): the loss sees int4 weights, the gradient reaches the
float masters straight through the rounding, and the saved student is exactly the model trained."""

from __future__ import annotations

import json
import logging
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from distill.export import qat
from distill.export.torchao_build import is_torchao_folder
from distill.quickstart import TEACHER
from tests.conftest import distill_config, write_config
from tests.helpers import run_cli

logging.getLogger("torchao").setLevel(logging.ERROR)


def reference_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Symmetric int4 per group of input columns: scale = max|w| / 7.5, q = clamp(round(w / scale), -8, 7),
    w_q = q * scale. In float32 and as w * (1 / scale), as torchao computes it: at a group's extreme
    w / scale is ±7.5 up to float32 rounding, and the side it falls on decides between -8 and -7."""
    w = weight.detach().float().reshape(weight.shape[0], -1, group_size)
    scale = w.abs().amax(-1, keepdim=True) / 7.5
    return (torch.clamp(torch.round(w * (1.0 / scale)), -8, 7) * scale).reshape(weight.shape)


def tiny_llama(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("group_size", [32, 64])
def test_fake_quantized_weights_equal_a_reference_int4_quantizer(group_size):
    model = tiny_llama(tied=False)
    floats = {n: model.get_submodule(n).weight.detach().clone() for n in qat.quantized_linears(model)}
    qat.prepare(model, 4, group_size)
    assert "lm_head" not in floats and type(model.lm_head) is torch.nn.Linear  # the head stays float
    for name, w in floats.items():
        module = model.get_submodule(name)
        assert type(module).__name__ == "FakeQuantizedLinear", name
        fq = module.weight_fake_quantizer(module.weight)
        torch.testing.assert_close(fq, reference_int4(w, group_size), atol=0, rtol=0, msg=name)
        groups = fq.detach().reshape(w.shape[0], -1, group_size)
        assert max(len(torch.unique(g)) for g in groups.reshape(-1, group_size)) <= 16  # 4 bits per group
        assert len(torch.unique(groups)) > 16  # and a scale of its own for each group


def test_the_gradient_goes_straight_through_the_rounding_to_the_float_weights():
    """d loss / d W of the fake-quantized linear = d loss / d W_q of a plain linear with the reference
    W_q (the straight-through estimator), in float64, and 0 where w / scale fell outside [-8, 7] and
    was clamped (a clipped STE: at a group's largest positive weight, which rounds to 8)."""
    model = tiny_llama(tied=True)
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    qat.prepare(model, 4, 32)
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(1))
    g_out = torch.randn(5, w.shape[0], generator=torch.Generator().manual_seed(2))
    (layer(x) * g_out).sum().backward()
    wq = reference_int4(w, 32).double().requires_grad_()
    (torch.nn.functional.linear(x.double(), wq) * g_out.double()).sum().backward()
    groups = w.reshape(w.shape[0], -1, 32)
    ratio = torch.round(groups * (1.0 / (groups.abs().amax(-1, keepdim=True) / 7.5))).reshape(w.shape)
    inside = (ratio >= -8) & (ratio <= 7)
    assert 0 < (~inside).sum() < w.shape[0] * w.shape[1] // 32  # at most one clamped weight per group
    torch.testing.assert_close(layer.weight.grad.double(), wq.grad * inside, atol=1e-5, rtol=1e-5)
    assert not torch.equal(reference_int4(w, 32), w)  # the forward really saw other weights


@pytest.mark.parametrize("tied", [True, False])
def test_converted_build_scores_exactly_as_the_fake_quantized_model(tmp_path, tied):
    """The int4 build made from the float master (torchao through transformers, as `distill export`
    makes it) gives the logits the loss saw during training."""
    from distill.export.torchao_build import export_torchao

    model = tiny_llama(tied=tied)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        float_logits = model(ids).logits
        qat.prepare(model, 4, 32)
        trained_logits = model(ids).logits
    qat.to_float(model)
    assert not qat.is_prepared(model)
    model.save_pretrained(tmp_path / "float")
    AutoTokenizer.from_pretrained(TEACHER).save_pretrained(tmp_path / "float")  # a build carries a tokenizer
    export_torchao(tmp_path / "float", tmp_path / "int4", "int4", group_size=32, check=False, progress=False)
    build = AutoModelForCausalLM.from_pretrained(tmp_path / "int4")
    with torch.no_grad():
        torch.testing.assert_close(build(ids).logits, trained_logits, atol=1e-5, rtol=1e-5)
    assert (trained_logits - float_logits).abs().max() > 1e-3


def test_a_group_size_that_does_not_divide_a_layer_is_refused():
    from distill.errors import UserError

    with pytest.raises(UserError, match="does not divide the input width 64"):
        qat.check_qat(tiny_llama(tied=True), 4, 128)


def _qat_run(workspace, tmp_path, name, env=None, **train):
    config = distill_config(workspace, tmp_path / name,
                            train={"max_steps": 6, "save_every": 2, "log_every": 1, "eval_every": 3,
                                   "qat": {"bits": 4, "group_size": 32}, **train})
    result = run_cli("train", str(write_config(tmp_path / f"{name}.yaml", config)), env=env)
    return result, tmp_path / name


def test_a_qat_run_saves_the_int4_student_and_its_float_master_and_resumes_exactly(workspace, tmp_path):
    result, straight = _qat_run(workspace, tmp_path, "straight")
    assert result.returncode == 0, result.stderr[-3000:]
    student, master = straight / "student", straight / "student-float"
    assert is_torchao_folder(student) and not is_torchao_folder(master)
    export = json.loads((student / "export.json").read_text())
    assert export["quant"] == "int4" and export["check"]["mean_abs_dlogp"] > 0
    build = AutoModelForCausalLM.from_pretrained(student)
    assert type(build.model.layers[0].mlp.up_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"

    # The int4 student scores as its float master does with fake quantization: the model trained.
    ids = torch.randint(0, build.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    trained = qat.prepare(AutoModelForCausalLM.from_pretrained(master).eval(), 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(build(ids).logits, trained(ids).logits, atol=1e-5, rtol=1e-5)

    # `distill export RUN` builds from the float master, not from the int4 student.
    result = run_cli("export", str(straight), "--to", "torchao", "--quant", "int8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((straight / "export" / "student-float-int8" / "export.json").read_text())["source"] == str(master)

    # Killed after a checkpoint, the run resumes to the same float master.
    result, resumed = _qat_run(workspace, tmp_path, "resumed", env={"DISTILL_TEST_KILL_AT": "step:3"})
    assert result.returncode == -signal.SIGKILL
    result, resumed = _qat_run(workspace, tmp_path, "resumed")
    assert result.returncode == 0 and "resuming from" in result.stdout + result.stderr, result.stderr[-3000:]
    a, b = (load_file(str(r / "student-float" / "model.safetensors")) for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_keep_float_false_leaves_only_the_int4_student(workspace, tmp_path):
    result, run = _qat_run(workspace, tmp_path, "nofloat", qat={"bits": 4, "group_size": 32, "keep_float": False},
                           max_steps=2, save_every=0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert is_torchao_folder(run / "student") and not (run / "student-float").exists()
    result = run_cli("export", str(run), "--to", "gguf", "--quant", "f16")
    assert result.returncode == 2 and "already a torchao build" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("qat_settings, message", [
    ({"bits": 8}, "train.qat.bits=8"),
    ({"group_size": 48}, "train.qat.group_size must be a power of two"),
    ({"group_size": 64}, "does not divide the input width 32"),
    ({"bitz": 4}, "unknown key 'train.qat.bitz'"),
])
def test_bad_qat_settings_are_one_line_exit_2(workspace, tmp_path, qat_settings, message):
    result, _ = _qat_run(workspace, tmp_path, "bad", qat=qat_settings, max_steps=1)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_quantized_student_model_is_refused(workspace, tmp_path):
    result, run = _qat_run(workspace, tmp_path, "first", max_steps=1, save_every=0)
    assert result.returncode == 0, result.stderr[-3000:]
    config = distill_config(workspace, tmp_path / "again", student={"model": str(run / "student")},
                            train={"max_steps": 1, "qat": {"bits": 4}})
    config["student"].pop("config")
    result = run_cli("train", str(write_config(tmp_path / "again.yaml", config)))
    assert result.returncode == 2 and "already a quantized torchao build" in result.stderr, result.stderr[-3000:]
