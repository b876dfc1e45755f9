"""The on-policy experiment's data: Python functions of the bundled corpus cut at their docstring.

Each example is a function with a docstring and a body: ``prompt`` = the ``def`` line through the
docstring's closing quotes (as ``distill eval`` prompts are made), ``completion`` = the rest of the
function's body (a newline first, then the indented code, as it stands in the file). Written as
prompt/completion JSON Lines (off-policy KD trains on the real bodies) and as prompt-only JSON Lines
(on-policy KD: the student writes the bodies).

    python benchmarks/onpolicy_data.py OUT_DIR [--max-prompt-tokens 96] [--max-completion-tokens 160]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import pyarrow.parquet as pq

from distill.evaluate import function_examples
from distill.quickstart import CORPUS, TEACHER


def examples_of(source: str) -> list[tuple[str, str]]:
    """(prompt, completion) for every function with a docstring and more body in ``source``: the
    prompts `distill eval` uses, the real body (stripped of trailing blank lines) as completion."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarnings of old escape sequences in the stdlib
        return [(prompt, body.rstrip() + "\n") for _, prompt, body in function_examples(source)]


def write(out: Path, *, split: str, max_prompt_tokens: int, max_completion_tokens: int) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TEACHER)
    texts = pq.read_table(CORPUS / f"{split}.parquet").column("text").to_pylist()
    rows = []
    for text in texts:
        for prompt, completion in examples_of(text):
            n_p = len(tok(prompt, add_special_tokens=False)["input_ids"])
            n_c = len(tok(completion, add_special_tokens=False)["input_ids"])
            if n_p <= max_prompt_tokens and n_c <= max_completion_tokens:
                rows.append({"prompt": prompt, "completion": completion})
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{split}_pc.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with (out / f"{split}_prompts.jsonl").open("w") as f:
        f.writelines(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows)
    return {"split": split, "examples": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-prompt-tokens", type=int, default=96)
    parser.add_argument("--max-completion-tokens", type=int, default=160)
    args = parser.parse_args()
    for split in ("train", "eval"):
        print(write(args.out, split=split, max_prompt_tokens=args.max_prompt_tokens,
                    max_completion_tokens=args.max_completion_tokens))


if __name__ == "__main__":
    main()
