"""Data loading: local files or hub datasets -> tokenized ``input_ids`` / ``labels``.

``load_tokenized`` reads, tokenizes (text packed into blocks; prompt/completion and chat with
only completion / assistant tokens supervised) and caches; ``collate`` pads a batch.

A mistake in the data raises ``DataError`` (a ``UserError``: the CLI prints one line and exits 2)
that names the place to open in an editor, e.g. ``/data/train.jsonl:17: not valid JSON (Expecting
',' delimiter at column 12)`` or ``/data/train.jsonl:17: field 'text' is missing or null, expected
a string``; see ``sources`` for how places are counted and ``formats`` for what each format checks.
"""

from distill.data.cache import tokenizer_fingerprint
from distill.data.collate import collate
from distill.data.formats import IGNORE_INDEX
from distill.data.loading import data_format, load_tokenized
from distill.data.sources import DataError

__all__ = ["DataError", "IGNORE_INDEX", "collate", "data_format", "load_tokenized", "tokenizer_fingerprint"]
