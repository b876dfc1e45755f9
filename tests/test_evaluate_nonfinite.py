"""`distill eval` on models whose outputs are NaN: tiny random Llamas (no training), one with a NaN
row in an MLP weight, as a student and as the teacher. Their metrics are null, never NaN nor a
score over NaN rows; the status, eval.json (strict JSON), report.html and the CLI table say so;
healthy models' metrics do not change; sampling from NaN logits does not crash."""

import json
import math
import re
import shutil

import pytest
import torch

from distill.evaluate import (FIDELITY_KEYS, GENERATION_KEYS, LIKELIHOOD_KEYS, SPEED_KEYS, NonFiniteGuard,
                              evaluate_models, sample_completions)
from distill.report import NONFINITE, write_report
from tests.helpers import make_llama, make_tokenizer, run_cli, write_text

SMALL = dict(max_length=32, num_prompts=3, max_new_tokens=6, batch_size=5, speed=False, progress=False)
UNK = 1  # the toy tokenizer's <unk>: never in the data, so only sampling can feed it to a model


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _edit(src, dst, tokenizer, change):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        change(model)
    return _save(model, tokenizer, dst)


def _nan_mlp_row(model):
    model.model.layers[0].mlp.up_proj.weight[5] = float("nan")  # one row: every later activation is NaN


def _steer_unk(sign):
    """Residual dimension 0 holds a large constant at every position, and only <unk>'s head row reads
    it: the model then (sign +1) samples <unk> almost surely, or (sign -1) never does."""
    def change(model):
        model.model.embed_tokens.weight[:, 0] = 100.0
        head = model.lm_head.weight  # (V, d)
        head[:, 0] = 0.0
        head[UNK, 0] = 10.0 * sign
    return change


def _nan_unk_embedding(model):
    model.model.embed_tokens.weight[UNK] = float("nan")  # finite on the data; NaN once <unk> is in context


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILL_CACHE", str(root / "cache"))
        tok = make_tokenizer(root / "tok")
        paths = {"data": str(write_text(root / "eval.jsonl", 40, seed=1))}
        for name, seed in (("teacher", 1), ("student", 2)):
            paths[name] = _save(make_llama(root / name, vocab_size=len(tok), layers=1, hidden=32, seed=seed), tok,
                                root / name)
        paths["broken"] = _edit(paths["student"], root / "broken", tok, _nan_mlp_row)
        paths["broken_teacher"] = _edit(paths["teacher"], root / "broken_teacher", tok, _nan_mlp_row)
        yield root, tok, paths


def _strict_json(text):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def _no_nan(value):
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_no_nan(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_no_nan(v) for v in value)
    return True


def _quality(metrics):
    return {k: metrics[k] for k in (*LIKELIHOOD_KEYS, *FIDELITY_KEYS, *GENERATION_KEYS, "eval_tokens")}


def test_a_nan_student_gets_nulls_and_a_status_and_the_others_do_not_change(ws, tmp_path):
    root, tok, p = ws
    healthy = evaluate_models({"student": p["student"]}, p["data"], teacher=p["teacher"], **SMALL)
    results = evaluate_models({"student": p["student"], "broken": p["broken"]}, p["data"], teacher=p["teacher"],
                              **SMALL)
    assert _no_nan(results)  # evaluate_models itself hands out no NaN
    models = results["models"]
    bad = models["broken"]
    n = bad["eval_tokens"]
    assert n > 0 and bad["nonfinite_positions"] == n  # one NaN row reaches every position
    assert bad["finite"] is False
    assert bad["status"] == f"non-finite outputs at {n} of {n} positions; generation skipped"
    for key in (*LIKELIHOOD_KEYS, *FIDELITY_KEYS, *GENERATION_KEYS):
        assert bad[key] is None, key  # top1_agreement was a number over NaN rows; eval_ce was NaN
    assert set(bad["nonfinite_metrics"]) == {*LIKELIHOOD_KEYS, *FIDELITY_KEYS, "teacher_nll", "distinct_1",
                                             "distinct_2"}  # valid_python does not apply to text prompts
    assert all("broken" not in s["completions"] for s in results["samples"])  # not sampled: no crash

    for name in ("teacher", "student"):
        assert models[name]["finite"] is True and models[name]["status"] == "ok"
        assert models[name]["nonfinite_positions"] == 0 and models[name]["nonfinite_metrics"] == []
        assert _quality(models[name]) == _quality(healthy["models"][name])  # exactly what they were alone
    assert [s["completions"] for s in results["samples"]] == [s["completions"] for s in healthy["samples"]]

    json_path, html_path = write_report(results, tmp_path)
    assert _strict_json(json_path.read_text())["models"]["broken"]["eval_ce"] is None
    page = html_path.read_text()
    assert "id='non-finite'" in page and "<b>broken</b>: non-finite outputs at" in page
    assert page.count(f"<td class='nonfinite'>{NONFINITE}</td>") == len(bad["nonfinite_metrics"])
    assert ">nan<" not in page.lower() and "No completions from broken" in page


