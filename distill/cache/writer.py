"""`distill cache`: run the teacher once over the training data and store its sparse targets.

The data is loaded, tokenized and packed by the same code and arguments as ``distill train``, so
cache row i holds the targets of training example i. Shard s holds examples
[s · shard_size, (s + 1) · shard_size) and is computed in fixed batches of consecutive examples, so
its bytes depend only on the teacher, the data and the cache settings: a killed run re-run, or the
same cache written by several processes (each takes shards rank, rank + world, ...), gives the same
files. A shard is written to a temporary name and renamed when complete; a re-run skips the shards
that exist and writes the rest; the manifest is written last, by the main process.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from distill.cache.format import (FORMAT, MANIFEST, PARTIAL, ROW_GROUP_SIZE, VERSION, CacheError, data_fingerprint,
                                  encode, id_bytes, read_manifest, shard_info, shard_name, value_encoding,
                                  verify_shard, weights_sha256, write_json, write_shard)
from distill import faults
from distill.errors import ConfigError
from distill.losses import SparseTargets, chunk_slices, sampled_targets, slice_vocab, topk_targets
from distill.teachers import LiveTeacher

DEFAULT_K = 64
DEFAULT_SAMPLES = 64
TARGET_CHUNK = 256  # rows of teacher logits alive at once (the same bound as the chunked loss)


@dataclass
class TargetSpec:
    """What to store per position: ``mode`` topk (``width`` = k) or sampled (``width`` = samples)."""

    mode: str
    width: int
    temperature: float
    encoding: dict
    seed: int = 0


@torch.no_grad()
def teacher_targets(teacher: LiveTeacher, inputs: dict, mask: torch.Tensor, spec: TargetSpec, *, vocab_size: int,
                    generator: Optional[torch.Generator] = None) -> SparseTargets:
    """The teacher's sparse targets at the supervised positions of one batch, a chunk of rows at a time.

    Shapes: inputs' tensors (B, T); mask (B, T-1); returns ids/logprobs (N, width), log_tail (N,).
    A position whose logits hold a NaN or +inf gets NaN log-probabilities and tail (never a sample
    drawn from them), for the caller to refuse.
    """
    # Final hidden states + head where the head is a plain linear map: never all (N, V) logits, the
    # head runs per chunk; otherwise (soft-capping, logit scaling) the teacher's full logits.
    signal = teacher.signal(inputs, mask, want="hidden")
    if signal.hidden is not None:
        rows_in = signal.hidden  # (N, d)
        head = lambda h: F.linear(h, signal.weight, signal.bias)  # noqa: E731
    else:
        rows_in, head = signal.logits, None  # (N, V)
    parts = []
    for rows in chunk_slices(rows_in.shape[0], TARGET_CHUNK):
        logits = slice_vocab(head(rows_in[rows]) if head is not None else rows_in[rows], vocab_size)  # (C, V)
        broken = ~torch.isfinite(logits.amax(-1, keepdim=True))  # (C, 1): one pass; amax keeps a NaN or +inf
        logits = torch.where(broken, 0.0, logits)
        if spec.mode == "topk":
            part = topk_targets(logits, spec.width, temperature=spec.temperature)
        else:
            part = sampled_targets(logits, spec.width, temperature=spec.temperature, generator=generator)
        nan = torch.tensor(float("nan"), device=logits.device)
        parts.append(SparseTargets(part.ids, torch.where(broken, nan, part.logprobs),
                                   torch.where(broken[:, 0], nan, part.log_tail), part.temperature))
    if not parts:
        return SparseTargets.empty((0,), spec.width, spec.temperature, device=mask.device)
    return SparseTargets(torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]),
                         torch.cat([p.log_tail for p in parts]), spec.temperature)


def shard_rows(teacher: LiveTeacher, dataset, examples: range, spec: TargetSpec, *, vocab_size: int, batch_size: int,
               pad_token_id: int, device, shard_index: int) -> list[dict]:
    """The Parquet rows of one shard: the encoded targets of ``examples``, in fixed batches.

    Raises CacheError naming the example and the shard if the teacher's targets hold a NaN or +inf
    (−inf is an empty slot): such a shard is never written."""
    from distill.build import fetch  # the trainer's own batching: the same padding and masks

    generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + shard_index) if spec.mode == "sampled" else None
    rows = []
    for start in range(examples.start, examples.stop, batch_size):
        indices = list(range(start, min(start + batch_size, examples.stop)))
        batch = fetch(dataset, indices, pad_token_id, device)
        mask = batch["labels"][:, 1:] != -100  # (B, T-1): the positions training supervises, in its order
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        targets = teacher_targets(teacher, inputs, mask, spec, vocab_size=vocab_size, generator=generator)
        ids, logprobs, tails = (x.float().cpu().numpy() if x.is_floating_point() else x.cpu().numpy()
                                for x in (targets.ids, targets.logprobs, targets.log_tail))
        broken = (np.isnan(logprobs) | np.isposinf(logprobs)).any(-1) | np.isnan(tails) | np.isposinf(tails)  # (N,)
        counts = mask.sum(1).tolist()
        if broken.any():
            row = int(np.flatnonzero(broken)[0])
            index = indices[int(np.searchsorted(np.cumsum(counts), row, side="right"))]
            raise CacheError(f"the teacher's outputs are non-finite (NaN or inf) for training example {index}, in "
                             f"{shard_name(shard_index)}, at {int(broken.sum())} positions of this batch; nothing of "
                             "that shard was written. Check the teacher (and teacher.dtype: float16 overflows easily)")
        offset = 0
        for index, count in zip(indices, counts):
            cols = encode(ids[offset:offset + count], logprobs[offset:offset + count], tails[offset:offset + count],
                          vocab_size=vocab_size, encoding=spec.encoding)
            rows.append({"example": index, "positions": count, **cols})
            offset += count
    return rows


def make_header(*, teacher_info: dict, tokenizer_sha256: str, vocab_size: int, dataset, data_info: dict,
                spec: TargetSpec, shard_size: int, batch_size: int) -> dict:
    """Everything the manifest records except the shards: what a re-run must match to continue."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "teacher": teacher_info,
        "tokenizer_sha256": tokenizer_sha256,
        "vocab_size": vocab_size,
        "data": {"fingerprint": data_fingerprint(dataset), "examples": len(dataset), **data_info},
        "targets": {"mode": spec.mode, "k": spec.width, "temperature": spec.temperature,
                    "seed": spec.seed if spec.mode == "sampled" else None},
        "encoding": {
            "rows": "one per example: example int64, positions int32, ids/values/log_tail binary",
            "ids": {"order": "ascending per position", "delta": "first id, then gaps", "bytes": id_bytes(vocab_size),
                    "layout": "little-endian byte planes"},
            "values": spec.encoding,
            "log_tail": "float32 little-endian",
            "compression": "zstd",
            "row_group_size": ROW_GROUP_SIZE,
        },
        "shard_size": shard_size,
        "num_shards": math.ceil(len(dataset) / shard_size),
        "teacher_batch_size": batch_size,
    }


