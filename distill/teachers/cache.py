"""The teacher as a `distill cache` folder: sparse targets by training-example index."""

from __future__ import annotations

import time
from typing import Optional, Sequence

from torch import Tensor

from distill.teachers.base import TeacherSignal, finite


class CacheTeacher:
    """Targets from a verified ``TeacherCache``; row i of example e's targets belongs to e's i-th
    supervised position. Only training examples have targets: sampled text has none, and neither
    does "token_logprobs" (a top-k list may not hold the token)."""

    def __init__(self, cache, device):
        self.cache, self.device, self.seconds = cache, device, 0.0

    def signal(self, inputs: dict, mask: Tensor, examples: Optional[Sequence[int]], *, want: str,
               tokens: Optional[Tensor] = None) -> TeacherSignal:
        if want == "token_logprobs":
            raise ValueError("a teacher cache holds top-k / sampled targets, not the log-probability of any token")
        if examples is None:
            raise ValueError("a teacher cache has targets for training examples only, not for sampled text")
        tic = time.perf_counter()
        targets = self.cache.targets(list(examples), self.device)
        self.seconds += time.perf_counter() - tic
        return TeacherSignal(ok=finite(targets.logprobs) & finite(targets.log_tail), targets=targets)
