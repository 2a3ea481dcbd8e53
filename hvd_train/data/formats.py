"""The file formats a dataset can be in, registered by prefix (``csv:PATH``, ``images:DIR`` ...).

A format is one module that is a ``Format`` (below): it lists a location into a
sources.Source (its files cut into *units*, the same for every world size, each sample
identified by (unit, place in the unit)), reads a unit's samples (only those a ``select`` marks,
decided before anything is parsed or decoded), fetches an object store's units ahead, and
opens files for ``hvd-train predict``. Everything else (the split, the facts pass, shuffle
windows, shards, the reader process, the feed, exact metrics, resume, elastic training) is
stream.py's and knows no format. Adding a format: a module, and one line in REGISTRY.
"""
from __future__ import annotations

import importlib
from typing import Any, Iterator, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from .interface import DataError
from .sources import Select, Source, Unit

# prefix -> the module (in hvd_train.data) that reads it.
REGISTRY = {
    "csv": "sources",
    "parquet": "sources",
    "images": "images",
    "tfrecord": "tfrecord",
}


class Format(Protocol):
    """What a format module provides (a module satisfies a Protocol by its functions)."""

    LABEL: str  # the label's name when --label-column is not given ("": the option is required)
    EXAMPLE: str  # a path for messages, e.g. "data/train.csv"

    def source_of(self, kind: str, spec: str, label: str, options: Any = None) -> Source:
        """List ``spec`` into a Source; ``label`` "" for predict (no labels); ``options``: the
        run's TrainConfig (or anything with its fields), None for predict. Raises DataError."""

    def read_unit(self, source: Source, unit: Unit, columns: Optional[Sequence[str]] = None,
                  select: Optional[Select] = None, ahead: Any = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """(samples [n, *source.shape] in source.dtype, labels as str [n]) pieces of a unit, in
        order; with ``select`` only the samples it marks (module doc of sources.py)."""

    def ReadAhead(self, source: Source, order: Sequence[int], columns: Optional[Sequence[str]] = None) -> Any:
        """Fetches the units of ``order`` ahead of their parsing (an object store's), with
        ``take(unit)`` and ``close()``."""

    def unit_words(self, source: Source) -> str:
        """What a unit is, for ``hvd-train plan``: "row groups", "64 images" ..."""

    def predict_source(self, kind: str, spec: str, prep: dict) -> Source:
        """The files ``hvd-train predict`` scores, for a run's preprocessing.json."""

    def sample_names(self, source: Source, unit: Unit, count: int) -> List[str]:
        """What predict names each of a unit's ``count`` samples by (an image's file; a
        record's file and number), or [] where rows are known by their order (tables)."""


def kinds() -> Tuple[str, ...]:
    return tuple(REGISTRY)


def format_of(kind: str) -> Format:
    if kind not in REGISTRY:
        raise DataError(f"unknown data format {kind!r}: one of {', '.join(REGISTRY)}")
    return importlib.import_module(f"{__package__}.{REGISTRY[kind]}")


def is_file_source(dataset: str) -> bool:
    kind, colon, spec = dataset.partition(":")
    return bool(colon) and kind in REGISTRY


def label_of(config) -> str:
    """The label a run's dataset is read with: --label-column, or the format's own (image folders: the folder)."""
    return config.label_column or format_of(config.dataset.partition(":")[0]).LABEL


def open_source(dataset: str, label: str, options: Any = None) -> Source:
    """``KIND:PATH`` listed by its format (local; no collectives)."""
    kind, _, spec = dataset.partition(":")
    if kind not in REGISTRY or not spec:
        raise DataError(f"dataset {dataset!r}: expected one of " + ", ".join(f"{k}:PATH" for k in REGISTRY))
    return format_of(kind).source_of(kind, spec, label, options)


def read_unit(source: Source, unit: Unit, columns: Optional[Sequence[str]] = None, select: Optional[Select] = None,
              ahead: Any = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    return format_of(source.kind).read_unit(source, unit, columns=columns, select=select, ahead=ahead)


def read_ahead(source: Source, order: Sequence[int], columns: Optional[Sequence[str]] = None):
    return format_of(source.kind).ReadAhead(source, order, columns)


def unit_words(source: Source) -> str:
    return format_of(source.kind).unit_words(source)


def sample_names(source: Source, unit: Unit, count: int) -> List[str]:
    return format_of(source.kind).sample_names(source, unit, count)
