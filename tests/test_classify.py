"""`distill train` with task: classification: the objective against its formula, the CLI end to
end (a teacher trained by distill itself, KD students with feature terms, a decoder student on
another tokenizer), resume after a kill, and the label / field mistakes (one line, exit 2)."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification

from distill.classify import ClassificationLoss, ClassifierStudent, FeatureSettings, micro_batch_loss
from distill.data.classification import class_names, collate_classification
from distill.data.sources import DataError
from distill.losses import kd_loss
from distill.toy import make_tokenizer, sentence
from tests.conftest import write_config
from tests.helpers import read_metrics, run_cli, two_processes

POSITIVE = {"happy", "young", "quick", "big"}  # the label is the sentence's adjective's side


def write_sentiment(path, n, seed, *, label=lambda adj: "positive" if adj in POSITIVE else "negative", pair=False):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            text = sentence(rng)
            row = {"text": text, "label": label(text.split()[1])}
            if pair:
                row["other"] = sentence(rng)
            f.write(json.dumps(row) + "\n")
    return path


def bert(layers=2, hidden=48):
    return {"model_type": "bert", "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": 4, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A word-level tokenizer, the toy sentiment task and a 2-layer BERT teacher trained by distill (CE only)."""
    root = tmp_path_factory.mktemp("cls")
    make_tokenizer(root / "tok")
    make_tokenizer(root / "tok_other", shuffle_seed=3)  # same words, other ids: another tokenizer
    write_sentiment(root / "train.jsonl", 512, 0)
    write_sentiment(root / "eval.jsonl", 96, 1)
    config = {"task": "classification", "student": {"config": bert(), "tokenizer": str(root / "tok")},
              "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_length": 32},
              "loss": {"kd_weight": 0.0, "ce_weight": 1.0},
              "train": {"max_steps": 40, "batch_size": 16, "lr": 3e-3, "tracker": "none", "progress": False,
                        "output_dir": str(root / "teacher_run")}}
    result = run_cli("train", str(write_config(root / "teacher.yaml", config)))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def kd_config(ws, out, **sections):
    config = {"task": "classification", "teacher": {"model": str(ws / "teacher_run" / "student")},
              "student": {"config": bert(layers=1, hidden=32)},
              "data": {"train": str(ws / "train.jsonl"), "eval": str(ws / "eval.jsonl"), "max_length": 32},
              "train": {"max_steps": 60, "batch_size": 16, "lr": 3e-3, "tracker": "none", "progress": False,
                        "output_dir": str(out), "eval_at_start": True}}
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def final_eval(run):
    return [m for m in read_metrics(run / "metrics.jsonl") if "eval/accuracy" in m]


# ---------------------------------------------------------------------------------------------
# The objective


def test_class_logit_kd_equals_hintons_formula_on_a_hand_example():
    s = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([1, 2])
    tau, a, b = 2.0, 0.7, 0.3

    def soft(z):
        e = [[math.exp(v / tau) for v in row] for row in z.tolist()]
        return [[v / sum(row) for v in row] for row in e]

    p, q = soft(t), soft(s.detach())
    kl = sum(pi * math.log(pi / qi) for pr, qr in zip(p, q) for pi, qi in zip(pr, qr))
    ce = sum(-math.log(math.exp(row[k]) / sum(math.exp(v) for v in row)) for row, k in zip(s.tolist(), y.tolist()))
    want = a * tau ** 2 * kl + b * ce
    parts = kd_loss(s, t, y, temperature=tau, kd_weight=a, ce_weight=b)
    assert parts.loss.item() == pytest.approx(want, rel=1e-6)
    assert parts.kd.item() == pytest.approx(kl, rel=1e-6) and parts.ce.item() == pytest.approx(ce, rel=1e-6)
    parts.loss.backward()
    # d/ds of a·τ²·KL(p‖q_τ) + b·CE = a·τ·(q_τ − p) + b·(softmax(s) − onehot(y))
    soft1 = torch.softmax(s.detach(), -1)
    grad = a * tau * (torch.tensor(q, dtype=torch.float64) - torch.tensor(p, dtype=torch.float64)) \
        + b * (soft1 - torch.nn.functional.one_hot(y, 3).double())
    assert torch.allclose(s.grad, grad, atol=1e-6)


