"""The config schema: strictness, suggestions, overrides, ranges, and every shipped example."""

from pathlib import Path

import pytest
import yaml

from distill.cli import main
from distill.config import Config, load_config, save_config
from distill.errors import ConfigError

# examples/accelerate holds `accelerate launch` configs, validated in test_fsdp.py.
EXAMPLES = sorted(p for p in Path(__file__).resolve().parents[1].joinpath("examples").rglob("*.yaml")
                  if "accelerate" not in p.parent.name)
MINIMAL = {"teacher": {"model": "t"}, "student": {"model": "s"}, "data": {"train": "d.jsonl"}}


def test_examples_exist():
    assert len(EXAMPLES) >= 3, EXAMPLES  # the glob is recursive: subfolders are included


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_example_config_validates(path):
    raw = yaml.safe_load(path.read_text())
    config = load_config(path, stage="generate" if "generate" in raw else "train")  # `distill generate` configs
    assert isinstance(config, Config)
    assert set(raw) <= {"task", "teacher", "student", "data", "loss", "train", "cache", "generation", "generate"}


def test_defaults_and_overrides():
    c = load_config(MINIMAL, ["loss.divergence=jsd", "loss.beta=0.3", "train.lr=3e-4",
                              "train.adam_betas=[0.8, 0.95]", "student.model=null", "student.init_from_teacher_layers=[0,2]"])
    assert c.loss.divergence == "jsd" and c.loss.beta == 0.3
    assert c.train.lr == 3e-4 and c.train.adam_betas == [0.8, 0.95]
    assert c.student.model is None and c.student.init_from_teacher_layers == [0, 2]
    assert c.loss.temperature == 1.0 and c.loss.scale_by_tau2 is True and c.train.grad_accum_steps == 1


def test_int_is_accepted_as_float_but_not_the_reverse():
    assert load_config(MINIMAL, ["train.lr=1"]).train.lr == 1.0
    assert load_config({**MINIMAL, "train": {"lr": "3e-4"}}).train.lr == 3e-4  # YAML 1.1 gives a str
    with pytest.raises(ConfigError, match=r"train.batch_size: expected an integer"):
        load_config(MINIMAL, ["train.batch_size=8.5"])


@pytest.mark.parametrize("override, message", [
    (["train.learning_rate=1e-3"], r"unknown key 'train.learning_rate'"),
    (["trian.lr=1e-3"], r"unknown key 'trian'.*did you mean 'train'"),
    (["train.max_step=10"], r"did you mean 'train.max_steps'"),
    (["loss.divergence=forward_kll"], r"unknown divergence 'forward_kll'.*did you mean 'forward_kl'"),
    (["loss.divergence=jsd", "loss.beta=1.0"], r"beta must be in \(0, 1\).*forward_kl or reverse_kl"),
    (["loss.divergence=jsd", "loss.beta=0"], r"forward_kl or reverse_kl"),
    (["loss.beta=0.5"], r"loss.beta applies only to jsd, not to forward_kl"),
    (["loss.divergence=skew_kl", "loss.alpha=1.0"], r"alpha must be in \[0, 1\)"),
    (["loss.temperature=0"], r"temperature must be > 0"),
    (["loss.compile=true", "loss.chunk_size=0"], r"loss.compile compiles the chunked loss: it needs loss.chunk_size > 0"),
    (["loss.kd_weight=0", "loss.ce_weight=0"], r"nothing to train"),
    (["teacher.model=null"], r"teacher.model is required when loss.kd_weight > 0"),
    (["student.config={model_type: llama}"], r"exactly one of student.model"),
    (["train.precision=fp8"], r"train.precision: must be one of fp32, bf16, fp16"),
    (["train.batch_size=0"], r"batch_size .* must be > 0"),
    (["train.progress=yes please"], r"expected true or false"),
    (["data.train=null"], r"data.train is required"),
    (["train=3"], r"train: expected a mapping"),
    (["noequals"], r"not of the form key.sub=value"),
    (["generation.lmbda=1.5"], r"generation.lmbda must be in \[0, 1\]"),
    (["generation.lambda=0.5"], r"unknown key 'generation.lambda'.*did you mean 'generation.lmbda'"),
    (["generation.top_p=0"], r"top_p in \(0, 1\]"),
    (["generation.max_new_tokens=0"], r"max_new_tokens and num_generations must be > 0"),
    (["generation.temperature=0"], r"generation.temperature must be > 0"),
    (["generation.seq_kd=true", "generation.lmbda=1"], r"seq_kd has no effect with generation.lmbda=1"),
    (["generation.lmbda=0.5", "loss.kd_weight=0", "loss.ce_weight=1"], r"lmbda > 0 needs loss.kd_weight > 0"),
    (["loss.divergence=sampled_reverse_kl"], r"needs generation.lmbda=1"),
    (["loss.divergence=sampled_reverse_kl", "generation.lmbda=1", "loss.temperature=2"],
     r"set loss.temperature=1"),
    (["loss.discount=0.5"], r"loss.discount applies only to sampled_reverse_kl"),
    (["loss.divergence=sampled_reverse_kl", "generation.lmbda=1", "loss.discount=2"], r"discount must be in \[0, 1\]"),
])
def test_bad_configs_are_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(MINIMAL, override)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "data": {"train": "data/train.jsonl"}}))
    assert load_config(path).data.train == str(tmp_path / "data" / "train.jsonl")


