"""Every model distill writes carries its tokenizer's BOS / EOS / pad ids (config.json and
generation_config.json), so Hugging Face generation and llama.cpp stop where training meant them to."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, pipeline

from distill.models import align_special_tokens, load_tokenizer, student_from_config
from distill.quickstart import STUDENT_ARCH, TEACHER
from distill.training import save_student
from tests.conftest import distill_config, write_config
from tests.helpers import run_cli

QUOTE, EOS = 2, 0  # in the bundled tokenizer: '"' (Llama's default eos_token_id) and <|endoftext|>


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TEACHER))


def tiny(tokenizer):
    arch = {**STUDENT_ARCH, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
            "num_key_value_heads": 1}
    return student_from_config(arch, vocab_size=len(tokenizer))


def test_llama_defaults_are_replaced_by_the_tokenizers_ids(tokenizer):
    model = tiny(tokenizer)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (1, QUOTE)  # what HF's Llama defaults give
    changes = align_special_tokens(model, tokenizer)
    assert any("eos_token_id 2 ('\"') -> 0 ('<|endoftext|>')" in c for c in changes), changes
    assert (model.config.bos_token_id, model.config.eos_token_id) == (0, 0)
    g = model.generation_config
    assert (g.bos_token_id, g.eos_token_id, g.pad_token_id) == (0, 0, 0)
    # config.json's pad id would become the embedding's padding_idx (a frozen EOS row): not set there
    assert model.config.pad_token_id is None
    assert align_special_tokens(model, tokenizer) == []  # idempotent


def test_a_list_of_stop_ids_that_holds_the_eos_is_kept(tokenizer):
    model = tiny(tokenizer)
    model.generation_config.eos_token_id = [EOS, 7]  # e.g. an instruct model's <|im_end|> and <|endoftext|>
    align_special_tokens(model, tokenizer)
    assert model.generation_config.eos_token_id == [EOS, 7]


def test_a_tokenizer_without_bos_clears_a_bos_that_names_an_ordinary_token(tokenizer):
    model = tiny(tokenizer)
    no_bos = load_tokenizer(str(TEACHER))
    no_bos.bos_token = None
    align_special_tokens(model, no_bos)
    assert model.config.bos_token_id is None and model.generation_config.bos_token_id is None


class Force(LogitsProcessor):
    """Greedy decoding that writes ``ids`` in order, whatever the model says."""

    def __init__(self, ids, start):
        self.ids, self.start = ids, start

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[min(t, len(self.ids) - 1)]] = 0.0
        return forced


def test_a_saved_student_stops_at_endoftext_in_a_pipeline_not_at_a_quote(tokenizer, tmp_path):
    save_student(tiny(tokenizer), tokenizer, tmp_path)
    saved = json.loads((tmp_path / "student" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == EOS and saved["pad_token_id"] == EOS
    assert json.loads((tmp_path / "student" / "config.json").read_text())["eos_token_id"] == EOS

    generate = pipeline("text-generation", model=str(tmp_path / "student"), device="cpu")
    prompt = "def f():"
    start = len(tokenizer(prompt)["input_ids"])
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    forced = [QUOTE, a, QUOTE, EOS, b, b]  # the text: "a" and then <|endoftext|>
    out = generate(prompt, max_new_tokens=6, do_sample=False, return_full_text=False,
                   logits_processor=LogitsProcessorList([Force(forced, start)]))
    assert out[0]["generated_text"] == '"a"'  # with eos_token_id 2 it would have stopped at once


def test_train_fixes_a_pretrained_students_config_and_says_so(workspace, tmp_path):
    tok = load_tokenizer(str(workspace / "tok"))
    pretrained = tmp_path / "pretrained"
    shutil.copytree(workspace / "teacher_init", pretrained)
    for name in ("config.json", "generation_config.json"):  # a checkpoint with Llama's default ids
        raw = json.loads((pretrained / name).read_text())
        (pretrained / name).write_text(json.dumps({**raw, "bos_token_id": 1, "eos_token_id": 2}))
    assert tok.eos_token_id != 2
    config = distill_config(workspace, tmp_path / "run", student={"model": str(pretrained),
                                                                  "tokenizer": str(workspace / "tok"), "config": None},
                            train={"max_steps": 1})
    result = run_cli("train", str(write_config(tmp_path / "run.yaml", config)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the student's config disagrees with the tokenizer (" in result.stderr
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert student.config.eos_token_id == tok.eos_token_id
    assert student.generation_config.eos_token_id == tok.eos_token_id


def test_the_bundled_teacher_agrees_with_its_tokenizer(tokenizer):
    config = json.loads((TEACHER / "config.json").read_text())
    generation = json.loads((TEACHER / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == tokenizer.eos_token_id == EOS
    assert config["bos_token_id"] == generation["bos_token_id"] == tokenizer.bos_token_id
