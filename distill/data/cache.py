"""The tokenization cache: one folder per fingerprint, written atomically, with a manifest.

Layout under ``cache_dir``::

    <fingerprint>/            a ``Dataset.save_to_disk`` folder
        manifest.json         what went in: source identity, tokenizer hash, formatting args
    .tmp-<fingerprint>-<pid>-...  a write in progress (renamed to <fingerprint>/ when complete;
                              removed by the next write once process <pid> is gone, e.g. killed)

The fingerprint is the sha256 of the manifest's ``key``, so any change of data, tokenizer or
formatting arguments gives a new folder; a folder without a manifest is not a cache hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import datasets

from distill import faults

MANIFEST = "manifest.json"
CACHE_VERSION = 2  # bump when the tokenized output of the same inputs changes


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides how a tokenizer turns text into ids.

    Covers the class, the serialized backend (vocab, merges, normalizer, pre-tokenizer,
    post-processor; or the vocab for tokenizers without one), the special tokens and their ids,
    and the chat template(s).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = {
        "class": type(tokenizer).__name__,
        "backend": body,
        "special_tokens": {
            name: [str(token), tokenizer.convert_tokens_to_ids(str(token))]
            for name, token in sorted(tokenizer.special_tokens_map.items())
            if isinstance(token, str)
        },
        "added": sorted(
            (index, str(token)) for index, token in tokenizer.added_tokens_decoder.items()
        ),
        "chat_template": getattr(tokenizer, "chat_template", None),
        # Catches settings outside the serialized backend (e.g. add_bos_token on slow tokenizers).
        "probe": tokenizer("Hello, world! 123")["input_ids"],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cache_fingerprint(key: dict) -> str:
    """sha256 of a JSON-serializable ``key`` (sorted keys)."""
    blob = json.dumps({"cache_version": CACHE_VERSION, **key}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_cached(cache_dir: str | os.PathLike, fingerprint: str) -> datasets.Dataset | None:
    """The cached dataset for ``fingerprint``, or ``None`` when there is no complete entry."""
    path = os.path.join(cache_dir, fingerprint)
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        return None
    return datasets.load_from_disk(path)


def save_cached(
    dataset: datasets.Dataset,
    cache_dir: str | os.PathLike,
    fingerprint: str,
    key: dict,
    **info,
) -> datasets.Dataset:
    """Write ``dataset`` under ``cache_dir/fingerprint`` atomically; returns the on-disk copy.

    The manifest records ``key`` (what the fingerprint hashes) and any extra ``info``.

    The dataset and its manifest go to a temporary folder that is renamed when complete. If
    another process finished the same entry first, its copy is kept and ours discarded.
    """
    os.makedirs(cache_dir, exist_ok=True)
    _remove_orphans(cache_dir)
    final = os.path.join(cache_dir, fingerprint)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{fingerprint[:16]}-{os.getpid()}-", dir=cache_dir)
    try:
        dataset.save_to_disk(tmp)
        faults.point("tokenized")
        manifest = {"fingerprint": fingerprint, "cache_version": CACHE_VERSION, "key": key,
                    "num_rows": len(dataset), **info}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        if os.path.isdir(final) and not os.path.isfile(os.path.join(final, MANIFEST)):
            shutil.rmtree(final)  # not a cache entry: a leftover without a manifest
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(os.path.join(final, MANIFEST)):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(final)


def _remove_orphans(cache_dir) -> None:
    """Delete the temporary folders of writers that no longer run (a killed process leaves one)."""
    for name in os.listdir(cache_dir):
        parts = name.split("-")
        if not (name.startswith(".tmp-") and len(parts) >= 4 and parts[2].isdigit()):
            continue
        try:
            os.kill(int(parts[2]), 0)  # raises if no such process
        except ProcessLookupError:
            shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
        except (PermissionError, OverflowError):  # another user's live process, or not a pid
            pass
