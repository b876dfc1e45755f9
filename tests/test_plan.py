"""distill plan: the memory arithmetic against hand-computed values, the fake activation count against
a real forward, the refusal of a run that does not fit before any weights load, gradient
checkpointing's gradients against the plain ones."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from distill import plan
from distill.config import load_config
from distill.toy import llama_config, make_llama, make_tokenizer, write_text
from tests.conftest import write_config
from tests.helpers import read_metrics, run_cli

V = 45  # the toy tokenizer's size (checked in the fixture)


def _llama(layers=2, hidden=32, tie=False, fake=False):
    arch = llama_config(vocab_size=V, layers=layers, hidden=hidden, tie=tie)
    hf = AutoConfig.for_model(arch.pop("model_type"), **arch)
    if fake:
        return plan._lm(hf)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(hf)


def hand_params(hidden=32, layers=2, tie=False):
    """llama_config: 4 heads, 2 kv heads (head dim hidden/4), intermediate 2·hidden."""
    kv = 2 * hidden // 4
    layer = hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * 2 * hidden + 2 * hidden  # q, o; k, v; mlp; 2 norms
    return layer, V * hidden * (1 if tie else 2) + layers * layer + hidden


@pytest.mark.parametrize("tie", [False, True])
def test_shape_counts_parameters_by_hand_on_a_fake_model(tie):
    layer, total = hand_params(tie=tie)
    with plan._fake():
        s = plan.shape_of(_llama(tie=tie, fake=True))
    assert (s.params, s.layer_params, s.layers, s.hidden, s.intermediate, s.vocab) == (total, layer, 2, 32, 64, V)
    assert plan.shape_of(_llama(tie=tie)).params == sum(p.numel() for p in _llama(tie=tie).parameters())


def _saved_by_hand(model, batch, length, dtype, packed):
    """The reference: a real forward's saved tensors, counted per storage without plan's helpers."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            saved[st._cdata] = (st.nbytes(), st)
        return t

    ids = torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(
            "cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids) if packed else None)
    return sum(v[0] for v in saved.values())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_fake_activation_count_equals_real_forwards(dtype):
    """Counted on a fake model (nothing allocated), the saved bytes at batch 3 equal a real forward's,
    to the byte, for packed rows (an all-ones mask, which transformers drops) under fp32 and bf16."""
    with plan._fake():
        acts = plan.saved_activations(_llama(fake=True), length=16, autocast_dtype=dtype)
    real = _llama()
    real.train()
    for batch in (1, 3):
        assert acts.at(batch, checkpointing=False) == _saved_by_hand(real, batch, 16, dtype, packed=True)
    if dtype is not None:
        assert acts.fixed > 0  # the bf16 copies of the weights, saved once whatever the batch
    assert acts.layer_input_per_example == 16 * 32 * 4  # the residual stream stays fp32 under autocast
    assert 0 < acts.layers_per_example < acts.per_example
    assert acts.at(3, checkpointing=True) < acts.at(3, checkpointing=False)


def _inputs(**kw):
    student = plan.Shape(params=1000, layers=2, layer_params=300, hidden=8, intermediate=16, vocab=50)
    teacher = plan.Shape(params=4000, layers=4, layer_params=800, hidden=16, intermediate=32, vocab=50)
    acts = plan.Activations(fixed=600, per_example=10_000, layers_fixed=400, layers_per_example=8000,
                            layer_input_per_example=500, layers=2)
    args = dict(student=student, teacher=teacher, activations=acts, batch=3, length=10, optimizer="adamw",
                teacher_bytes=2, compute_bytes=2, chunk_size=16, vocab=50)
    args.update(kw)
    return plan.Inputs(**args)


def test_components_by_hand():
    x = _inputs()
    one = plan.components(x, strategy="ddp", processes=1)
    assert one.parts == {
        "student parameters": 4000, "gradients": 4000, "optimizer state": 8000, "teacher parameters": 8000,
        "activations": 600 + 30_000,
        "loss buffers": 7 * 16 * 50 * 4 + 50 * 8 * 4 + 30 * 8 * 4,  # 7 chunk x V fp32, head grad, hidden grad
        "teacher forward": 30 * 2 * (16 + 3 * 32)}
    transient = 30_600 + one.parts["loss buffers"] + one.parts["teacher forward"]
    assert one.total == 4000 + 8000 + 8000 + max(4000, transient)  # gradients and activations not alive at once
    accumulating = plan.components(_inputs(accumulation=2), strategy="ddp", processes=1)
    assert accumulating.total == sum(one.parts.values())  # the gradients live through every micro-batch
    two = plan.components(x, strategy="ddp", processes=2)
    assert two.parts["DDP gradient buckets"] == 4000 and two.total == one.total + 4000
    f = plan.components(x, strategy="fsdp2", processes=4)
    # The teacher's 4 layers sharded, its 800 other parameters (tied embeddings, norm) whole.
    assert (f.parts["student parameters"], f.parts["gradients"], f.parts["optimizer state"],
            f.parts["teacher parameters"]) == (1000, 1000, 2000, 2 * (3200 // 4 + 800))
    assert f.parts["gathered student layers"] == 2 * (400 + 2 * 300) + 4 * 300  # root + 2 layers bf16, 1 fp32 grad
    assert f.parts["gathered teacher layers"] == 2 * 800  # one layer at a time
    untied = dataclasses.replace(x.teacher, embedding=500)  # the input embeddings sharded too when untied
    mixed = plan.Activations(fixed=0, per_example=7000, layers_fixed=0, layers_per_example=6000,
                             layer_input_per_example=250, layers=2)
    g = plan.components(_inputs(teacher=untied, sharded_activations=mixed), strategy="fsdp2", processes=4)
    assert g.parts["teacher parameters"] == 2 * (3700 // 4 + 300)
    assert g.parts["gathered teacher layers"] == 2 * 800
    assert g.parts["activations"] == 7000 * 3  # FSDP2's bf16 parameters: its own forward's count
    assert plan.components(_inputs(sharded_activations=mixed), strategy="ddp", processes=2).parts["activations"] == \
        one.parts["activations"]
    z = plan.components(_inputs(teacher=untied, sharded_activations=mixed), strategy="zero3", processes=4)
    # ZeRO-3: the student divided as under FSDP2, fp32 gathers of the root and two layers, DDP's activations
    # (fp32 parameters under autocast), FSDP2's teacher.
    assert (z.parts["student parameters"], z.parts["gradients"], z.parts["optimizer state"]) == (1000, 1000, 2000)
    assert z.parts["gathered student layers"] == 4 * 1000  # DeepSpeed's default 1e9 live elements: all of it
    assert z.parts["DeepSpeed reduce bucket"] == 4 * 500_000_000  # its default bucket, fp32, whatever the model
    three = dataclasses.replace(x.student, layers=3, layer_params=200)  # root 400, + 2 layers: 800 of 1000
    for live, gathered in ((100, 800), (900, 900), (10 ** 9, 1000)):
        y = plan.components(_inputs(student=three, zero3_buckets=(64, live)), strategy="zero3", processes=4)
        assert (y.parts["gathered student layers"], y.parts["DeepSpeed reduce bucket"]) == (4 * gathered, 4 * 64)
    assert z.parts["activations"] == one.parts["activations"]
    assert (z.parts["teacher parameters"], z.parts["gathered teacher layers"]) == (2 * (3700 // 4 + 300), 2 * 800)
    assert "DDP gradient buckets" not in z.parts
    assert z.total == sum(z.parts.values())  # DeepSpeed's flat gradient buffer lives beside the activations
    ckpt = plan.components(x, strategy="ddp", processes=1, checkpointing=True)
    # all but the layers, + each layer's input, + one layer recomputed (its half of the layers' share)
    assert ckpt.parts["activations"] == (600 + 30_000) - (400 + 24_000) + 2 * 500 * 3 + (400 + 24_000) // 2
    dense = plan.components(_inputs(chunk_size=0, optimizer="sgd", teacher=None), strategy="ddp", processes=1)
    assert dense.parts["loss buffers"] == 7 * 30 * 50 * 4 and dense.parts["optimizer state"] == 0
    assert "teacher forward" not in dense.parts and dense.parts["teacher parameters"] == 0


def test_largest_batch_is_the_boundary():
    x = _inputs()
    for strategy, n, ckpt in (("ddp", 1, False), ("fsdp2", 4, True)):
        budget = plan.components(x, strategy=strategy, processes=n, batch=37, checkpointing=ckpt).total + 5
        best = plan.largest_batch(x, budget, strategy=strategy, processes=n, checkpointing=ckpt)
        assert best == 37
    assert plan.largest_batch(x, 10, strategy="ddp", processes=1, checkpointing=False) == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    tok = make_tokenizer(root / "teacher")
    assert len(tok) == V
    make_llama(root / "teacher", vocab_size=len(tok), layers=2, hidden=32)
    write_text(root / "train.jsonl", 40, seed=0)
    return root


def _config(tiny, out, **train):
    return {"teacher": {"model": str(tiny / "teacher")},
            "student": {"config": llama_config(vocab_size=V, layers=1, hidden=16)},
            "data": {"train": str(tiny / "train.jsonl"), "max_length": 16},
            "train": {"max_steps": 2, "batch_size": 4, "tracker": "none", "progress": False, "output_dir": str(out),
                      **train}}


def test_inputs_of_a_config_match_the_built_models(tiny, tmp_path):
    c = load_config(_config(tiny, tmp_path / "r"))
    x = plan.inputs_of(c)
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher")
    assert x.teacher.params == sum(p.numel() for p in teacher.parameters())
    assert x.student.layers == 1 and x.length == 16 and x.batch == 4 and x.teacher_bytes == 4
    assert x.vocab == len(make_tokenizer(tmp_path / "t"))
    assert x.teacher.embedding == teacher.model.embed_tokens.weight.numel()  # untied: FSDP2 shards it
    assert x.sharded_activations is None  # fp32: FSDP2 gathers fp32 parameters, the same forward as DDP
    bf16 = plan.inputs_of(load_config(_config(tiny, tmp_path / "r", precision="bf16")))
    # FSDP2's bf16 parameters keep the residual stream in bf16 and make no autocast weight copies.
    assert bf16.sharded_activations.per_example < bf16.activations.per_example
    assert bf16.sharded_activations.fixed < bf16.activations.fixed


def test_a_run_that_does_not_fit_is_refused_before_weights_load(tiny, tmp_path, monkeypatch):
    import distill.training as training

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the memory check")

    monkeypatch.setattr(training, "load_teacher", no_weights)
    monkeypatch.setattr(training.models, "student_from_config", no_weights)
    x = plan.inputs_of(load_config(_config(tiny, tmp_path / "r")))  # micro-batch 4
    need = plan.components(x, strategy="ddp", processes=1).total
    budget = plan.components(x, strategy="ddp", processes=1, batch=2).total + 1
    assert budget < need
    with pytest.raises(plan.MemoryPlanError, match=rf"needs about {plan.size(need)} per process but has "
                                                   rf"{plan.size(budget)} \(train\.memory_gb\).*"
                                                   r"train\.batch_size=2 fits"):
        training.train(_config(tiny, tmp_path / "r", memory_gb=budget / 2 ** 30))
    path = write_config(tmp_path / "c.yaml", _config(tiny, tmp_path / "r2", memory_gb=1e-6))
    done = run_cli("train", str(path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "not even micro-batch 1 fits" in done.stderr
    assert not (tmp_path / "r2" / "student").exists()
    assert not (tmp_path / "r2").exists()  # refused before the output folder is made


def test_distill_plan_prints_every_strategy(tiny, tmp_path):
    path = write_config(tmp_path / "c.yaml", _config(tiny, tmp_path / "r"))
    done = run_cli("plan", str(path), "--processes", "2", "--gpu-memory", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    x = plan.inputs_of(load_config(str(path)))
    ddp, fsdp, zero = (plan.components(x, strategy=s, processes=2) for s in ("ddp", "fsdp2", "zero3"))
    lines = {line.split("  ")[0]: line for line in done.stdout.splitlines()}
    assert lines["per process"].split()[2:] == ["DDP", "FSDP2", "ZeRO-3"]
    assert lines["total"].split("  ", 1)[1].split() == [w for p in (ddp, fsdp, zero) for w in plan.size(p.total).split()]
    # ZeRO-3's default reduce bucket alone (1.86 GiB, allocated whole) is over the 1 GiB given
    assert lines["fits"].split()[1:] == ["yes", "yes", "NO"] and zero.parts["DeepSpeed reduce bucket"] > 2 ** 30
    best = plan.largest_batch(x, 2 ** 30, strategy="ddp", processes=2, checkpointing=False)
    assert lines["largest micro-batch"].split()[2] == str(best)
    # Host memory while loading: an fp32 teacher (4 B each) and the fp32 student, by hand.
    teacher_bytes, student_bytes = 4 * x.teacher.params, 4 * x.student.params
    assert (f"loading (host memory): under DDP every process holds the teacher ({plan.size(teacher_bytes)}) and the "
            f"student ({plan.size(student_bytes)}); under FSDP2 process 0 alone reads the teacher and sends the "
            "others their shards; every process builds the student from its config; under ZeRO-3 process 0 alone "
            f"reads the teacher and sends the others their shards; every process holds the student "
            f"({plan.size(student_bytes)}) until DeepSpeed partitions it.") in done.stdout
    model, layers = plan.loading(x, "model"), plan.loading(x, "teacher")
    fsdp_part = lambda line: line.split("; under ZeRO-3")[0]  # noqa: E731
    assert fsdp_part(layers) == fsdp_part(model)  # FSDP2: the student made on process 0 either way
    assert layers.endswith(f"under ZeRO-3 every process holds the teacher ({plan.size(teacher_bytes)}) and the student "
                           f"({plan.size(student_bytes)}) until DeepSpeed partitions the student.")  # its layers need the whole teacher everywhere
    assert "under FSDP2 process 0 alone reads them and sends the others their shards" in plan.loading(x, "model")
    tight = run_cli("plan", str(path), "--gpu-memory", "0.000001")
    assert tight.returncode == 0 and "NO" in tight.stdout
    bad = run_cli("plan", str(path), "--processes", "0")
    assert bad.returncode == 2 and "--processes" in bad.stderr


def test_gradient_checkpointing_trains_the_same_student(tiny, tmp_path):
    """train.gradient_checkpointing recomputes the layers in backward: same loss, same weights."""
    from safetensors.torch import load_file

    from distill.training import train

    runs = []
    for ckpt in (False, True):
        config = _config(tiny, tmp_path / str(ckpt), gradient_checkpointing=ckpt, max_steps=3, log_every=1)
        config["student"]["config"] = llama_config(vocab_size=V, layers=2, hidden=16)
        train(config)
        losses = [m["loss"] for m in read_metrics(tmp_path / str(ckpt) / "metrics.jsonl") if "loss" in m]
        runs.append((losses, load_file(tmp_path / str(ckpt) / "student" / "model.safetensors")))
    (plain, w0), (ckpt, w1) = runs
    assert len(plain) == 3 and ckpt == pytest.approx(plain, rel=1e-5)
    for name, tensor in w0.items():
        torch.testing.assert_close(w1[name], tensor, rtol=1e-5, atol=1e-6)


def test_enable_checkpointing_saves_less_for_backward():
    from distill.models import enable_checkpointing

    model = _llama(layers=3)
    model.train()
    plain = _saved_by_hand(model, 2, 16, None, packed=True)
    enable_checkpointing(model)
    on = getattr(type(model), "is_activation_checkpointing", None)  # transformers 5's name; older: gradient_
    assert (model.is_activation_checkpointing if on is not None else model.is_gradient_checkpointing)
    assert model.config.use_cache is False
    assert _saved_by_hand(model, 2, 16, None, packed=True) < plain / 2
