"""Image folders: ``images:DIR``, the layout of Keras's ``image_dataset_from_directory``.

DIR (a directory, or an ``s3://`` prefix) holds one folder per class; every image under a class
folder, at any depth, is a sample of that class (the folder's name). JPEG, PNG, BMP and GIF
(Keras's set; a GIF's first frame), by extension, case-insensitive; other files and hidden ones
(a name starting with ".") are not images and are left out, as Keras does; an image directly in
DIR (outside a class folder) is refused, not dropped. Images are decoded with Pillow, converted
to RGB (``--image-channels 3``; an alpha channel is dropped) or grayscale (1; default: the first
image's), and resized to ``--image-size HxW`` (bilinear; a JPEG is decoded at the smallest
scale that still covers the size, which is most of its decoding cost). A file that cannot be
decoded is one DataError naming it (the facts pass decodes every image once, so it is found
before training starts, by the rank that owns it; every rank then stops with its message).

Units are runs of UNIT_IMAGES files in sorted order (class, then path); a sample is (unit, place
in the unit), so the split is a hash per image, the same for every world size (stream.py).
Samples stream as uint8 (height, width, channels): four times fewer bytes than float32 in the
shuffle windows and the reader's shared memory; they are standardised inside TensorFlow (per
channel, with the training split's statistics), and evaluation and predict apply the same
float32 arithmetic.

Decoding runs in the reader process of each rank (reader.py), beside training: the training
process only copies finished uint8 batches.
"""
from __future__ import annotations

import functools
import io
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .. import storage
from . import sources
from .interface import DataError
from .sources import Select, Source, Unit

KINDS = ("images",)
LABEL = "class"  # the folder an image is in
EXAMPLE = "data/photos/"
EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
UNIT_IMAGES = 64  # part of a sample's identity (so of the split): changing it changes the split
DEFAULT_SIZE = (64, 64)
READ_AHEAD_THREADS = 8  # units whose images are being fetched at once (an image is one small request)
CACHE_MB = 256  # decoded images kept per process (--image-cache)


def unit_words(source: Source) -> str:
    return f"runs of {UNIT_IMAGES} images"


