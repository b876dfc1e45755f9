"""``load_tokenized``: a source string in, a tokenized ``datasets.Dataset`` out, cached."""

from __future__ import annotations

import functools
import os

import datasets

from distill.data import formats
from distill.data.cache import cache_fingerprint, load_cached, save_cached, tokenizer_fingerprint
from distill.data.sources import (
    DataError,
    first_bad_json,
    load_raw,
    local_fingerprint,
    locate_rows,
    resolve_source,
)


def load_tokenized(
    source: str,
    *,
    tokenizer,
    format: str = "auto",
    max_length: int = 512,
    packing: bool = True,
    split: str = "train",
    text_field: str = "text",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
    cache_dir: str | os.PathLike | None = None,
    max_examples: int | None = None,
    teacher_tokenizer=None,
    teacher_max_length: int | None = None,
) -> datasets.Dataset:
    """Load ``source`` and tokenize it into columns ``input_ids`` and ``labels``.

    Args:
        source: a local .jsonl/.json/.parquet/.txt file, a directory or glob of such files, or a
            hub dataset id (see ``distill.data.sources`` for how it is resolved; each .txt file is
            one document).
        tokenizer: a Hugging Face tokenizer with an EOS token.
        format: "text", "prompt_completion", "chat", "prompt" (prompt-only), or "auto" (chosen by the columns present:
            ``messages_field`` -> chat, ``prompt_field`` + ``completion_field`` ->
            prompt_completion, ``text_field`` -> text, ``prompt_field`` alone -> prompt).
            ``data_format(result)`` tells which it was.
        max_length: the block length when packing text, else the truncation length.
        packing: pack text into blocks of exactly ``max_length``; ignored by supervised formats
            (see ``distill.data.formats`` for the rules of each format).
        split: the split of a hub dataset; local files are always one split.
        cache_dir: where tokenized results are kept (``<cache_dir>/<fingerprint>/``, plus
            ``datasets``' own arrow files of local sources under ``<cache_dir>/hf-datasets``).
            A second call with the same data, tokenizer and arguments loads from there without
            tokenizing. ``None``: no cache of ours.
        max_examples: use only the first N raw examples (before dropping and packing).
        teacher_tokenizer: a teacher on another tokenizer (cross-tokenizer training): chat rows also
            get the teacher's own rendering, ``teacher_input_ids`` / ``teacher_labels`` (at most
            ``teacher_max_length`` tokens); other formats are unchanged.

    Returns:
        A dataset whose rows hold ``input_ids`` and ``labels``, lists of ints of equal length
        ``<= max_length``; labels are unshifted with -100 on unsupervised positions.

    Raises:
        DataError: missing file, unreadable or empty data, missing column, unknown format, no
            supervised tokens, a tokenizer without EOS, a chat template that is not prefix-stable.
            A problem in one row names where it is, as a user opens it in an editor:
            ``/data/train.jsonl:17: not valid JSON (...)`` or ``/data/train.jsonl:17: field 'text'
            is missing or null, expected a string`` (see ``distill.data.sources.locate_rows``).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"max_length must be a positive integer, got {max_length!r}")
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise DataError(f"max_examples must be a positive integer or None, got {max_examples!r}")
    if format != "auto" and format not in formats.FORMATS:
        raise DataError(f"unknown data format {format!r}: use auto, {', '.join(formats.FORMATS)}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token: set tokenizer.eos_token")

    src = resolve_source(source)
    raw = None
    if src.is_local:
        source_key = {"files": local_fingerprint(src)}
        hf_cache_dir = os.path.join(cache_dir, "hf-datasets") if cache_dir is not None else None
    else:
        # Hub data: datasets' fingerprint of the downloaded files identifies the version.
        hf_cache_dir = None
        raw = load_raw(src, split=split, hf_cache_dir=hf_cache_dir)
        source_key = {"hub_id": src.hub_id, "split": split, "fingerprint": raw._fingerprint}
    key = {
        "source": source_key,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "format": format,
        "max_length": max_length,
        "packing": packing,
        "fields": [text_field, prompt_field, completion_field, messages_field],
        "max_examples": max_examples,
    }
    if teacher_tokenizer is not None:
        key["teacher"] = {"tokenizer": tokenizer_fingerprint(teacher_tokenizer), "max_length": teacher_max_length}
    fingerprint = cache_fingerprint(key)
    if cache_dir is not None:
        cached = load_cached(cache_dir, fingerprint)
        if cached is not None:
            return cached

    if raw is None:
        raw = load_raw(src, split=split, hf_cache_dir=hf_cache_dir)
    # Rows keep their global index under select(range(n)), so places are found in the files.
    locate = functools.partial(locate_rows, src, num_rows=len(raw))
    if max_examples is not None:
        raw = raw.select(range(min(max_examples, len(raw))))
    concrete = formats.resolve_format(
        format,
        raw.column_names,
        text_field=text_field,
        prompt_field=prompt_field,
        completion_field=completion_field,
        messages_field=messages_field,
        where=src.describe(),
    )
    try:
        tokenized = formats.tokenize_dataset(
            raw,
            tokenizer=tokenizer,
            format=concrete,
            max_length=max_length,
            packing=packing,
            text_field=text_field,
            prompt_field=prompt_field,
            completion_field=completion_field,
            messages_field=messages_field,
            fingerprint=fingerprint,
            locate=locate,
            teacher_tokenizer=teacher_tokenizer,
            teacher_max_length=teacher_max_length,
        )
    except UnicodeDecodeError as e:  # pyarrow can read bytes that are not UTF-8 into a string
        bad = first_bad_json(src) if src.builder == "json" else None
        raise DataError(bad or f"{src.describe()} is not valid UTF-8 text ({e.reason})") from e
    tokenized.info.description = f"{FORMAT_TAG}{concrete}"  # saved with it: see data_format
    if cache_dir is None:
        return tokenized
    return save_cached(tokenized, cache_dir, fingerprint, key, resolved_format=concrete)


FORMAT_TAG = "distill format: "


def data_format(dataset: datasets.Dataset) -> str | None:
    """The concrete format (text, prompt_completion, chat, prompt) a ``load_tokenized`` result was made
    from, or None for a dataset made some other way."""
    description = dataset.info.description or ""
    return description[len(FORMAT_TAG):] if description.startswith(FORMAT_TAG) else None
