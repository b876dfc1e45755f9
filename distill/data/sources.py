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

Errors in the data name the place a user opens in an editor (``locate_rows``): ``file:line`` for
JSON Lines (1-based physical lines; ``\\n``, ``\\r\\n`` and a lone ``\\r`` end a line, as for pyarrow;
blank lines, which ``datasets`` skips, are counted but hold no row), ``file:line (element N)`` for
a .json array, ``file row N`` for parquet, the file itself for .txt, and ``row N (1-based) of hub
dataset 'id'`` for hub data (and for files whose lines do not match the rows read). A JSON file
``datasets`` cannot parse is scanned afterwards (only then) for its first bad line:
``/data/train.jsonl:17: not valid JSON (Expecting ',' delimiter at column 12)``.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
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
        # The json builder logs its parse error (with a 0-based row) before raising; the DataError
        # below says it better, with the file and line.
        json_log = logging.getLogger("datasets.packaged_modules.json.json")
        level = json_log.level
        json_log.setLevel(logging.CRITICAL)
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
            if src.builder == "json":
                bad = first_bad_json(src)
                if bad is not None:
                    raise DataError(bad) from e
            cause = e.__cause__ or e
            raise DataError(
                f"could not read {src.describe()} as {src.builder}: "
                f"{type(cause).__name__}: {' '.join(str(cause).split())}"
            ) from e
        finally:
            json_log.setLevel(level)
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


# ---- where a row is -----------------------------------------------------------------------

_BLANK = b" \t"  # pyarrow's JSON whitespace within a line (a form feed is an error, not blank)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_JSON_SPACE = re.compile(r"[ \t\r\n]*")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "a boolean", type(None): "null"}


def _physical_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` of each physical line, 1-based, without its line break."""
    number = 0
    with open(path, "rb") as f:
        for chunk in f:  # split on \n; splitlines also ends a line at a lone \r, as pyarrow does
            for line in chunk.splitlines():
                number += 1
                yield number, line.removeprefix(codecs.BOM_UTF8) if number == 1 else line


def _is_json_array(path: str) -> bool:
    """Whether a JSON file holds one array (``datasets`` reads its elements as rows)."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(codecs.BOM_UTF8)
    return head.lstrip(b" \t\r\n").startswith(b"[")


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8-sig", newline="") as f:  # newline="": keep \r for counting
        return f.read()


def _array_element_lines(path: str) -> list[int]:
    """The 1-based line on which each element of a JSON array file starts."""
    text = _read_text(path)
    decoder = json.JSONDecoder()
    lines, line, counted = [], 1, 0
    pos = text.index("[") + 1
    while True:
        pos = _JSON_SPACE.match(text, pos).end()
        if text[pos] == "]":
            return lines
        line += len(_LINE_BREAK.findall(text, counted, pos))
        counted = pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)
        pos = _JSON_SPACE.match(text, pos).end()
        if text[pos] == ",":
            pos += 1


def _places(src: Source, path: str) -> Iterator[str]:
    """The place of each row that ``load_raw`` reads from ``path``, in order."""
    if src.builder == "parquet":
        import pyarrow.parquet as pq

        return (f"{path} row {n}" for n in range(1, pq.ParquetFile(path).metadata.num_rows + 1))
    if src.builder == "text":  # sample_by="document": the whole file is one row
        return iter([path])
    if _is_json_array(path):
        return (f"{path}:{line} (element {n})"
                for n, line in enumerate(_array_element_lines(path), 1))
    return (f"{path}:{number}" for number, line in _physical_lines(path) if line.strip(_BLANK))


def locate_rows(src: Source, indices: Sequence[int], *, num_rows: int | None = None) -> list[str]:
    """Where the rows at 0-based ``indices`` of ``load_raw(src)`` come from (see module doc).

    Files are read again, so call this only to report a problem. ``num_rows`` (the number of rows
    ``load_raw`` gave) guards the mapping: when the files give another count (e.g. two JSON objects
    on one line, or a file changed since), the places are ``row N (1-based) of <source>``.
    """
    by_row = [f"row {index + 1} (1-based) of {src.describe()}" for index in indices]
    if not src.is_local:
        return by_row
    wanted = {index: None for index in indices}
    last = max(wanted, default=-1)
    row = 0
    try:
        for path in src.files:
            for place in _places(src, path):
                if row in wanted:
                    wanted[row] = place
                row += 1
                if num_rows is None and row > last:
                    return [wanted[index] for index in indices]
    except (OSError, ValueError, IndexError):  # unreadable or changed since it was loaded
        return by_row
    if (num_rows is not None and row != num_rows) or None in wanted.values():
        return by_row
    return [wanted[index] for index in indices]


def locate_row(src: Source, index: int, *, num_rows: int | None = None) -> str:
    """``locate_rows`` for one row: e.g. ``/data/train.jsonl:17``."""
    return locate_rows(src, [index], num_rows=num_rows)[0]


def first_bad_json(src: Source) -> str | None:
    """``file:line: reason`` for the first line of ``src``'s JSON files that is not a JSON object
    (or, for a JSON array file, where it stops parsing); ``None`` when every line parses.

    When every line parses, the first line whose top-level field changes JSON type (a string on
    one line, a number on another) is named instead: ``datasets`` cannot always read those.
    """
    seen = {}  # field -> (kind, place) where it was first seen
    mixed = None
    for path in src.files:
        if _is_json_array(path):
            with open(path, "rb") as f:
                data = f.read().removeprefix(codecs.BOM_UTF8)
            try:
                json.loads(data.decode("utf-8"))
            except UnicodeDecodeError as e:
                line = len(_LINE_BREAK.findall(data[: e.start].decode("utf-8"))) + 1
                return f"{path}:{line}: not valid UTF-8 ({e.reason})"
            except json.JSONDecodeError as e:
                return f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
            continue
        for number, line in _physical_lines(path):
            if not line.strip(_BLANK):
                continue
            try:
                value = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                return f"{path}:{number}: not valid UTF-8 ({e.reason} at column {e.start + 1})"
            except json.JSONDecodeError as e:
                return f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(value, dict):
                kind = _JSON_TYPES.get(type(value), type(value).__name__)
                return f"{path}:{number}: not a JSON object (found {kind}); each line must be one"
            for field, item in value.items() if mixed is None else ():
                kind = _JSON_TYPES.get(type(item), type(item).__name__)
                first = seen.setdefault(field, (kind, f"{path}:{number}"))
                if kind != "null" and first[0] == "null":
                    seen[field] = (kind, f"{path}:{number}")
                elif kind not in ("null", first[0]):
                    mixed = (f"{path}:{number}: field {field!r} is {kind}, but {first[0]} at "
                             f"{first[1]}; give a field one JSON type throughout")
    return mixed
