"""TFRecord files of ``tf.train.Example`` records: ``tfrecord:PATH``.

PATH is a file, a directory (its ``*.tfrecord``/``*.tfrecords``/``*.tfr`` files) or a glob, local
or in object storage, files in sorted order. ``--label-column NAME`` names the label feature
(int64: class ids, bytes: class names, float: a regression target). The other features are
read from the records themselves: every int64 and float feature, in name order, each a value or
a fixed-length list (flattened to name[0], name[1], ...), is a column of a table; or, with
``--image-feature NAME``, that bytes feature is an encoded image (JPEG, PNG ...), decoded and
resized as images:DIR's are (images.decode) and the other features are not read. The first
record of every file is checked against this spec when the files are listed (one message
naming the file and what differs: a missing label, an image feature that is not bytes, a bytes
feature in a table, files with other features); every record is checked again as it is read
(its file and record number in the message).

Records are identified by (file, record number), so a file is cut into units of UNIT_RECORDS
records: 3 files over 4 ranks still give every rank its share and equal steps. Finding the
units reads each record's 12-byte header once when the files are listed (a local file: a read
per record, skipping the data; an object: the file in 8 MB blocks), by one rank per host; the
header's CRC-32C is checked (a corrupt or truncated file is named there). The records' data
CRCs are not checked (a corrupt record fails to parse or lacks its features, and is named).

Parsing needs no TensorFlow: the Example message is defined here for the protobuf runtime
(its own descriptor pool), so the reader processes stay free of TensorFlow.
"""
from __future__ import annotations

import functools
import struct
from types import SimpleNamespace
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .. import storage
from . import images, sources
from .interface import DataError
from .sources import Select, Source, Unit

KINDS = ("tfrecord",)
LABEL = ""  # --label-column is required
EXAMPLE = "data/train.tfrecord"
EXTENSIONS = (".tfrecord", ".tfrecords", ".tfr")
UNIT_RECORDS = 256  # part of a record's identity (so of the split)
INDEX_BLOCK = 8 << 20  # an object's headers are found by reading it in blocks of this size
_HEADER = struct.Struct("<QI")


def unit_words(source: Source) -> str:
    return f"runs of {UNIT_RECORDS} records"


# --- the wire format ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _crc_table() -> Tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data`` (for the 8-byte length of a header: cheap in Python)."""
    table, c = _crc_table(), 0xFFFFFFFF
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    c ^= 0xFFFFFFFF
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@functools.lru_cache(maxsize=1)
def example_class():
    """tf.train.Example as a protobuf message class, without TensorFlow: its proto built here
    (the same field numbers) in a descriptor pool of its own."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="hvd_train_example.proto", package="hvd_train.tfrecord",
                                            syntax="proto3")

    def message(name):
        return fd.message_type.add(name=name)

    def field(m, name, number, kind, label=F.LABEL_OPTIONAL, type_name=None, oneof=None):
        f = m.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            f.type_name = type_name
        if oneof is not None:
            f.oneof_index = oneof
        return f

    for name, kind in (("BytesList", F.TYPE_BYTES), ("FloatList", F.TYPE_FLOAT), ("Int64List", F.TYPE_INT64)):
        field(message(name), "value", 1, kind, F.LABEL_REPEATED)
    feature = message("Feature")
    feature.oneof_decl.add(name="kind")
    for number, name in enumerate(("bytes_list", "float_list", "int64_list"), 1):
        field(feature, name, number, F.TYPE_MESSAGE, type_name=f".hvd_train.tfrecord.{name.title().replace('_', '')}",
              oneof=0)
    features = message("Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    field(entry, "key", 1, F.TYPE_STRING)
    field(entry, "value", 2, F.TYPE_MESSAGE, type_name=".hvd_train.tfrecord.Feature")
    field(features, "feature", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".hvd_train.tfrecord.Features.FeatureEntry")
    field(message("Example"), "features", 1, F.TYPE_MESSAGE, type_name=".hvd_train.tfrecord.Features")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("hvd_train.tfrecord.Example"))


def _kind_of(feature) -> str:
    return feature.WhichOneof("kind") or "empty"


def _values(feature) -> Any:
    kind = _kind_of(feature)
    return getattr(feature, kind).value if kind != "empty" else ()


_TYPE_WORDS = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64", "empty": "empty"}


def _describe(features) -> str:
    return ", ".join(f"{k} ({_TYPE_WORDS[_kind_of(v)]} x{len(_values(v))})" for k, v in sorted(features.items()))


def parse(data: bytes, path: str, record: int):
    """One record's feature map; DataError naming the file and the record (1-based)."""
    try:
        return example_class().FromString(data).features.feature
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise DataError(f"{path} record {record + 1}: not a tf.train.Example ({err})") from None


