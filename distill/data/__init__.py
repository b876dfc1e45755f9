"""Data loading: local files or hub datasets -> tokenized ``input_ids`` / ``labels``.

``load_tokenized`` reads, tokenizes (text packed into blocks; prompt/completion and chat with
only completion / assistant tokens supervised) and caches; ``collate`` pads a batch.
"""

from distill.data.cache import tokenizer_fingerprint
from distill.data.collate import collate
from distill.data.formats import IGNORE_INDEX
from distill.data.loading import load_tokenized
from distill.data.sources import DataError

__all__ = ["DataError", "IGNORE_INDEX", "collate", "load_tokenized", "tokenizer_fingerprint"]