def write_cache(teacher: LiveTeacher, dataset, folder, *, header: dict, spec: TargetSpec, vocab_size: int,
                pad_token_id: int, batch_size: int, shard_size: int, accelerator: Accelerator) -> dict:
    """Write (or finish) the cache in ``folder``; returns its manifest. Every process calls this."""
    folder = Path(folder)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    done = folder / MANIFEST
    recorded = None
    if done.exists():
        recorded = read_manifest(folder)
    elif (folder / PARTIAL).exists():
        recorded = json.loads((folder / PARTIAL).read_text())
    if recorded is not None:
        _check_same_cache(folder, {k: v for k, v in recorded.items() if k not in ("shards", "totals")}, header)
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".tmp-*"):  # shards of a killed run: never renamed, never visible
            stale.unlink()
        if recorded is not None and done.exists():  # a finished cache: its shards must still be intact
            for info in recorded["shards"]:
                if (folder / info["file"]).exists():
                    verify_shard(folder, info)
        else:
            write_json(folder / PARTIAL, header)
    accelerator.wait_for_everyone()

    n = len(dataset)
    written = 0
    with ThreadPoolExecutor(max_workers=1) as pool:  # writing overlaps the next shard's teacher forward
        pending = None
        for index in range(rank, header["num_shards"], world):
            path = folder / shard_name(index)
            if path.exists():
                continue
            rows = shard_rows(teacher, dataset, range(index * shard_size, min((index + 1) * shard_size, n)), spec,
                              vocab_size=vocab_size, batch_size=batch_size, pad_token_id=pad_token_id,
                              device=accelerator.device, shard_index=index)
            if pending is not None:
                pending.result()
            pending = pool.submit(write_shard, path, rows)
            written += 1
            if faults.ENV in os.environ:  # the kill tests: the shard is whole on disk before the kill
                pending.result()
                faults.point("shard-done")
        if pending is not None:
            pending.result()
    accelerator.wait_for_everyone()

    if main:
        shards = [shard_info(folder / shard_name(i), i, i * shard_size) for i in range(header["num_shards"])]
        positions, size = sum(s["positions"] for s in shards), sum(s["bytes"] for s in shards)
        manifest = {**header, "shards": shards,
                    "totals": {"positions": positions, "bytes": size,
                               "bytes_per_position": round(size / max(positions, 1), 3)}}
        write_json(done, manifest, fault="manifest")
        (folder / PARTIAL).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    manifest = read_manifest(folder)
    manifest["written_now"] = written
    return manifest


