"""distill.data: loading, formats, packing, label masking, caching, collation.

Tokenizers are built in-process: a word-level one with hand-known ids (so expected ids are written
out, not computed by the code under test) and a byte-level BPE one for realistic boundaries.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import distill.data.formats as formats_module
import distill.data.loading as loading_module
import distill.data.sources as sources_module
from distill.data import DataError, collate, data_format, load_tokenized, tokenizer_fingerprint
from distill.data.formats import assistant_spans, pack_blocks
from distill.data.sources import load_raw, resolve_source
from distill.errors import UserError

# ---- tokenizers -----------------------------------------------------------------------------

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = "hello world the cat sat on mat user assistant system : hi how are you fine thanks".split()
V = {token: i for i, token in enumerate(SPECIALS + WORDS)}
PAD, EOS, BOS, USER, ASSISTANT, END = (V[t] for t in
                                        ["<pad>", "<eos>", "<bos>", "<|user|>", "<|assistant|>", "<|end|>"])
X = -100


def w(text: str) -> list[int]:
    """Hand lookup of word ids (independent of the tokenizer under test)."""
    return [V[token] for token in text.split()]


CHAT_GENERATION = (
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}<|assistant|> {% generation %}{{ m.content }} <|end|>{% endgeneration %} "
    "{% else %}<|user|> {{ m.content }} <|end|> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
CHAT_PLAIN = CHAT_GENERATION.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def word_tokenizer(*, bos: bool = False, eos_suffix: bool = False, chat_template: str | None = None,
                   eos: bool = True, extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    vocab = dict(V)
    for word in extra_words:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS)
    template = " ".join((["<bos>"] if bos else []) + ["$A"] + (["<eos>"] if eos_suffix else []))
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<bos>", BOS), ("<eos>", EOS)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eos>" if eos else None)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


CORPUS = ["the cat sat on the mat", "hello world", "user: hi there\nassistant: fine thanks",
          "how are you today", "the quick brown fox jumps over the lazy dog"]


def bpe_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


# ---- data files -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    """Keep datasets' own arrow cache out of the home directory."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-home"))


def jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def rows_of(ds) -> list[tuple[list[int], list[int]]]:
    return [(row["input_ids"], row["labels"]) for row in ds]


# ---- text -----------------------------------------------------------------------------------


def test_packing_blocks_have_eos_between_documents(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}, {"text": "the cat sat"},
                                       {"text": "on the mat"}])
    ds = load_tokenized(src, tokenizer=word_tokenizer(), max_length=4)
    # stream: hello world E the | cat sat E on | the mat E  (partial block dropped)
    assert ds.column_names == ["input_ids", "labels"]
    assert rows_of(ds) == [
        (w("hello world") + [EOS] + w("the"),) * 2,
        (w("cat sat") + [EOS] + w("on"),) * 2,
    ]


def test_packing_with_bos_tokenizer_keeps_one_bos_per_document(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}, {"text": "the cat"}])
    ds = load_tokenized(src, tokenizer=word_tokenizer(bos=True), max_length=3)
    stream = [BOS] + w("hello world") + [EOS] + [BOS] + w("the cat") + [EOS]
    assert [row["input_ids"] for row in ds] == [stream[0:3], stream[3:6]]


def test_packing_does_not_double_eos_when_tokenizer_appends_it(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", [{"text": "hello"}, {"text": "world"}])
    ds = load_tokenized(src, tokenizer=word_tokenizer(eos_suffix=True), max_length=4)
    assert ds[0]["input_ids"] == w("hello") + [EOS] + w("world") + [EOS]


def test_packing_data_shorter_than_one_block_gives_one_short_block(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}, {"text": "the cat"}])
    ds = load_tokenized(src, tokenizer=word_tokenizer(), max_length=100)
    assert rows_of(ds) == [(w("hello world") + [EOS] + w("the cat") + [EOS],) * 2]


def test_packing_skips_empty_documents(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", [{"text": "hello"}, {"text": ""}, {"text": "  \n"},
                                       {"text": "world"}])
    ds = load_tokenized(src, tokenizer=word_tokenizer(), max_length=4)
    assert ds[0]["input_ids"] == w("hello") + [EOS] + w("world") + [EOS]


def test_text_without_packing_truncates_each_document(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}, {"text": "the cat sat on the mat"},
                                       {"text": "hi you"}])
    ds = load_tokenized(src, tokenizer=word_tokenizer(), max_length=3, packing=False)
    # a document that fits gets EOS; a longer one is cut with no EOS (it does not end there)
    assert rows_of(ds) == [
        (w("hello world") + [EOS],) * 2,
        (w("the cat sat"),) * 2,
        (w("hi you") + [EOS],) * 2,
    ]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(st.lists(st.sampled_from(WORDS[:8]), min_size=1, max_size=9), min_size=1,
                     max_size=8),
       max_length=st.integers(1, 12))