def source_of(kind: str, spec: str, label: str, options: Any = None) -> Source:
    """Format.source_of: the images under ``spec``, with their classes when ``label`` is set."""
    size = tuple(getattr(options, "image_size", None) or DEFAULT_SIZE)
    channels = int(getattr(options, "image_channels", 0) or 0)
    listed = list_images(spec, labelled=bool(label))
    files = tuple(p for p, _, _ in listed)
    if not channels:
        channels = _channels_of(files[0])
    units = tuple(Unit(k * UNIT_IMAGES, k, k * UNIT_IMAGES, min((k + 1) * UNIT_IMAGES, len(files)))
                  for k in range(-(-len(files) // UNIT_IMAGES)))
    cache = int(getattr(options, "image_cache", CACHE_MB)) << 20
    return Source("images", spec, files, tuple(n for _, n, _ in listed), (), label, units,
                  sample_shape=(int(size[0]), int(size[1]), channels), dtype="uint8",
                  file_labels=tuple(c for _, _, c in listed), settings=(("cache_bytes", cache),))


def predict_source(kind: str, spec: str, prep: dict) -> Source:
    """Images to score, at the size and channels the run trained on; any layout (a file, a
    glob, a folder at any depth)."""
    h, w, c = prep["input_shape"]
    return source_of(kind, spec, "", SimpleNamespace(image_size=(h, w), image_channels=c))


def sample_names(source: Source, unit: Unit, count: int) -> List[str]:
    return list(source.files[unit.start:unit.start + count])


def _is_image(path: str) -> bool:
    return path.lower().endswith(EXTENSIONS)


def list_images(spec: str, labelled: bool) -> List[Tuple[str, int, str]]:
    """(location, bytes, class) of the images, sorted; class "" when not ``labelled``."""
    sources.check_dataset(spec)
    try:
        if sources.is_glob(spec):
            found = [(p, n, "") for p, n in storage.glob(spec) if _is_image(p)]
            if labelled:
                raise DataError(f"images:{spec}: a glob has no class folders; give the folder that holds one "
                                "folder per class")
            if not found:
                raise DataError(f"{spec} matches no images ({', '.join(EXTENSIONS)})")
            return found
        if not labelled and storage.is_file(spec):
            return [(spec, storage.size(spec), "")]
        walked = storage.walk_files(spec)
    except storage.StorageError as err:
        raise DataError(f"cannot list {spec}: {str(err).split(': ', 1)[-1]}") from None
    root = spec.rstrip("/")
    found, loose = [], []
    for path, n in walked:
        parts = path[len(root):].strip("/").split("/")
        if any(part.startswith(".") for part in parts) or not _is_image(path):
            continue
        if not labelled:
            found.append((path, n, ""))
        elif len(parts) < 2:
            loose.append(parts[-1])
        else:
            found.append((path, n, parts[0]))
    if loose:
        raise DataError(f"images:{spec} holds {len(loose)} image(s) outside a class folder (e.g. {loose[0]}): "
                        "put every image in a folder named after its class")
    if not found:
        if not walked and not storage.is_dir(spec):
            if storage.is_remote(spec):
                storage.missing_bucket(spec)
            raise DataError(f"cannot read images {spec}: no such directory")
        raise DataError(f"{spec} holds no images ({', '.join(EXTENSIONS)})"
                        + (" in class folders" if labelled else ""))
    return found


def _read(path: str) -> bytes:
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        raise DataError(f"{path} disappeared while being read") from None
    except OSError as err:
        raise DataError(storage.describe(err, path)) from None


def _channels_of(path: str) -> int:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(_read(path))) as img:
            return 1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for a bad file
        raise DataError(f"cannot read image {path}: {_reason(err)}") from None


def _reason(err: BaseException) -> str:
    text = str(err).split(" (", 1)[0] if "cannot identify image file" in str(err) else str(err)
    return "not an image Pillow can decode" if "cannot identify image file" in text else (text or type(err).__name__)


def decode(data: bytes, path: str, shape: Tuple[int, int, int]) -> np.ndarray:
    """One image's bytes as uint8 (height, width, channels); DataError naming ``path``."""
    from PIL import Image

    h, w, c = shape
    mode = "RGB" if c == 3 else "L"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft(mode, (w, h))  # JPEG: decode at the smallest scale >= the size
            if img.mode != mode:  # a convert to the mode it has costs a copy: 45% of a small JPEG's decode
                img = img.convert(mode)
            if img.size != (w, h):
                img = img.resize((w, h), Image.BILINEAR)
            return np.asarray(img, np.uint8).reshape(h, w, c)
    except Exception as err:  # noqa: BLE001 - a truncated or corrupt file: Pillow's many errors
        raise DataError(f"cannot read image {path}: {_reason(err)}") from None


class _Cache:
    """Decoded images of this process, by (file, size, shape), up to a byte budget (least
    recently used out first): a rank's reader process decodes an image once while its share of
    the data fits, then copies it (what ``tf.data``'s cache does for a Keras pipeline), and so
    does evaluation in the training process."""

    def __init__(self) -> None:
        self.held: "OrderedDict[Tuple[str, int, Tuple[int, ...]], np.ndarray]" = OrderedDict()
        self.bytes = 0

    def get(self, key):
        found = self.held.get(key)
        if found is not None:
            self.held.move_to_end(key)
        return found

    def put(self, key, image: np.ndarray, budget: int) -> None:
        if image.nbytes > budget:
            return
        self.held[key] = image
        self.bytes += image.nbytes
        while self.bytes > budget:
            self.bytes -= self.held.popitem(last=False)[1].nbytes


_CACHE = _Cache()


def _key(source: Source, f: int):
    """An image's cache key: its file, the size listed (a file replaced by one of another size is
    decoded again when the folder is listed again) and the decoded shape."""
    return source.files[f], source.sizes[f], source.shape


def read_unit(source: Source, unit: Unit, columns: Optional[Sequence[str]] = None, select: Optional[Select] = None,
              ahead: Optional["ReadAhead"] = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Format.read_unit: the unit's images (those ``select`` marks) decoded, with their classes."""
    n = unit.stop - unit.start
    keep = np.flatnonzero(np.ones(n, bool) if select is None else np.asarray(select(0, n), bool))
    budget = dict(source.settings).get("cache_bytes", 0)
    key = functools.partial(_key, source)
    cached = [_CACHE.get(key(unit.start + i)) for i in keep.tolist()] if budget else []
    fetched = ahead.take(unit) if ahead is not None and not (cached and all(c is not None for c in cached)) else None
    x = np.empty((len(keep), *source.shape), np.uint8)
    for j, i in enumerate(keep.tolist()):
        f = unit.start + i
        if cached and cached[j] is not None:
            x[j] = cached[j]
            continue
        path = source.files[f]
        x[j] = decode(fetched[f] if fetched is not None else _read(path), path, source.shape)
        if budget:
            _CACHE.put(key(f), x[j].copy(), budget)
    labels = np.asarray([source.file_labels[unit.start + i] for i in keep.tolist()] or np.zeros(0, str), str)
    yield x, labels


def ReadAhead(source: Source, order: Sequence[int], columns: Optional[Sequence[str]] = None) -> sources.FetchAhead:
    """Format.ReadAhead: an object store's images fetched by threads ahead of their decoding, a
    unit's files in each task, up to READ_AHEAD_THREADS units at once."""
    return sources.FetchAhead(source, order, functools.partial(_fetch_unit, source),
                              lambda unit: sum(source.sizes[unit.start:unit.stop]), READ_AHEAD_THREADS)


def _fetch_unit(source: Source, unit: Unit) -> Dict[int, bytes]:
    return {f: _read(source.files[f]) for f in range(unit.start, unit.stop)}
