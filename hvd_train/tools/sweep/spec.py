"""A sweep file, checked, and the trials it makes.

TOML: top-level keys say how to search (``SETTINGS``); ``[base]`` holds TrainConfig options
every trial shares (the ``--config`` vocabulary); ``[grid]`` lists values per option, every
combination is tried (scikit-learn's ParameterGrid); ``[random]`` gives a list of choices or a
distribution per option, ``trials`` draws with ``seed`` (scikit-learn's ParameterSampler, scipy
distributions). With both, every grid point is combined with every random draw.

Errors in the file (an unknown option, an empty grid, a wrong type) are one SweepError before
anything runs. A grid point whose *values* TrainConfig rejects (dropout 1.5) is a trial that
fails: it is recorded with the error, and the others run.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ...config import configfile
from ...config.options import TASK_METRICS, ConfigError, TrainConfig
from ...training import pruning

LAUNCHERS = ("local", "hosts", "mpirun")
DISTRIBUTIONS = ("uniform", "loguniform", "int")
TABLES = ("base", "grid", "random")
# Options the sweep sets for each trial (where it writes, what it prunes against): not the user's.
SWEEP_SETS = ("output_dir", "resume", "prune_file")
# Left out of a trial's digest: where it writes and how it reports, not what it trains.
NOT_DIGESTED = SWEEP_SETS + ("checkpoint_dir", "progress", "verbose_ranks", "tensorboard")


class SweepError(ConfigError):
    """The sweep file is wrong: one message, nothing runs."""


@dataclass(frozen=True)
class Settings:
    """The top-level keys of a sweep file, with their defaults."""

    metric: str = "val_loss"  # what ranks the trials: the validation figure of the final weights
    mode: Optional[str] = None  # min or max; None = the metric's own (max for val_accuracy, val_r2)
    np: int = 2  # processes per trial
    launcher: str = "local"  # launch/<launcher>.sh runs each trial
    launcher_args: Tuple[str, ...] = ()  # before the launcher's --, e.g. ["-H", "node1:2,node2:2"]
    trials: int = 10  # random draws ([random] only)
    seed: int = 0  # of the random draws
    time_budget_minutes: Optional[float] = None  # no trial starts after this much time of this invocation
    trial_timeout_minutes: Optional[float] = None  # a trial still running then is stopped and recorded failed
    prune: str = "none"  # none or median
    prune_warmup_epochs: int = 3  # never prune before this epoch (the default LR warmup is 3 epochs)
    prune_startup_trials: int = 2  # a median needs this many finished trials at the epoch


SETTING_TYPES = {"metric": str, "mode": str, "np": int, "launcher": str, "launcher_args": list, "trials": int,
                 "seed": int, "time_budget_minutes": float, "trial_timeout_minutes": float, "prune": str,
                 "prune_warmup_epochs": int, "prune_startup_trials": int}


@dataclass(frozen=True)
class Distribution:
    """A [random] distribution: uniform or log-uniform floats, or integers in [low, high]."""

    kind: str
    low: float
    high: float

    def frozen(self):
        from scipy import stats

        if self.kind == "uniform":
            return stats.uniform(self.low, self.high - self.low)
        if self.kind == "loguniform":
            return stats.loguniform(self.low, self.high)
        return stats.randint(int(self.low), int(self.high) + 1)

    def __str__(self) -> str:
        return f"{self.kind}({self.low:g}, {self.high:g})"


@dataclass(frozen=True)
class Trial:
    index: int  # 1-based, in plan order
    params: Dict[str, Any]  # the swept options' values
    config: Optional[TrainConfig]  # base + params, resolved; None when TrainConfig rejects them
    error: Optional[str]  # why TrainConfig rejects them
    digest: str  # finds the trial's results again when the sweep is resumed

    def label(self) -> str:
        return " ".join(f"{k}={show(v)}" for k, v in self.params.items())


@dataclass(frozen=True)
class Sweep:
    path: str
    settings: Settings
    base: Dict[str, Any]
    grid: Dict[str, List[Any]] = field(default_factory=dict)
    random: Dict[str, Any] = field(default_factory=dict)  # option -> list of choices or Distribution

    @property
    def mode(self) -> str:
        return self.settings.mode or pruning.default_mode(self.settings.metric)

    @property
    def swept(self) -> List[str]:
        return list(self.grid) + list(self.random)

    def shape(self) -> str:
        """How the trials come about, e.g. 'grid 2 x 3 = 6' or 'grid 4 x 5 random draws'."""
        parts = []
        if self.grid:
            sizes = [len(v) for v in self.grid.values()]
            parts.append("grid " + " x ".join(map(str, sizes)))
        if self.random:
            parts.append(f"{self.settings.trials} random draw(s), seed {self.settings.seed}")
        return " x ".join(parts)

    def trials(self) -> List[Trial]:
        """Every trial, in order: grid points (ParameterGrid's order), each with every random draw."""
        from sklearn.model_selection import ParameterGrid, ParameterSampler

        draws: List[Dict[str, Any]] = [{}]
        if self.random:
            space = {k: v.frozen() if isinstance(v, Distribution) else v for k, v in self.random.items()}
            with warnings.catch_warnings():  # choices only, fewer than trials: each combination once
                warnings.simplefilter("ignore", UserWarning)
                draws = list(ParameterSampler(space, n_iter=self.settings.trials, random_state=self.settings.seed))
        points = list(ParameterGrid(self.grid)) if self.grid else [{}]
        types = configfile.value_types()
        out = []
        for point in points:
            for draw in draws:
                params = {k: _plain(types[k], {**point, **draw}[k]) for k in self.swept}
                out.append(_trial(len(out) + 1, self.base, params, self.settings.np))
        return out


def _trial(index: int, base: Dict[str, Any], params: Dict[str, Any], np_: int) -> Trial:
    values = {**base, **params}
    try:
        config, error = TrainConfig(**values), None
        identity = {k: v for k, v in config.to_dict().items() if k not in NOT_DIGESTED}
    except (ConfigError, TypeError, ValueError) as err:
        config, error = None, str(err)
        identity = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    text = json.dumps({"config": identity, "np": np_}, sort_keys=True, default=str)
    return Trial(index, params, config, error, hashlib.sha256(text.encode()).hexdigest()[:12])


def _plain(value_type: Any, value: Any) -> Any:
    """A drawn value as the option's Python type (numpy scalars out, tuples for sizes)."""
    if hasattr(value, "item"):
        value = value.item()
    if value_type is float:
        return float(value)
    if value_type is tuple:
        return tuple(value)
    return value


def show(value: Any) -> str:
    """A parameter value for tables and progress lines: 4 significant digits, sizes as 64,32."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def load(path: str) -> Sweep:
    return parse(_checked(configfile.read_toml, path, "sweep"), path)


def parse(raw: Dict[str, Any], path: str = "sweep") -> Sweep:
    """A sweep file's contents, checked (every message starts with ``path``)."""
    settings: Dict[str, Any] = {}
    for key, value in raw.items():
        if key in TABLES:
            if not isinstance(value, dict):
                raise SweepError(f"{path}: {key} must be a table ([{key}] followed by option = value lines)")
            continue
        if key not in SETTING_TYPES:
            close = difflib.get_close_matches(key, [*SETTING_TYPES, *TABLES], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SweepError(f"{path}: unknown key {key!r}{hint}; top-level keys are {', '.join(SETTING_TYPES)}, "
                             f"tables [{'], ['.join(TABLES)}]")
        settings[key] = _setting(path, key, value)
    base = _checked(configfile.check_values, raw.get("base", {}), f"{path} [base]")
    grid = dict(_grid(path, k, v) for k, v in raw.get("grid", {}).items())
    random = dict(_random(path, k, v) for k, v in raw.get("random", {}).items())
    settings_ = Settings(**settings)
    sweep = Sweep(path, settings_, base, grid, random)
    _check_together(sweep, raw)
    return sweep


def _checked(check, *args):
    try:
        return check(*args)
    except SweepError:
        raise
    except ConfigError as err:
        raise SweepError(str(err)) from None


def _setting(path: str, key: str, value: Any) -> Any:
    kind = SETTING_TYPES[key]
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SweepError(f"{path}: {key} must be an array of strings, e.g. [\"-H\", \"node1:2,node2:2\"]")
        return tuple(value)
    value = _checked(configfile.check_value, path, key, value, kind)
    if kind in (int, float) and key != "seed" and not (value >= 0 if key == "prune_warmup_epochs" else value > 0):
        raise SweepError(f"{path}: {key} must be {'>= 0' if key == 'prune_warmup_epochs' else '> 0'}, got {value}")
    return value


def _grid(path: str, key: str, values: Any) -> Tuple[str, List[Any]]:
    """(option, its values) of a [grid] line."""
    where = f"{path} [grid]"
    name = _checked(configfile.field_name, key, where)
    if not isinstance(values, list):
        raise SweepError(f"{where}: {key} must be an array of the values to try, e.g. {key} = [a, b]; a single "
                         "value belongs in [base]")
    if not values:
        raise SweepError(f"{where}: {key} is an empty array: give at least one value")
    value_type = configfile.value_types()[name]
    return name, [_checked(configfile.check_value, where, f"{key}[{i}]", v, value_type) for i, v in enumerate(values)]


def _random(path: str, key: str, spec: Any) -> Tuple[str, Any]:
    """(option, its list of choices or Distribution) of a [random] line."""
    where = f"{path} [random]"
    name = _checked(configfile.field_name, key, where)
    value_type = configfile.value_types()[name]
    example = f"{key} = {{ distribution = \"loguniform\", low = 0.0001, high = 0.1 }}"
    if isinstance(spec, list):
        if not spec:
            raise SweepError(f"{where}: {key} is an empty array: give at least one choice")
        return name, [_checked(configfile.check_value, where, f"{key}[{i}]", v, value_type)
                      for i, v in enumerate(spec)]
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: {key} must be an array of choices or a distribution table, e.g. {example}")
    unknown = set(spec) - {"distribution", "low", "high"}
    kind = spec.get("distribution")
    if unknown or kind not in DISTRIBUTIONS or "low" not in spec or "high" not in spec:
        raise SweepError(f"{where}: {key} needs exactly distribution ({', '.join(DISTRIBUTIONS)}), low and high, "
                         f"e.g. {example}")
    if value_type not in (int, float) or (value_type is int and kind != "int"):
        what = {int: "an integer option: use distribution = \"int\""}.get(value_type, "not a number option: give "
                                                                         "an array of choices")
        raise SweepError(f"{where}: {key} is {what}")
    low, high = (_checked(configfile.check_value, where, f"{key}.{b}", spec[b], int if kind == "int" else float)
                 for b in ("low", "high"))
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise SweepError(f"{where}: {key} needs low < high, got low {low}, high {high}")
    if kind == "loguniform" and low <= 0:
        raise SweepError(f"{where}: {key}: a loguniform distribution needs low > 0, got {low}")
    return name, Distribution(kind, low, high)


def _check_together(sweep: Sweep, raw: Dict[str, Any]) -> None:
    path, s = sweep.path, sweep.settings
    if not sweep.grid and not sweep.random:
        what = "are empty" if ("grid" in raw or "random" in raw) else "are missing"
        raise SweepError(f"{path}: nothing to search: [grid] and [random] {what}; e.g. [grid] lr = [0.003, 0.01]")
    for key in set(sweep.grid) & set(sweep.random):
        raise SweepError(f"{path}: {key} is in both [grid] and [random]: search it one way")
    for key in set(sweep.base) & set(sweep.swept):
        raise SweepError(f"{path}: {key} is in [base] and is searched: remove it from [base]")
    for key in [k for k in (*sweep.base, *sweep.swept) if k in SWEEP_SETS]:
        raise SweepError(f"{path}: {key} cannot be set in a sweep file: the sweep sets it for each trial")
    if "task" in sweep.swept:
        raise SweepError(f"{path}: task cannot be searched (every trial is ranked by the same metric): "
                         "put it in [base]")
    task = sweep.base.get("task", "classification")
    if s.metric not in TASK_METRICS.get(task, ()):
        raise SweepError(f"{path}: metric {s.metric!r} is not a validation metric of {task}: choose one of "
                         f"{', '.join(TASK_METRICS.get(task, ()))}")
    if s.mode is not None and s.mode not in pruning.MODES:
        raise SweepError(f"{path}: mode must be min or max, got {s.mode!r}")
    if s.launcher not in LAUNCHERS:
        raise SweepError(f"{path}: launcher must be one of {', '.join(LAUNCHERS)}, got {s.launcher!r}")
    if s.prune not in pruning.RULES:
        raise SweepError(f"{path}: prune must be one of {', '.join(pruning.RULES)}, got {s.prune!r}")
    if s.launcher == "hosts" and not any(a in ("-H", "--hosts", "--hostfile") for a in s.launcher_args):
        raise SweepError(f"{path}: launcher \"hosts\" needs launcher_args = [\"-H\", \"host1:2,host2:2\"] "
                         "(or [\"--hostfile\", FILE])")