def _check_same_cache(folder: Path, old: dict, new: dict) -> None:
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        detail = [f"{k}.{s}" for k in changed if isinstance(old.get(k), dict) and isinstance(new.get(k), dict)
                  for s in sorted(set(old[k]) | set(new[k])) if old[k].get(s) != new[k].get(s)]
        raise CacheError(f"{folder} holds a different teacher cache ({', '.join((detail or changed)[:4])} changed); "
                         "use a new cache.dir, or delete that folder to start over")


# ---------------------------------------------------------------------------------------------
# The verb


def cache(config, overrides: Optional[list[str]] = None) -> dict:
    """`distill cache`: build the teacher's cache as ``config`` says (a Config, dict or YAML path)."""
    from distill import build
    from distill.config import load_config
    from distill.data import load_tokenized, tokenizer_fingerprint

    config = load_config(config, overrides)
    if config.task != "causal_lm":
        from distill.errors import UserError

        raise UserError(f"distill cache stores a causal LM's token distributions; task={config.task} trains from the "
                        "live teacher (its forward on a few classes or one embedding per example is cheap)")
    c, t = config.cache, config.teacher
    if not t.model:
        raise ConfigError("distill cache needs teacher.model (the model whose targets it stores)")
    if not c.dir:
        raise ConfigError("distill cache needs cache.dir (the folder to write)")
    accelerator = Accelerator(cpu=not build.has_accelerator())
    tok_name, tokenizer = build.load_run_tokenizer(config)
    dtype = build.teacher_dtype(config)
    teacher = build.load_teacher(config)
    vocab_size = build.shared_vocab(config, tok_name, tokenizer)
    if teacher.get_output_embeddings().weight.shape[0] < vocab_size:
        raise CacheError(f"the tokenizer has {vocab_size} tokens but the teacher's vocabulary has only "
                         f"{teacher.get_output_embeddings().weight.shape[0]} rows")
    teacher.to(accelerator.device)
    with accelerator.main_process_first():
        train_set = load_tokenized(config.data.train, split=config.data.train_split,
                                   max_examples=config.data.max_train_examples,
                                   **build.training_data_args(config, tokenizer))
    if c.mode == "topk":
        width = c.k or DEFAULT_K
        if width > vocab_size:
            raise ConfigError(f"cache.k={width} is larger than the vocabulary ({vocab_size})")
        spec = TargetSpec("topk", width, c.temperature, value_encoding("topk", c.logprob_dtype or "uint8", None))
    else:
        width = c.samples or DEFAULT_SAMPLES
        spec = TargetSpec("sampled", width, c.temperature, value_encoding("sampled", None, width), seed=c.seed)
    d = config.data
    header = make_header(
        teacher_info={"model": t.model, "revision": t.revision, "dtype": str(dtype).replace("torch.", ""),
                      "weights_sha256": weights_sha256(teacher)},
        tokenizer_sha256=tokenizer_fingerprint(tokenizer), vocab_size=vocab_size, dataset=train_set,
        data_info={"train": d.train, "format": d.format, "max_length": d.max_length, "packing": d.packing,
                   "max_train_examples": d.max_train_examples},
        spec=spec, shard_size=c.shard_size, batch_size=c.batch_size)
    manifest = write_cache(LiveTeacher(teacher, vocab_size), train_set, c.dir, header=header, spec=spec,
                           vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id, batch_size=c.batch_size,
                           shard_size=c.shard_size, accelerator=accelerator)
    return {"dir": str(c.dir), **manifest["totals"], "shards": len(manifest["shards"]),
            "written_now": manifest["written_now"], "main_process": accelerator.is_main_process}
