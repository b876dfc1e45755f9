"""Turn raw examples into ``input_ids`` and ``labels``: text, prompt/completion and chat.

Labels are unshifted (Hugging Face convention: ``labels[i]`` is the token at position ``i``; the
trainer shifts) and ``IGNORE_INDEX`` (-100) marks positions that are not supervised.

The tokenizer's own special tokens are used as it adds them by default: a tokenizer that prepends
BOS gets one BOS per document / example, one that adds nothing gets nothing. EOS is added by us
(see each format), and never twice if the tokenizer already appends it.

Formats:

- ``text``: one document per row. Empty or whitespace-only documents are skipped (a warning
  counts them and names the first few places). With packing, every document is followed by EOS,
  all documents are concatenated in order and cut into blocks of exactly ``max_length``; the final partial block is dropped, except when the whole dataset is
  shorter than one block, in which case that single shorter block is kept (so a tiny eval file
  still works). Without packing, each document (plus EOS if it fits) is truncated to
  ``max_length``. Every token is supervised.
- ``prompt_completion``: the prompt and the completion are tokenized *separately* and their ids
  concatenated, so the supervised boundary is exact: put any separating space or newline in the
  prompt or the completion as the model should see it. EOS follows the completion; an empty or
  whitespace-only completion is a ``DataError`` (it would train on EOS alone). A chat template
  is *not* applied (plain concatenation); use the ``chat`` format for templated data. Only
  completion tokens and the EOS are supervised.
- ``chat``: ``messages`` is a list of ``{"role", "content"}``; only the ``assistant`` turns are
  supervised. With a chat template that marks assistant text with ``{% generation %}``, the
  tokenizer's assistant mask is used. With any other chat template, the conversation is rendered
  once and the assistant spans are found by rendering prefixes: the text added by turn ``i``
  beyond ``messages[:i]`` rendered with the generation prompt (so the assistant header stays
  unsupervised, the turn's end marker supervised). A template whose renderings are not prefixes
  of each other (e.g. one that rewrites earlier turns) is refused with ``DataError``. Tokens that
  overlap an assistant span are supervised. Without a chat template the fallback format is
  ``"{role}: "`` + ``content + "\\n"`` per turn, with EOS after each assistant turn; the assistant
  content, its newline and that EOS are supervised. With ``teacher_tokenizer`` (a teacher on another
  tokenizer), each conversation is also rendered with the teacher's own template (or its fallback),
  in columns ``teacher_input_ids`` / ``teacher_labels``, truncated to ``teacher_max_length``.

- ``prompt``: prompt-only data for on-policy distillation (``prompt_field`` and no completion):
  ``prefix + prompt`` with nothing supervised; the completions are sampled during training. A
  prompt longer than ``max_length`` is dropped and counted in a warning (cutting it would change
  what it asks); an empty prompt is a ``DataError``.

Supervised formats are not packed (``packing`` applies to ``text`` only): without per-document
attention masks, packed examples would attend across example boundaries. Examples truncated to
``max_length`` are cut at the end; an example left with no supervised token (e.g. a prompt that
fills ``max_length``) is dropped and counted in a warning; if all are dropped, ``DataError``.

Errors and warnings about a row name its place through ``locate`` (``distill.data.sources.
locate_rows``: ``file:line`` for JSON Lines), e.g. ``/data/train.jsonl:17: field 'text' is missing
or null, expected a string``. A missing field, a field of the wrong type, malformed messages, an
empty or whitespace-only completion and a chat template that fails on a conversation are
``DataError``; empty text documents and assistant turns with empty content are warnings that
count them and name the first few places.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

import datasets
import numpy as np
import pyarrow as pa

from distill.data.sources import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FORMATS = ("text", "prompt_completion", "chat", "prompt")
PROMPT_FORMATS = ("prompt_completion", "chat", "prompt")  # formats that hold prompts (on-policy training)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
SHOWN_PLACES = 3  # how many places a warning names
_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
    }
)
_PAIRED_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "teacher_input_ids": datasets.List(datasets.Value("int32")),
        "teacher_labels": datasets.List(datasets.Value("int32")),
    }
)


def resolve_format(
    format: str,
    columns: Sequence[str],
    *,
    text_field: str,
    prompt_field: str,
    completion_field: str,
    messages_field: str,
    where: str,
) -> str:
    """The concrete format for ``format`` ("auto" picks by columns); checks required columns.

    ``where`` names the data in error messages.
    """
    if format == "auto":
        if messages_field in columns:
            return "chat"
        if prompt_field in columns and completion_field in columns:
            return "prompt_completion"
        if text_field in columns:
            return "text"
        if list(columns) == [prompt_field]:  # not with other columns: a misnamed completion would be ignored
            return "prompt"
        raise DataError(
            f"cannot tell the data format of {where}: it has columns {list(columns)}, expected "
            f"{messages_field!r} (chat), {prompt_field!r} + {completion_field!r} "
            f"(prompt_completion), {text_field!r} (text) or only {prompt_field!r} (prompt); set the "
            "format or the field names"
        )
    required = {
        "text": [text_field],
        "prompt_completion": [prompt_field, completion_field],
        "chat": [messages_field],
        "prompt": [prompt_field],
    }.get(format)
    if required is None:
        raise DataError(f"unknown data format {format!r}: use auto, {', '.join(FORMATS)}")
    for field in required:
        if field not in columns:
            raise DataError(
                f"{where} has no column {field!r} needed by format {format!r}; "
                f"columns found: {list(columns)}"
            )
    return format


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before the text by default (e.g. ``[bos]``), found by probing."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def _plain_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def row_numbers(indices: Sequence[int]) -> list[str]:
    """The default ``locate``: ``row N`` (1-based) when nothing better is known."""
    return [f"row {index + 1}" for index in indices]


def _at(locate, index: int) -> str:
    """The place of one row, for an error message."""
    return locate([index])[0]


def _check_str(value, field: str, index: int, locate) -> str:
    if value is None:  # also what Arrow fills in where a row lacks a field that others have
        raise DataError(
            f"{_at(locate, index)}: field {field!r} is missing or null, expected a string"
        )
    if not isinstance(value, str):
        kind = type(value).__name__
        raise DataError(f"{_at(locate, index)}: field {field!r} is {kind}, expected a string")
    return value


def _warn_rows(what: str, indices: list[int], count: int, locate) -> None:
    """Warn that ``count`` rows are ``what``, naming the places of the first few ``indices``
    (none are known when ``datasets`` served the map from its cache)."""
    shown = indices[:SHOWN_PLACES]
    if not shown:
        log.warning("%d %s", count, what)
        return
    more = ", ..." if count > len(shown) else ""
    log.warning("%d %s: %s%s", count, what, ", ".join(locate(shown)), more)


def _truncate(ids: list[int], labels: list[int], max_length: int, *, prompt_only: bool = False):
    """Cut at the end; ``None`` when nothing supervised is left (prompt-only: when it does not fit)."""
    if prompt_only:
        return (ids, labels) if len(ids) <= max_length else None
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return ids, labels


# ---- text ---------------------------------------------------------------------------------


def _document_ids(texts: list[str], tokenizer, eos_id: int) -> list[list[int]]:
    """Each non-empty document's ids (tokenizer defaults), ending with exactly one EOS."""
    encoded = tokenizer(texts, verbose=False)["input_ids"]
    out = []
    for ids in encoded:
        ids = list(ids)
        if not ids or ids[-1] != eos_id:
            ids.append(eos_id)
        out.append(ids)
    return out


