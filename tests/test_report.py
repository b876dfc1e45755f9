"""distill.report (eval.json + a self-contained report.html) and `distill eval` through the CLI."""

import json
import re

import pytest

from distill.errors import UserError
from distill.report import best_models, write_report
from tests.helpers import run_cli


def fake_results(python=True):
    """The shape evaluate_models returns, with made-up numbers (no models needed)."""
    def model(ce, agree, nll, speed):
        return {"path": "/models/x", "params": 123456, "size_bytes": 500000, "size_mb": 0.5, "eval_tokens": 4096,
                "eval_ce": ce, "perplexity": 2.718281828 ** ce, "top1_accuracy": 0.4, "ece": 0.05,
                "top1_agreement": agree, "forward_kl": None if agree is None else 0.3,
                "reverse_kl": None if agree is None else 0.25, "teacher_nll": nll,
                "valid_python": 0.5 if python else None, "distinct_1": 0.4, "distinct_2": 0.8, "completion_tokens": 100,
                "generate_tokens_per_s_batch1": speed, "generate_tokens_per_s_batched": 4 * speed,
                "forward_tokens_per_s": 100 * speed}

    return {
        "data": "corpus/eval.parquet",
        "settings": {"teacher": "/models/teacher", "models": {"baseline": "/b", "distilled": "/d"}, "max_length": 256,
                     "num_prompts": 2, "prompts_found": 2, "prompt_mode": "python", "max_new_tokens": 64,
                     "batch_size": 8, "seed": 0, "speed": True, "dtype": "float32", "ece_bins": 15},
        "models": {"teacher": model(2.0, None, 1.5, 50.0), "baseline": model(2.6, 0.6, 2.4, 200.0),
                   "distilled <b>": model(2.4, 0.7, 2.1, 200.0)},
        "samples": [{"prompt": 'def f(url):\n    """Fetch http://example.com/<x>."""', "source": "row 0, line 1",
                     "completions": {"teacher": "\n    return <script>alert(1)</script>",
                                     "baseline": "\n    return 'https://evil.example/a.js'",
                                     "distilled <b>": "\n    pass"}},
                    {"prompt": "def g():\n    '''G.'''", "source": "row 1, line 9",
                     "completions": {"teacher": "\n    return 1", "baseline": "", "distilled <b>": "\n    return 2"}}],
        "machine": {"platform": "Linux", "cpu_count": 2, "torch": "2.x", "device": "cpu",
                    "date": "2025-01-01T00:00:00+00:00"},
    }


def write_run(path, n=40):
    path.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 3.0 / s, "kd": 1.0, "ce": 2.0}) for s in range(1, n + 1)]
    lines += [json.dumps({"step": s, "eval/ce": 2.0 + 1 / s, "eval/ppl": 8.0}) for s in (10, 20, 40)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\nnot json\n")
    return path


def assert_self_contained(page: str):
    assert not re.search(r"https?:|ftp:|file:", page, re.I)
    assert "//" not in re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page).replace("&#58;//", "")
    assert not re.search(r"<script|<link|<iframe|<object|<embed|@import|url\(", page, re.I)
    for tag in re.findall(r"<img\b[^>]*>", page):
        assert re.search(r"src='data:image/png;base64,[A-Za-z0-9+/=]+'", tag), tag
    for attr in re.findall(r"\b(?:src|href)\s*=\s*['\"]?([^'\" >]*)", page, re.I):
        assert attr.startswith("data:"), attr


def test_report_round_trips_json_and_is_self_contained(tmp_path):
    results = fake_results()
    json_path, html_path = write_report(results, tmp_path / "out", runs={"distilled <b>": write_run(tmp_path / "run")})
    assert json.loads(json_path.read_text()) == results
    page = html_path.read_text()
    assert_self_contained(page)
    assert page.count("<img") >= 9  # 7 metric charts, speed, forward speed ... and the curves
    for name in ("teacher", "baseline", "distilled &lt;b&gt;"):
        assert name in page
    assert "distilled <b>" not in page and "<script>alert" not in page  # escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "def g():" in page  # the samples, as text
    assert "id='loss-curves'" in page
    assert not list((tmp_path / "out").glob(".*tmp*"))  # written atomically: no temporary left


def test_report_without_runs_teacher_or_python(tmp_path):
    results = fake_results(python=False)
    del results["models"]["teacher"]
    for sample in results["samples"]:
        sample["completions"].pop("teacher")
    _, html_path = write_report(results, tmp_path)
    page = html_path.read_text()
    assert_self_contained(page)
    assert "loss-curves" not in page and "valid Python<span class='dir'>" not in page  # no such row
    assert best_models(results, "eval_ce") == {"distilled <b>"}  # no teacher: the best of all models