def test_packing_is_the_document_stream_cut_into_blocks(docs, max_length):
    stream = [t for doc in docs for t in w(" ".join(doc)) + [EOS]]
    with tempfile.TemporaryDirectory() as tmp:
        src = jsonl(Path(tmp) / "d.jsonl", [{"text": " ".join(doc)} for doc in docs])
        ds = load_tokenized(src, tokenizer=word_tokenizer(), max_length=max_length)
        got = [row["input_ids"] for row in ds]
    if len(stream) < max_length:
        assert got == [stream]
    else:
        n = len(stream) // max_length
        assert got == [stream[i * max_length:(i + 1) * max_length] for i in range(n)]


def test_pack_blocks_shapes():
    flat = torch.arange(10).numpy()
    assert pack_blocks(flat, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert pack_blocks(flat, 10).shape == (1, 10)
    assert pack_blocks(flat, 11).tolist() == [list(range(10))]


def test_bpe_packing_decodes_back_to_documents(tmp_path):
    tok = bpe_tokenizer()
    docs = ["the cat sat on the mat", "hello world"]
    src = jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    ds = load_tokenized(src, tokenizer=tok, max_length=1000)
    assert tok.decode(ds[0]["input_ids"]) == "the cat sat on the mat<eos>hello world<eos>"


# ---- prompt / completion --------------------------------------------------------------------


def test_prompt_completion_supervises_completion_and_eos_only(tmp_path):
    src = jsonl(tmp_path / "pc.jsonl", [{"prompt": "hello world", "completion": "the cat"},
                                        {"prompt": "hi", "completion": "you"}])
    ds = load_tokenized(src, tokenizer=word_tokenizer(), max_length=16)
    assert rows_of(ds) == [
        (w("hello world the cat") + [EOS], [X, X] + w("the cat") + [EOS]),
        (w("hi you") + [EOS], [X] + w("you") + [EOS]),
    ]  # an empty completion is an error: test_empty_completion_names_its_line


def test_prompt_completion_bos_belongs_to_the_prompt(tmp_path):
    src = jsonl(tmp_path / "pc.jsonl", [{"prompt": "hello", "completion": "world"}])
    ds = load_tokenized(src, tokenizer=word_tokenizer(bos=True), max_length=16)
    assert rows_of(ds) == [([BOS] + w("hello world") + [EOS], [X, X] + w("world") + [EOS])]


def test_prompt_completion_ignores_packing_and_chat_template(tmp_path):
    src = jsonl(tmp_path / "pc.jsonl", [{"prompt": "hi", "completion": "fine"}] * 3)
    tok = word_tokenizer(chat_template=CHAT_PLAIN)
    ds = load_tokenized(src, tokenizer=tok, max_length=16, packing=True)
    assert rows_of(ds) == [(w("hi fine") + [EOS], [X] + w("fine") + [EOS])] * 3


def test_prompt_completion_truncates_completion_and_drops_prompt_only(tmp_path, caplog):
    src = jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "hello world", "completion": "the cat sat"},  # cut inside the completion
        {"prompt": "the cat sat on", "completion": "mat"},      # prompt fills max_length: dropped
        {"prompt": "hi", "completion": "you"},
    ])
    ds = load_tokenized(src, tokenizer=word_tokenizer(), max_length=4)
    assert rows_of(ds) == [
        (w("hello world the cat"), [X, X] + w("the cat")),
        (w("hi you") + [EOS], [X] + w("you") + [EOS]),
    ]
    assert "dropped 1 of 3 prompt_completion examples" in caplog.text


def test_prompt_completion_all_dropped_is_an_error(tmp_path):
    src = jsonl(tmp_path / "pc.jsonl", [{"prompt": "the cat sat on", "completion": "mat"}])
    with pytest.raises(DataError, match="no supervised tokens"):
        load_tokenized(src, tokenizer=word_tokenizer(), max_length=4)


def test_prompt_completion_boundary_is_exact_with_bpe(tmp_path):
    tok = bpe_tokenizer()
    prompt, completion = "the cat sat", " on the mat"
    src = jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": completion}])
    row = load_tokenized(src, tokenizer=tok, max_length=64)[0]
    n_prompt = len(tok(prompt)["input_ids"])
    assert row["labels"][:n_prompt] == [X] * n_prompt
    assert X not in row["labels"][n_prompt:]
    assert tok.decode(row["input_ids"][:n_prompt]) == prompt
    assert tok.decode(row["labels"][n_prompt:]) == completion + "<eos>"


# ---- prompt only (on-policy training) --------------------------------------------------------


