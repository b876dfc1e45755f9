"""The teacher cache on disk: Parquet shards (zstd) and a JSON manifest.

Layout of a cache folder::

    manifest.json            written last, atomically: what the cache holds and each shard's checksum
    manifest.partial.json    while writing: the same header, without shards (what a re-run must match)
    shard-00000.parquet      examples [0, shard_size), renamed into place only when complete
    .tmp-shard-...           a shard being written

One Parquet row per dataset example (the index into the tokenized training data), holding its
supervised positions (``labels[1:] != -100``, in order) with k slots each:

    example   int64    the dataset index
    positions int32    P, the number of supervised positions
    ids       binary   (P, k) ids, each position's ids sorted ascending and delta-coded (the first id,
                       then the gaps, all >= 0) as little-endian unsigned integers of
                       ``id_bytes`` = ceil(log2(V) / 8) bytes, stored as byte planes (all lowest
                       bytes, then the next ...), which zstd compresses to about the gaps' entropy
    values    binary   (P, k), slot for slot with ``ids``: the values' codes as byte planes
    log_tail  binary   (P,) float32 little-endian: log of the teacher's mass outside the ids (−inf: none)

Value encodings (``values.kind`` in the manifest):

- ``logprob_sqrt_uint8`` / ``logprob_sqrt_uint16``: square-root companded log-probabilities,
  code c = round(sqrt(−log p) / step), step = sqrt(RANGE) / (2^bits − 2), clamped to sqrt(RANGE);
  the top code means p = 0 (an empty slot). The square root spends the codes where the mass is:
  fine steps near p = 1, coarser ones for rare ids. On reading, log p = −(c · step)² and the values
  are renormalized so that Σ_j p_j = 1 − r (r is stored exactly). Error bound, with x = sqrt(−log p):
  rounding moves log p by at most x·step + step²/4, the renormalization by at most the largest of
  those over the position, so |log p̂ − log p| <= (x + sqrt(RANGE))·step + step²/2 for
  log p >= −RANGE (uint8: <= 0.063 at p = 1, <= 0.126 at the floor); below −RANGE, p̂ ≈ e^−RANGE.
  RANGE is 16 for uint8 (step 0.0157, floor 1.1e-7) and 32 for uint16 (step 8.6e-5, floor 1.3e-14).
- ``logprob_float32``: log p exactly as computed (float32).
- ``count_uint8`` / ``count_uint16`` (sampled targets): how often the id was drawn; log p = log(c / S),
  exact; c = 0 marks an empty slot.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distill import faults
from distill.errors import UserError

FORMAT = "distill-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
ROW_GROUP_SIZE = 32  # examples per Parquet row group: the unit the reader decodes for random access
LOGPROB_RANGE = {"uint8": 16.0, "uint16": 32.0}
SCHEMA = pa.schema([("example", pa.int64()), ("positions", pa.int32()), ("ids", pa.binary()),
                    ("values", pa.binary()), ("log_tail", pa.binary())])


class CacheError(UserError):
    """A cache that is missing, incomplete, corrupt or does not match the run."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def id_bytes(vocab_size: int) -> int:
    """Bytes per delta-coded id: enough for any id below ``vocab_size``."""
    return max(1, math.ceil(math.log2(max(vocab_size, 2)) / 8))


def value_encoding(mode: str, logprob_dtype: str | None, samples: int | None) -> dict:
    """The manifest's description of how values are stored (see the module docstring)."""
    if mode == "sampled":
        bits = 8 if samples <= 255 else 16
        return {"kind": f"count_uint{bits}", "samples": samples, "max_abs_error": 0.0}
    if logprob_dtype == "float32":
        return {"kind": "logprob_float32", "max_abs_error": 0.0}
    bits = 8 if logprob_dtype == "uint8" else 16
    value_range = LOGPROB_RANGE[logprob_dtype]
    step = math.sqrt(value_range) / (2**bits - 2)
    return {"kind": f"logprob_sqrt_uint{bits}", "range": value_range, "step": step, "empty_code": 2**bits - 1,
            "renormalized_on_read": True, "max_abs_error": 2 * math.sqrt(value_range) * step + step**2 / 2}


# ---------------------------------------------------------------------------------------------
# Encoding one example's targets


def _planes(values: np.ndarray, nbytes: int) -> bytes:
    """Unsigned little-endian integers (or float32) as ``nbytes`` byte planes."""
    raw = np.ascontiguousarray(values).view(np.uint8).reshape(values.size, values.itemsize)
    return np.ascontiguousarray(raw[:, :nbytes].T).tobytes()


def _unplanes(blob: bytes, nbytes: int, dtype) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    planes = np.frombuffer(blob, dtype=np.uint8).reshape(nbytes, -1)
    raw = np.zeros((planes.shape[1], itemsize), dtype=np.uint8)
    raw[:, :nbytes] = planes.T
    return raw.view(dtype).reshape(-1)


