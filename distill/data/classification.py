"""Labelled text for sequence classification: ``text`` (and an optional ``text_pair``) and a ``label``
per row, tokenized for the student (and, when it reads another tokenizer, for the teacher).

Labels are ints (class indices) or names. The class names of a run are decided once
(``class_names``) and saved with the student (``config.id2label``): ``data.labels`` when given,
else the teacher's own names (its ``id2label``, unless those are transformers' placeholders
``LABEL_0``, ``LABEL_1``, ...), else the training data's (sorted names, or ``"0"`` .. ``"C-1"`` for
int labels). A row whose label is not one of them is a ``DataError`` that names the row's place.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import datasets
import torch

from distill.data.sources import DataError, load_raw, locate_rows, resolve_source

_PLACEHOLDER = re.compile(r"^LABEL_\d+$")


def raw_rows(source: str, *, split: str = "train", fields: Sequence[str], max_examples: Optional[int] = None,
             cache_dir: str | os.PathLike | None = None):
    """(rows, src) of ``source``: the raw examples, checked to have every column in ``fields``."""
    src = resolve_source(source)
    hf_cache_dir = os.path.join(cache_dir, "hf-datasets") if cache_dir is not None and src.is_local else None
    raw = load_raw(src, split=split, hf_cache_dir=hf_cache_dir)
    missing = [f for f in fields if f not in raw.column_names]
    if missing:
        raise DataError(f"{src.describe()} has no column {missing[0]!r} (its columns: {', '.join(raw.column_names)}); "
                        "set data.text_field / data.text_pair_field / data.label_field")
    if max_examples is not None:
        raw = raw.select(range(min(max_examples, len(raw))))
    return raw, src


def meaningful_names(config) -> Optional[list[str]]:
    """A model config's class names, or None when it has only transformers' placeholders."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label, key=int)]
    return None if not names or all(_PLACEHOLDER.match(n) for n in names) else names


def class_names(values: Sequence, *, given: Optional[Sequence[str]] = None,
                teacher: Optional[Sequence[str]] = None, where: str = "the data") -> list[str]:
    """The class names in index order: ``given`` (data.labels), else ``teacher``'s, else the data's."""
    if given is not None and teacher is not None and list(given) != list(teacher):
        raise DataError(f"data.labels {list(given)} differ from the teacher's classes {list(teacher)} (its config's "
                        "id2label): list them in the teacher's order, or leave data.labels out")
    if given is not None or teacher is not None:
        return list(given if given is not None else teacher)
    kinds = {type(v) for v in values if v is not None}
    if kinds and kinds <= {str}:
        names = sorted(set(values) - {None})
    elif kinds and kinds <= {int}:
        names = [str(i) for i in range(max(v for v in values if v is not None) + 1)]
    else:
        raise DataError(f"{where}: labels must be all class indices (ints) or all names (strings), found "
                        f"{', '.join(sorted(k.__name__ for k in kinds)) or 'none'}; or list the names in data.labels")
    if len(names) < 2:
        raise DataError(f"{where} has a single class ({names}): a classifier needs at least 2 (or list them in "
                        "data.labels)")
    return names


def label_ids(values: Sequence, names: Sequence[str], *, field: str, locate) -> list[int]:
    """Each row's class index: an int in range, or a name of ``names`` (a digit string also matches
    the index when the names are ``"0"``, ``"1"``, ...). ``locate(indices)`` names rows' places."""
    index = {n: i for i, n in enumerate(names)}
    out, bad = [], None
    for row, v in enumerate(values):
        if isinstance(v, bool) or v is None or not isinstance(v, (int, str)):
            bad = (row, f"field {field!r} is {'missing or null' if v is None else repr(v)}, expected a class index "
                        f"or name")
        elif isinstance(v, int):
            if not 0 <= v < len(names):
                bad = (row, f"label {v} is outside 0..{len(names) - 1} (the classes: {', '.join(names)})")
            else:
                out.append(v)
                continue
        elif v in index:
            out.append(index[v])
            continue
        else:
            bad = (row, f"label {v!r} is not one of the classes {', '.join(map(repr, names))} (data.labels, or the "
                        "teacher's id2label)")
        break
    if bad is not None:
        raise DataError(f"{locate([bad[0]])[0]}: {bad[1]}")
    return out


