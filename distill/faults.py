"""Fault injection for the kill tests: the process SIGKILLs itself at a named point of a write.

``DISTILL_TEST_KILL_AT=NAME`` kills at the first pass through point NAME, ``NAME:N`` at the N-th.
Unset (always, outside the tests) every call is one dictionary lookup. The points:

    step        right after optimizer step N (``step:N``)
    checkpoint  a checkpoint's files are in its temporary folder, its completion marker is not
    rotate      the new checkpoint is complete and the oldest removed; the new one is not yet renamed in
    metrics     half of a metrics.jsonl line is written
    student     the final student's weights are in ``.tmp-student``, its tokenizer is not
    shard       a cache shard is written under its temporary name, not yet renamed
    shard-done  right after cache shard N is renamed into place (``shard-done:N`` counts from 1)
    manifest    the cache manifest is written under its temporary name, not yet renamed
    gen-chunk   a `distill generate` chunk is written under its temporary name, not yet renamed
    gen-chunk-done  right after generated chunk N is renamed into place (``gen-chunk-done:N``)
    gen-manifest    the generate manifest is written under its temporary name (data.* is complete)
    tokenized   the tokenized dataset is in its temporary folder, without its manifest
"""

from __future__ import annotations

import os
import signal
from typing import Callable, Optional

ENV = "DISTILL_TEST_KILL_AT"
_passes: dict[str, int] = {}


def point(name: str, before: Optional[Callable[[], object]] = None) -> None:
    """SIGKILL this process here if ``DISTILL_TEST_KILL_AT`` names this pass through ``name``;
    ``before`` runs first (e.g. writes half a line, so the kill cuts a write in two)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(nth or 1):
        if before is not None:
            before()
        os.kill(os.getpid(), signal.SIGKILL)