def test_prompt_only_rows_keep_the_whole_prompt_unsupervised_and_no_eos(tmp_path):
    src = jsonl(tmp_path / "p.jsonl", [{"prompt": "hello world"}, {"prompt": "the cat"}])
    ds = load_tokenized(src, tokenizer=word_tokenizer(bos=True), max_length=16)
    assert rows_of(ds) == [([BOS] + w("hello world"), [X, X, X]), ([BOS] + w("the cat"), [X, X, X])]
    assert data_format(ds) == "prompt"  # auto: "prompt" is the only column


def test_a_prompt_column_beside_others_is_not_silently_prompt_only(tmp_path):
    # A misnamed completion ("answer") would otherwise be dropped without a word.
    src = jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "answer": "you"}])
    assert "cannot tell the data format" in _error(tmp_path, src)
    ds = load_tokenized(src, tokenizer=word_tokenizer(), max_length=16, format="prompt")
    assert rows_of(ds) == [(w("hi"), [X])]


def test_long_prompts_are_dropped_with_a_warning_and_all_dropped_is_an_error(tmp_path, caplog):
    src = jsonl(tmp_path / "p.jsonl", [{"prompt": "hello world the cat"}, {"prompt": "hi"}])
    ds = load_tokenized(src, tokenizer=word_tokenizer(), max_length=3)
    assert rows_of(ds) == [(w("hi"), [X])]
    assert "dropped 1 of 2 prompts longer than max_length=3" in caplog.text
    src = jsonl(tmp_path / "long.jsonl", [{"prompt": "hello world the cat"}])
    assert "all 1 prompts are longer than max_length=3" in _error(tmp_path, src, max_length=3)


def test_an_empty_prompt_names_its_line(tmp_path):
    src = jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": "  "}])
    assert _error(tmp_path, src).startswith(f"{src}:2: field 'prompt' is empty")


def test_data_format_is_recorded_for_every_format(tmp_path):
    pc = jsonl(tmp_path / "pc.jsonl", [{"prompt": "hi", "completion": "you"}])
    text = jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}])
    assert data_format(load_tokenized(pc, tokenizer=word_tokenizer(), max_length=16)) == "prompt_completion"
    assert data_format(load_tokenized(text, tokenizer=word_tokenizer(), max_length=16)) == "text"
    assert data_format(datasets.Dataset.from_dict({"input_ids": [[1]]})) is None


# ---- chat -----------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "fine thanks"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine"},
]
TEMPLATED_IDS = ([USER] + w("hi") + [END, ASSISTANT] + w("fine thanks") + [END, USER]
                 + w("how are you") + [END, ASSISTANT] + w("fine") + [END])
TEMPLATED_LABELS = [X] * 4 + w("fine thanks") + [END] + [X] * 6 + w("fine") + [END]


@pytest.mark.parametrize("template", [CHAT_GENERATION, CHAT_PLAIN], ids=["generation", "prefix"])
def test_chat_template_supervises_assistant_turns_only(tmp_path, template):
    src = jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    ds = load_tokenized(src, tokenizer=word_tokenizer(chat_template=template), max_length=64)
    assert rows_of(ds) == [(TEMPLATED_IDS, TEMPLATED_LABELS)]


def test_chat_template_truncation(tmp_path):
    src = jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    ds = load_tokenized(src, tokenizer=word_tokenizer(chat_template=CHAT_PLAIN), max_length=6)
    assert rows_of(ds) == [(TEMPLATED_IDS[:6], TEMPLATED_LABELS[:6])]


def test_chat_fallback_without_template(tmp_path):
    src = jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[:2]}])
    ds = load_tokenized(src, tokenizer=word_tokenizer(bos=True), max_length=64)
    # "<bos>" "user: " "hi\n" "assistant: " "fine thanks\n" EOS
    assert rows_of(ds) == [(
        [BOS] + w("user : hi assistant : fine thanks") + [EOS],
        [X] * 6 + w("fine thanks") + [EOS],
    )]


def test_chat_fallback_eos_after_every_assistant_turn_with_bpe(tmp_path):
    tok = bpe_tokenizer()
    src = jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    row = load_tokenized(src, tokenizer=tok, max_length=256)[0]
    assert tok.decode(row["input_ids"]) == (
        "user: hi\nassistant: fine thanks\n<eos>user: how are you\nassistant: fine\n<eos>")
    supervised = [t for t in row["labels"] if t != X]
    assert tok.decode(supervised) == "fine thanks\n<eos>fine\n<eos>"


def test_chat_prefix_method_with_bpe_merging_across_the_header(tmp_path):
    # The header ends in a space that BPE merges into the first content token (" fine").
    template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    tok = bpe_tokenizer(chat_template=template)
    src = jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[:2]}])
    row = load_tokenized(src, tokenizer=tok, max_length=256)[0]
    assert tok.decode(row["input_ids"]) == "user: hi\nassistant: fine thanks\n"
    first = row["labels"].index(next(t for t in row["labels"] if t != X))
    assert tok.decode(row["input_ids"][:first]) == "user: hi\nassistant:"
    assert tok.decode(row["labels"][first:]) == " fine thanks\n"


