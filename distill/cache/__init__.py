"""The offline teacher cache: Parquet shards of sparse (top-k or sampled) teacher targets + a manifest.

- ``format``: the on-disk layout, the encodings and their error bounds, checksums, fingerprints.
- ``writer``: ``distill cache`` (``cache``) and ``write_cache``: run the teacher once, write shards.
- ``reader``: ``TeacherCache``: verify a cache, check it against a run, read targets per batch.
"""

from distill.cache.format import CacheError, data_fingerprint, decode, encode, value_encoding
from distill.cache.reader import TeacherCache

__all__ = ["CacheError", "TeacherCache", "data_fingerprint", "decode", "encode", "value_encoding"]