def _tiny(hidden, layers, seed, labels=3):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(**bert(layers, hidden), vocab_size=30, num_labels=labels,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               attn_implementation="eager")
    return AutoModelForSequenceClassification.from_config(cfg).double()


def test_the_micro_batch_loss_is_kd_plus_ce_plus_the_feature_terms_on_real_positions():
    student, teacher = _tiny(16, 1, 0), _tiny(24, 2, 1).eval()
    f = FeatureSettings(hidden_weight=0.5, layer_map=[1], attention_weight=0.25, attention_heads="average",
                        include_embeddings=True)
    wrapped = ClassifierStudent(student, f, teacher_width=24).double()
    assert set(wrapped.projections) == {"0", "1"}  # embeddings and layer 1, each 16 -> 24
    s = ClassificationLoss(divergence="jsd", divergence_kwargs={"beta": 0.3}, temperature=2.0, scale_by_tau2=True,
                           kd_weight=0.8, ce_weight=0.4, features=f)
    rows = {"input_ids": [[5, 6, 7, 8, 9], [10, 11, 12]], "label": [2, 0]}
    batch = collate_classification(rows, pad_token_id=0)
    loss, parts, ok = micro_batch_loss(wrapped, teacher, batch, s)
    assert bool(ok.all())

    # The reference, term by term, in float64 on unpadded rows one at a time.
    want = 0.0
    for ids, label in zip(rows["input_ids"], rows["label"]):
        x = torch.tensor([ids])
        so = student(input_ids=x, output_hidden_states=True, output_attentions=True)
        to = teacher(input_ids=x, output_hidden_states=True, output_attentions=True)
        want = want + kd_loss(so.logits, to.logits, torch.tensor([label]), divergence="jsd", beta=0.3,
                              temperature=2.0, kd_weight=0.8, ce_weight=0.4).loss
        hid = [((wrapped.projections[str(i)](so.hidden_states[i]) - to.hidden_states[j]) ** 2).mean(-1).mean()
               for i, j in ((0, 0), (1, 2))]
        want = want + 0.5 * torch.stack(hid).mean()
        ps, pt = so.attentions[0].mean(1), to.attentions[1].mean(1)  # (1, T, T), heads averaged
        want = want + 0.25 * (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    g1 = torch.autograd.grad(loss, list(wrapped.parameters()))
    g2 = torch.autograd.grad(want, list(wrapped.parameters()))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-5)


def test_class_names_come_from_the_config_the_teacher_or_the_data():
    assert class_names(["b", "a", "b"]) == ["a", "b"]
    assert class_names([2, 0, 1]) == ["0", "1", "2"]
    assert class_names(["x"], given=["neg", "pos"]) == ["neg", "pos"]
    assert class_names([0], teacher=["neg", "pos"]) == ["neg", "pos"]
    with pytest.raises(DataError, match="differ from the teacher"):
        class_names([0], given=["pos", "neg"], teacher=["neg", "pos"])
    with pytest.raises(DataError, match="all class indices"):
        class_names([0, "a"])
    with pytest.raises(DataError, match="single class"):
        class_names(["a", "a"])


def test_classification_has_its_own_loss_defaults_and_refusals():
    from distill.config import CLASSIFICATION_LOSS_DEFAULTS, load_config
    from distill.errors import ConfigError

    base = {"task": "classification", "teacher": {"model": "t"}, "student": {"model": "s"}, "data": {"train": "d"}}
    c = load_config(base)
    assert (c.loss.temperature, c.loss.kd_weight, c.loss.ce_weight) == tuple(
        CLASSIFICATION_LOSS_DEFAULTS[k] for k in ("temperature", "kd_weight", "ce_weight"))
    assert load_config(base, ["loss.temperature=8"]).loss.temperature == 8.0  # what the user gives wins
    assert load_config({k: v for k, v in base.items() if k != "task"}).loss.temperature == 1.0  # LM default
    lm = load_config({k: v for k, v in base.items() if k != "task"}, ["loss.features.hidden_weight=1"])
    assert lm.loss.features.hidden_weight == 1.0  # the causal-LM loop has the feature terms too
    with pytest.raises(ConfigError, match="need the same tokenizer"):
        load_config({k: v for k, v in base.items() if k != "task"}, ["loss.features.hidden_weight=1",
                                                                      "loss.cross_tokenizer.uld_weight=1"])
    with pytest.raises(ConfigError, match="teacher.source=cache is for causal LMs"):
        load_config(base, ["teacher.source=cache", "cache.dir=x"])
    with pytest.raises(ConfigError, match="has a name twice"):
        load_config(base, ["data.labels=[a, a]"])
    with pytest.raises(ConfigError, match="layer_map"):
        load_config(base, ["loss.features.layer_map=[-2]"])