def encode(ids: np.ndarray, logprobs: np.ndarray, log_tail: np.ndarray, *, vocab_size: int,
           encoding: dict) -> dict:
    """One example's targets as the ``ids``, ``values``, ``log_tail`` columns.

    Shapes: ids (P, k) int, logprobs (P, k) float (log p, −inf for empty slots), log_tail (P,).
    """
    order = np.argsort(ids, axis=-1, kind="stable")
    ids = np.take_along_axis(ids.astype(np.int64), order, -1)  # (P, k) ascending
    logprobs = np.take_along_axis(logprobs.astype(np.float64), order, -1)  # (P, k)
    gaps = np.diff(ids, axis=-1, prepend=0).astype(np.uint32)  # (P, k): first id, then gaps >= 0
    kind = encoding["kind"]
    empty = np.isneginf(logprobs)
    if kind == "logprob_float32":
        codes, nbytes = logprobs.astype(np.float32), 4
    elif kind.startswith("logprob_sqrt_uint"):
        top = encoding["empty_code"]
        root = np.sqrt(-np.minimum(np.where(empty, 0.0, logprobs), 0.0))  # sqrt(−log p)
        codes = np.clip(np.rint(root / encoding["step"]), 0, top - 1)
        codes = np.where(empty, top, codes).astype(np.uint16)
        nbytes = 1 if kind.endswith("uint8") else 2
    else:  # counts
        codes = np.where(empty, 0, np.rint(np.exp(logprobs) * encoding["samples"])).astype(np.uint16)
        nbytes = 1 if kind == "count_uint8" else 2
    return {"ids": _planes(gaps, id_bytes(vocab_size)), "values": _planes(codes, nbytes),
            "log_tail": np.asarray(log_tail, dtype="<f4").tobytes()}


def decode(ids: bytes, values: bytes, log_tail: bytes, *, positions: int, k: int, vocab_size: int,
           encoding: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of ``encode``: ids (P, k) int64 ascending, logprobs (P, k) float32, log_tail (P,) float32."""
    gaps = _unplanes(ids, id_bytes(vocab_size), np.uint32).reshape(positions, k)
    out_ids = np.cumsum(gaps, axis=-1, dtype=np.int64)  # (P, k)
    tail = np.frombuffer(log_tail, dtype="<f4").astype(np.float32)  # (P,)
    kind = encoding["kind"]
    with np.errstate(divide="ignore"):
        if kind == "logprob_float32":
            logprobs = _unplanes(values, 4, np.float32).reshape(positions, k)
        elif kind.startswith("logprob_sqrt_uint"):
            nbytes = 1 if kind.endswith("uint8") else 2
            codes = _unplanes(values, nbytes, np.uint16).reshape(positions, k)
            logp = np.where(codes == encoding["empty_code"], -np.inf, -(codes * float(encoding["step"])) ** 2)
            # Renormalize so that Σ p + r = 1 (r is exact): keeps every error within one step.
            listed = np.log(np.exp(logp).sum(-1, keepdims=True))  # (P, 1)
            head = np.log1p(-np.exp(tail.astype(np.float64)))[:, None]  # (P, 1): log(1 − r)
            shift = np.where(np.isfinite(listed), head - listed, 0.0)
            logprobs = (logp + shift).astype(np.float32)
        else:
            nbytes = 1 if kind == "count_uint8" else 2
            codes = _unplanes(values, nbytes, np.uint16).reshape(positions, k)
            logprobs = np.log(codes / encoding["samples"]).astype(np.float32)
    return out_ids, logprobs, tail


# ---------------------------------------------------------------------------------------------
# Shards and manifests


def write_shard(path: Path, rows: list[dict]) -> None:
    """Write rows (dicts with the SCHEMA's columns) to ``path``: a temporary name, then a rename."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    tmp = path.with_name(f".tmp-{path.stem}-{os.getpid()}.parquet")
    pq.write_table(table, tmp, compression="zstd", use_dictionary=False, row_group_size=ROW_GROUP_SIZE,
                   write_statistics=False)
    faults.point("shard")
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_info(path: Path, index: int, first_example: int) -> dict:
    meta = pq.ParquetFile(path).metadata
    positions = pq.read_table(path, columns=["positions"]).column(0).to_numpy().sum()
    return {"file": path.name, "index": index, "first_example": first_example, "examples": meta.num_rows,
            "positions": int(positions), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def verify_shard(folder: Path, info: dict) -> None:
    """Raise CacheError naming the shard if it is missing, truncated or corrupt."""
    path = folder / info["file"]
    hint = "; delete it and run `distill cache` again to rewrite it"
    if not path.is_file():
        raise CacheError(f"cache shard {path} is missing{hint}")
    size = path.stat().st_size
    if size != info["bytes"]:
        raise CacheError(f"cache shard {path} is truncated or corrupt ({size} bytes, the manifest says "
                         f"{info['bytes']}){hint}")
    if file_sha256(path) != info["sha256"]:
        raise CacheError(f"cache shard {path} is corrupt (sha256 checksum mismatch){hint}")


def write_json(path: Path, data: dict, fault: str = "") -> None:
    """``data`` as JSON at ``path``: a temporary name, then a rename (``fault``: a kill-test point)."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if fault:
        faults.point(fault)
    os.replace(tmp, path)


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        incomplete = (Path(folder) / PARTIAL).exists()
        hint = " (it is incomplete: run `distill cache` again to finish it)" if incomplete else ""
        raise CacheError(f"no teacher cache at {folder}: {MANIFEST} not found{hint}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(f"{path}: not a {FORMAT} manifest of version {VERSION}")
    return manifest


# ---------------------------------------------------------------------------------------------
# Fingerprints recorded in the manifest


def data_fingerprint(dataset) -> str:
    """sha256 of the tokenized data's content: every example's input_ids and labels, in order."""
    digest = hashlib.sha256()
    table = dataset.with_format("arrow")
    for start in range(0, len(dataset), 4096):
        batch = table[start:start + 4096]
        for column in ("input_ids", "labels"):
            array = batch.column(column).combine_chunks()
            digest.update(array.value_lengths().to_numpy(zero_copy_only=False).astype("<i8").tobytes())
            digest.update(array.flatten().to_numpy(zero_copy_only=False).astype("<i8").tobytes())
    return digest.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the parameters and buffers as loaded: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