def test_saved_config_round_trips(tmp_path):
    c = load_config(MINIMAL, ["loss.divergence=skew_kl", "loss.alpha=0.2"])
    save_config(c, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == c


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "train": {"lr": "fast"}}))
    assert main(["config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "train.lr: expected a number" in err
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_cli_config_prints_resolved_config(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert main(["config", str(path), "train.seed=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["seed"] == 7 and printed["loss"]["divergence"] == "forward_kl"


def test_on_policy_settings_that_are_valid():
    c = load_config(MINIMAL, ["generation.lmbda=0.5", "loss.divergence=jsd", "loss.beta=0.5", "generation.top_k=20"])
    assert c.generation.lmbda == 0.5 and c.generation.top_k == 20 and c.generation.max_new_tokens == 128
    c = load_config(MINIMAL, ["loss.divergence=sampled_reverse_kl", "generation.lmbda=1", "loss.discount=0.9"])
    assert c.loss.discount == 0.9
    # Sequence-level KD alone (Kim & Rush): plain CE on the teacher's samples is a valid objective.
    c = load_config(MINIMAL, ["generation.seq_kd=true", "loss.kd_weight=0", "loss.ce_weight=1"])
    assert c.generation.seq_kd and c.generation.lmbda == 0


CROSS = {**MINIMAL, "student": {"config": {"model_type": "llama"}, "tokenizer": "other-tok"},
         "loss": {"cross_tokenizer": {}}}


@pytest.mark.parametrize("override, message", [
    (["loss.cross_tokenizer.exact_weight=0", "loss.cross_tokenizer.uld_weight=0"], "not both 0"),
    (["loss.cross_tokenizer.uld_weight=-1"], "must be >= 0"),
    (["teacher.source=cache", "cache.dir=c"], "top-k cache"),
    (["loss.divergence=sampled_reverse_kl", "generation.lmbda=1"], "sampled_reverse_kl"),
    (["generation.seq_kd=true"], "seq_kd"),
    (["loss.cross_tokenizer.uld_tokens=some"], "uld_tokens"),
])
def test_cross_tokenizer_settings_are_checked(override, message):
    assert load_config(CROSS).loss.cross_tokenizer.exact_mode == "renormalized"
    with pytest.raises(ConfigError, match=message):
        load_config(CROSS, override)


def test_cross_tokenizer_refuses_teacher_layer_init():
    with pytest.raises(ConfigError, match="embeddings"):
        load_config({**CROSS, "student": {"init_from_teacher_layers": [0], "tokenizer": "t"}})