# ---------------------------------------------------------------------------------------------
# End to end through the CLI


def test_the_teacher_trained_by_distill_is_a_classifier_with_its_names(ws):
    student = ws / "teacher_run" / "student"
    model = AutoModelForSequenceClassification.from_pretrained(student)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert final_eval(ws / "teacher_run")[-1]["eval/accuracy"] >= 0.9


def test_kd_with_hidden_states_and_relations_trains_a_smaller_student_and_exports_it_alone(ws, tmp_path):
    out = tmp_path / "kd"
    config = kd_config(ws, out, loss={"features": {"hidden_weight": 1.0, "relation_weight": 1.0}})
    result = run_cli("train", str(write_config(tmp_path / "kd.yaml", config)))
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = final_eval(out)[0], final_eval(out)[-1]
    assert last["eval/forward_kl"] < 0.5 * first["eval/forward_kl"]
    assert last["eval/teacher_agreement"] >= 0.85
    logged = read_metrics(out / "metrics.jsonl")[1]
    assert {"kd", "ce", "hidden", "relation"} <= set(logged)
    weights = load_file(out / "student" / "model.safetensors")
    assert not any("projection" in k for k in weights)  # 32 -> 48: trained, checkpointed, not exported
    ckpt = next((out / "checkpoints").glob("step-*"))
    assert any("projections" in k for k in load_file(ckpt / "model.safetensors"))
    model = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert model.config.num_hidden_layers == 1 and model.config.label2id == {"negative": 0, "positive": 1}

    # distill eval on classifiers: task metrics, fidelity, speed and size in eval.json and the report
    report = tmp_path / "report"
    result = run_cli("eval", "--teacher", str(ws / "teacher_run" / "student"), "--model", f"kd={out / 'student'}",
                     "--data", str(ws / "eval.jsonl"), "--out", str(report), "--run", f"kd={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((report / "eval.json").read_text())
    assert results["task"] == "classification" and results["labels"] == ["negative", "positive"]
    kd, teacher = results["models"]["kd"], results["models"]["teacher"]
    assert kd["accuracy"] == pytest.approx(last["eval/accuracy"])  # the same data, the same model
    assert kd["forward_kl"] == pytest.approx(last["eval/forward_kl"], rel=1e-4)
    assert kd["params"] < teacher["params"] and kd["size_ratio"] < 1
    for key in ("macro_f1", "ece", "latency_ms_p50", "latency_ms_p95", "examples_per_s", "accuracy_share"):
        assert kd[key] is not None and kd[key] >= 0, key
    assert sum(map(sum, kd["confusion"])) == 96
    page = (report / "report.html").read_text()
    assert "Confusion matrices" in page and "Per class" in page and "Training curves" in page
    assert page.count("<img") == 6 + 1 + 2 + 1  # bars, reliability diagram, two confusion matrices, curves
    assert "accuracy" in result.stdout and "latency p50" in result.stdout


def test_an_encoder_student_from_every_other_teacher_layer(ws, tmp_path):
    out = tmp_path / "layers"
    config = kd_config(ws, out, student={"config": None, "init_from_teacher_layers": [1]},
                       train={"max_steps": 10})
    config["student"].pop("config")
    result = run_cli("train", str(write_config(tmp_path / "l.yaml", config)))
    assert result.returncode == 0, result.stderr[-3000:]
    teacher = load_file(ws / "teacher_run" / "student" / "model.safetensors")
    start = final_eval(out)[0]
    assert start["eval/teacher_agreement"] > 0.5  # the copied embeddings, layer and head already agree
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 1
    assert student.bert.embeddings.word_embeddings.weight.shape == teacher["bert.embeddings.word_embeddings.weight"].shape


def test_a_decoder_student_on_another_tokenizer_learns_from_class_logits(ws, tmp_path):
    out = tmp_path / "dec"
    config = kd_config(ws, out, student={"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                                     "num_hidden_layers": 1, "num_attention_heads": 4,
                                                     "num_key_value_heads": 2, "max_position_embeddings": 64},
                                          "tokenizer": str(ws / "tok_other")},
                       loss={"divergence": "reverse_kl"})
    result = run_cli("train", str(write_config(tmp_path / "d.yaml", config)))
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = final_eval(out)[0], final_eval(out)[-1]
    assert last["eval/forward_kl"] < 0.5 * first["eval/forward_kl"] and last["eval/accuracy"] >= 0.8
    model = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert model.config.pad_token_id == 0  # the decoder head reads the last non-pad token


