"""Reading a teacher cache: verify it once, then hand out the targets of any set of examples.

``TeacherCache(folder)`` checks every shard against the manifest's size and sha256 (a corrupt or
truncated shard is a ``CacheError`` naming it), ``check`` compares the manifest with the run's
tokenizer and tokenized data, and ``targets(indices)`` returns the targets of those dataset examples
concatenated in order: exactly the rows of ``labels[:, 1:] != -100`` of the batch ``collate`` makes
from the same examples. Shards are read one Parquet row group at a time (a few dozen examples),
decoded, and kept in a small LRU, so shuffled batches do not read whole shards.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from distill.cache.format import CacheError, decode, read_manifest, verify_shard
from distill.losses import SparseTargets


class TeacherCache:
    """A verified cache folder (see ``distill.cache.format`` for what it holds)."""

    def __init__(self, folder, *, verify: bool = True, max_row_groups: int = 256):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if verify:
            for info in self.manifest["shards"]:
                verify_shard(self.folder, info)
        targets = self.manifest["targets"]
        self.mode, self.k, self.temperature = targets["mode"], targets["k"], float(targets["temperature"])
        self.vocab_size = self.manifest["vocab_size"]
        self.num_examples = self.manifest["data"]["examples"]
        self._encoding = self.manifest["encoding"]
        self._shard_size = self.manifest["shard_size"]
        self._group_size = self._encoding["row_group_size"]
        self._files: dict[int, pq.ParquetFile] = {}
        self._groups: OrderedDict = OrderedDict()  # (shard, row group) -> decoded examples
        self._max_groups = max_row_groups

    def check(self, *, tokenizer_sha256: str, data_fingerprint: str, num_examples: int) -> None:
        """Refuse a cache built for another tokenizer or other tokenized data (CacheError, one line)."""
        if self.manifest["tokenizer_sha256"] != tokenizer_sha256:
            raise CacheError(f"teacher cache {self.folder} was built with a different tokenizer than this run's; "
                             "rebuild it with `distill cache` using the same tokenizer")
        data = self.manifest["data"]
        if data["fingerprint"] != data_fingerprint or data["examples"] != num_examples:
            raise CacheError(f"teacher cache {self.folder} was built from different training data "
                             f"({data['examples']} examples from {data.get('train')}, this run has {num_examples}; "
                             "the tokenized contents differ); rebuild it with `distill cache` on this config")

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids (P, k) int64, logprobs (P, k) float32, log_tail (P,) float32 of dataset example ``index``."""
        if not 0 <= index < self.num_examples:
            raise IndexError(f"example {index} is not in the cache ({self.num_examples} examples)")
        shard, row = divmod(index, self._shard_size)
        group, offset = divmod(row, self._group_size)
        return self._group(shard, group)[offset]

    def targets(self, indices: list[int], device=None) -> SparseTargets:
        """The targets of these examples' supervised positions, concatenated in order.

        Shapes: returns ids/logprobs (N, k), log_tail (N,), N = their supervised positions.
        """
        parts = [self.example(i) for i in indices]
        ids, logprobs, tails = (torch.from_numpy(np.concatenate([p[j] for p in parts])) for j in range(3))
        return SparseTargets(ids, logprobs, tails, self.temperature).to(device)

    def _group(self, shard: int, group: int) -> list:
        key = (shard, group)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        if shard not in self._files:
            self._files[shard] = pq.ParquetFile(self.folder / self.manifest["shards"][shard]["file"])
        table = self._files[shard].read_row_group(group).to_pydict()
        decoded = [decode(i, v, t, positions=p, k=self.k, vocab_size=self.vocab_size,
                          encoding=self._encoding["values"])
                   for i, v, t, p in zip(table["ids"], table["values"], table["log_tail"], table["positions"])]
        self._groups[key] = decoded
        if len(self._groups) > self._max_groups:
            self._groups.popitem(last=False)
        return decoded