def test_chat_assistant_first_turn_starts_at_its_content():
    render_calls = []

    def render(msgs, add_generation_prompt):
        render_calls.append(len(msgs))
        return "".join(f"[{m['role']}] {m['content']};" for m in msgs)

    full, spans = assistant_spans([{"role": "assistant", "content": "hey"},
                                   {"role": "user", "content": "yo"}], render)
    assert full == "[assistant] hey;[user] yo;"
    assert [full[a:b] for a, b in spans] == ["hey;"]


def test_chat_not_prefix_stable_template_is_refused(tmp_path):
    # Renders the number of messages first, so a prefix is not rendered as a prefix.
    template = "{{ messages | length }} " + CHAT_PLAIN
    src = jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    tok = word_tokenizer(chat_template=template, extra_words=("1", "2", "3", "4"))
    with pytest.raises(DataError, match=re.escape(f"{src}:1: the chat template is not prefix-stable")):
        load_tokenized(src, tokenizer=tok, max_length=64)


def test_chat_template_exception_is_a_data_error(tmp_path):
    template = ("{% if messages[0].role != 'user' %}{{ raise_exception('must start with user') }}"
                "{% endif %}" + CHAT_PLAIN)
    src = jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION},
                                          {"messages": CONVERSATION[1:]}])
    with pytest.raises(DataError, match=re.escape(f"{src}:2: ") + ".*must start with user"):
        load_tokenized(src, tokenizer=word_tokenizer(chat_template=template), max_length=64)


def test_chat_without_assistant_turns_is_dropped_or_an_error(tmp_path):
    only_user = [{"role": "user", "content": "hi"}]
    src = jsonl(tmp_path / "chat.jsonl", [{"messages": only_user}, {"messages": CONVERSATION}])
    ds = load_tokenized(src, tokenizer=word_tokenizer(chat_template=CHAT_PLAIN), max_length=64)
    assert rows_of(ds) == [(TEMPLATED_IDS, TEMPLATED_LABELS)]
    src = jsonl(tmp_path / "chat2.jsonl", [{"messages": only_user}])
    with pytest.raises(DataError, match="no supervised tokens"):
        load_tokenized(src, tokenizer=word_tokenizer(chat_template=CHAT_PLAIN), max_length=64)


def test_chat_messages_with_extra_keys_in_some_rows(tmp_path):
    # Arrow gives every message every key seen anywhere (None where absent).
    named = [{"role": "user", "content": "hi", "name": "bob"}, CONVERSATION[1]]
    src = jsonl(tmp_path / "chat.jsonl", [{"messages": named}, {"messages": CONVERSATION}])
    ds = load_tokenized(src, tokenizer=word_tokenizer(chat_template=CHAT_GENERATION), max_length=64)
    assert rows_of(ds)[1] == (TEMPLATED_IDS, TEMPLATED_LABELS)


def test_malformed_messages_are_a_data_error(tmp_path):
    src = jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": []}])
    with pytest.raises(DataError, match=re.escape(f"{src}:2: field 'messages' must be a non-empty list")):
        load_tokenized(src, tokenizer=word_tokenizer(chat_template=CHAT_PLAIN), max_length=64)


# ---- file kinds, sources, auto format -------------------------------------------------------


def test_file_kinds_load_the_same_examples(tmp_path):
    rows = [{"prompt": "hello", "completion": "world"}, {"prompt": "hi", "completion": "you"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    jsonl(tmp_path / "a.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    expected = [(w("hello world") + [EOS], [X] + w("world") + [EOS]),
                (w("hi you") + [EOS], [X] + w("you") + [EOS])]
    for name in ["a.json", "a.jsonl", "a.parquet"]:
        ds = load_tokenized(str(tmp_path / name), tokenizer=word_tokenizer(), max_length=8)
        assert rows_of(ds) == expected, name


def test_txt_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n\nthe cat\n")
    (tmp_path / "b.txt").write_text("hi")
    ds = load_tokenized(str(tmp_path), tokenizer=word_tokenizer(), max_length=100)
    assert ds[0]["input_ids"] == w("hello world the cat") + [EOS] + w("hi") + [EOS]


def test_directory_and_glob_sources(tmp_path):
    (tmp_path / "sub").mkdir()
    jsonl(tmp_path / "sub" / "b.jsonl", [{"text": "world"}])
    jsonl(tmp_path / "a.jsonl", [{"text": "hello"}])
    by_dir = load_tokenized(str(tmp_path), tokenizer=word_tokenizer(), max_length=100)
    assert by_dir[0]["input_ids"] == w("hello") + [EOS] + w("world") + [EOS]
    by_glob = load_tokenized(str(tmp_path / "*.jsonl"), tokenizer=word_tokenizer(), max_length=100)
    assert by_glob[0]["input_ids"] == w("hello") + [EOS]


def test_auto_format_picks_by_columns(tmp_path):
    tok = word_tokenizer(chat_template=CHAT_PLAIN)
    chat = jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION, "text": "ignored"}])
    assert rows_of(load_tokenized(chat, tokenizer=tok)) == [(TEMPLATED_IDS, TEMPLATED_LABELS)]
    pc = jsonl(tmp_path / "pc.jsonl", [{"prompt": "hi", "completion": "you", "text": "x"}])
    assert rows_of(load_tokenized(pc, tokenizer=tok))[0][1] == [X] + w("you") + [EOS]
    text = jsonl(tmp_path / "t.jsonl", [{"text": "hi", "prompt": "no completion column"}])
    assert rows_of(load_tokenized(text, tokenizer=tok)) == [(w("hi") + [EOS],) * 2]