def test_a_nan_teacher_is_marked_and_nulls_every_fidelity_metric(ws, tmp_path):
    root, tok, p = ws
    healthy = evaluate_models({"student": p["student"]}, p["data"], teacher=p["teacher"], **SMALL)["models"]
    results = evaluate_models({"student": p["student"]}, p["data"], teacher=p["broken_teacher"], **SMALL)
    assert _no_nan(results)
    teacher, student = results["models"]["teacher"], results["models"]["student"]
    n = teacher["eval_tokens"]
    assert teacher["finite"] is False and teacher["nonfinite_positions"] == n
    assert teacher["status"] == (f"non-finite outputs at {n} of {n} positions; generation skipped; "
                                 "no model's fidelity to the teacher or teacher NLL is computed")
    assert all(teacher[k] is None for k in (*LIKELIHOOD_KEYS, *GENERATION_KEYS))

    assert student["finite"] is True and student["nonfinite_positions"] == 0
    assert student["status"] == "fidelity to the teacher not computed: the teacher's outputs are non-finite"
    assert all(student[k] is None for k in (*FIDELITY_KEYS, "teacher_nll"))
    assert student["nonfinite_metrics"] == [*FIDELITY_KEYS, "teacher_nll"]
    for key in (*LIKELIHOOD_KEYS, "distinct_1", "distinct_2"):
        assert student[key] == healthy["student"][key], key  # its own metrics stand

    json_path, html_path = write_report(results, tmp_path)
    _strict_json(json_path.read_text())
    page = html_path.read_text()
    assert "<b>teacher</b>: non-finite outputs at" in page
    assert page.count(f"<td class='nonfinite'>{NONFINITE}</td>") == 6  # the student's five fidelity metrics and its NLL
    assert page.count(f"<td class='ref nonfinite'>{NONFINITE}</td>") == len(teacher["nonfinite_metrics"])


