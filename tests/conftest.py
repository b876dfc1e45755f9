import os

import pytest
import yaml

from tests.helpers import make_llama, make_tokenizer, run_cli, write_prompt_completion, write_text

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_config(path, config: dict):
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """Tokenizer, data and a teacher trained briefly by `distill train` itself (kd_weight 0)."""
    root = tmp_path_factory.mktemp("ws")
    os.environ["DISTILL_CACHE"] = str(root / "cache")
    tok = make_tokenizer(root / "tok")
    make_llama(root / "teacher_init", vocab_size=len(tok), layers=2, hidden=48, seed=1)
    write_text(root / "train.jsonl", 400, seed=0)
    write_text(root / "eval.jsonl", 40, seed=1)
    write_prompt_completion(root / "pc_train.jsonl", 64, seed=2)
    write_prompt_completion(root / "pc_eval.jsonl", 16, seed=3)
    config = {
        "student": {"model": str(root / "teacher_init"), "tokenizer": str(root / "tok")},
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_length": 32},
        "loss": {"kd_weight": 0.0, "ce_weight": 1.0},
        "train": {"max_steps": 60, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "tracker": "none",
                  "progress": False, "output_dir": str(root / "teacher_run")},
    }
    result = run_cli("train", str(write_config(root / "teacher.yaml", config)))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def distill_config(ws, out, **sections) -> dict:
    """A distillation config on the workspace: a 1-layer student from an architecture config."""
    config = {
        "teacher": {"model": str(ws / "teacher_run" / "student")},
        "student": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "max_position_embeddings": 128}},
        "data": {"train": str(ws / "train.jsonl"), "eval": str(ws / "eval.jsonl"), "max_length": 32},
        "loss": {"divergence": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.0},
        "train": {"max_steps": 8, "batch_size": 8, "lr": 3e-3, "tracker": "none", "progress": False,
                  "output_dir": str(out)},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config