def test_custom_field_names(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", [{"q": "hi", "a": "you"}])
    ds = load_tokenized(src, tokenizer=word_tokenizer(), prompt_field="q", completion_field="a")
    assert rows_of(ds) == [(w("hi you") + [EOS], [X] + w("you") + [EOS])]


def test_max_examples_takes_the_first_rows(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", [{"text": t} for t in ["hello", "world", "hi"]])
    ds = load_tokenized(src, tokenizer=word_tokenizer(), max_length=100, max_examples=2)
    assert ds[0]["input_ids"] == w("hello") + [EOS] + w("world") + [EOS]


def test_resolve_source_hub_versus_path(tmp_path):
    assert resolve_source("owner/dataset").hub_id == "owner/dataset"
    assert resolve_source("wikitext").hub_id == "wikitext"
    for missing in ["data/train.jsonl", "./x", "/no/such/dir/", "a/b/c", str(tmp_path / "*.jsonl")]:
        with pytest.raises(DataError, match="not found"):
            resolve_source(missing)


def test_hub_source_goes_through_load_dataset(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_dict({"text": ["hello world"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_tokenized("owner/corpus", tokenizer=word_tokenizer(), split="validation",
                        max_length=100, cache_dir=tmp_path / "cache")
    assert calls == [("owner/corpus", {"split": "validation", "cache_dir": None})]
    assert ds[0]["input_ids"] == w("hello world") + [EOS]


# ---- errors ---------------------------------------------------------------------------------


def _error(tmp_path, src, **kwargs) -> str:
    kwargs.setdefault("tokenizer", word_tokenizer())
    with pytest.raises(DataError) as info:
        load_tokenized(str(src), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    return message


def test_missing_file_is_one_clear_error(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert _error(tmp_path, missing) == f"data file not found: {missing} (check the path)"


def test_empty_files_are_errors(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    assert "data is empty" in _error(tmp_path, tmp_path / "e.jsonl")
    (tmp_path / "ws.jsonl").write_text("\n \n")
    assert "data is empty" in _error(tmp_path, tmp_path / "ws.jsonl")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    assert "data is empty" in _error(tmp_path, tmp_path / "e.parquet")
    jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": " "}])
    assert "every document in column 'text' is empty" in _error(tmp_path, tmp_path / "blank.jsonl")
    (tmp_path / "empty_dir").mkdir()
    assert "no data files in directory" in _error(tmp_path, tmp_path / "empty_dir")


def test_missing_column_names_it_and_the_columns_found(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "answer": "you"}])
    message = _error(tmp_path, src, format="prompt_completion")
    assert "no column 'completion' needed by format 'prompt_completion'" in message
    assert "columns found: ['prompt', 'answer']" in message
    message = _error(tmp_path, src)
    assert "cannot tell the data format" in message and "['prompt', 'answer']" in message


def test_other_user_mistakes(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", [{"text": "hi"}])
    assert "unknown data format 'csv'" in _error(tmp_path, src, format="csv")
    assert "no EOS token" in _error(tmp_path, src, tokenizer=word_tokenizer(eos=False))
    assert "max_length must be a positive integer" in _error(tmp_path, src, max_length=0)
    (tmp_path / "bad.jsonl").write_text('{"text": "hi"}\n{not json\n')
    assert "bad.jsonl:2: not valid JSON" in _error(tmp_path, tmp_path / "bad.jsonl")
    bad_type = jsonl(tmp_path / "t.jsonl", [{"text": 3}])
    assert "field 'text' is int, expected a string" in _error(tmp_path, bad_type)
    (tmp_path / "a.csv").write_text("text\nhi\n")
    assert "unsupported data file" in _error(tmp_path, tmp_path / "a.csv")


# ---- errors name their place ----------------------------------------------------------------
# A user opens the file at the line an error names: 1-based physical lines, blank lines counted.


def test_broken_json_line_names_file_and_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    jsonl(data / "a.jsonl", [{"text": "hello"}] * 3)
    (data / "b.jsonl").write_text('{"text": "hi"}\n\n  \n{"text": "you"}\n{"text": "x",}\n')
    message = _error(tmp_path, data)  # the directory: both files, in order
    assert message == (f"{data / 'b.jsonl'}:5: not valid JSON "
                       "(Expecting property name enclosed in double quotes at column 14)")


@pytest.mark.parametrize("content, line, reason", [
    (b'{"text": "a"}\r\n\r\n{"text": "b"\r\n', 3, "not valid JSON (Expecting ',' delimiter"),
    (b'{"text": "a"}\r{"text": "b"}\r{"text"\r', 3, "not valid JSON (Expecting ':' delimiter"),
    (b'\xef\xbb\xbf{"text": "a"}\n{"text": "\xff"}\n', 2, "not valid UTF-8 (invalid start byte"),
    (b'{"text": "a"}\n\n3\n', 3, "not a JSON object (found a number)"),
    (b'{"text": "a"}\n{"text": "b"} x\n', 2, "not valid JSON (Extra data at column 15)"),
], ids=["crlf", "lone-cr", "utf8", "not-object", "extra-data"])
def test_bad_jsonl_lines(tmp_path, content, line, reason):
    (tmp_path / "d.jsonl").write_bytes(content)
    assert _error(tmp_path, tmp_path / "d.jsonl").startswith(f"{tmp_path / 'd.jsonl'}:{line}: {reason}")


def test_broken_json_array_names_its_line(tmp_path):
    (tmp_path / "d.json").write_text('[\n  {"text": "a"},\n  {"text": "b"}\n  {"text": "c"}\n]\n')
    assert _error(tmp_path, tmp_path / "d.json") == (
        f"{tmp_path / 'd.json'}:4: not valid JSON (Expecting ',' delimiter at column 3)")


@pytest.mark.parametrize("format", ["text", "prompt_completion"])
def test_missing_field_names_file_and_line(tmp_path, format):
    field = "text" if format == "text" else "completion"
    good = {"text": "hi", "prompt": "hi", "completion": "you"}
    bad = {k: v for k, v in good.items() if k != field}
    data = tmp_path / "data"
    data.mkdir()
    jsonl(data / "a.jsonl", [good, good])
    (data / "b.jsonl").write_text("\n".join(["", json.dumps(good), "   ", json.dumps(bad), ""]))
    message = _error(tmp_path, data, format=format)
    assert message == f"{data / 'b.jsonl'}:4: field {field!r} is missing or null, expected a string"
    # max_examples selects a prefix: row indices stay those of the whole data
    assert len(load_tokenized(str(data), tokenizer=word_tokenizer(), format=format,
                              max_examples=3)) >= 1
    assert _error(tmp_path, data, format=format, max_examples=4).startswith(f"{data / 'b.jsonl'}:4: ")


def test_wrong_type_names_file_and_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n{"text": "you"}\n{"text": 3}\n')
    assert _error(tmp_path, tmp_path / "d.jsonl") == (
        f"{tmp_path / 'd.jsonl'}:3: field 'text' is int, expected a string")
    # with a blank line, datasets (5.2) cannot read mixed types at all: the scan names the line
    (tmp_path / "b.jsonl").write_text('{"text": null}\n{"text": "you"}\n\n{"text": 3}\n')
    assert _error(tmp_path, tmp_path / "b.jsonl") == (
        f"{tmp_path / 'b.jsonl'}:4: field 'text' is a number, but a string at "
        f"{tmp_path / 'b.jsonl'}:2; give a field one JSON type throughout")


def test_json_array_and_parquet_places(tmp_path):
    rows = [{"text": "hi"}, {"text": "you"}, {"text": None}]
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))  # element 3 starts on line 8
    assert _error(tmp_path, tmp_path / "d.json").startswith(
        f"{tmp_path / 'd.json'}:8 (element 3): field 'text' is missing or null")
    (tmp_path / "p").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "p" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p" / "b.parquet")
    assert _error(tmp_path, tmp_path / "p").startswith(
        f"{tmp_path / 'p' / 'b.parquet'} row 3: field 'text' is missing or null")


def test_hub_rows_are_named_by_1_based_row(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, **kwargs: datasets.Dataset.from_dict({"text": ["hi", None]}))
    assert _error(tmp_path, "owner/corpus") == (
        "row 2 (1-based) of hub dataset 'owner/corpus': field 'text' is missing or null, "
        "expected a string")


def test_places_fall_back_to_row_numbers_when_lines_and_rows_disagree(tmp_path):
    # pyarrow reads two objects from one line: lines no longer tell rows apart
    (tmp_path / "d.jsonl").write_text('{"text": "a"} {"text": "b"}\n{"text": null}\n')
    assert _error(tmp_path, tmp_path / "d.jsonl").startswith(
        f"row 3 (1-based) of {tmp_path / 'd.jsonl'}: field 'text' is missing or null")


def test_locate_rows_agrees_with_what_datasets_reads(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"n": 0}\r\n\r\n \t\r\n{"n": 1}\r{"n": 2}\n')
    (data / "b.jsonl").write_bytes(b'\n\n{"n": 3}\n{"n": 4}')
    (data / "c.json").write_text('[{"n": 5},\n\n {"n": 6}]')
    src = resolve_source(str(data))
    raw = load_raw(src, split="train", hf_cache_dir=str(tmp_path / "hf"))
    places = sources_module.locate_rows(src, range(len(raw)), num_rows=len(raw))
    a, b, c = (str(data / name) for name in ["a.jsonl", "b.jsonl", "c.json"])
    assert places == [f"{a}:1", f"{a}:4", f"{a}:5", f"{b}:3", f"{b}:4",
                      f"{c}:1 (element 1)", f"{c}:3 (element 2)"]
    assert raw["n"] == list(range(7))
    assert sources_module.locate_row(src, 3) == f"{b}:3"


def test_empty_documents_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    src = jsonl(tmp_path / "d.jsonl", [{"text": t} for t in ["hello", "", "world", " \n", "", "\t", "hi"]])
    ds = load_tokenized(src, tokenizer=word_tokenizer(), max_length=100)
    assert ds[0]["input_ids"] == w("hello") + [EOS] + w("world") + [EOS] + w("hi") + [EOS]
    assert (f"4 empty documents in column 'text' skipped: {src}:2, {src}:4, {src}:5, ..."
            in caplog.text)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("hello")
    (tmp_path / "txt" / "b.txt").write_text(" \n\n")
    load_tokenized(str(tmp_path / "txt"), tokenizer=word_tokenizer(), max_length=100)
    assert f"1 empty documents in column 'text' skipped: {tmp_path / 'txt' / 'b.txt'}\n" in caplog.text


def test_empty_completion_names_its_line(tmp_path):
    src = jsonl(tmp_path / "pc.jsonl", [{"prompt": "hi", "completion": "you"},
                                        {"prompt": "hi", "completion": " \n"}])
    assert _error(tmp_path, src).startswith(
        f"{src}:2: field 'completion' is empty: the example would train on EOS alone")


def test_empty_assistant_turn_warns_naming_its_line(tmp_path, caplog):
    empty = [CONVERSATION[0], {"role": "assistant", "content": ""}]
    src = jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": empty}])
    load_tokenized(src, tokenizer=word_tokenizer(chat_template=CHAT_PLAIN), max_length=64)
    assert f"1 chat examples with an assistant turn of empty content: {src}:2" in caplog.text
    assert f"{src}:2, ..." not in caplog.text


@pytest.mark.parametrize("third_line, expected", [
    ('{"txt": "typo"}', "field 'text' is missing or null, expected a string"),
    ('{"text": "the end",}', "not valid JSON (Expecting property name enclosed in double quotes "
                             "at column 20)"),
], ids=["missing-field", "broken-json"])
def test_data_error_through_the_cli_is_one_line_with_file_and_line(tmp_path, third_line, expected):
    from tests.conftest import write_config
    from tests.helpers import make_tokenizer, run_cli

    make_tokenizer(tmp_path / "tok")
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "the cat"}\n\n' + third_line + '\n{"text": "the dog"}\n')
    config = {
        "student": {"tokenizer": str(tmp_path / "tok"),
                    "config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                               "num_hidden_layers": 1, "num_attention_heads": 2,
                               "num_key_value_heads": 1, "max_position_embeddings": 64}},
        "data": {"train": str(bad), "format": "text", "max_length": 8},
        "loss": {"kd_weight": 0.0, "ce_weight": 1.0},
        "train": {"max_steps": 1, "batch_size": 1, "tracker": "none", "progress": False,
                  "output_dir": str(tmp_path / "run")},
    }
    result = run_cli("train", str(write_config(tmp_path / "c.yaml", config)),
                     env={"DISTILL_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("distill: error:")]
    assert lines == [f"distill: error: {bad}:3: {expected}"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "row 1" not in result.stderr  # datasets' 0-based row


# ---- caching --------------------------------------------------------------------------------


def _count_tokenize(monkeypatch) -> list:
    calls = []
    real = formats_module.tokenize_dataset

    def counting(*args, **kwargs):
        calls.append(kwargs["format"])
        return real(*args, **kwargs)

    monkeypatch.setattr(formats_module, "tokenize_dataset", counting)
    return calls


def test_cache_hit_skips_loading_and_tokenizing(tmp_path, monkeypatch):
    src = jsonl(tmp_path / "d.jsonl", [{"prompt": "hello", "completion": "world"}])
    cache = tmp_path / "cache"
    first = load_tokenized(src, tokenizer=word_tokenizer(), cache_dir=cache)
    entries = [p for p in os.listdir(cache) if not p.startswith(("hf-", "."))]
    assert len(entries) == 1 and len(entries[0]) == 64
    manifest = json.loads((cache / entries[0] / "manifest.json").read_text())
    assert manifest["resolved_format"] == "prompt_completion" and manifest["num_rows"] == 1
    assert not [p for p in os.listdir(cache) if p.startswith(".tmp")]

    def fail(*args, **kwargs):
        raise AssertionError("cache hit expected")

    monkeypatch.setattr(formats_module, "tokenize_dataset", fail)
    monkeypatch.setattr(loading_module, "load_raw", fail)
    second = load_tokenized(src, tokenizer=word_tokenizer(), cache_dir=cache)
    assert rows_of(second) == rows_of(first) == [(w("hello world") + [EOS], [X] + w("world") + [EOS])]


def test_cache_misses_when_anything_changes(tmp_path, monkeypatch):
    src = tmp_path / "d.jsonl"
    jsonl(src, [{"text": "hello world"}])
    cache = tmp_path / "cache"
    calls = _count_tokenize(monkeypatch)
    load_tokenized(str(src), tokenizer=word_tokenizer(), cache_dir=cache, max_length=8)
    load_tokenized(str(src), tokenizer=word_tokenizer(), cache_dir=cache, max_length=8)
    assert len(calls) == 1
    load_tokenized(str(src), tokenizer=word_tokenizer(), cache_dir=cache, max_length=9)
    load_tokenized(str(src), tokenizer=word_tokenizer(bos=True), cache_dir=cache, max_length=8)
    load_tokenized(str(src), tokenizer=word_tokenizer(), cache_dir=cache, max_length=8,
                   packing=False)
    assert len(calls) == 4
    jsonl(src, [{"text": "the cat"}])  # same size, new content
    ds = load_tokenized(str(src), tokenizer=word_tokenizer(), cache_dir=cache, max_length=8)
    assert len(calls) == 5 and ds[0]["input_ids"] == w("the cat") + [EOS]


def test_interrupted_cache_write_leaves_no_entry(tmp_path, monkeypatch):
    src = jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}])
    cache = tmp_path / "cache"

    def crash(self, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", crash)
    with pytest.raises(KeyboardInterrupt):
        load_tokenized(src, tokenizer=word_tokenizer(), cache_dir=cache)
    assert [p for p in os.listdir(cache) if not p.startswith("hf-")] == []
    monkeypatch.undo()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-home"))
    calls = _count_tokenize(monkeypatch)
    ds = load_tokenized(src, tokenizer=word_tokenizer(), cache_dir=cache)
    assert calls == ["text"] and ds[0]["input_ids"] == w("hello world") + [EOS]


def test_tokenizer_fingerprint():
    base = tokenizer_fingerprint(word_tokenizer())
    assert base == tokenizer_fingerprint(word_tokenizer())
    assert len(base) == 64
    others = [word_tokenizer(bos=True), word_tokenizer(chat_template=CHAT_PLAIN),
              word_tokenizer(extra_words=("dog",)), word_tokenizer(eos=False), bpe_tokenizer()]
    fingerprints = {tokenizer_fingerprint(t) for t in others}
    assert base not in fingerprints and len(fingerprints) == len(others)


# ---- collate --------------------------------------------------------------------------------


def test_collate_right_pads():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [X, 6, 7]},
                     {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[X, 6, 7], [8, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert {t.dtype for t in batch.values()} == {torch.int64}


def test_collate_pad_to_multiple_of():
    batch = collate([{"input_ids": [1] * 5, "labels": [1] * 5}], pad_token_id=9,
                    pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[1] * 5 + [9] * 3]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3]
    assert batch["labels"].shape == (1, 8)
    with pytest.raises(ValueError, match="differ in length"):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_token_id=0)


def test_dataloader_over_a_loaded_dataset(tmp_path):
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choices(WORDS[:8], k=rng.randint(1, 5))),
             "completion": " ".join(rng.choices(WORDS[:8], k=rng.randint(1, 5)))} for _ in range(10)]
    src = jsonl(tmp_path / "pc.jsonl", rows)
    ds = load_tokenized(src, tokenizer=word_tokenizer(), max_length=8)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, collate_fn=lambda ex: collate(ex, pad_token_id=PAD))
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    for batch in batches:
        real = batch["attention_mask"].bool()
        assert (batch["input_ids"][~real] == PAD).all() and (batch["labels"][~real] == X).all()
        assert ((batch["labels"] == X) | (batch["labels"] == batch["input_ids"])).all()