def test_killed_and_resumed_equals_uninterrupted(ws, tmp_path):
    config = kd_config(ws, tmp_path / "a", loss={"features": {"hidden_weight": 1.0}},
                       train={"max_steps": 8, "save_every": 2, "eval_at_start": False})
    path = write_config(tmp_path / "a.yaml", config)
    assert run_cli("train", str(path)).returncode == 0
    config["train"]["output_dir"] = str(tmp_path / "b")
    path = write_config(tmp_path / "b.yaml", config)
    killed = run_cli("train", str(path), env={"DISTILL_TEST_KILL_AT": "step:5"})
    assert killed.returncode != 0 and not (tmp_path / "b" / "student").exists()
    resumed = run_cli("train", str(path))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (load_file(tmp_path / r / "student" / "model.safetensors") for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_match_one_process_with_accumulation(ws, tmp_path):
    """Micro-batch 8 x 2 accumulation on one process == 4 x 2 on each of two (same global batch)."""
    runs = {}
    for name, batch, launcher in (("one", 8, None), ("two", 4, two_processes(29541))):
        config = kd_config(ws, tmp_path / name, loss={"features": {"hidden_weight": 1.0}},
                           train={"max_steps": 3, "batch_size": batch, "grad_accum_steps": 2, "optimizer": "sgd",
                                  "lr": 0.5, "max_grad_norm": 0.0, "schedule": "constant", "eval_at_start": False})
        config["student"]["config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        result = run_cli("train", str(write_config(tmp_path / f"{name}.yaml", config)), launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = load_file(tmp_path / name / "student" / "model.safetensors")
    for key, value in runs["one"].items():
        assert torch.allclose(runs["two"][key], value, atol=2e-6), key
    one, two = final_eval(tmp_path / "one")[-1], final_eval(tmp_path / "two")[-1]
    assert two["eval/examples"] == one["eval/examples"] == 96
    assert two["eval/forward_kl"] == pytest.approx(one["eval/forward_kl"], rel=1e-5)


def test_an_embedding_student_learns_the_teachers_geometry_and_saves_as_a_sentence_encoder(ws, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "emb"
    config = kd_config(ws, out, loss={"embedding": {"pooling": "mean", "kind": "cosine", "weight": 1.0, "similarity_weight": 1.0,
                                           "rkd_distance_weight": 1.0, "rkd_angle_weight": 1.0}})
    config["task"] = "embedding"
    result = run_cli("train", str(write_config(tmp_path / "e.yaml", config)))
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [m for m in read_metrics(out / "metrics.jsonl") if "eval/similarity_mse" in m]
    first, last = evals[0], evals[-1]
    assert last["eval/similarity_mse"] < 0.5 * first["eval/similarity_mse"]
    assert last["eval/cosine"] > first["eval/cosine"] + 0.2
    logged = read_metrics(out / "metrics.jsonl")[1]
    assert {"embedding", "similarity", "rkd_distance", "rkd_angle"} <= set(logged) and "kd" not in logged
    weights = load_file(out / "student" / "model.safetensors")
    assert not any("projection" in k for k in weights)
    model = AutoModel.from_pretrained(out / "student")
    assert type(model).__name__ == "BertModel" and model.config.hidden_size == 32
    pooling = json.loads((out / "student" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and pooling["word_embedding_dimension"] == 32
    assert json.loads((out / "student" / "modules.json").read_text())[1]["path"] == "1_Pooling"

    # distill eval on encoders: the same geometry as the run's last eval, k-NN accuracy, speed, report
    report = tmp_path / "report"
    result = run_cli("eval", "--teacher", str(ws / "teacher_run" / "student"), "--model", f"emb={out / 'student'}",
                     "--data", str(ws / "eval.jsonl"), "--max-length", "32", "--out", str(report), "--run", f"emb={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((report / "eval.json").read_text())
    emb, teacher = results["models"]["emb"], results["models"]["teacher"]
    assert results["task"] == "embedding" and emb["pooling"] == "mean" and emb["dim"] == 32 and teacher["dim"] == 48
    assert emb["similarity_mse"] == pytest.approx(last["eval/similarity_mse"], rel=1e-4)
    assert emb["neighbour_agreement"] == pytest.approx(last["eval/neighbour_agreement"])
    assert emb["cosine_to_teacher"] is None  # 32 vs 48 wide: the projection stayed in the checkpoints
    assert 0.5 < emb["similarity_spearman"] <= 1.0 and emb["knn_accuracy"] is not None
    assert emb["params"] < teacher["params"] and emb["latency_ms_p50"] > 0
    page = (report / "report.html").read_text()
    assert "sentence encoders" in page and "Pair similarities" in page and "Training curves" in page
    assert "similarity Spearman" in result.stdout


# ---------------------------------------------------------------------------------------------
# Mistakes: one line, exit 2


def _refused(ws, tmp_path, config, match):
    result = run_cli("train", str(write_config(tmp_path / "bad.yaml", config)))
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("distill: error")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-2000:]
    assert match in lines[0], lines[0]
    return lines[0]


def test_an_unknown_label_names_its_line(ws, tmp_path):
    data = write_sentiment(tmp_path / "t.jsonl", 40, 5, label=lambda adj: "neutral" if adj == "red" else "positive")
    config = kd_config(ws, tmp_path / "r", data={"train": str(data)})
    line = _refused(ws, tmp_path, config, "label 'neutral' is not one of the classes")
    assert "t.jsonl:" in line


def test_a_missing_label_field_is_named(ws, tmp_path):
    config = kd_config(ws, tmp_path / "r", data={"label_field": "sentiment"})
    _refused(ws, tmp_path, config, "no column 'sentiment'")


def test_data_labels_in_another_order_than_the_teachers_are_refused(ws, tmp_path):
    config = kd_config(ws, tmp_path / "r", data={"labels": ["positive", "negative"]})
    _refused(ws, tmp_path, config, "differ from the teacher's classes")


def test_an_int_label_out_of_range_is_refused(ws, tmp_path):
    data = write_sentiment(tmp_path / "t.jsonl", 40, 5, label=lambda adj: 3 if adj == "red" else 1)
    config = kd_config(ws, tmp_path / "r", data={"train": str(data)})
    _refused(ws, tmp_path, config, "label 3 is outside 0..1")


def test_token_level_options_are_refused_for_classification(ws, tmp_path):
    config = kd_config(ws, tmp_path / "r", generation={"lmbda": 0.5})
    _refused(ws, tmp_path, config, "applies to task=causal_lm only")


def test_feature_terms_across_tokenizers_are_refused(ws, tmp_path):
    config = kd_config(ws, tmp_path / "r", student={"tokenizer": str(ws / "tok_other")},
                       loss={"features": {"hidden_weight": 1.0}})
    _refused(ws, tmp_path, config, "must read the same tokenizer")


def test_rkd_angle_on_micro_batches_of_two_is_refused(ws, tmp_path):
    config = kd_config(ws, tmp_path / "r", loss={"embedding": {"rkd_angle_weight": 1.0}}, train={"batch_size": 2})
    config["task"] = "embedding"
    _refused(ws, tmp_path, config, "RKD angle needs 3")


def test_distill_cache_refuses_a_classification_config(ws, tmp_path):
    config = kd_config(ws, tmp_path / "r", cache={"dir": str(tmp_path / "c")})
    result = run_cli("cache", str(write_config(tmp_path / "c.yaml", config)))
    assert result.returncode == 2 and "distill cache stores a causal LM's" in result.stderr
