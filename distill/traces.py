"""Pure text functions of `distill generate`: final answers of reasoning traces, and near-duplicates.

**Answers.** ``extract_answer(text, pattern)`` is the LAST match of ``pattern``'s one group in
``text`` (a trace may restate intermediate results; the final line counts), stripped, or None.
``normalize_answer`` makes equal answers compare equal: surrounding space, a trailing period,
``$`` and thousands separators go, numbers compare as numbers (``1,000.0`` == ``1000``), anything
else case-insensitively with single spaces. ``verdict`` is "correct", "wrong" or "unparseable".

**Near-duplicates.** ``NearDuplicates`` keeps texts whose normalized form (lower case, words only)
was not seen before and whose word n-gram set overlaps no kept text's by more than
``max_overlap`` (Jaccard), the filters synthetic-data pipelines use (exact hash + n-gram overlap).
"""

from __future__ import annotations

import hashlib
import re
from decimal import Decimal, InvalidOperation
from typing import Optional

_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
_WORDS = re.compile(r"\w+")


def extract_answer(text: str, pattern: str) -> Optional[str]:
    """The last match of ``pattern``'s group 1 in ``text`` (multiline: ^ and $ match at line ends)."""
    matches = list(re.finditer(pattern, text, flags=re.MULTILINE))
    if not matches:
        return None
    answer = matches[-1].group(1)
    return answer.strip() if answer is not None and answer.strip() else None


def normalize_answer(answer: str) -> str:
    """The comparable form of an answer (see the module docstring)."""
    s = " ".join(str(answer).split()).strip().rstrip(".").strip()
    s = s.replace("$", "").strip()
    bare = s.replace(",", "").replace("_", "")
    if _NUMBER.fullmatch(bare):
        try:
            value = Decimal(bare)
        except InvalidOperation:
            return s.lower()
        if value == value.to_integral_value():
            return format(value.to_integral_value(), "f").replace("-0", "0") if value == 0 else \
                format(value.to_integral_value(), "f")
        return format(value.normalize(), "f")
    return s.lower()


def verdict(text: str, reference, pattern: str) -> tuple[str, Optional[str]]:
    """("correct" | "wrong" | "unparseable", the extracted answer) of a trace against ``reference``."""
    answer = extract_answer(text, pattern)
    if answer is None:
        return "unparseable", None
    return ("correct" if normalize_answer(answer) == normalize_answer(str(reference)) else "wrong"), answer


def normalized_text(text: str) -> str:
    """Lower-case words joined by single spaces: what the exact-duplicate hash is taken of."""
    return " ".join(_WORDS.findall(text.lower()))


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The set of word n-grams of ``text`` (the whole word list when it has fewer than n words)."""
    words = _WORDS.findall(text.lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDuplicates:
    """A filter of texts: ``add(text)`` is True (and remembers it) unless it is a near-duplicate."""

    def __init__(self, n: int = 3, max_overlap: float = 0.6):
        self.n, self.max_overlap = n, max_overlap
        self._hashes: set[str] = set()
        self._grams: list[set] = []

    def reason(self, text: str) -> Optional[str]:
        """Why ``text`` would be rejected ("duplicate" or "overlap"), or None."""
        if hashlib.sha256(normalized_text(text).encode()).hexdigest() in self._hashes:
            return "duplicate"
        grams = ngrams(text, self.n)
        if any(jaccard(grams, kept) > self.max_overlap for kept in self._grams):
            return "overlap"
        return None

    def add(self, text: str) -> bool:
        if self.reason(text) is not None:
            return False
        self._hashes.add(hashlib.sha256(normalized_text(text).encode()).hexdigest())
        self._grams.append(ngrams(text, self.n))
        return True
