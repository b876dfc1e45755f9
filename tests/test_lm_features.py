"""Feature terms in the causal-LM loop (loss.features with task: causal_lm): the hidden-state,
attention-map and attention-relation terms of ``distill.training.micro_batch_loss`` against a
float64 reference written out here (its own hooks, its own formulas), values and gradients, dense
and chunked; and `distill train` end to end: the terms fall, the projection is checkpointed and not
exported, kill/resume equals uninterrupted, the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distill.features import FeatureSettings, LayerTaps
from distill.losses import kd_loss
from distill.teachers import LiveTeacher
from distill.toy import make_llama
from distill.training import Backbone, LossSettings, micro_batch_loss
from tests.conftest import distill_config, write_config
from tests.helpers import read_metrics, run_cli, two_processes

X = -100
V = 40


def _batch():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 0, 0, 0], [16, 17, 18, 19, 20, 21, 0]])
    attn = (torch.arange(7)[None] < torch.tensor([[7], [4], [6]])).long()
    labels = torch.tensor([[X, X, 7, 8, 9, 10, 11], [X, 13, 14, 15, X, X, X], [X, X, X, X, 20, 21, X]])
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def _models(tmp_path):
    teacher = make_llama(tmp_path / "t", vocab_size=V, layers=4, hidden=32, seed=1)
    student = make_llama(tmp_path / "s", vocab_size=V, layers=2, hidden=16, seed=2)
    with torch.no_grad():  # sharper attention than a random init's near-uniform maps: KL well above rounding
        for m, scale in ((teacher, 6.0), (student, 3.0)):
            m.set_attn_implementation("eager")
            for layer in m.model.layers:
                layer.self_attn.q_proj.weight.mul_(scale)
                layer.self_attn.k_proj.weight.mul_(scale)
    return teacher.double().eval(), student.double().eval()


def _hooked(model, batch):
    """Layer outputs, q / k / v of the last layer and attention probabilities, by hand."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("layer", i), o)))
    for kind in ("q_proj", "k_proj", "v_proj"):
        lin = getattr(model.model.layers[-1].self_attn, kind)
        handles.append(lin.register_forward_hook(lambda m, a, o, k=kind: seen.__setitem__(k, o)))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                output_attentions=True)
    for h in handles:
        h.remove()
    return out, seen


