"""`distill train` with a teacher on another tokenizer (loss.cross_tokenizer), end to end through the CLI."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
from safetensors.torch import load_file

from distill.toy import write_prompt_completion, write_text
from tests.conftest import write_config
from tests.helpers import read_metrics, run_cli, two_processes
from tests.tokenizer_zoo import train_tokenizer

pytestmark = pytest.mark.slow

STUDENT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two byte-level BPE tokenizers of the toy text (300 and 258 tokens: the byte alphabet and one merge,
    so the second splits words into bytes; its <pad> token shifts every id),
    a WordPiece one, and a teacher trained on the first by `distill train`."""
    root = tmp_path_factory.mktemp("xtok")
    write_text(root / "train.jsonl", 300, seed=0)
    write_text(root / "eval.jsonl", 24, seed=1)
    write_prompt_completion(root / "pc_train.jsonl", 48, seed=2)
    write_prompt_completion(root / "pc_eval.jsonl", 8, seed=3)
    texts = [json.loads(line)["text"] for line in (root / "train.jsonl").read_text().splitlines()]
    for name, kind, size in (("tok_a", "bpe", 300), ("tok_b", "bpe", 120), ("tok_wp", "wordpiece", 120)):
        train_tokenizer(texts, kind, size, pad=name == "tok_b").save_pretrained(root / name)
    config = {"student": {"config": {**STUDENT, "hidden_size": 48, "num_hidden_layers": 2},
                          "tokenizer": str(root / "tok_a")},
              "data": {"train": str(root / "train.jsonl"), "max_length": 64},
              "loss": {"kd_weight": 0.0, "ce_weight": 1.0},
              "train": {"max_steps": 60, "batch_size": 16, "lr": 3e-3, "tracker": "none", "progress": False,
                        "output_dir": str(root / "teacher")}}
    result = run_cli("train", str(write_config(root / "teacher.yaml", config)))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def run(root, name, *, tokenizer="tok_b", loss=None, train=None, data=None, env=None, generation=None):
    config = {"teacher": {"model": str(root / "teacher" / "student")},
              "student": {"config": STUDENT, "tokenizer": str(root / tokenizer)},
              "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_length": 64,
                       **(data or {})},
              "loss": {"kd_weight": 1.0, "ce_weight": 0.0, **(loss or {})},
              "train": {"max_steps": 30, "batch_size": 8, "lr": 3e-3, "tracker": "none", "progress": False,
                        "eval_every": 30, "eval_at_start": True, "output_dir": str(root / name), **(train or {})},
              **({"generation": generation} if generation else {})}
    result = run_cli("train", str(write_config(root / f"{name}.yaml", config)), env=env)
    return result, root / name


