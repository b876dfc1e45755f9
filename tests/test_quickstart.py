"""`distill quickstart` end to end on the bundled assets, shortened (CI smoke run)."""

import json

import pytest

from distill.quickstart import CORPUS, TEACHER
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def test_bundled_assets_are_complete():
    from transformers import AutoConfig, AutoTokenizer

    assert (TEACHER / "model.safetensors").stat().st_size <= 32 * 2**20
    tok = AutoTokenizer.from_pretrained(TEACHER)
    assert len(tok) == AutoConfig.from_pretrained(TEACHER).vocab_size == 8192
    manifest = json.loads((CORPUS / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "eval", "test"}
    assert (CORPUS / "LICENSE-CPython.txt").is_file()


def test_quickstart_smoke(tmp_path):
    out = tmp_path / "qs"
    result = run_cli("quickstart", "--out", str(out), "--steps", "3", "--prompts", "2", "--max-eval-examples", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "quickstart.json").read_text())
    assert set(summary["models"]) == {"teacher", "baseline", "distilled"}
    for name, metrics in summary["models"].items():
        assert metrics["params"] > 0 and metrics["perplexity"] > 1
    assert summary["models"]["teacher"]["params"] > summary["models"]["distilled"]["params"]
    assert (out / "report.html").is_file() and (out / "eval.json").is_file()
    assert "top-1 agreement" in result.stdout


def test_quickstart_classify_smoke(tmp_path):
    out = tmp_path / "qc"
    result = run_cli("quickstart", "--task", "classify", "--out", str(out), "--steps", "3", "--max-eval-examples", "64")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "quickstart.json").read_text())
    assert set(summary["models"]) == {"teacher", "baseline", "distilled"}
    for name, metrics in summary["models"].items():
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["latency_ms_p50"] > 0, name
    assert summary["models"]["teacher"]["params"] > summary["models"]["distilled"]["params"]
    results = json.loads((out / "eval.json").read_text())
    assert results["task"] == "classification" and results["labels"] == ["fresh", "rotten"]
    assert sum(map(sum, results["models"]["distilled"]["confusion"])) == 64
    assert (out / "report.html").is_file() and "test accuracy" in result.stdout