def pack_blocks(flat: np.ndarray, max_length: int) -> np.ndarray:
    """Cut a 1-D token stream into rows of exactly ``max_length``, dropping the remainder
    (a stream shorter than one block is returned as one shorter row).

    Shapes: flat (N,) -> (N // max_length, max_length), or (1, N) when N < max_length.
    """
    if len(flat) < max_length:
        return flat[None, :]
    n_blocks = len(flat) // max_length
    return flat[: n_blocks * max_length].reshape(n_blocks, max_length)  # (n_blocks, max_length)


def _blocks_dataset(blocks: np.ndarray) -> datasets.Dataset:
    n, length = blocks.shape
    offsets = pa.array(np.arange(0, n * length + 1, length, dtype=np.int32))
    column = pa.ListArray.from_arrays(offsets, pa.array(blocks.reshape(-1).astype(np.int32)))
    table = pa.Table.from_arrays([column, column], names=["input_ids", "labels"])
    return datasets.Dataset(datasets.table.InMemoryTable(table))  # features: lists of int32


def _tokenize_text(raw, *, tokenizer, eos_id, max_length, packing, text_field, fingerprint,
                   locate):
    empty = []  # the first few empty documents' indices (not filled when datasets' cache hits)

    def encode(batch, indices):
        texts = []
        for text, index in zip(batch[text_field], indices):
            if _check_str(text, text_field, index, locate).strip():
                texts.append(text)
            elif len(empty) < SHOWN_PLACES:
                empty.append(index)
        docs = _document_ids(texts, tokenizer, eos_id) if texts else []
        if not packing:
            docs = [ids[:max_length] for ids in docs]
        return {"input_ids": docs, "labels": docs}

    docs = raw.map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=_FEATURES,
        new_fingerprint=fingerprint,
        desc="Tokenizing text",
    )
    if len(docs) == 0:
        raise DataError(f"no text: every document in column {text_field!r} is empty")
    if len(docs) < len(raw):
        _warn_rows(f"empty documents in column {text_field!r} skipped", empty,
                   len(raw) - len(docs), locate)
    if not packing:
        return docs
    flat = docs.data.column("input_ids").combine_chunks().flatten().to_numpy()  # (N,)
    if len(flat) < max_length:
        log.warning(
            "the data has %d tokens, fewer than max_length=%d: using one shorter block",
            len(flat),
            max_length,
        )
    return _blocks_dataset(pack_blocks(flat, max_length))