def chat_files(root, max_length=256):
    """The prompt/completion toy rows as one-turn chats, and tok_b with a ChatML template (its markers
    added as special tokens); the teacher's tok_a has no chat template (its fallback format)."""
    from distill.models import load_tokenizer
    from tests.tokenizer_zoo import with_chat_template

    if not (root / "tok_b_chat").exists():
        with_chat_template(load_tokenizer(str(root / "tok_b")), "chatml").save_pretrained(root / "tok_b_chat")
        for split in ("pc_train", "pc_eval"):
            rows = [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]
            (root / f"{split}_chat.jsonl").write_text("".join(json.dumps({"messages": [
                {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}) + "\n"
                for r in rows))
    return {"train": str(root / "pc_train_chat.jsonl"), "eval": str(root / "pc_eval_chat.jsonl"), "format": "chat",
            "max_length": max_length}


def evals(run_dir):
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if "eval/ce" in m]


def test_identical_tokenizers_give_the_ordinary_token_level_run(pair):
    """The cross-tokenizer objective (exact-match part only) with the teacher's own tokenizer is the
    ordinary divergence at every position: same parameters after a few SGD steps."""
    common = dict(tokenizer="tok_a", data={"train": str(pair / "pc_train.jsonl"), "eval": str(pair / "pc_eval.jsonl"),
                                          "format": "prompt_completion"},
                  train={"max_steps": 3, "optimizer": "sgd", "lr": 0.5, "schedule": "constant", "max_grad_norm": 0.0,
                         "eval_at_start": False})
    loss = {"divergence": "jsd", "beta": 0.3, "temperature": 2.0, "ce_weight": 0.5, "chunk_size": 0}
    ok_plain, plain = run(pair, "same_plain", loss=loss, **common)
    ok_cross, cross = run(pair, "same_cross", loss={**loss, "cross_tokenizer": {"exact_weight": 1.0, "uld_weight": 0.0}},
                          **common)
    assert ok_plain.returncode == 0 and ok_cross.returncode == 0, ok_cross.stderr[-3000:]
    a, b = load_file(str(plain / "student" / "model.safetensors")), load_file(str(cross / "student" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-6, rtol=0, msg=lambda m: f"{key}: {m}")
    la = [m for m in read_metrics(plain / "metrics.jsonl") if "loss" in m][-1]
    lb = [m for m in read_metrics(cross / "metrics.jsonl") if "loss" in m][-1]
    assert la["kd"] == pytest.approx(lb["kd"], rel=1e-5) and la["ce"] == pytest.approx(lb["ce"], rel=1e-5)
    # Every supervised token is an aligned span, and eval agrees with the id-by-id numbers.
    final = evals(cross)[-1]
    assert final["eval/aligned_token_share"] == pytest.approx(1.0)


def test_a_student_on_another_tokenizer_learns_the_teacher(pair):
    """Hybrid (exact-match + ULD) lowers the aligned KL to the teacher, well below CE alone."""
    # kd_weight 0 with the mode set: CE alone, the teacher only evaluated against on the aligned spans
    longer = {"max_steps": 60, "lr": 1e-2, "eval_every": 60}
    ok, ce_only = run(pair, "b_ce", loss={"kd_weight": 0.0, "ce_weight": 1.0, "cross_tokenizer": {}}, train=longer)
    assert ok.returncode == 0, ok.stderr[-3000:]
    ok, hybrid = run(pair, "b_hybrid", loss={"cross_tokenizer": {"exact_weight": 1.0, "uld_weight": 1.0}}, train=longer)
    assert ok.returncode == 0, ok.stderr[-3000:]
    first, last = evals(hybrid)[0], evals(hybrid)[-1]
    assert 0.5 < last["eval/aligned_token_share"] <= 1.0
    assert last["eval/aligned_forward_kl"] < 0.6 * first["eval/aligned_forward_kl"]
    assert last["eval/aligned_top1_agreement"] > first["eval/aligned_top1_agreement"] + 0.1
    assert last["eval/aligned_forward_kl"] < 0.7 * evals(ce_only)[-1]["eval/aligned_forward_kl"]
    logs = [m for m in read_metrics(hybrid / "metrics.jsonl") if "loss" in m]
    assert logs[-1]["kd"] < logs[0]["kd"]
    ok, uld = run(pair, "b_uld", loss={"cross_tokenizer": {"exact_weight": 0.0, "uld_weight": 1.0}}, train=longer)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert evals(uld)[-1]["eval/aligned_uld"] < evals(uld)[0]["eval/aligned_uld"]


def _params_close(a_dir, b_dir, atol):
    a, b = load_file(str(a_dir / "student" / "model.safetensors")), load_file(str(b_dir / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")


def test_micro_batch_times_accumulation_and_resume_invariants_hold(pair):
    """Sums over spans, one division by the step's supervised tokens: 8 x 1 == 2 x 4 on rows with
    different supervised lengths; and a run killed after a checkpoint resumes to the same weights."""
    hybrid = {"ce_weight": 0.3, "cross_tokenizer": {"uld_weight": 0.5}}
    pc = {"train": str(pair / "pc_train.jsonl"), "eval": str(pair / "pc_eval.jsonl"), "format": "prompt_completion"}
    sgd = {"max_steps": 3, "optimizer": "sgd", "lr": 0.5, "schedule": "constant", "max_grad_norm": 0.0,
           "eval_at_start": False, "eval_every": 0}
    runs = []
    for batch, accum in ((8, 1), (2, 4)):
        ok, run_dir = run(pair, f"acc_{batch}x{accum}", loss=hybrid, data=pc,
                          train={**sgd, "batch_size": batch, "grad_accum_steps": accum})
        assert ok.returncode == 0, ok.stderr[-3000:]
        runs.append(run_dir)
    _params_close(runs[0], runs[1], atol=2e-6)

    common = {"max_steps": 6, "save_every": 3, "log_every": 1, "eval_every": 0, "eval_at_start": False}
    ok, straight = run(pair, "x_straight", loss=hybrid, train=common)
    assert ok.returncode == 0, ok.stderr[-3000:]
    killed, resumed = run(pair, "x_resumed", loss=hybrid, train=common, env={"DISTILL_TEST_KILL_AT": "step:4"})
    assert killed.returncode == -signal.SIGKILL  # after step 4, with step 3 checkpointed
    again, _ = run(pair, "x_resumed", loss=hybrid, train=common)
    assert again.returncode == 0 and "resuming from" in again.stdout + again.stderr, again.stderr[-3000:]
    _params_close(resumed, straight, atol=0)


def test_refusals_are_one_line(pair):
    result, _ = run(pair, "refuse_mismatch")  # another tokenizer, no cross-tokenizer mode
    assert result.returncode == 2 and "loss.cross_tokenizer" in result.stderr and "Traceback" not in result.stderr
    result, _ = run(pair, "refuse_wp", tokenizer="tok_wp", loss={"cross_tokenizer": {}})
    assert result.returncode == 2 and "WordPiece" in result.stderr and "Traceback" not in result.stderr
    config = {"teacher": {"model": str(pair / "teacher" / "student"), "source": "cache"},
              "cache": {"dir": str(pair / "no-cache")},
              "student": {"config": STUDENT, "tokenizer": str(pair / "tok_b")},
              "data": {"train": str(pair / "train.jsonl")},
              "loss": {"cross_tokenizer": {"uld_weight": 0.5}},
              "train": {"output_dir": str(pair / "refuse_cache")}}
    result = run_cli("train", str(write_config(pair / "refuse_cache.yaml", config)))
    assert result.returncode == 2 and "top-k cache" in result.stderr and "Traceback" not in result.stderr


def test_eval_scores_a_model_on_another_tokenizer_with_the_teacher_on_the_same_text(pair):
    """`distill eval` with a teacher on tok_a, a copy of it, and two students on tok_b (CE-only and the
    hybrid): one table, bits per byte for all, aligned fidelity for the tok_b models, and the hybrid
    closer to the teacher on aligned spans than the CE-only student."""
    longer = {"max_steps": 60, "eval_every": 0, "eval_at_start": False}
    ok, ce_only = run(pair, "ev_ce", loss={"kd_weight": 0.0, "ce_weight": 1.0, "cross_tokenizer": {}}, train=longer)
    assert ok.returncode == 0, ok.stderr[-3000:]
    ok, hybrid = run(pair, "ev_hybrid", loss={"cross_tokenizer": {"exact_weight": 1.0, "uld_weight": 1.0}},
                     train=longer)
    assert ok.returncode == 0, ok.stderr[-3000:]
    teacher = str(pair / "teacher" / "student")
    result = run_cli("eval", "--teacher", teacher, "--model", f"self={teacher}",
                     "--model", f"ce={ce_only / 'student'}", "--model", f"hybrid={hybrid / 'student'}",
                     "--data", str(pair / "eval.jsonl"), "--max-length", "48", "--prompts", "4",
                     "--max-new-tokens", "12", "--draft-prompts", "2", "--out", str(pair / "ev_out"))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((pair / "ev_out" / "eval.json").read_text())
    models = results["models"]
    assert results["settings"]["other_tokenizers"] == ["ce", "hybrid"]
    assert models["self"]["tokenizer"] == "shared" and models["hybrid"]["tokenizer"].endswith("student")
    for name in ("teacher", "self", "ce", "hybrid"):
        assert models[name]["bits_per_byte"] > 0, name
    assert models["self"]["bits_per_byte"] == pytest.approx(models["teacher"]["bits_per_byte"], rel=1e-6)
    assert models["self"]["aligned_forward_kl"] is None and models["self"]["forward_kl"] == pytest.approx(0, abs=1e-6)
    for name in ("ce", "hybrid"):
        m = models[name]
        assert m["forward_kl"] is None and m["top1_agreement"] is None and m["spec_acceptance_measured"] is None
        assert m["aligned_forward_kl"] > 0 and 0 <= m["aligned_top1_agreement"] <= 1
        assert 0.5 < m["aligned_token_share"] <= 1 and m["aligned_spans"] > 0
        assert m["teacher_nll"] > 0 and m["generate_tokens_per_s_batch1"] > 0 and m["completion_tokens"] > 0
        assert all(name in s["completions"] for s in results["samples"])
    assert models["hybrid"]["aligned_forward_kl"] < models["ce"]["aligned_forward_kl"]
    assert models["self"]["spec_acceptance_measured"] is not None  # the same tokenizer can still draft
    html = (pair / "ev_out" / "report.html").read_text()
    assert "aligned forward KL" in html and "bits per byte" in html
    assert "bits per byte" in result.stdout


def test_foreign_scoring_with_the_same_tokenizer_reduces_to_the_ordinary_one(pair):
    """The aligned path with identical tokenizers: the same CE per token, bits per byte (against a
    byte count from decoding each ASCII token), KL 0 and agreement 1 on every span."""
    from distill.data import load_tokenized
    from distill.evaluate import bits_per_byte, foreign_metrics, likelihood_metrics, predicted_bytes
    from distill.models import load_causal_lm, load_tokenizer
    from distill.teachers.cross import Aligner

    teacher_dir = pair / "teacher" / "student"
    tok = load_tokenizer(str(teacher_dir))
    model = load_causal_lm(str(teacher_dir)).eval()
    dataset = load_tokenized(str(pair / "eval.jsonl"), tokenizer=tok, format="text", packing=True, max_length=40)
    plain = likelihood_metrics({"m": model}, dataset, teacher=None, vocab_size=len(tok), batch_size=4,
                               pad_token_id=tok.pad_token_id, device="cpu")["m"]
    aligned = foreign_metrics(model, Aligner(tok, tok), dataset, vocab_size=len(tok), teacher=model,
                              teacher_vocab_size=len(tok), batch_size=3, pad_token_id=tok.pad_token_id, device="cpu")
    assert aligned["eval_tokens"] == plain["eval_tokens"]
    assert aligned["eval_ce"] == pytest.approx(plain["eval_ce"], rel=1e-5)
    assert aligned["top1_accuracy"] == pytest.approx(plain["top1_accuracy"], abs=1e-9)
    n_bytes = sum(len(tok.decode([t]).encode()) for row in dataset["labels"] for t in row[1:]
                  if t != -100 and t not in tok.all_special_ids)
    assert predicted_bytes(dataset, tok) == n_bytes == aligned["predicted_bytes"]
    assert bits_per_byte(plain, n_bytes) == pytest.approx(
        plain["eval_ce"] * plain["eval_tokens"] / n_bytes / math.log(2), rel=1e-12)
    assert aligned["aligned_forward_kl"] == pytest.approx(0.0, abs=1e-6)
    assert aligned["aligned_uld"] == pytest.approx(0.0, abs=1e-6)
    assert aligned["aligned_top1_agreement"] == 1.0 and aligned["aligned_token_share"] == pytest.approx(1.0)


def test_chat_data_trains_with_each_side_reading_its_own_template(pair):
    """Chat rows on a ChatML student tokenizer and a teacher without a chat template (its fallback
    format): the teacher's rows are its own rendering (teacher_input_ids in the tokenized data) and the
    hybrid lowers the aligned KL on the assistant turns."""
    from distill.data import load_tokenized
    from distill.models import load_tokenizer

    chat = chat_files(pair)
    ok, run_dir = run(pair, "chat_hybrid", tokenizer="tok_b_chat", data=chat,
                      loss={"kd_weight": 0.7, "ce_weight": 0.3, "cross_tokenizer": {"uld_weight": 0.5}},
                      train={"max_steps": 40, "eval_every": 40})
    assert ok.returncode == 0, ok.stderr[-3000:]
    first, last = evals(run_dir)[0], evals(run_dir)[-1]
    assert last["eval/aligned_spans"] > 0 and 0.5 < last["eval/aligned_token_share"] <= 1.0
    assert last["eval/aligned_forward_kl"] < 0.8 * first["eval/aligned_forward_kl"]

    student_tok, teacher_tok = load_tokenizer(str(pair / "tok_b_chat")), load_tokenizer(str(pair / "tok_a"))
    data = load_tokenized(chat["eval"], tokenizer=student_tok, format="chat", max_length=256,
                          teacher_tokenizer=teacher_tok, teacher_max_length=256)
    row = data[0]
    assert student_tok.convert_tokens_to_ids("<|im_start|>") in row["input_ids"]
    text = teacher_tok.decode(row["teacher_input_ids"])
    assert text.startswith("user: ") and "\nassistant: " in text and "im_start" not in text  # its fallback format


@pytest.mark.parametrize("fmt", ["chat", "prompt_completion"])
def test_on_policy_steps_score_the_students_samples_with_the_other_tokenizer(pair, fmt):
    """generation.lmbda = 1 in cross-tokenizer mode: the student samples, the teacher scores the
    samples' text on aligned spans (for chat, after its own rendering of the prompt), and the aligned KL
    on the eval data falls."""
    data = (chat_files(pair, max_length=220) if fmt == "chat" else
            {"train": str(pair / "pc_train.jsonl"), "eval": str(pair / "pc_eval.jsonl"), "format": fmt,
             "max_length": 220})
    ok, run_dir = run(pair, f"onpolicy_{fmt}", tokenizer="tok_b_chat" if fmt == "chat" else "tok_b", data=data,
                      loss={"kd_weight": 1.0, "ce_weight": 0.0, "cross_tokenizer": {"uld_weight": 0.5}},
                      train={"max_steps": 20, "eval_every": 20, "log_every": 5},
                      generation={"lmbda": 1.0, "max_new_tokens": 24})
    assert ok.returncode == 0, ok.stderr[-3000:]
    logs = [m for m in read_metrics(run_dir / "metrics.jsonl") if "kd" in m]
    assert logs and sum(m["steps_student"] for m in logs) == 20 and all(m["time/align_s"] > 0 for m in logs)
    first, last = evals(run_dir)[0], evals(run_dir)[-1]
    assert last["eval/aligned_forward_kl"] < 0.9 * first["eval/aligned_forward_kl"]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["source"] == "student" and s["completion_ids"] for s in samples)


def test_two_processes_match_one_on_chat_rows_in_cross_mode(pair):
    """DDP in cross-tokenizer mode (chat rows with the teacher's own template): 2 processes x 4 rows give
    the parameters and aligned eval metrics of 1 process x 8 rows (one global division by the step's
    supervised tokens)."""
    data = chat_files(pair)
    hybrid = {"kd_weight": 0.7, "ce_weight": 0.3, "cross_tokenizer": {"uld_weight": 0.5}}
    sgd = {"max_steps": 3, "optimizer": "sgd", "lr": 0.5, "schedule": "constant", "max_grad_norm": 0.0,
           "eval_at_start": False, "eval_every": 3}
    ok, one = run(pair, "ddp_one", tokenizer="tok_b_chat", data=data, loss=hybrid, train={**sgd, "batch_size": 8})
    assert ok.returncode == 0, ok.stderr[-3000:]
    config = {"teacher": {"model": str(pair / "teacher" / "student")},
              "student": {"config": STUDENT, "tokenizer": str(pair / "tok_b_chat")}, "data": data, "loss": hybrid,
              "train": {**sgd, "batch_size": 4, "tracker": "none", "progress": False,
                        "output_dir": str(pair / "ddp_two")}}
    two = run_cli("train", str(write_config(pair / "ddp_two.yaml", config)), launcher=two_processes(29523))
    assert two.returncode == 0, two.stderr[-3000:]
    _params_close(pair / "ddp_two", one, atol=2e-6)
    a, b = evals(pair / "ddp_two")[-1], evals(one)[-1]
    assert a["eval/aligned_spans"] == b["eval/aligned_spans"] > 0
    for key in ("eval/aligned_forward_kl", "eval/aligned_uld", "eval/aligned_token_share"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
