"""Test helpers: running the CLI, reading metrics. Tiny models and data come from distill.toy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from distill.toy import make_llama, make_tokenizer, write_prompt_completion, write_text  # noqa: F401


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, launcher: list[str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``distill ARGS`` in a fresh process (or under ``launcher``), capturing output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = (launcher or [sys.executable, "-m", "distill"]) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