def _relations(x, heads, allowed):
    B, T, d = x.shape
    xa = x.view(B, T, heads, d // heads).transpose(1, 2)
    scores = (xa @ xa.transpose(-1, -2) / math.sqrt(d // heads)).masked_fill(~allowed[:, None], float("-inf"))
    return torch.log_softmax(scores, -1)


def test_feature_terms_in_the_lm_objective_match_a_float64_reference(tmp_path):
    teacher, student = _models(tmp_path)
    batch = _batch()
    f = FeatureSettings(hidden_weight=0.7, layer_map=[1, 3], include_embeddings=True, attention_weight=0.2,
                        attention_heads="average", relation_weight=0.3, relation_heads=2, relation_layer=3)
    backbone = Backbone(student, f, teacher_width=32).double()
    assert set(backbone.projections) == {"0", "1", "2"}  # embeddings and both layers, 16 -> 32
    with torch.no_grad():
        for p in backbone.projections.parameters():
            p.normal_(0, 0.3)
    taps = LayerTaps(teacher, f, side="teacher", relation_layer=3)

    # The reference: KD + CE on the supervised rows, then each term summed over the positions that
    # predict a supervised token (position t predicts token t + 1).
    so, s_seen = _hooked(student, batch)
    with torch.no_grad():
        to, t_seen = _hooked(teacher, batch)
    mask = batch["labels"][:, 1:] != X
    pred = torch.nn.functional.pad(mask, (0, 1))  # (B, T)
    real = batch["attention_mask"].bool()
    ref = kd_loss(so.logits[:, :-1][mask], to.logits[:, :-1][mask], batch["labels"][:, 1:][mask],
                  divergence="forward_kl", temperature=2.0, kd_weight=1.0, ce_weight=0.5).loss
    s_h = {0: so.hidden_states[0], 1: s_seen[("layer", 0)], 2: s_seen[("layer", 1)]}
    t_h = {0: to.hidden_states[0], 2: t_seen[("layer", 1)], 4: t_seen[("layer", 3)]}
    hid = torch.stack([((backbone.projections[str(s)](s_h[s]) - t_h[t]) ** 2).mean(-1)
                       for s, t in ((0, 0), (1, 2), (2, 4))]).mean(0)
    att = torch.stack([(to.attentions[t].mean(1) * (to.attentions[t].mean(1).clamp_min(1e-300).log()
                                                    - so.attentions[s].mean(1).clamp_min(1e-300).log())).sum(-1)
                       for s, t in ((0, 1), (1, 3))]).mean(0)
    allowed = real[:, None, :] & torch.ones(7, 7, dtype=torch.bool).tril()[None]
    rel = []
    for k in ("q_proj", "k_proj", "v_proj"):
        lq, lp = _relations(s_seen[k], 2, allowed), _relations(t_seen[k], 2, allowed)
        rel.append(torch.where(allowed[:, None], lp.exp() * (lp - lq), 0.0).sum(-1).mean(1))
    rel = torch.stack(rel).mean(0)
    ref = ref + 0.7 * hid[pred].sum() + 0.2 * att[pred].sum() + 0.3 * rel[pred].sum()
    ref_grads = torch.autograd.grad(ref, [student.model.embed_tokens.weight, backbone.projections["1"].linear.weight])

    for chunk in (0, 4):  # dense logits, and the LM head fused into the chunked loss
        s = LossSettings(divergence="forward_kl", divergence_kwargs={}, temperature=2.0, scale_by_tau2=True,
                         kd_weight=1.0, ce_weight=0.5, chunk_size=chunk, vocab_size=V, features=f)
        parts, ok = micro_batch_loss(backbone, LiveTeacher(teacher, V, chunk_size=4), batch, s, taps=taps)
        assert bool(ok) and set(parts.features) == {"hidden", "attention", "relation"}
        torch.testing.assert_close(parts.features["hidden"].double(), hid[pred].sum(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(parts.features["attention"].double(), att[pred].sum(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(parts.features["relation"].double(), rel[pred].sum(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(parts.loss.double(), ref, rtol=1e-5, atol=1e-6)
        got = torch.autograd.grad(parts.loss, [student.model.embed_tokens.weight,
                                               backbone.projections["1"].linear.weight])
        for g, r in zip(got, ref_grads):
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-7)
    # Hooks record only inside micro_batch_loss: a plain forward (evaluation, sampling) keeps nothing.
    backbone(batch["input_ids"], batch["attention_mask"])
    teacher(input_ids=batch["input_ids"])
    assert backbone.taps.outputs == {} and taps.outputs == {}


def _run(ws, tmp_path, name, **sections):
    out = tmp_path / name
    config = distill_config(ws, out, **sections)
    return out, config, write_config(tmp_path / f"{name}.yaml", config)


STUDENT_2L = {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}}


def test_distill_train_with_hidden_states_and_relations(workspace, tmp_path):
    out, config, path = _run(workspace, tmp_path, "feat", student=STUDENT_2L,
                             loss={"kd_weight": 0.0, "ce_weight": 0.0,  # the feature terms alone: they must fall
                                   "features": {"hidden_weight": 1.0, "relation_weight": 1.0, "relation_heads": 2}},
                             train={"max_steps": 30, "log_every": 5, "save_every": 30, "lr": 1e-2})
    result = run_cli("train", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [m for m in read_metrics(out / "metrics.jsonl") if "hidden" in m]
    assert len(logged) == 6 and all(m["relation"] is not None for m in logged)
    assert logged[-1]["hidden"] < 0.6 * logged[0]["hidden"]  # the projected student states move to the teacher's
    assert logged[-1]["relation"] < 0.5 * logged[0]["relation"]
    for m in logged:  # kd and ce weigh 0: the loss is the two terms (the teacher still runs, for its features)
        assert m["loss"] == pytest.approx(m["hidden"] + m["relation"], rel=1e-5)
    weights = load_file(out / "student" / "model.safetensors")
    assert not any("projection" in k for k in weights)  # 32 -> 48: trained, checkpointed, not exported
    ckpt = next((out / "checkpoints").glob("step-*"))
    assert any(k.startswith("projections.") for k in load_file(ckpt / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32


def test_lm_features_killed_and_resumed_equals_uninterrupted(workspace, tmp_path):
    sections = dict(loss={"features": {"hidden_weight": 1.0}},
                    train={"max_steps": 6, "save_every": 2, "eval_at_start": False})
    _, _, a = _run(workspace, tmp_path, "a", **sections)
    assert run_cli("train", str(a)).returncode == 0
    _, _, b = _run(workspace, tmp_path, "b", **sections)
    killed = run_cli("train", str(b), env={"DISTILL_TEST_KILL_AT": "step:3"})
    assert killed.returncode != 0 and not (tmp_path / "b" / "student").exists()
    resumed = run_cli("train", str(b))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    wa, wb = (load_file(tmp_path / r / "student" / "model.safetensors") for r in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (read_metrics(tmp_path / r / "metrics.jsonl") for r in "ab")
    assert [m.get("hidden") for m in ma] == [m.get("hidden") for m in mb]


def test_lm_features_on_two_processes_match_one_process(workspace, tmp_path):
    """Micro-batch 8 x 2 accumulation on one process == 4 x 2 on each of two: the projection, used
    inside the wrapped forward, gets the same all-reduced gradient as the student."""
    runs = {}
    for name, batch, launcher in (("one", 8, None), ("two", 4, two_processes(29561))):
        _, _, path = _run(workspace, tmp_path, name, student=STUDENT_2L,
                          data={"train": str(workspace / "pc_train.jsonl"), "eval": str(workspace / "pc_eval.jsonl"),
                                "format": "prompt_completion", "max_length": 48},  # supervised counts differ by row
                          loss={"ce_weight": 0.5, "features": {"hidden_weight": 1.0, "relation_weight": 1.0,
                                                               "relation_heads": 2}},
                          train={"max_steps": 3, "batch_size": batch, "grad_accum_steps": 2, "optimizer": "sgd",
                                 "lr": 0.5, "max_grad_norm": 0.0, "schedule": "constant", "eval_at_start": False,
                                 "log_every": 1})
        result = run_cli("train", str(path), launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
        ckpt = next((tmp_path / name / "checkpoints").glob("step-*"))
        runs[name] = load_file(ckpt / "model.safetensors")  # the student and its projections
    assert any(k.startswith("projections.") for k in runs["one"])
    assert runs["one"].keys() == runs["two"].keys()
    for key, value in runs["one"].items():
        assert torch.allclose(runs["two"][key], value, atol=2e-6), key
    one, two = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("one", "two"))
    logged = [[m["hidden"] for m in run if "hidden" in m] for run in (one, two)]
    assert len(logged[0]) == 3 and logged[1] == pytest.approx(logged[0], rel=1e-5)


def test_lm_feature_refusals_are_one_line(workspace, tmp_path):
    cases = [({"loss": {"features": {"hidden_weight": 1.0}, "cross_tokenizer": {}}}, "same tokenizer"),
             ({"loss": {"features": {"relation_weight": 1.0, "relation_heads": 3}}}, "relation_heads=3"),
             ({"loss": {"features": {"hidden_weight": 1.0, "layer_map": [5]}}}, "layer_map"),
             ({"teacher": {"source": "cache"}, "cache": {"dir": str(tmp_path)},
               "loss": {"features": {"hidden_weight": 1.0}}}, "live teacher")]
    for i, (sections, message) in enumerate(cases):
        _, _, path = _run(workspace, tmp_path, f"bad{i}", **sections)
        result = run_cli("train", str(path))
        assert result.returncode == 2, (sections, result.stderr[-2000:])
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
