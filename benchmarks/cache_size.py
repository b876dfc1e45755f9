"""Bytes per position of the teacher cache at several k, against a bf16 full distribution (2·V bytes).

    python benchmarks/cache_size.py                         # the table in BENCHMARKS.md
    python benchmarks/cache_size.py --vocab 32000 --ks 8 64 --positions 4096

Synthetic teacher distributions over a V-token vocabulary: logits = σ·N(0, 1) + prior, with
``--prior uniform`` (every id equally likely to be in the top k: the worst case for the gap coding
of ids) or ``--prior zipf`` (logit += −log(rank): frequent ids, which BPE vocabularies number
first, are likelier, as with real teachers). Targets are made by the cache's own functions
(``topk_targets`` / ``sampled_targets``), encoded by ``distill.cache.format.encode`` and written
as one real Parquet shard (zstd) with ``write_shard``; bytes/position is the shard's file size
divided by the positions in it. The max |Δ log p| column is the round trip's measured error for
log p >= −RANGE (see the format's docstring for the bound).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow
import torch

from distill.cache.format import decode, encode, value_encoding, write_shard
from distill.losses import sampled_targets, topk_targets


def measure(vocab: int, k: int, mode: str, dtype: str | None, positions: int, prior: str, sigma: float) -> dict:
    g = torch.Generator().manual_seed(0)
    encoding = value_encoding(mode, dtype, k if mode == "sampled" else None)
    rows, err, per_example = [], 0.0, 64
    bias = -torch.log(torch.arange(1, vocab + 1, dtype=torch.float32)) if prior == "zipf" else 0.0
    for example in range(positions // per_example):
        logits = torch.randn(per_example, vocab, generator=g) * sigma + bias  # (P, V)
        t = (topk_targets(logits, k) if mode == "topk" else sampled_targets(logits, k, generator=g))
        ids, logp, tail = (x.numpy() for x in (t.ids, t.logprobs, t.log_tail))
        cols = encode(ids, logp, tail, vocab_size=vocab, encoding=encoding)
        rows.append({"example": example, "positions": per_example, **cols})
        _, got, _ = decode(cols["ids"], cols["values"], cols["log_tail"], positions=per_example, k=k,
                           vocab_size=vocab, encoding=encoding)
        want = np.take_along_axis(logp, np.argsort(ids, -1, kind="stable"), -1)
        ok = np.isfinite(want) & (want >= -encoding.get("range", np.inf))
        err = max(err, float(np.abs(got[ok] - want[ok]).max()))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard-00000.parquet"
        write_shard(path, rows)
        size = path.stat().st_size
    n = per_example * len(rows)
    return {"k": k, "mode": mode, "values": encoding["kind"], "bytes": size / n, "vs_bf16": size / n / (2 * vocab),
            "err": err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["uint8", "uint16", "float32"])
    parser.add_argument("--samples", type=int, nargs="*", default=[64], help="sampled-mode widths to add")
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--prior", nargs="+", default=["uniform", "zipf"])
    parser.add_argument("--sigma", type=float, default=2.5)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, Python {sys.version.split()[0]}, "
          f"torch {torch.__version__}, pyarrow {pyarrow.__version__}, {datetime.date.today()}")
    print(f"V = {args.vocab}: a bf16 full distribution is {2 * args.vocab:,} bytes/position\n")
    print("| ids prior | k | values | bytes/position | vs bf16 full | max abs. error of log p |")
    print("|---|---|---|---|---|---|")
    for prior in args.prior:
        cases = [(k, "topk", d) for d in args.dtypes for k in args.ks] + [(s, "sampled", None) for s in args.samples]
        for k, mode, dtype in cases:
            r = measure(args.vocab, k, mode, dtype, args.positions, prior, args.sigma)
            name = r["values"] + (f" (S = {k})" if mode == "sampled" else "")
            print(f"| {prior} | {k} | {name} | {r['bytes']:.1f} | {r['vs_bf16']:.2%} | {r['err']:.2g} |", flush=True)


if __name__ == "__main__":
    main()