def test_nonfinite_positions_are_counted_exactly(ws):
    """A NaN embedding row for one word: only the blocks holding it go NaN. The count equals the rows
    with a non-finite value in the dense logits, and the model's metrics are null all the same."""
    from distill.data import collate, load_tokenized
    from distill.models import load_causal_lm

    root, tok, p = ws
    horse = tok.convert_tokens_to_ids("horse")
    path = _edit(p["student"], root / "nan_horse", tok, lambda m: m.model.embed_tokens.weight[horse].fill_(math.nan))
    results = evaluate_models({"m": path}, p["data"], **{**SMALL, "max_length": 8, "num_prompts": 0})
    got = results["models"]["m"]

    dataset = load_tokenized(p["data"], tokenizer=tok, format="text", packing=True, max_length=8)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where evaluate_models ran: NaN spreads per kernel
    model = load_causal_lm(path).eval().to(device)
    batch = collate([dict(input_ids=i, labels=l) for i, l in zip(dataset["input_ids"], dataset["labels"])],
                    pad_token_id=tok.pad_token_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    expected = int((~torch.isfinite(logits[mask]).all(-1)).sum())
    assert 0 < expected < got["eval_tokens"]
    assert got["nonfinite_positions"] == expected
    assert got["status"] == f"non-finite outputs at {expected} of {got['eval_tokens']} positions"
    assert all(got[k] is None for k in LIKELIHOOD_KEYS)


def test_the_sampling_guard_keeps_nan_logits_from_crashing_and_healthy_samples_unchanged(ws):
    from distill.models import load_causal_lm

    root, tok, p = ws
    prompts = [[tok.eos_token_id] + tok("the big dog sees", add_special_tokens=False)["input_ids"],
               [tok.eos_token_id] + tok("a cat", add_special_tokens=False)["input_ids"]]
    args = dict(max_new_tokens=5, batch_size=2, seed=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                device="cpu")
    broken = load_causal_lm(p["broken"]).eval()
    with pytest.raises(RuntimeError):  # why the guard exists: multinomial refuses NaN probabilities
        sample_completions(broken, prompts, **args)
    guard = NonFiniteGuard()
    sample_completions(broken, prompts, **args, guard=guard)
    assert guard.fired()

    healthy = load_causal_lm(p["student"]).eval()
    guard = NonFiniteGuard()
    assert sample_completions(healthy, prompts, **args, guard=guard) == sample_completions(healthy, prompts, **args)
    assert not guard.fired()


def test_non_finite_only_while_sampling_or_scoring(ws):
    """Finite on the data, NaN once <unk> is in context: a model that samples <unk> goes NaN while
    sampling (its generation metrics are null, its likelihood stands); a teacher that goes NaN
    scoring a student's <unk> is marked, and that student's teacher NLL is null."""
    root, tok, p = ws
    teacher = _edit(p["teacher"], root / "unk_teacher", tok,
                    lambda m: (_steer_unk(-1)(m), _nan_unk_embedding(m)))
    sampler = _edit(p["student"], root / "sampler", tok, _steer_unk(+1))
    nan_sampler = _edit(sampler, root / "nan_sampler", tok, _nan_unk_embedding)
    results = evaluate_models({"sampler": sampler, "nan_sampler": nan_sampler}, p["data"], teacher=teacher, **SMALL)
    assert _no_nan(results)
    models = results["models"]

    t = models["teacher"]
    assert t["nonfinite_positions"] == 0 and t["finite"] is False
    assert t["status"] == "non-finite outputs while scoring completions"
    assert t["eval_ce"] is not None and t["teacher_nll"] is not None  # its own samples avoid <unk>

    s = models["sampler"]
    assert s["finite"] is True and s["eval_ce"] is not None and s["distinct_1"] is not None
    assert s["teacher_nll"] is None and s["nonfinite_metrics"] == ["teacher_nll"]
    assert s["status"] == "teacher NLL not computed: the teacher's outputs are non-finite"

    ns = models["nan_sampler"]
    assert ns["nonfinite_positions"] == 0 and ns["finite"] is False
    assert ns["status"] == "non-finite outputs while sampling; generation metrics not computed"
    assert ns["eval_ce"] == pytest.approx(s["eval_ce"])  # the NaN row is never read on the data
    assert all(ns[k] is None for k in GENERATION_KEYS)
    assert all("nan_sampler" not in sample["completions"] for sample in results["samples"])


@pytest.mark.slow
def test_cli_marks_a_nan_model_warns_on_stderr_and_exits_0(ws, tmp_path):
    root, tok, p = ws
    out = tmp_path / "report"
    result = run_cli("eval", "--teacher", p["teacher"], "--model", f"student={p['student']}",
                     "--model", f"broken={p['broken']}", "--data", p["data"], "--out", str(out),
                     "--max-length", "32", "--prompts", "2", "--max-new-tokens", "4", "--batch-size", "4",
                     env={"DISTILL_CACHE": str(root / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.split("\n\nwrote")[0]
    rows = [re.split(r"\s{2,}", line.strip()) for line in printed.splitlines()[1:]]
    table = {row[0]: row[1:] for row in rows}
    assert table["eval cross-entropy"][2] == NONFINITE and table["top-1 agreement with teacher"][2] == NONFINITE
    assert table["generation tokens/s, batch 1"][2] == NONFINITE  # not sampled from, so not timed
    assert table["top-1 agreement with teacher"][0] == "—"  # the teacher's n/a is not a non-finite
    assert NONFINITE not in "".join(table["eval cross-entropy"][:2]) and "nan" not in printed.lower()
    results = _strict_json((out / "eval.json").read_text())
    n = results["models"]["broken"]["eval_tokens"]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("distill: warning:")]
    assert warnings == [f"distill: warning: model 'broken': non-finite outputs at {n} of {n} positions; "
                        "generation and speed skipped"]
    assert results["models"]["broken"]["finite"] is False
    assert set(SPEED_KEYS) <= set(results["models"]["broken"]["nonfinite_metrics"])
    assert results["models"]["student"]["forward_tokens_per_s"] > 0
    page = (out / "report.html").read_text()
    assert f"<b>broken</b>: non-finite outputs at {n} of {n} positions" in page
    assert "<span class=badge>non-finite</span>" in page
    shutil.rmtree(out)