def test_best_models_skips_the_teacher_ties_and_neutral_metrics():
    results = fake_results()
    assert best_models(results, "teacher_nll") == {"distilled <b>"}  # the teacher's 1.5 is a reference
    assert best_models(results, "top1_agreement") == {"distilled <b>"}
    assert best_models(results, "generate_tokens_per_s_batch1") == set()  # a tie between all
    assert best_models(results, "distinct_1") == set()  # no better direction


def test_missing_run_metrics_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="metrics.jsonl"):
        write_report(fake_results(), tmp_path, runs={"x": tmp_path / "nope"})


# ---------------------------------------------------------------------------------------------
# The CLI


@pytest.mark.slow
def test_cli_eval_happy_path(workspace, tmp_path):
    teacher = str(workspace / "teacher_run" / "student")
    out = tmp_path / "report"
    result = run_cli("eval", "--teacher", teacher, "--model", f"copy={teacher}", "--data",
                     str(workspace / "eval.jsonl"), "--out", str(out), "--run", f"teacher={workspace / 'teacher_run'}",
                     "--max-length", "32", "--prompts", "2", "--max-new-tokens", "4", "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher" in result.stdout and "copy" in result.stdout and "perplexity" in result.stdout
    assert str(out / "report.html") in result.stdout
    results = json.loads((out / "eval.json").read_text())
    assert list(results["models"]) == ["teacher", "copy"]
    assert results["models"]["copy"]["top1_agreement"] == 1.0
    assert results["models"]["copy"]["forward_tokens_per_s"] > 0  # measured (its value is never checked)
    page = (out / "report.html").read_text()
    assert_self_contained(page)
    assert "id='loss-curves'" in page


@pytest.mark.parametrize("args, message", [
    (["--model", "nameonly"], "expected NAME=PATH"),
    (["--model", "=/x"], "expected NAME=PATH"),
    (["--model", "a=/no/such/model"], "not found: /no/such/model"),
    (["--teacher", "/no/such/teacher", "--model", "a=/no/such/model"], "not found"),
    ([], "no models"),
    (["--model", "a=/x", "--model", "a=/y"], "given twice"),
])
def test_cli_eval_user_errors_exit_2(tmp_path, capsys, args, message):
    from distill.cli import main

    assert main(["eval", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distill: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_cli_eval_bad_run_dir_exits_2_before_evaluating(tmp_path, capsys):
    from distill.cli import main

    model = tmp_path / "m"
    model.mkdir()
    assert main(["eval", "--data", "x.jsonl", "--model", f"a={model}", "--run", f"a={tmp_path / 'run'}"]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_report_and_table_mark_non_finite_models(tmp_path):
    """A model marked non-finite (nulls, ``nonfinite_metrics``, a status) and a raw NaN or infinity
    that slipped in: strict JSON, a warning naming the model, "non-finite" cells, charts that skip them."""
    from distill.cli import _eval_table
    from distill.report import NONFINITE

    results = fake_results()
    bad = results["models"]["baseline"]
    lacking = ["eval_ce", "perplexity", "top1_accuracy", "ece", "top1_agreement", "forward_kl", "reverse_kl"]
    bad.update(dict.fromkeys(lacking), finite=False, nonfinite_positions=4096, nonfinite_metrics=lacking,
               status="non-finite outputs at 4096 of 4096 positions")
    results["models"]["distilled <b>"].update(distinct_1=float("nan"), generate_tokens_per_s_batched=float("inf"))
    json_path, html_path = write_report(results, tmp_path)

    def refuse(token):
        raise ValueError(token)
    loaded = json.loads(json_path.read_text(), parse_constant=refuse)
    assert loaded["models"]["distilled <b>"]["distinct_1"] is None and loaded["models"]["baseline"]["eval_ce"] is None
    page = html_path.read_text()
    assert_self_contained(page)
    assert "id='non-finite'" in page and "<b>baseline</b>: non-finite outputs at 4096 of 4096 positions" in page
    assert page.count(f"<td class='nonfinite'>{NONFINITE}</td>") == len(lacking) + 2  # + the raw NaN and inf
    assert ">nan<" not in page.lower() and ">inf<" not in page.lower()
    assert page.count("<img") >= 8  # every chart drawn: the speed chart skips the infinite model
    assert best_models(results, "eval_ce") == set()  # one student left: nothing to choose between

    lines = {line[:30].strip(): line[30:].split() for line in _eval_table(results).splitlines()[1:]}
    assert lines["eval cross-entropy"] == ["2.0000", NONFINITE, "2.4000"]
    assert lines["top-1 agreement with teacher"] == ["—", NONFINITE, "70.0%"]
    assert lines["distinct-1"] == ["0.400", "0.400", NONFINITE]
