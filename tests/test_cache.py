"""The cache format: encodings round-trip within their stated error, sizes, and the config schema."""

import math

import numpy as np
import pytest
import torch

from distill.cache.format import SCHEMA, decode, encode, id_bytes, value_encoding, write_shard
from distill.config import load_config
from distill.errors import ConfigError
from distill.losses import sampled_targets, topk_targets


def synthetic_targets(n, vocab, k, *, seed=0, mode="topk"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 2.5  # (n, V)
    logits[0, :] = -1e4
    logits[0, 7] = 30.0  # a near-one-hot position: p ≈ 1, the rest underflows
    if mode == "sampled":
        return sampled_targets(logits, k, generator=g)
    return topk_targets(logits, k)


def round_trip(t, vocab, encoding):
    ids, logp, tail = (x.numpy() for x in (t.ids, t.logprobs, t.log_tail))
    cols = encode(ids, logp, tail, vocab_size=vocab, encoding=encoding)
    got = decode(cols["ids"], cols["values"], cols["log_tail"], positions=ids.shape[0], k=ids.shape[1],
                 vocab_size=vocab, encoding=encoding)
    order = np.argsort(ids, -1, kind="stable")
    return got, (np.take_along_axis(ids, order, -1), np.take_along_axis(logp, order, -1), tail)


@pytest.mark.parametrize("vocab", [45, 1000, 128256])  # 1, 2 and 3 bytes per id
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_topk_round_trip_ids_exact_logprobs_within_the_stated_error(vocab, dtype):
    encoding = value_encoding("topk", dtype, None)
    t = synthetic_targets(29, vocab, 13)
    (ids, logp, tail), (want_ids, want_logp, want_tail) = round_trip(t, vocab, encoding)
    assert id_bytes(vocab) == {45: 1, 1000: 2, 128256: 3}[vocab]
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(tail, want_tail)
    if dtype == "float32":
        np.testing.assert_array_equal(logp, want_logp)
        return
    step, floor = encoding["step"], -encoding["range"]
    in_range = want_logp >= floor
    err = np.abs(logp - want_logp)
    x = np.sqrt(-np.minimum(want_logp, 0))  # the documented per-entry bound: (x + sqrt(RANGE))·step + step²/2
    bound = (x + math.sqrt(encoding["range"])) * step + step**2 / 2 + 1e-6
    assert (err[in_range] <= bound[in_range]).all()
    assert err[in_range].max() <= encoding["max_abs_error"]
    assert (np.exp(logp[~in_range]) <= 2 * math.exp(floor)).all()  # below the floor: a tiny probability
    total = np.logaddexp(np.logaddexp.reduce(logp.astype(np.float64), -1), tail)  # renormalized: Σ p + r = 1
    np.testing.assert_allclose(total, 0.0, atol=1e-5)


def test_sampled_round_trip_is_exact():
    t = synthetic_targets(31, 1000, 20, mode="sampled")
    encoding = value_encoding("sampled", None, 20)
    assert encoding["kind"] == "count_uint8" and value_encoding("sampled", None, 300)["kind"] == "count_uint16"
    (ids, logp, tail), (want_ids, want_logp, _) = round_trip(t, 1000, encoding)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(logp, want_logp, rtol=1e-6)  # log(c / S), empty slots −inf on both sides
    assert np.isneginf(tail).all()


def test_an_example_without_supervised_positions():
    encoding = value_encoding("topk", "uint8", None)
    cols = encode(np.zeros((0, 4), np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32), vocab_size=45,
                  encoding=encoding)
    ids, logp, tail = decode(cols["ids"], cols["values"], cols["log_tail"], positions=0, k=4, vocab_size=45,
                             encoding=encoding)
    assert ids.shape == (0, 4) and logp.shape == (0, 4) and tail.shape == (0,)


def test_at_most_200_bytes_per_position_at_k_64_with_a_128k_vocabulary(tmp_path):
    """Ids spread uniformly over the vocabulary (the worst case for the gap coding), uint8 values."""
    vocab, k, encoding = 128256, 64, value_encoding("topk", "uint8", None)
    rows, positions = [], 0
    for example in range(4):
        t = synthetic_targets(32, vocab, k, seed=example)
        cols = encode(t.ids.numpy(), t.logprobs.numpy(), t.log_tail.numpy(), vocab_size=vocab, encoding=encoding)
        rows.append({"example": example, "positions": 32, **cols})
        positions += 32
    write_shard(tmp_path / "shard-00000.parquet", rows)
    size = (tmp_path / "shard-00000.parquet").stat().st_size
    assert size / positions <= 200
    assert not list(tmp_path.glob(".tmp*"))
    assert [f.name for f in SCHEMA] == ["example", "positions", "ids", "values", "log_tail"]


BASE = {"student": {"config": {"model_type": "llama"}, "tokenizer": "tok"}, "data": {"train": "x.jsonl"}}


@pytest.mark.parametrize("sections, message", [
    ({"teacher": {"source": "cache"}}, "needs cache.dir"),
    ({"teacher": {"source": "cache"}, "cache": {"dir": "c"}, "loss": {"divergence": "jsd"}}, "forward_kl only"),
    ({"teacher": {"model": "t"}, "loss": {"sparse_mode": "tail"}}, "applies only to teacher.source=cache"),
    ({"teacher": {"model": "t"}, "cache": {"samples": 8}}, "cache.samples applies only"),
    ({"teacher": {"model": "t"}, "cache": {"mode": "sampled", "k": 8}}, "apply only to cache.mode=topk"),
    ({"teacher": {"model": "t"}, "cache": {"k": 0}}, "cache.k must be > 0"),
    ({"teacher": {"model": "t"}, "cache": {"temperature": 0}}, "cache.temperature"),
    ({"teacher": {"model": "t"}, "cache": {"shard_size": 0}}, "shard_size"),
    ({"teacher": {"model": "t"}, "cache": {"logprob_dtype": "int4"}}, "must be one of"),
    ({"teacher": {"model": "t"}, "cache": {"kk": 3}}, "did you mean 'cache.k'"),
    ({"teacher": {"source": "disk"}}, "must be one of live, cache"),
])
def test_config_errors(sections, message):
    with pytest.raises(ConfigError, match=message):
        load_config({**BASE, **sections})


def test_training_from_a_cache_needs_no_teacher_model():
    config = load_config({**BASE, "teacher": {"source": "cache"}, "cache": {"dir": "c"},
                          "loss": {"sparse_mode": "renormalized", "temperature": 2.0}})
    assert config.teacher.model is None and config.cache.k is None and config.loss.sparse_mode == "renormalized"