# ---- prompt / completion ------------------------------------------------------------------


def encode_prompt_completion(
    prompt: str, completion: str, *, tokenizer, eos_id: int, prefix: list[int]
) -> tuple[list[int], list[int]]:
    """``prefix + prompt`` unsupervised, ``completion + EOS`` supervised (not truncated)."""
    prompt_ids = prefix + _plain_ids(tokenizer, prompt)
    completion_ids = _plain_ids(tokenizer, completion) + [eos_id]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


# ---- chat ---------------------------------------------------------------------------------


def chat_template_of(tokenizer) -> str | None:
    """The tokenizer's default chat template, or ``None`` when it has none."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return tokenizer.get_chat_template()


def _check_messages(messages, field: str, index: int, locate) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        if messages is None:
            found = "missing or null"
        elif isinstance(messages, list):
            found = "an empty list"
        else:
            found = type(messages).__name__
        raise DataError(
            f"{_at(locate, index)}: field {field!r} must be a non-empty list of messages, "
            f"found {found}"
        )
    clean = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(
                f"{_at(locate, index)}: each message in {field!r} needs a string 'role'"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise DataError(
                f"{_at(locate, index)}: message content in {field!r} must be a string, "
                f"found {type(content).__name__}"
            )
        # Arrow fills keys that other rows have with None; templates expect them absent.
        clean.append({k: v for k, v in message.items() if v is not None})
    return clean


def encode_chat_fallback(
    messages: list[dict], *, tokenizer, eos_id: int, prefix: list[int]
) -> tuple[list[int], list[int]]:
    """No chat template: ``"{role}: "`` + ``content + "\\n"`` per turn, EOS after assistant turns."""
    ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
    for message in messages:
        head = _plain_ids(tokenizer, f"{message['role']}: ")
        body = _plain_ids(tokenizer, message.get("content", "") + "\n")
        ids += head + body
        labels += [IGNORE_INDEX] * len(head)
        if message["role"] == "assistant":
            ids.append(eos_id)
            labels += list(body) + [eos_id]
        else:
            labels += [IGNORE_INDEX] * len(body)
    return ids, labels


def chat_encoder(tokenizer, *, eos_id: int, prefix: list[int], role: str = ""):
    """``encode(messages, where) -> (ids, labels)`` for one tokenizer: its ``{% generation %}``
    template, any other template (prefix renderings), or the fallback format without one. ``where``
    names the row in errors; ``role`` ("teacher") names whose template failed."""
    template = chat_template_of(tokenizer)
    whose = f"the {role}'s chat template" if role else "the chat template"
    if template and not _GENERATION_TAG.search(template) and not tokenizer.is_fast:
        raise DataError(
            f"chat data with {whose if role else 'this chat template'} needs a fast tokenizer (character "
            "offsets) or a template with {% generation %} markers"
        )

    def encode(messages: list[dict], where: str) -> tuple[list[int], list[int]]:
        try:
            if template is None:
                return encode_chat_fallback(messages, tokenizer=tokenizer, eos_id=eos_id, prefix=prefix)
            if _GENERATION_TAG.search(template):
                return encode_chat_generation(messages, tokenizer=tokenizer)
            return encode_chat_prefix(messages, tokenizer=tokenizer)
        except NotPrefixStable as e:
            raise DataError(
                f"{where}: {whose} is not prefix-stable ({e}), so assistant turns cannot be located; "
                "use a template with {% generation %} markers"
            ) from e
        except DataError:
            raise
        except Exception as e:  # template errors (e.g. roles must alternate) are data errors
            raise DataError(
                f"{where}: {whose} cannot render these messages: {type(e).__name__}: {' '.join(str(e).split())}"
            ) from e

    return encode


def encode_chat_generation(messages: list[dict], *, tokenizer) -> tuple[list[int], list[int]]:
    """A ``{% generation %}`` template: the tokenizer's assistant mask gives the labels."""
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = list(out["input_ids"])
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"])]
    return ids, labels