# --- listing -----------------------------------------------------------------------------------

def _headers(path: str, size: int) -> List[Tuple[int, int]]:
    """(offset, data length) of every record of a file, from their headers (CRC checked)."""
    remote = storage.is_remote(path)
    found, at = [], 0
    block, block_at = b"", 0
    try:
        with storage.open_input(path) as f:
            while at < size:
                if remote:  # the object in big blocks; a header straddling two is read again
                    if not (block_at <= at and at + 12 <= block_at + len(block)):
                        block_at, block = at, f.read_at(min(INDEX_BLOCK, size - at), at)
                    head = block[at - block_at:at - block_at + 12]
                else:
                    head = f.read_at(12, at)
                if len(head) < 12:
                    raise DataError(f"{path}: truncated TFRecord file (a header cut at byte {at})")
                length, crc = _HEADER.unpack(head)
                if masked_crc(head[:8]) != crc:
                    raise DataError(f"{path}: not a TFRecord file, or corrupt at byte {at} (record {len(found) + 1}: "
                                    "its length's checksum does not match)")
                if at + 16 + length > size:
                    raise DataError(f"{path}: truncated TFRecord file (record {len(found) + 1} ends past the end)")
                found.append((at, length))
                at += 16 + length
    except FileNotFoundError:
        raise DataError(f"{path} disappeared while being read") from None
    except OSError as err:
        raise DataError(storage.describe(err, path)) from None
    return found


def _first_record(path: str, size: int):
    if size < 12:
        return None
    try:
        with storage.open_input(path) as f:
            head = f.read_at(12, 0)
            length, _ = _HEADER.unpack(head)
            return parse(f.read_at(min(length, size), 12), path, 0)
    except OSError as err:
        raise DataError(storage.describe(err, path)) from None


def _spec(path: str, features, label: str, image: Optional[str]) -> Tuple[Tuple[str, ...], Tuple[int, ...]]:
    """From a first record: (the feature columns, each one's length), checked against the options."""
    if label and label not in features:
        raise DataError(f"label feature {label!r} not found in {path}'s first record; its features are: "
                        f"{_describe(features)}")
    if image:
        if image not in features or _kind_of(features[image]) != "bytes_list":
            found = f"it is {_TYPE_WORDS[_kind_of(features[image])]}" if image in features else "it is missing"
            raise DataError(f"--image-feature {image!r} must be a bytes feature holding an encoded image in {path}'s "
                            f"first record, but {found}; its features are: {_describe(features)}")
        return (image,), (1,)
    names, lengths = [], []
    for name in sorted(features):
        if name == label:
            continue
        kind = _kind_of(features[name])
        if kind == "bytes_list":
            raise DataError(f"{path}: feature {name!r} is bytes, not a number: give --image-feature {name} if it is "
                            "an encoded image (a table's features are int64 or float)")
        names.append(name)
        lengths.append(len(_values(features[name])))
    if not names:
        raise DataError(f"{path}'s first record has no feature besides {label!r}: {_describe(features)}")
    return tuple(names), tuple(lengths)


