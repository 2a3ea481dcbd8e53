"""Run configuration files: TOML in, TOML out. Keys are TrainConfig's fields (the CLI's long
options with ``_`` for ``-``); the command line overrides the file.

A run saves its resolved configuration as ``config.toml``; ``--config`` on that file reloads the
same run (the output directory and ``resume``, which say where a run goes and starts, not what it
trains, are left out: give them on the command line).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import typing
from typing import Any, Dict

from .options import ConfigError, TrainConfig

# Where a run goes and where it starts from: not part of what it trains.
NOT_SAVED = ("output_dir", "resume")


def value_types() -> Dict[str, Any]:
    """Each TrainConfig field's value type (what the command line and TOML files must give):
    Optional[X] -> X, Tuple[int, ...] -> tuple. None needs no check: neither can write it, and
    an absent option is the default."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: _value_type(hints[f.name]) for f in dataclasses.fields(TrainConfig)}


def _value_type(hint: Any) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        return _value_type(next(a for a in args if a is not type(None)))
    if typing.get_origin(hint) is tuple:
        return tuple
    return hint


def _toml_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


def check_value(path: str, key: str, value: Any, base: Any) -> Any:
    """``value`` as a ``base``-typed option value (int accepted for float, array for tuple), or one error."""
    wrong = None
    if base is bool:
        wrong = not isinstance(value, bool) and "a boolean (true/false)"
    elif base is int:
        wrong = (isinstance(value, bool) or not isinstance(value, int)) and "an integer"
    elif base is float:
        wrong = (isinstance(value, bool) or not isinstance(value, (int, float))) and "a number"
        value = float(value) if not wrong else value
    elif base is str:
        wrong = not isinstance(value, str) and "a string"
    elif base is tuple:
        ok = isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        wrong = not ok and "a non-empty array of integers, e.g. [64, 32]"
        value = tuple(value) if ok else value
    if wrong:
        raise ConfigError(f"{path}: {key} must be {wrong}, got {_toml_type(value)} {json.dumps(value, default=str)}")
    return value


def load(path: str) -> Dict[str, Any]:
    """The file's values, checked against TrainConfig's fields and types (not yet validated together)."""
    return check_values(read_toml(path, "config"), path)


def read_toml(path: str, kind: str) -> Dict[str, Any]:
    """A TOML file's contents; a missing file or bad TOML is one ConfigError naming the ``kind`` of file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"cannot read {kind} file {path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None


def check_values(raw: Dict[str, Any], source: str) -> Dict[str, Any]:
    """``raw`` (TOML keys -> values) as TrainConfig field names -> values of the right types; an
    unknown key names the closest option. ``source`` starts each message (a file, a table)."""
    types = value_types()
    values = {}
    for key, value in raw.items():
        name = field_name(key, source)
        values[name] = check_value(source, key, value, types[name])
    return values


def field_name(key: str, source: str) -> str:
    """The TrainConfig field a TOML key names (``-`` or ``_``), or one error naming the closest."""
    name = key.replace("-", "_")
    fields = value_types()
    if name not in fields:
        close = difflib.get_close_matches(name, fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: unknown key {key!r}{hint}; keys are hvd-train's long options, "
                          f"e.g. batch_size = 32")
    return name


def dumps(config: TrainConfig) -> str:
    """The resolved configuration as TOML; ``load`` of it gives the same values back."""
    lines = ["# hvd-train configuration: hvd-train --config THIS_FILE [options] re-runs it;",
             "# options given on the command line override these values."]
    for name, value in config.to_dict().items():
        if name in NOT_SAVED:
            if value is not None:
                lines.append(f"# {name} = {json.dumps(value)}  (not reloaded: give --{name.replace('_', '-')})")
            continue
        if value is None:  # TOML has no null; an absent key is the default, which is None here
            continue
        lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return repr(int(value))
    if isinstance(value, float):
        return repr(float(value))  # a NumPy float's repr is np.float64(...), not TOML
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: the same escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