class NotPrefixStable(ValueError):
    """A chat template renders a conversation's prefix as something that is not its prefix."""


def assistant_spans(messages: list[dict], render) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    ``render(messages, add_generation_prompt)`` returns the template's text. Raises
    ``NotPrefixStable`` when the template is not prefix-stable.
    """
    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = render(messages[: i + 1], False)
        if not full.startswith(upto):
            raise NotPrefixStable(f"rendering messages[:{i + 1}] is not a prefix of the whole")
        if i == 0:  # nothing before: the turn starts where its content does
            content = message.get("content") or ""
            start = upto.rfind(content) if content and content in upto else len(upto)
        else:
            for with_prompt in (True, False):
                before = render(messages[:i], with_prompt)
                if upto.startswith(before):
                    break
            else:
                raise NotPrefixStable(
                    f"rendering messages[:{i}] is not a prefix of messages[:{i + 1}]"
                )
            start = len(before)
        spans.append((start, len(upto)))
    return full, spans


def encode_chat_prefix(messages: list[dict], *, tokenizer) -> tuple[list[int], list[int]]:
    """Any other chat template: assistant spans from prefix renderings (see module doc)."""

    def render(msgs, add_generation_prompt):
        return tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    full, spans = assistant_spans(messages, render)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = list(enc["input_ids"])
    labels = [
        token if any(start < span_end and end > span_start for span_start, span_end in spans)
        else IGNORE_INDEX
        for token, (start, end) in zip(ids, enc["offset_mapping"])
    ]
    return ids, labels


# ---- all formats --------------------------------------------------------------------------


def tokenize_dataset(
    raw: datasets.Dataset,
    *,
    tokenizer,
    format: str,
    max_length: int,
    packing: bool,
    text_field: str,
    prompt_field: str,
    completion_field: str,
    messages_field: str,
    fingerprint: str,
    locate: Callable[[Sequence[int]], list[str]] = row_numbers,
    teacher_tokenizer=None,
    teacher_max_length: int | None = None,
) -> datasets.Dataset:
    """Tokenize ``raw`` in a concrete ``format``; returns columns ``input_ids`` and ``labels`` (and, for
    chat with ``teacher_tokenizer``, the teacher's own rendering: see the module doc).

    ``fingerprint`` names the result in the ``datasets`` cache (it must change whenever any input
    does). ``locate`` turns 0-based row indices of ``raw`` into the places error messages name;
    it is called only when there is something to report. See the module doc for each format's
    rules.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no EOS token: set tokenizer.eos_token")
    if format == "text":
        return _tokenize_text(
            raw,
            tokenizer=tokenizer,
            eos_id=eos_id,
            max_length=max_length,
            packing=packing,
            text_field=text_field,
            fingerprint=fingerprint,
            locate=locate,
        )

    prefix = special_prefix(tokenizer)
    empty_turns = []  # indices of the first few chats with an empty assistant turn
    empty_count = 0
    if format == "prompt_completion":

        def encode_row(row, index):
            completion = _check_str(row[completion_field], completion_field, index, locate)
            if not completion.strip():
                raise DataError(
                    f"{_at(locate, index)}: field {completion_field!r} is empty: the example "
                    "would train on EOS alone; remove it or fill in the completion"
                )
            return encode_prompt_completion(
                _check_str(row[prompt_field], prompt_field, index, locate),
                completion,
                tokenizer=tokenizer,
                eos_id=eos_id,
                prefix=prefix,
            )

    elif format == "prompt":

        def encode_row(row, index):
            prompt = _check_str(row[prompt_field], prompt_field, index, locate)
            if not prompt.strip():
                raise DataError(f"{_at(locate, index)}: field {prompt_field!r} is empty: nothing to continue")
            ids = prefix + _plain_ids(tokenizer, prompt)
            return ids, [IGNORE_INDEX] * len(ids)

    else:
        student_chat = chat_encoder(tokenizer, eos_id=eos_id, prefix=prefix)
        teacher_chat = (chat_encoder(teacher_tokenizer, eos_id=teacher_tokenizer.eos_token_id,
                                     prefix=special_prefix(teacher_tokenizer), role="teacher")
                        if teacher_tokenizer is not None else None)

        def encode_row(row, index):
            nonlocal empty_count
            messages = _check_messages(row[messages_field], messages_field, index, locate)
            if any(m["role"] == "assistant" and not m.get("content", "").strip() for m in messages):
                empty_count += 1
                if len(empty_turns) < SHOWN_PLACES:
                    empty_turns.append(index)
            return student_chat(messages, _at(locate, index))

    columns = raw.column_names
    paired = format == "chat" and teacher_tokenizer is not None

    def encode(batch, indices):
        out = {"input_ids": [], "labels": []} | ({"teacher_input_ids": [], "teacher_labels": []} if paired else {})
        for offset, index in enumerate(indices):
            row = {name: batch[name][offset] for name in columns}
            kept = _truncate(*encode_row(row, index), max_length, prompt_only=format == "prompt")
            if kept is not None:
                out["input_ids"].append(kept[0])
                out["labels"].append(kept[1])
                if paired:  # the same conversation in the teacher's own template, cut to its positions
                    messages = _check_messages(row[messages_field], messages_field, index, locate)
                    t_ids, t_labels = teacher_chat(messages, _at(locate, index))
                    cap = teacher_max_length or len(t_ids)
                    out["teacher_input_ids"].append(t_ids[:cap])
                    out["teacher_labels"].append(t_labels[:cap])
        return out

    tokenized = raw.map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=columns,
        features=_PAIRED_FEATURES if paired else _FEATURES,
        new_fingerprint=fingerprint,
        desc=f"Tokenizing {format}",
    )
    if empty_count:
        _warn_rows("chat examples with an assistant turn of empty content", empty_turns,
                   empty_count, locate)
    dropped = len(raw) - len(tokenized)
    if format == "prompt" and dropped:
        if not len(tokenized):
            raise DataError(f"all {len(raw)} prompts are longer than max_length={max_length} tokens")
        log.warning("dropped %d of %d prompts longer than max_length=%d tokens", dropped, len(raw), max_length)
        return tokenized
    if len(tokenized) == 0:
        raise DataError(
            f"no supervised tokens: all {len(raw)} {format} examples have none within "
            f"max_length={max_length} (the prompt fills it, or there is no assistant turn)"
        )
    if dropped:
        log.warning(
            "dropped %d of %d %s examples with no supervised tokens within max_length=%d",
            dropped,
            len(raw),
            format,
            max_length,
        )
    return tokenized