def _texts(values: Sequence, field: str, locate) -> list[str]:
    for row, v in enumerate(values):
        if not isinstance(v, str):
            raise DataError(f"{locate([row])[0]}: field {field!r} is "
                            f"{'missing or null' if v is None else type(v).__name__}, expected a string")
    return list(values)


def load_classification(source: str, *, tokenizer, names: Optional[Sequence[str]], text_field: str = "text",
                        text_pair_field: Optional[str] = None, label_field: str = "label", max_length: int = 512,
                        split: str = "train", max_examples: Optional[int] = None, teacher_tokenizer=None,
                        cache_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """Rows of ``source`` as columns ``input_ids`` (truncated to ``max_length``, special tokens as the
    tokenizer adds them), ``label`` (class index; without ``names``, unlabelled text: no label column)
    and, with ``teacher_tokenizer``, ``teacher_input_ids``.

    Raises DataError: a missing file or column, an empty set, a text that is not a string, a label
    that is not a class (each naming the row's place)."""
    fields = [text_field] + ([label_field] if names is not None else []) + ([text_pair_field] if text_pair_field else [])
    raw, src = raw_rows(source, split=split, fields=fields, max_examples=max_examples, cache_dir=cache_dir)
    locate = lambda rows: locate_rows(src, rows)  # noqa: E731
    texts = _texts(raw[text_field], text_field, locate)
    pairs = _texts(raw[text_pair_field], text_pair_field, locate) if text_pair_field else None
    columns = {"input_ids": encode(tokenizer, texts, pairs, max_length)}
    if names is not None:
        columns["label"] = label_ids(raw[label_field], names, field=label_field, locate=locate)
    if teacher_tokenizer is not None:
        columns["teacher_input_ids"] = encode(teacher_tokenizer, texts, pairs, max_length)
    return datasets.Dataset.from_dict(columns)


def encode(tokenizer, texts: list[str], pairs: Optional[list[str]], max_length: int) -> list[list[int]]:
    """Token ids per row, truncated to ``max_length`` (a pair: the longer text is cut first)."""
    args = (texts,) if pairs is None else (texts, pairs)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    before = backend.truncation if backend is not None else None
    ids = tokenizer(*args, truncation="longest_first" if pairs is not None else True, max_length=max_length)["input_ids"]
    if backend is not None and before is None and backend.truncation is not None:
        backend.no_truncation()  # a fast tokenizer keeps the call's setting; a saved tokenizer.json would truncate
    empty = next((i for i, row in enumerate(ids) if not row), None)
    if empty is not None:
        raise DataError(f"row {empty + 1}: the text tokenizes to no tokens")
    return ids


def collate_classification(rows: dict, *, pad_token_id: int, teacher_pad_token_id: Optional[int] = None,
                           device=None) -> dict:
    """A batch from ``dataset[indices]``: right-padded ``input_ids`` and ``attention_mask`` (B, T),
    ``labels`` (B,) when the rows have them, and the teacher's own ``teacher_input_ids`` / ``teacher_attention_mask`` when present."""
    def pad(seqs, pad_id):
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[r, :len(s)] = 1
        return ids, mask

    ids, mask = pad(rows["input_ids"], pad_token_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if "label" in rows:
        batch["labels"] = torch.as_tensor(rows["label"], dtype=torch.long)
    if "teacher_input_ids" in rows:
        batch["teacher_input_ids"], batch["teacher_attention_mask"] = pad(
            rows["teacher_input_ids"], pad_token_id if teacher_pad_token_id is None else teacher_pad_token_id)
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch
