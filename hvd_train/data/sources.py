"""File datasets: ``csv:PATH`` and ``parquet:PATH``, read with pyarrow, in units.

PATH is a file, a directory (its ``*.csv`` / ``*.parquet`` files) or a glob, local or in object
storage (``s3://bucket/prefix/``: storage.py, the one module that lists and opens them; a glob's
wildcards then in its last part); files are taken in sorted order and must share one header
(CSV) or schema (Parquet). A file is read in *units*: Parquet row groups, or CSV byte ranges of
``CSV_UNIT_BYTES`` (a row belongs to the range its first byte is in; a row is one non-empty
line: line breaks quoted inside values are refused). An object is read by ranged requests: a
CSV unit in one, a Parquet row group's columns in one or a few each.
Units are the same for every world size, so they can be dealt out to ranks (stream.py), and a
row is identified by (file, unit, row within the unit) whoever reads it.

A reader may pass ``select``, a mask of the rows it wants, decided from row numbers alone
(splits, shards): a CSV unit is then cut into lines and only the chosen lines are parsed, so a
rank that keeps a tenth of the rows parses a tenth of the text. Parquet decodes whole columns
and drops the other rows after.

Every function here is local (no collectives). Bad input raises data.DataError naming the file,
and the line (CSV, the header being line 1) or row (Parquet, 1-based) and column where there is one.
"""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .. import storage
from .arrays import DataError

KINDS = ("csv", "parquet")
CSV_UNIT_BYTES = 1 << 20  # part of the row identity (so of the split): changing it changes the split
CSV_TAIL_BYTES = 1 << 16  # read past a CSV unit's end to find its last row's end, in one request
READ_BATCH_ROWS = 8192  # rows per Parquet piece: a few MB per copy, so a handful of copies stay small
PARQUET_GROUP_BYTES = 64 << 20  # row groups up to this size (decoded) are read column by column

# select(offset, n) -> bool mask over rows [offset, offset + n) of a unit: the rows to return.
Select = Callable[[int, int], np.ndarray]


def is_file_source(dataset: str) -> bool:
    return any(dataset.startswith(f"{kind}:") for kind in KINDS)


@dataclass(frozen=True)
class Unit:
    """One piece of one file: a Parquet row group, or a CSV byte range [start, stop)."""

    file: int  # index into Source.files
    index: int  # row group / range number within the file
    start: int = 0
    stop: int = 0


@dataclass(frozen=True)
class Source:
    kind: str  # "csv" or "parquet"
    spec: str  # the PATH as given
    files: Tuple[str, ...]
    sizes: Tuple[int, ...]  # bytes per file
    columns: Tuple[str, ...]
    label: str
    units: Tuple[Unit, ...]
    data_starts: Tuple[int, ...] = ()  # CSV: byte offset of each file's first data row
    # A sample's shape and the dtype its values are streamed in: a table's (features,) as
    # float32, standardised as read; an image's (height, width, channels) as uint8, standardised
    # inside TensorFlow (a quarter of the bytes through the windows and the reader's slots).
    sample_shape: Tuple[int, ...] = ()
    dtype: str = "float32"
    file_labels: Tuple[str, ...] = ()  # a label per file, where a file's place names it (image folders)
    layout: Tuple[Tuple[str, int], ...] = ()  # a format's own column layout (TFRecord: each feature's length)
    settings: Tuple[Tuple[str, Any], ...] = ()  # a format's own options, carried to the reader processes

    @property
    def features(self) -> Tuple[str, ...]:
        return tuple(c for c in self.columns if c != self.label)

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.sample_shape or (len(self.features),)

    LISTED_FILES = 100  # more files than this are fingerprinted by a digest of their names and sizes

    def listing(self) -> List[str]:
        """What every rank must see alike: file names and sizes (the consensus fingerprint); for
        many files (an image folder), their count, bytes and a digest of every name and size."""
        names = [f"{storage.basename(p) if not self.file_labels else self._relative(i)}:{s}"
                 for i, (p, s) in enumerate(zip(self.files, self.sizes))]
        if len(names) <= self.LISTED_FILES:
            return names
        import hashlib

        digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
        return [f"{len(names)} files", f"{sum(self.sizes)} bytes", f"names and sizes sha256 {digest}"]

    def _relative(self, i: int) -> str:
        return f"{self.file_labels[i]}/{storage.basename(self.files[i])}"

    SAMPLED_FILES = 256  # the sample digest reads the edges of at most this many files, evenly spaced

    def sample_digest(self, edge: int = 1 << 16) -> str:
        """SHA-256 over the first and last ``edge`` bytes of every file (of SAMPLED_FILES evenly
        spaced ones, when there are more): a cheap local check that this host's files hold what
        the others' do (the full content digest comes from the ranks' shares and is the same
        everywhere by construction)."""
        import hashlib

        h = hashlib.sha256()
        step = max(1, -(-len(self.files) // self.SAMPLED_FILES))
        for path, size in list(zip(self.files, self.sizes))[::step]:
            with _opened(path) as f:
                h.update(f.read_at(min(edge, size), 0))
                h.update(f.read_at(min(edge, size), max(size - edge, 0)))
        return h.hexdigest()


# The Format of csv: and parquet: (formats.py).
LABEL = ""  # --label-column is required
EXAMPLE = "data/train.csv"


def open_source(dataset: str, label: str) -> Source:
    """List the files of ``csv:PATH`` / ``parquet:PATH``, check their headers agree, cut units."""
    kind, _, spec = dataset.partition(":")
    if kind not in KINDS or not spec:
        raise DataError(f"dataset {dataset!r}: expected csv:PATH or parquet:PATH")
    return source_of(kind, spec, label)


def unit_words(source: Source) -> str:
    return "row groups" if source.kind == "parquet" else f"{CSV_UNIT_BYTES >> 20} MB ranges"


def predict_source(kind: str, spec: str, prep: dict) -> Source:
    return source_of(kind, spec, "")


def sample_names(source: Source, unit: Unit, count: int) -> List[str]:
    return []  # a table's predictions are in its rows' order


def source_of(kind: str, spec: str, label: str, options=None) -> Source:
    """Format.source_of: list, check the headers agree, cut units."""
    _lean_memory_pool()
    listed = list_files(kind, spec)
    if kind == "csv":
        return _open_csv(spec, listed, label)
    return _open_parquet(spec, listed, label)


def _lean_memory_pool() -> None:
    """pyarrow's default pool, mimalloc, keeps the pages it frees: reading Parquet row groups
    one after the other measured ~40 MB more peak RSS per process than with jemalloc (or the
    system allocator). Use jemalloc where the wheel has it, unless ARROW_DEFAULT_MEMORY_POOL says."""
    import pyarrow as pa

    if "ARROW_DEFAULT_MEMORY_POOL" in os.environ or pa.default_memory_pool().backend_name != "mimalloc":
        return
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:  # a build without jemalloc
        pa.set_memory_pool(pa.system_memory_pool())


def check_dataset(spec: str) -> None:
    """DataError if a dataset's location cannot be used (storage.check's message)."""
    try:
        storage.check(spec, "dataset")
    except storage.StorageError as err:
        raise DataError(str(err)) from None


def is_glob(spec: str) -> bool:
    """A pattern: wildcards anywhere in a local path, in the last part of a URI."""
    return storage.has_magic(storage.basename(spec)) or (not storage.is_remote(spec) and storage.has_magic(spec))


def list_files(kind: str, spec: str, suffixes: Optional[Tuple[str, ...]] = None, name: str = "",
               any_case: bool = False) -> List[Tuple[str, int]]:
    """(location, bytes) of the files PATH names, in order (one listing request for a prefix): a
    file, a glob, or a directory's files ending in one of ``suffixes`` (default ``.KIND``; with
    ``any_case``, in any case). ``name``: the format in messages (default CSV or Parquet)."""
    suffixes = suffixes or (f".{kind}",)
    name = name or (kind.upper() if kind == "csv" else "Parquet")
    check_dataset(spec)
    try:
        if is_glob(spec):
            found = storage.glob(spec)
            if not found:
                raise DataError(f"{spec} matches no files")
            return found
        if storage.is_file(spec):
            return [(spec, storage.size(spec))]
        found = [(p, n) for p, n in storage.list_files(spec)
                 if (p.lower() if any_case else p).endswith(suffixes) and not storage.basename(p).startswith(".")]
        if found:
            return found
        if storage.is_dir(spec):
            raise DataError(f"{'prefix' if storage.is_remote(spec) else 'directory'} {spec} holds no "
                            f"{'/'.join('*' + x for x in suffixes)} files")
        if storage.is_remote(spec):
            storage.missing_bucket(spec)
    except storage.StorageError as err:
        raise DataError(f"cannot list {spec}: {str(err).split(': ', 1)[-1]}") from None
    raise DataError(f"cannot read {name} {spec}: no such file or directory")


# Objects of object storage stay open in this process (and a Parquet object's footer parsed):
# opening one costs a request (its size), a Parquet footer one or two more, per unit otherwise.
# Local files are opened per unit, so that one replaced or deleted under the run is noticed.
_KEPT: "OrderedDict[Tuple[str, str], Any]" = OrderedDict()
KEPT_OBJECTS = 64


def _kept(kind: str, path: str, make):
    key = (kind, path)
    if key in _KEPT:
        _KEPT.move_to_end(key)
        return _KEPT[key]
    value = _KEPT[key] = make()
    while len(_KEPT) > KEPT_OBJECTS:
        _KEPT.popitem(last=False)
    return value


def _open_input(path: str):
    """A seekable file for a location; DataError naming it if it cannot be opened."""
    try:
        return storage.open_input(path)
    except FileNotFoundError:
        raise DataError(f"{path} disappeared while being read") from None
    except OSError as err:
        raise DataError(storage.describe(err, path)) from None


@contextlib.contextmanager
def _opened(path: str) -> Iterator[Any]:
    """A seekable file for a location, within: kept open for an object, closed after for a local file."""
    if storage.is_remote(path):
        yield _kept("file", path, lambda: _open_input(path))
        return
    with _open_input(path) as f:
        yield f


def _check_header(path: str, columns: Sequence[str], label: str) -> None:
    empty = [i + 1 for i, c in enumerate(columns) if not c.strip()]
    if empty:
        raise DataError(f"{path}: column(s) {', '.join(map(str, empty))} of the header have no name")
    seen, dup = set(), []
    for c in columns:
        if c in seen and c not in dup:
            dup.append(c)
        seen.add(c)
    if dup:
        raise DataError(f"{path}: duplicated column name(s) {', '.join(repr(d) for d in dup)}")
    if not label:  # predict: no label column
        return
    if label not in columns:
        raise DataError(f"label column {label!r} not found in {path}; columns are: {', '.join(columns)}")
    if len(columns) < 2:
        raise DataError(f"{path} has no feature columns besides {label!r}")


def _csv_header(path: str) -> Tuple[List[str], int]:
    """(column names, byte offset of the first data row)."""
    import csv

    try:
        with _opened(path) as f:
            line = _first_line_of(f)
    except OSError as err:
        raise DataError(storage.describe(err, path)) from None
    if not line.strip():
        raise DataError(f"CSV {path} is empty (a header row is required)")
    if b"\0" in line:
        raise DataError(f"cannot parse CSV {path}: not text")
    try:
        header = next(csv.reader([line.decode().rstrip("\r\n")]))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot parse the header of CSV {path}: {err}") from None
    return [h.strip() for h in header], len(line)


def _first_line_of(f) -> bytes:
    """The first line of a file (with its line break), read in blocks: one request for an object."""
    line, at = b"", 0
    while True:
        block = f.read_at(1 << 16, at)
        end = block.find(b"\n")
        if end >= 0:
            return line + block[:end + 1]
        line += block
        at += len(block)
        if not block:
            return line


def _open_csv(spec: str, listed: List[Tuple[str, int]], label: str) -> Source:
    columns, units, sizes, starts = None, [], [], []
    files = [p for p, _ in listed]
    for i, (path, size) in enumerate(listed):
        header, data_start = _csv_header(path)
        _check_header(path, header, label)
        if columns is None:
            columns = header
        elif header != columns:
            raise DataError(f"{path} has columns {header}, but {files[0]} has {columns}: all files need one header")
        sizes.append(size)
        starts.append(data_start)
        for k, start in enumerate(range(data_start, max(size, data_start + 1), CSV_UNIT_BYTES)):
            if start < size:
                units.append(Unit(i, k, start, min(start + CSV_UNIT_BYTES, size)))
    return Source("csv", spec, tuple(files), tuple(sizes), tuple(columns), label, tuple(units), tuple(starts))


def _parquet_file(path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    remote = storage.is_remote(path)
    try:
        if remote:  # the footer read once; a row group's columns fetched together (one coalesced request)
            return _kept("parquet", path, lambda: _open_parquet_object(path))
        return pq.ParquetFile(_open_input(path), pre_buffer=False, buffer_size=1 << 20)  # pages as needed
    except FileNotFoundError:
        raise DataError(f"{path} disappeared while being read") from None
    except storage.StorageError as err:
        raise DataError(str(err)) from None
    except (pa.ArrowInvalid, OSError) as err:
        if _from_storage(err):
            raise DataError(storage.describe(err, path)) from None
        raise DataError(f"{path} is not a readable Parquet file ({err})") from None


def _open_parquet_object(path: str):
    import pyarrow.parquet as pq

    return pq.ParquetFile(_open_input(path), pre_buffer=True)


def _from_storage(err: BaseException) -> bool:
    """An error of the object store's requests (not of the file's content)."""
    return "curlCode" in str(err) or "AWS Error" in str(err)


def _open_parquet(spec: str, listed: List[Tuple[str, int]], label: str) -> Source:
    schema, units, sizes = None, [], []
    files = [p for p, _ in listed]
    for i, (path, size) in enumerate(listed):
        pf = _parquet_file(path)
        names = list(pf.schema_arrow.names)
        _check_header(path, names, label)
        if schema is None:
            schema, first = pf.schema_arrow, names
            if label:  # training: every other column is a feature (predict reads the model's own)
                _check_types(path, schema, label)
        elif not pf.schema_arrow.equals(schema):
            raise DataError(f"{path} has schema {_show_schema(pf.schema_arrow)}, but {files[0]} has "
                            f"{_show_schema(schema)}: all files need one schema")
        sizes.append(size)
        units += [Unit(i, k) for k in range(pf.metadata.num_row_groups)]
    return Source("parquet", spec, tuple(files), tuple(sizes), tuple(first), label, tuple(units))


def _show_schema(schema) -> str:
    return "[" + ", ".join(f"{f.name}: {f.type}" for f in schema) + "]"


def _check_types(path: str, schema, label: str) -> None:
    import pyarrow as pa

    for field in schema:
        if field.name != label and not (pa.types.is_integer(field.type) or pa.types.is_floating(field.type)
                                        or pa.types.is_boolean(field.type)):
            raise DataError(f"{path}: feature column {field.name!r} has type {field.type}, not a number")


def _csv_range(source: Source, unit: Unit) -> bytes:
    """The bytes of the rows that start in [start, stop): from after the first line end at or
    after start - 1 (unless start is the first data row) to the first line end at or after stop - 1."""
    path, size = source.files[unit.file], source.sizes[unit.file]
    first = unit.start > source.data_starts[unit.file]  # the range starts after a line end to find
    at = unit.start - 1 if first else unit.start
    try:
        with _opened(path) as f:
            # One read (one request for an object) of the range and a margin for the last line's
            # end; more only for a line longer than the margin.
            data = f.read_at(min(unit.stop + CSV_TAIL_BYTES, size) - at, at)
            begin = 0
            if first:
                nl = data.find(b"\n")
                while nl < 0 and at + len(data) < size:
                    data += f.read_at(min(CSV_TAIL_BYTES, size - at - len(data)), at + len(data))
                    nl = data.find(b"\n")
                begin = nl + 1 if nl >= 0 else len(data)
            end = len(data)
            if unit.stop < size:
                nl = data.find(b"\n", unit.stop - 1 - at)
                while nl < 0 and at + len(data) < size:
                    data += f.read_at(min(CSV_TAIL_BYTES, size - at - len(data)), at + len(data))
                    nl = data.find(b"\n", unit.stop - 1 - at)
                end = nl + 1 if nl >= 0 else len(data)
            return data[begin:end] if end > begin else b""
    except FileNotFoundError:
        raise DataError(f"{path} disappeared while being read") from None
    except OSError as err:
        raise DataError(storage.describe(err, path)) from None


def read_unit(source: Source, unit: Unit, columns: Optional[Sequence[str]] = None, select: Optional[Select] = None,
              ahead: Optional["ReadAhead"] = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(features float64 [n, f], labels as str [n]) pieces of a unit, in row order; features
    checked numeric and finite. ``columns``: feature columns to read (default: all but the label);
    a source without a label column (predict) gives labels of "" . ``select``: only the rows it
    marks, called in row order on consecutive ranges that cover the unit (a CSV unit or a Parquet
    row group: once; a big row group: once per piece), before those rows are parsed or kept;
    the rows it marks then arrive in order, in one piece or several. ``ahead``: a ReadAhead
    holding this unit's bytes, fetched while earlier units were parsed."""
    features = list(columns or source.features)
    missing = [c for c in features if c not in source.columns]
    if missing:
        raise DataError(f"{source.files[unit.file]} lacks column(s) {', '.join(missing)}")
    fetched = ahead.take(unit) if ahead is not None else None
    if source.kind == "csv":
        yield _read_csv_unit(source, unit, features, select, fetched)
        return
    yield from _read_parquet_unit(source, unit, features, select, fetched)


READ_AHEAD_BYTES = 32 << 20  # an object's units fetched ahead of parsing, at most this much in flight
READ_AHEAD_THREADS = 4  # requests in flight: CSV ranges need 4 to hide their latency, 8 add nothing (performance.md)


class ReadAhead:
    """The raw reads of an object store's units, in the order they will be parsed, made by
    threads ahead of the parsing (a CSV unit's bytes; a Parquet row group's columns, decoded):
    each request's latency overlaps the parsing and the other requests, and the reader process
    (reader.py) overlaps all of it with training. Up to READ_AHEAD_BYTES (by the units' sizes)
    and READ_AHEAD_THREADS requests at once. Local files read as they are parsed (``active``
    False): the page cache is faster than a thread hand-over."""

    def __init__(self, source: Source, order: Sequence[int], columns: Optional[Sequence[str]] = None):
        self.source, self.order, self.next = source, list(order), 0
        self.active = bool(source.files) and storage.is_remote(source.files[0])
        self.want = list(columns or source.features) + ([source.label] if source.label else [])
        self.pending: "OrderedDict[int, Any]" = OrderedDict()
        self.position = {u: i for i, u in enumerate(self.order)}
        self.number = {unit: i for i, unit in enumerate(source.units)}
        self.pool = None
        if self.active:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(READ_AHEAD_THREADS, thread_name_prefix="hvd_train-read-ahead")
            self._fill()

    def _bytes(self, u: int) -> int:
        unit = self.source.units[u]
        if self.source.kind == "csv":
            return unit.stop - unit.start
        return _parquet_file(self.source.files[unit.file]).metadata.row_group(unit.index).total_byte_size

    def _fill(self) -> None:
        held = sum(size for _, size in self.pending.values())
        while self.next < len(self.order) and (not self.pending or held < READ_AHEAD_BYTES):
            u = self.order[self.next]
            size = self._bytes(u)
            if self.source.kind == "parquet" and size > PARQUET_GROUP_BYTES:
                break  # read in pieces when parsed
            self.pending[u] = (self.pool.submit(self._fetch, self.source.units[u]), size)
            held += size
            self.next += 1

    def _fetch(self, unit: Unit):
        if self.source.kind == "csv":
            return _csv_range(self.source, unit)
        import threading

        import pyarrow as pa

        path = self.source.files[unit.file]
        try:
            # One ParquetFile per thread: reading one from several threads at once is not safe.
            pf = _kept(f"parquet-{threading.get_ident()}", path, lambda: _open_parquet_object(path))
            return pf.read_row_group(unit.index, columns=self.want, use_threads=False)
        except FileNotFoundError:
            raise DataError(f"{path} disappeared while being read") from None
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(storage.describe(err, f"{path} row group {unit.index}")) from None

    def take(self, unit: Unit):
        """The unit's fetched data (raises what its read raised), or None if it was not fetched."""
        if not self.active:
            return None
        u = self.number[unit]
        entry = self.pending.pop(u, None)
        if entry is None:  # not fetched (a big row group, or out of order): read when parsed
            self.next = max(self.next, self.position.get(u, self.next - 1) + 1)
            self._fill()
            return None
        try:
            return entry[0].result()
        finally:
            self._fill()

    def close(self) -> None:
        if self.pool is not None:
            for future, _ in self.pending.values():
                future.cancel()
            self.pool.shutdown(wait=True)
            self.pending.clear()


class FetchAhead:
    """A format's units of an object store fetched by threads ahead of their parsing, in the
    order they will be parsed, up to READ_AHEAD_BYTES by ``size(unit)``: ``fetch(unit)`` runs
    in a thread and ``take(unit)`` returns what it returned (or raises what it raised), None for
    a unit not fetched. Local files are read as they are parsed (``active`` False). The images
    and TFRecord formats' read-ahead (CSV and Parquet have their own: ReadAhead)."""

    def __init__(self, source: Source, order: Sequence[int], fetch: Callable[[Unit], Any], size: Callable[[Unit], int],
                 threads: int = READ_AHEAD_THREADS):
        self.source, self.order, self.next, self.fetch, self.size = source, list(order), 0, fetch, size
        self.active = bool(source.files) and storage.is_remote(source.files[0])
        self.number = {unit: i for i, unit in enumerate(source.units)}
        self.pending: "OrderedDict[int, Any]" = OrderedDict()
        self.pool = None
        if self.active:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(threads, thread_name_prefix="hvd_train-fetch-ahead")
            self._fill()

    def _fill(self) -> None:
        held = sum(self.size(self.source.units[u]) for u in self.pending)
        while self.next < len(self.order) and (not self.pending or held < READ_AHEAD_BYTES):
            unit = self.source.units[self.order[self.next]]
            self.pending[self.order[self.next]] = self.pool.submit(self.fetch, unit)
            held += self.size(unit)
            self.next += 1

    def take(self, unit: Unit) -> Any:
        if not self.active:
            return None
        future = self.pending.pop(self.number[unit], None)
        if future is None:
            return None
        try:
            return future.result()
        finally:
            self._fill()

    def close(self) -> None:
        if self.pool is not None:
            for future in self.pending.values():
                future.cancel()
            self.pool.shutdown(wait=True)
            self.pending.clear()


def _read_parquet_unit(source, unit, features, select: Optional[Select], fetched=None):
    """A row group's pieces. A group up to PARQUET_GROUP_BYTES is decoded one column at a time
    (Arrow's reader then holds one column's pages, not every column's, which costs ~1 MB per
    column whatever the batch size), and with ``select`` each column keeps only the chosen rows
    as it is decoded (``select`` is then called once, for the whole group): what a rank holds
    falls with its share of the rows, not a decoded group per reader whatever N. Bigger groups
    are read in pieces of READ_BATCH_ROWS, ``select`` called per piece."""
    import pyarrow as pa

    path = source.files[unit.file]
    want = features + ([source.label] if source.label else [])
    try:
        pf = _parquet_file(path)
        done = _rows_before_group(pf, unit.index)
        group = pf.metadata.row_group(unit.index)
        rows = np.arange(group.num_rows)  # the group's row numbers (an error names the file's row)
        if group.total_byte_size <= PARQUET_GROUP_BYTES:
            columns = {}
            if select is not None:
                rows = np.flatnonzero(select(0, group.num_rows))
                taken, select = pa.array(rows), None
            # An object: every column in one read (one request); a local file: one column at a time.
            together = [want] if storage.is_remote(path) else [[c] for c in want]
            for names in together:
                table = fetched if fetched is not None else pf.read_row_group(unit.index, columns=names,
                                                                              use_threads=False)
                for c in names:
                    column = table.column(c)
                    columns[c] = column if len(rows) == group.num_rows else column.take(taken)
                del table
            batches = iter(pa.table(columns).to_batches(max_chunksize=READ_BATCH_ROWS))
        else:
            batches = pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[unit.index], columns=want,
                                      use_threads=False)
        offset = 0  # rows of the group (taken rows with a select already applied) before the batch
        for batch in batches:
            at = rows[offset:offset + batch.num_rows]
            offset += batch.num_rows
            if select is not None:
                keep = select(int(at[0]), batch.num_rows)
                batch, at = batch.filter(pa.array(keep)), at[keep]
            try:
                x = _feature_matrix(batch, features)
            except _BadValue as bad:
                raise DataError(f"{path} row {done + int(at[bad.row]) + 1}, column {bad.column!r}: "
                                f"{bad.what}") from None
            labels = (np.asarray(batch.column(source.label).cast(pa.string()).to_numpy(zero_copy_only=False), str)
                      if source.label else np.full(batch.num_rows, "", str))
            yield x, labels
    except FileNotFoundError:
        raise DataError(f"{path} disappeared while being read") from None
    except storage.StorageError as err:
        raise DataError(str(err)) from None
    except (pa.ArrowInvalid, OSError) as err:
        if _from_storage(err):
            raise DataError(storage.describe(err, f"{path} row group {unit.index}")) from None
        raise DataError(f"cannot read {path} row group {unit.index}: {err}") from None


def _rows_before_group(pf, group: int) -> int:
    return sum(pf.metadata.row_group(g).num_rows for g in range(group))


def csv_lines(data: bytes) -> Tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of the non-empty lines of ``data``, each end just past its line
    break (or at the end of the data): a CSV unit's rows, as pyarrow counts them."""
    buf = np.frombuffer(data, np.uint8)
    if not len(buf):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ends = np.flatnonzero(buf == 10) + 1
    if buf[-1] != 10:
        ends = np.append(ends, len(buf))
    starts = np.concatenate([np.zeros(1, np.int64), ends[:-1]])
    content = ends - (buf[ends - 1] == 10)  # end of the text, without "\n" ...
    cr = content > starts
    cr[cr] = buf[content[cr] - 1] == 13
    content = content - cr  # ... and without the "\r" of "\r\n"
    keep = content > starts
    return starts[keep], ends[keep]


def _read_csv_unit(source, unit, features, select=None, fetched=None):
    import io

    import pyarrow as pa
    import pyarrow.csv as pacsv

    data = fetched if fetched is not None else _csv_range(source, unit)
    starts, ends = csv_lines(data)
    text = data
    if select is not None:
        keep = np.asarray(select(0, len(starts)), bool)
        text = b"".join(data[a:b] for a, b in zip(starts[keep].tolist(), ends[keep].tolist()))
        expected = int(keep.sum())
    else:
        expected = len(starts)
    if not expected:
        return np.zeros((0, len(features))), np.zeros(0, str)
    types = {c: pa.float64() for c in features}
    extra = [source.label] if source.label else []
    types.update({c: pa.string() for c in extra})
    try:
        table = pacsv.read_csv(
            io.BytesIO(text),
            read_options=pacsv.ReadOptions(column_names=list(source.columns), use_threads=False),
            parse_options=pacsv.ParseOptions(),
            convert_options=pacsv.ConvertOptions(column_types=types, include_columns=features + extra,
                                                 null_values=[""], strings_can_be_null=False))
        x = _feature_matrix(table, features)
    except (pa.ArrowInvalid, _BadValue) as err:  # find the line and say what is wrong, from the text
        raise DataError(_csv_problem(source, unit, data, features, str(err))) from None
    if table.num_rows != expected:  # a line break inside quotes, or lines ended by a lone "\r"
        raise DataError(f"{source.files[unit.file]}: {table.num_rows} rows parsed from {expected} lines near line "
                        f"{_first_line(source, unit)}; each row must be one line (no line breaks inside quotes, "
                        f"lines ended by \\n or \\r\\n)")
    if not source.label:
        return x, np.full(len(x), "", str)
    labels = np.asarray(table.column(source.label).to_numpy(zero_copy_only=False), str)
    return x, np.char.strip(labels)


class _BadValue(Exception):
    def __init__(self, row: int, column: str, what: str):
        super().__init__(what)
        self.row, self.column, self.what = row, column, what


def _feature_matrix(table, features) -> np.ndarray:
    """float64 [n, f] of the feature columns; a missing or non-finite value raises _BadValue."""
    import pyarrow as pa

    x = np.empty((table.num_rows, len(features)), np.float64)
    for j, name in enumerate(features):
        column = table.column(name)
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise _BadValue(row, name, "missing value")
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        finite = np.isfinite(values)
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            raise _BadValue(row, name, f"{float(values[row])!r} is not finite (NaN/inf)")
        x[:, j] = values
    return x


def _first_line(source, unit) -> int:
    """The file line number (the header is line 1) of a CSV unit's first line (error path only)."""
    begin = _csv_range(source, Unit(unit.file, 0, 0, unit.start)) if unit.start > source.data_starts[unit.file] else b""
    return (begin.count(b"\n") if begin else 1) + 1


def _csv_problem(source, unit, data, features, arrow_message) -> str:
    """A bad value in a CSV unit, as file, line and column (error path only: rescans the text)."""
    import csv
    import io
    import math

    path = source.files[unit.file]
    first_line = _first_line(source, unit)
    at = [source.columns.index(c) for c in features]
    reader = csv.reader(io.StringIO(data.decode(errors="replace")))
    for row in reader:
        if not row:
            continue
        line = first_line + reader.line_num - 1
        if len(row) != len(source.columns):
            return f"{path} line {line}: {len(row)} fields, header has {len(source.columns)}"
        for i in at:
            text = row[i].strip()
            try:
                value = float(text)
            except ValueError:
                return f"{path} line {line}, column {source.columns[i]!r}: {text!r} is not a number"
            if not math.isfinite(value):
                return f"{path} line {line}, column {source.columns[i]!r}: {text!r} is not finite (NaN/inf)"
    return f"cannot parse CSV {path}: {arrow_message}"