def source_of(kind: str, spec: str, label: str, options: Any = None) -> Source:
    """Format.source_of: the files, their spec from the first records, their units of records."""
    image = getattr(options, "image_feature", None)
    listed = sources.list_files(kind, spec, EXTENSIONS, "TFRecord", any_case=True)
    names = lengths = None
    units: List[Unit] = []
    for i, (path, size) in enumerate(listed):
        first = _first_record(path, size)
        if first is not None:
            found = _spec(path, first, label, image)
            if names is None:
                names, lengths, first_path = found[0], found[1], path
            elif found != (names, lengths):
                raise DataError(f"{path} has features {_columns(*found)}, but {first_path} has "
                                f"{_columns(names, lengths)}: all files need one spec")
        headers = _headers(path, size)
        for k in range(0, len(headers), UNIT_RECORDS):
            part = headers[k:k + UNIT_RECORDS]
            units.append(Unit(i, k // UNIT_RECORDS, part[0][0], part[-1][0] + 16 + part[-1][1]))
    if names is None:
        raise DataError(f"{spec}: the TFRecord files hold no records")
    columns = _columns(names, lengths) + ((label,) if label else ())
    shape: Tuple[int, ...] = ()
    dtype = "float32"
    if image:
        size = tuple(getattr(options, "image_size", None) or images.DEFAULT_SIZE)
        channels = int(getattr(options, "image_channels", 0) or 0) or _image_channels(listed[0][0], image)
        shape, dtype, columns = (int(size[0]), int(size[1]), channels), "uint8", (image,) + ((label,) if label else ())
    return Source("tfrecord", spec, tuple(p for p, _ in listed), tuple(n for _, n in listed), columns, label,
                  tuple(units), sample_shape=shape, dtype=dtype,
                  layout=() if image else tuple(zip(names, lengths)))


def _columns(names: Sequence[str], lengths: Sequence[int]) -> Tuple[str, ...]:
    out: List[str] = []
    for name, n in zip(names, lengths):
        out += [name] if n == 1 else [f"{name}[{j}]" for j in range(n)]
    return tuple(out)


def _image_channels(path: str, image: str) -> int:
    import io

    from PIL import Image

    first = _first_record(path, storage.size(path))
    try:
        with Image.open(io.BytesIO(first[image].bytes_list.value[0])) as img:
            return 1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path} record 1: feature {image!r} is not an image Pillow can decode ({err})") from None


def _table_spec(source: Source) -> Tuple[Tuple[str, ...], Tuple[int, ...]]:
    """The feature names and lengths the source was opened with."""
    return tuple(n for n, _ in source.layout), tuple(k for _, k in source.layout)


def predict_source(kind: str, spec: str, prep: dict) -> Source:
    shape = prep["input_shape"]
    if len(shape) == 3:
        options = SimpleNamespace(image_feature=prep["feature_names"][0], image_size=shape[:2], image_channels=shape[2])
        return source_of(kind, spec, "", options)
    return source_of(kind, spec, "")


def sample_names(source: Source, unit: Unit, count: int) -> List[str]:
    if source.dtype != "uint8":
        return []  # a table's predictions are in its records' order
    first = unit.index * UNIT_RECORDS
    return [f"{source.files[unit.file]} record {first + k + 1}" for k in range(count)]


# --- reading -----------------------------------------------------------------------------------

def _unit_bytes(source: Source, unit: Unit) -> bytes:
    path = source.files[unit.file]
    try:
        with sources._opened(path) as f:
            return f.read_at(unit.stop - unit.start, unit.start)
    except FileNotFoundError:
        raise DataError(f"{path} disappeared while being read") from None
    except OSError as err:
        raise DataError(storage.describe(err, path)) from None


def _records(data: bytes, path: str, first: int) -> List[Tuple[int, int]]:
    out, at = [], 0
    while at < len(data):
        if at + 12 > len(data):
            raise DataError(f"{path}: the file changed since the run started (record {first + len(out) + 1})")
        length, crc = _HEADER.unpack_from(data, at)
        if masked_crc(data[at:at + 8]) != crc or at + 16 + length > len(data):
            raise DataError(f"{path}: the file changed since the run started (record {first + len(out) + 1})")
        out.append((at + 12, length))
        at += 16 + length
    return out


def _label_text(feature, path: str, record: int, label: str) -> str:
    values = _values(feature)
    if len(values) != 1:
        raise DataError(f"{path} record {record + 1}: label {label!r} has {len(values)} values, not one")
    v = values[0]
    return v.decode(errors="replace") if isinstance(v, bytes) else repr(float(v)) if isinstance(v, float) else str(v)


def read_unit(source: Source, unit: Unit, columns: Optional[Sequence[str]] = None, select: Optional[Select] = None,
              ahead: Any = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Format.read_unit: the unit's records (those ``select`` marks) parsed: a table's features
    as float64, or the image decoded; labels as text."""
    path = source.files[unit.file]
    fetched = ahead.take(unit) if ahead is not None else None
    data = fetched if fetched is not None else _unit_bytes(source, unit)
    first = unit.index * UNIT_RECORDS
    records = _records(data, path, first)
    keep = np.flatnonzero(np.ones(len(records), bool) if select is None else np.asarray(select(0, len(records)), bool))
    image = source.features[0] if source.dtype == "uint8" else None
    if image is None:
        names, lengths = _table_spec(source)
        width = sum(lengths)
        x = np.empty((len(keep), width), np.float64)
    else:
        x = np.empty((len(keep), *source.shape), np.uint8)
    labels = []
    for j, r in enumerate(keep.tolist()):
        at, length = records[r]
        features = parse(data[at:at + length], path, first + r)
        if source.label:
            if source.label not in features:
                raise DataError(f"{path} record {first + r + 1}: no label feature {source.label!r}")
            labels.append(_label_text(features[source.label], path, first + r, source.label))
        if image is not None:
            if image not in features or not features[image].bytes_list.value:
                raise DataError(f"{path} record {first + r + 1}: no image in feature {image!r}")
            x[j] = images.decode(features[image].bytes_list.value[0], f"{path} record {first + r + 1}", source.shape)
            continue
        col = 0
        for name, n in zip(names, lengths):
            values = _values(features[name]) if name in features else None
            if values is None or len(values) != n or _kind_of(features[name]) == "bytes_list":
                found = "missing" if values is None else f"{_TYPE_WORDS[_kind_of(features[name])]} x{len(values)}"
                raise DataError(f"{path} record {first + r + 1}: feature {name!r} is {found}, the first record's "
                                f"spec has {n} number(s)")
            x[j, col:col + n] = values
            col += n
        if not np.isfinite(x[j]).all():
            bad = int(np.flatnonzero(~np.isfinite(x[j]))[0])
            raise DataError(f"{path} record {first + r + 1}, column {_columns(names, lengths)[bad]!r}: "
                            f"{x[j, bad]!r} is not finite (NaN/inf)")
    if columns is not None and image is None:  # predict: the model's features, in its order
        have = _columns(names, lengths)
        missing = [c for c in columns if c not in have]
        if missing:
            raise DataError(f"{path} lacks feature(s) {', '.join(missing)}")
        x = x[:, [have.index(c) for c in columns]]
    yield x, np.asarray(labels if source.label else [""] * len(keep), str)


def ReadAhead(source: Source, order: Sequence[int], columns: Optional[Sequence[str]] = None) -> sources.FetchAhead:
    """Format.ReadAhead: an object store's units (one ranged read each) fetched ahead of their parsing."""
    return sources.FetchAhead(source, order, functools.partial(_unit_bytes, source),
                              lambda unit: unit.stop - unit.start)
