"""The teacher's signal behind one interface: "what does the teacher say about these positions".

A teacher answers ``signal(inputs, mask, examples, want=..., tokens=...)`` for the supervised
positions of one micro-batch (``mask``'s True entries, row-major, the order every loss uses) with a
``TeacherSignal``. What it can give depends on where it comes from:

- ``LiveTeacher`` (``live.py``): a model in memory. Full distributions (``want="logits"``), final
  hidden states + LM head for the fused chunked loss (``"hidden"``), or the log-probability of given
  tokens (``"token_logprobs"``). (Its samples for sequence-level KD come from
  ``distill.generation.sample`` on the same model.)
- ``CacheTeacher`` (``cache.py``): a `distill cache` folder. Sparse top-k / sampled targets looked
  up by training-example index, whatever ``want`` says (the loss then uses the sparse form).

Adding a source (an HTTP endpoint that returns log-probs of given tokens) is one file with one class.
"""

from distill.teachers.base import Teacher, TeacherSignal, finite
from distill.teachers.cache import CacheTeacher
from distill.teachers.live import LiveTeacher

__all__ = ["CacheTeacher", "LiveTeacher", "Teacher", "TeacherSignal", "finite"]
