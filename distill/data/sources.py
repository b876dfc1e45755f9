"""Where raw examples come from: local files (jsonl, json, parquet, txt) or a hub dataset.

A ``source`` string is resolved in this order:

1. an existing file or directory (a directory means every supported file under it, recursively);
2. a glob pattern (``data/*.jsonl``) that matches at least one file;
3. something that looks like a local path (has a supported extension, starts with ``/``, ``.``
   or ``~``, or has more than one ``/``) but does not exist: ``DataError`` "file not found";
4. otherwise a hub dataset id, loaded with ``datasets.load_dataset(id, split=split)``.

``.txt`` files use the ``datasets`` "text" builder with ``sample_by="document"``: each file is
one document (blank lines inside it are kept as text). ``.json`` may be JSON Lines or a JSON array
of objects. Local files always form a single split; ``split`` applies to hub datasets only.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass

import datasets

from distill.errors import UserError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}

# Files up to this size are fingerprinted by content; larger ones by size and mtime.
CONTENT_HASH_LIMIT = 64 * 1024 * 1024


class DataError(UserError, ValueError):
    """A mistake in the data the user can fix: missing file, empty data, missing column, ..."""


@dataclass(frozen=True)
class Source:
    """A resolved source: either local ``files`` read by ``builder``, or a ``hub_id``."""

    files: tuple[str, ...] = ()
    builder: str | None = None
    hub_id: str | None = None

    @property
    def is_local(self) -> bool:
        return self.hub_id is None

    def describe(self) -> str:
        if not self.is_local:
            return f"hub dataset {self.hub_id!r}"
        if len(self.files) == 1:
            return self.files[0]
        return f"{len(self.files)} files ({self.files[0]}, ...)"


def _supported(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in BUILDERS


def _looks_like_path(source: str) -> bool:
    return (
        _supported(source)
        or source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or "\\" in source
    )


def resolve_source(source: str) -> Source:
    """Turn a source string into local files (with their builder) or a hub id; see module doc."""
    if not source:
        raise DataError("data source is empty: give a file, a directory, a glob or a hub dataset id")
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        found = glob.glob(os.path.join(glob.escape(path), "**", "*"), recursive=True)
        files = sorted(f for f in found if os.path.isfile(f) and _supported(f))
        if not files:
            raise DataError(
                f"no data files in directory {source}: expected {', '.join(BUILDERS)} files"
            )
    elif os.path.isfile(path):
        files = [path]
    elif glob.has_magic(path) and glob.glob(path, recursive=True):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    elif _looks_like_path(source) or glob.has_magic(path):
        raise DataError(f"data file not found: {source} (check the path)")
    else:
        return Source(hub_id=source)

    unsupported = [f for f in files if not _supported(f)]
    if unsupported:
        raise DataError(
            f"unsupported data file {unsupported[0]}: use one of {', '.join(BUILDERS)}"
        )
    builders = {BUILDERS[os.path.splitext(f)[1].lower()] for f in files}
    if len(builders) > 1:
        raise DataError(
            f"data source {source} mixes file kinds ({', '.join(sorted(builders))}): use one kind"
        )
    return Source(files=tuple(os.path.abspath(f) for f in files), builder=builders.pop())


def _file_digest(path: str) -> str:
    stat = os.stat(path)
    if stat.st_size > CONTENT_HASH_LIMIT:
        return f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256={digest.hexdigest()}"


def local_fingerprint(src: Source) -> list[list[str]]:
    """Identity of local files without reading them into ``datasets``: path plus content hash
    (files up to 64 MiB) or size and mtime (larger files)."""
    return [[f, _file_digest(f)] for f in src.files]


def _all_empty(src: Source) -> bool:
    """Whether every file holds no data (whitespace-only text/json, zero-row parquet)."""
    for path in src.files:
        if src.builder == "parquet":
            import pyarrow.parquet as pq

            try:
                if pq.ParquetFile(path).metadata.num_rows > 0:
                    return False
            except Exception:
                return False
        else:
            with open(path, "rb") as f:
                if any(chunk.strip() for chunk in iter(lambda: f.read(1 << 20), b"")):
                    return False
    return True


def load_raw(src: Source, *, split: str, hf_cache_dir: str | None) -> datasets.Dataset:
    """Load the untokenized examples of a resolved source as one ``datasets.Dataset``."""
    if src.is_local:
        kwargs = {"sample_by": "document"} if src.builder == "text" else {}
        try:
            ds = datasets.load_dataset(
                src.builder,
                data_files=list(src.files),
                split="train",
                cache_dir=hf_cache_dir,
                **kwargs,
            )
        except Exception as e:  # datasets wraps parse errors in several exception types
            if _all_empty(src):
                raise DataError(f"data is empty: {src.describe()} has no examples") from e
            cause = e.__cause__ or e
            raise DataError(
                f"could not read {src.describe()} as {src.builder}: "
                f"{type(cause).__name__}: {' '.join(str(cause).split())}"
            ) from e
    else:
        try:
            ds = datasets.load_dataset(src.hub_id, split=split, cache_dir=hf_cache_dir)
        except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as e:
            raise DataError(
                f"data source {src.hub_id!r} is neither a local file nor a reachable hub dataset: {e}"
            ) from e
        except ValueError as e:  # e.g. an unknown split
            raise DataError(f"could not load hub dataset {src.hub_id!r} split {split!r}: {e}") from e
        if isinstance(ds, datasets.DatasetDict):  # pragma: no cover - split is always given
            raise DataError(f"hub dataset {src.hub_id!r}: choose a split")
    if len(ds) == 0:
        raise DataError(f"data is empty: {src.describe()} has no examples")
    return ds
