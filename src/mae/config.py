"""Layered run configs: dataclass defaults <- YAML file <- dotted ``key=value`` command-line overrides.

Every recipe declares its settings as a (nested) dataclass whose fields carry a help text
(``field(metadata={"help": ...})`` or a string literal right below the field, litgpt style). `load_config`
builds one from the layers, checks every value against the field's type annotation, and calls ``validate()``
on each dataclass that defines it, so a run fails at start-up with one clear line instead of hours later:

    cfg = load_config(PretrainConfig, "pretrain/vit_b_800ep", ["epochs=20", "optim.betas=[0.9,0.95]"])

The file may be a path or the name of a preset shipped inside the package (`mae.presets.resolve_preset`). A shipped
preset is written for the paper's cluster: a worker count it sets (a field whose default is
`mae.threads.default_workers`, e.g. ``data.num_workers: 10``) above what this machine allows is lowered to that
default, with one log line; the same value from the command line or from the user's own file is kept.

Numbers: every float setting must be finite, and a section declares the valid values of its number fields in one
table, checked before its ``validate()`` (`Range` explains the notation):

    RANGES: ClassVar[dict[str, str]] = {"lr": "> 0", "weight_decay": ">= 0", "betas": "[0, 1)"}

A list or tuple of numbers is checked value by value; ``None`` (null) stays allowed where the type allows it.

Merging: a mapping given for a nested dataclass or a ``dict`` field updates it key by key; any other value
(lists included) replaces the previous one. Override values are read as YAML (``[1,2]``, ``null``, ``true``),
except that a ``str`` field takes the text as written (``run_name=2024`` stays the string ``'2024'``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import logging
import math
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from mae.errors import ConfigError
from mae.files import write_text
from mae.presets import resolve_preset, shipped_name
from mae.threads import default_workers, max_workers, usable_cpus

__all__ = ["Range", "config_help", "load_config", "parse_range", "save_config", "to_dict"]

T = TypeVar("T")

_NONE_TYPE = type(None)


# ---------------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------------


def load_config(cls: type[T], path: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a `cls` instance from its defaults, then the YAML file at `path` (a file, a shipped preset's name such
    as 'vit_l_800ep' or 'pretrain/vit_l_800ep', or a mapping of the same shape), then `key=value` overrides."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    raw = _default_raw(cls)
    preset: tuple[str, dict[str, Any]] | None = None  # (name, its keys) when the file is a shipped preset
    if isinstance(path, Mapping):  # a config stored as data (e.g. inside a checkpoint)
        raw = _merge(raw, {k: v for k, v in path.items() if k != RUN_INFO_KEY}, cls, prefix="", root=cls)
    elif path is not None:
        kind = cls.__module__.rsplit(".", 1)[-1] if cls.__module__.startswith("mae.recipes.") else None
        file = resolve_preset(path, kind)
        layer = _read_yaml(file)
        raw = _merge(raw, layer, cls, prefix="", root=cls)
        name = shipped_name(file)
        preset = (name, layer) if name is not None else None
    if isinstance(overrides, str):  # a lone "a=b" would otherwise be split into characters
        overrides = [overrides]
    overridden: set[str] = set()
    for item in overrides:
        update = _parse_override(cls, item)
        overridden.update(_leaf_keys(update))
        raw = _merge(raw, update, cls, prefix="", root=cls)
    if preset is not None:
        raw = _fit_workers_to_machine(cls, raw, preset[0], preset[1], overridden)
    cfg = _build(cls, raw, prefix="")
    _validate_tree(cfg)
    return cfg


def to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-ready data of a config: dataclasses become dicts, tuples lists, paths strings."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


RUN_INFO_KEY = "_run"
"""Top-level key of a saved config.yaml that records how the run was started (command, host, versions); it is not a
setting, and `load_config` skips it."""


def save_config(cfg: Any, path: str | Path, run_info: Mapping[str, Any] | None = None) -> Path:
    """Write a config (a dataclass or its resolved dict) as readable YAML that `load_config` reads back unchanged,
    atomically; `run_info` goes under the ``_run`` key (ignored when loading)."""
    path = Path(path)
    name = type(cfg).__name__ if dataclasses.is_dataclass(cfg) else "run config"
    header = f"# resolved {name}; load with mae.config.load_config (the {RUN_INFO_KEY} section is a record)\n"
    data = to_dict(cfg)
    if run_info:
        data = {**data, RUN_INFO_KEY: to_dict(dict(run_info))}
    write_text(path, header + yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False, width=120))
    return path


class _ConfigDumper(yaml.SafeDumper):
    """Block-style YAML, except that short lists of plain values stay on one line (``betas: [0.9, 0.95]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flat = all(isinstance(v, (int, float, str, bool)) or v is None for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_ConfigDumper.add_representer(list, _represent_list)


def config_help(cls: type) -> str:
    """One line per dotted key, ``key (type, default ...): help``, for the command line's --help."""
    rows: list[tuple[str, str]] = []
    _help_rows(cls, _default_raw(cls), "", rows)
    width = min(max((len(k) for k, _ in rows), default=0), 48)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


# ---------------------------------------------------------------------------------------------------------------------
# layers: defaults, YAML, overrides
# ---------------------------------------------------------------------------------------------------------------------


class _Missing:
    """Marks a required field that no layer has set yet."""

    def __repr__(self) -> str:
        return "<required>"


_MISSING = _Missing()


def _default_raw(cls: type) -> dict[str, Any]:
    """The defaults of a dataclass as a nested dict (required fields map to `_MISSING`)."""
    raw: dict[str, Any] = {}
    for f in _init_fields(cls):
        if f.default is not dataclasses.MISSING:
            raw[f.name] = _to_raw(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            raw[f.name] = _to_raw(f.default_factory())
        else:
            raw[f.name] = _MISSING
    return raw


def _to_raw(value: Any) -> Any:
    """Like `to_dict` but keeps tuples and paths: defaults must pass the same type checks as user values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_raw(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        return {k: _to_raw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_raw(v) for v in value]
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file '{path}' {what}; pass the path of a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"could not read config file '{path}': {getattr(e, 'strerror', None) or e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file '{path}' is not valid YAML: {problem}{where}") from e
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys to values, got {type(data).__name__}")
    return {k: v for k, v in data.items() if k != RUN_INFO_KEY}


def _leaf_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys a nested mapping sets: ``{'data': {'num_workers': 2}}`` -> ``['data.num_workers']``."""
    keys: list[str] = []
    for key, value in tree.items():
        keys += _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, Mapping) and value else [f"{prefix}{key}"]
    return keys


def _worker_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of the fields whose default is the machine's DataLoader worker count (`default_workers`)."""
    keys: list[str] = []
    for f in _init_fields(cls):
        dc = _dataclass_in(_hints(cls)[f.name])
        if dc is not None:
            keys += _worker_keys(dc, f"{prefix}{f.name}.")
        elif f.default_factory is default_workers:
            keys.append(prefix + f.name)
    return keys


def _fit_workers_to_machine(cls: type, raw: dict[str, Any], preset: str, layer: Mapping[str, Any],
                            overridden: set[str]) -> dict[str, Any]:
    """`raw` with each worker count that the shipped `preset` sets (its `layer`) above what this machine allows
    (`max_workers`: the cluster presets ask for 10) lowered to the machine's default, saying so in one log line. A
    value from the command line (`overridden`) or from the user's own YAML file is kept as given."""
    for key in _worker_keys(cls):
        value: Any = layer
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if not isinstance(value, int) or isinstance(value, bool) or value <= max_workers() \
                or any(key == o or key.startswith(f"{o}.") for o in overridden):
            continue
        chosen = default_workers()
        *sections, leaf = key.split(".")
        raw = node = dict(raw)
        for part in sections:  # copies along the path: the caller's dicts stay as they were
            node[part] = dict(node[part])  # a mapping: the preset set a value inside it, and no override replaced it
            node = node[part]
        node[leaf] = chosen
        logging.getLogger("mae").info(
            "preset %s sets %s=%d, more loader processes than this machine's %d usable CPUs allow (at most %d, one CPU "
            "kept for training); using %d. Pass %s=%d on the command line to keep %d", preset, key, value,
            usable_cpus(), max_workers(), chosen, key, value, value)
    return raw


def _parse_override(cls: type, item: str) -> dict[str, Any]:
    """``'a.b=3'`` -> ``{'a': {'b': 3}}``, checking the key against the schema and parsing the value as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"bad override {item!r}: expected the form key=value, e.g. 'model.patch_size=16'")
    leaf_type = _type_at(cls, key)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML (e.g. an unbalanced bracket in a path): take it literally, the type check decides
    if value is not None and not isinstance(value, str) and _wants_text(leaf_type):
        value = text
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def _type_at(cls: type, dotted: str) -> Any:
    """The annotation of the field at a dotted key; unknown keys raise with a suggestion."""
    tp: Any = cls
    walked: list[str] = []
    for part in dotted.split("."):
        dc = _dataclass_in(tp)
        if dc is None:
            if _origin(tp) is dict or tp is dict:
                args = typing.get_args(tp)
                tp = args[1] if len(args) == 2 else Any
                walked.append(part)
                continue
            if tp is Any:
                return Any
            parent = ".".join(walked)
            raise ConfigError(
                f"config key '{parent}' holds a value ({_type_name(tp)}), not a section; "
                f"set it as '{parent}=<value>' instead of '{dotted}=...'"
            )
        hints = _hints(dc)
        if part not in hints:
            _unknown_key(cls, ".".join([*walked, part]), dc, ".".join(walked))
        tp = hints[part]
        walked.append(part)
    return tp


def _merge(raw: dict[str, Any], update: Mapping[str, Any], cls: type, prefix: str, root: type) -> dict[str, Any]:
    """`update` merged onto the raw values of dataclass `cls` (at `prefix` inside `root`); unknown keys raise."""
    out = dict(raw)
    hints = _hints(cls)
    for raw_key, value in update.items():
        key = str(raw_key)
        if key not in hints:
            _unknown_key(root, prefix + key, cls, prefix[:-1])
        tp = hints[key]
        dc = _dataclass_in(tp)
        base = out.get(key, _MISSING)
        if dc is not None and isinstance(value, Mapping):
            if not isinstance(base, Mapping):  # None, required, or replaced by a scalar: start from dc's defaults
                base = _default_raw(dc)
            out[key] = _merge(base, value, dc, prefix=f"{prefix}{key}.", root=root)
        elif _is_dict_type(tp) and isinstance(value, Mapping) and isinstance(base, Mapping):
            out[key] = {**base, **value}
        else:
            out[key] = value
    return out


def _unknown_key(root: type | None, dotted: str, section: type, section_name: str) -> typing.NoReturn:
    """Raise for `dotted`, suggesting the closest key of `root` (or of `section` when the root is not known)."""
    keys = (
        _dotted_keys(root)
        if root is not None
        else [(f"{section_name}.{k}" if section_name else k) for k in _dotted_keys(section)]
    )
    close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean '{close[0]}'?"
    else:
        names = ", ".join(_hints(section))
        where = f"under '{section_name}'" if section_name else "at the top level"
        hint = f"valid keys {where}: {names}"
    raise ConfigError(f"unknown config key '{dotted}'; {hint}")


def _dotted_keys(cls: type) -> list[str]:
    """Every key of a (nested) dataclass in dotted form, sections included."""
    keys: list[str] = []
    for name, tp in _hints(cls).items():
        keys.append(name)
        dc = _dataclass_in(tp)
        if dc is not None:
            keys.extend(f"{name}.{k}" for k in _dotted_keys(dc))
    return keys


# ---------------------------------------------------------------------------------------------------------------------
# building and type checks
# ---------------------------------------------------------------------------------------------------------------------


def _build(cls: type[T], raw: Mapping[str, Any], prefix: str) -> T:
    hints = _hints(cls)  # type: ignore[arg-type]  # a class is hashable; mypy misreads functools.cache on type[T]
    unknown = [k for k in raw if k not in hints]
    if unknown:
        _unknown_key(None, prefix + str(unknown[0]), cls, prefix[:-1])
    defaults = _default_raw(cls)
    kwargs: dict[str, Any] = {}
    for f in _init_fields(cls):
        value = raw.get(f.name, defaults[f.name])
        if value is _MISSING:
            raise ConfigError(
                f"missing required config key '{prefix}{f.name}'; set it in the YAML file or as "
                f"{prefix}{f.name}=<value>"
            )
        kwargs[f.name] = _coerce(value, hints[f.name], prefix + f.name)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """`value` checked against (and converted to) annotation `tp`; raises ConfigError naming `path`."""
    if tp is Any or tp is object:
        return value
    origin, args = _origin(tp), typing.get_args(tp)

    if origin is Union:
        if value is None and _NONE_TYPE in args:
            return None
        members = [a for a in args if a is not _NONE_TYPE]
        if len(members) == 1:  # Optional[X]: X's own message is the most precise
            try:
                return _coerce(value, members[0], path)
            except ConfigError as e:
                if str(e).startswith(f"{path}: expected"):  # the value itself is wrong, not something inside it
                    _wrong(value, tp, path)
                raise
        for arg in members:
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        _wrong(value, tp, path)
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
        raise ConfigError(f"{path}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # type: ignore[arg-type]  # tp is a dataclass type here (a type hint)
            return value
        if isinstance(value, Mapping):
            return _build(tp, value, prefix=f"{path}.")  # type: ignore[arg-type]  # as above
        _wrong(value, tp, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        _wrong(value, tp, path)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _wrong(value, tp, path)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        _wrong(value, tp, path)
    if tp is str:
        if isinstance(value, str):
            return value
        _wrong(value, tp, path)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        _wrong(value, tp, path)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _wrong(value, tp, path)
        container = origin or tp
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values ({_type_name(tp)}), got {list(value)!r}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        return container(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            _wrong(value, tp, path)
        key_tp, val_tp = args if len(args) == 2 else (Any, Any)
        return {_coerce(k, key_tp, path): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        _wrong(value, tp, path)
    return value  # an annotation this module does not know how to check: pass the value through


def _wrong(value: Any, tp: Any, path: str) -> typing.NoReturn:
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def _validate_tree(obj: Any, prefix: str = "") -> None:
    """Check the numbers of every dataclass in the tree against their ranges, then call its ``validate()``,
    innermost first."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _validate_tree(getattr(obj, f.name), f"{prefix}{f.name}.")
        _check_numbers(obj, prefix)
        validate = getattr(obj, "validate", None)
        if callable(validate):
            validate()
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _validate_tree(v, prefix)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _validate_tree(v, prefix)


# ---------------------------------------------------------------------------------------------------------------------
# number ranges
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a number setting, written as in maths (`parse_range`): ``"> 0"``, ``">= 0"``, ``"< 1"``,
    ``"<= 1"``, ``"[0, 1)"``, ``"(0, 1]"``, or ``"any"`` (every finite number). NaN is never valid, and +-inf only
    where the interval closes on it (``"[0, inf]"``)."""

    low: float
    high: float
    low_open: bool
    high_open: bool
    text: str
    """As messages and --help show it: ``> 0``, ``in [0, 1)``, ``finite``."""

    def __contains__(self, x: float) -> bool:
        if math.isnan(x) or x < self.low or x > self.high:
            return False
        return not ((self.low_open and x == self.low) or (self.high_open and x == self.high))


@functools.cache
def parse_range(spec: str) -> Range:
    """`Range` of a spec such as ``"> 0"`` or ``"[0, 1)"``; a malformed spec is a bug in the config class."""
    text = " ".join(spec.split())
    if text == "any":
        return Range(-math.inf, math.inf, True, True, "finite")
    for op in (">=", "<=", ">", "<"):
        if text.startswith(op):
            bound = float(text[len(op):])
            if op[0] == ">":
                return Range(bound, math.inf, op == ">", True, text)
            return Range(-math.inf, bound, True, op == "<", text)
    if text[:1] in "[(" and text[-1:] in "])" and text.count(",") == 1:
        low, high = (float(part) for part in text[1:-1].split(","))
        if low <= high:
            return Range(low, high, text[0] == "(", text[-1] == ")", f"in {text}")
    raise ValueError(f"bad range {spec!r}: write '> 0', '>= 0', '[0, 1)', '(0, 1]' or 'any'")


@functools.cache
def _ranges(cls: type) -> dict[str, Range]:
    """The ``RANGES`` of `cls` and its bases (a subclass's entry wins), parsed."""
    merged: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        merged.update(vars(klass).get("RANGES", {}))
    unknown = sorted(set(merged) - set(_hints(cls)))
    if unknown:
        raise TypeError(f"{cls.__name__}.RANGES names {unknown}, which are not fields of {cls.__name__}")
    return {name: parse_range(spec) for name, spec in merged.items()}


def _check_numbers(obj: Any, prefix: str) -> None:
    """Raise a ConfigError for the first number field of dataclass `obj` outside its range (a float field without
    one must still be finite), naming the key, the value and the valid values."""
    cls = type(obj)
    ranges, hints = _ranges(cls), _hints(cls)  # type: ignore[arg-type]  # a class is hashable; mypy misreads functools.cache on type[Any]
    for f in _init_fields(cls):
        valid = ranges.get(f.name) or (parse_range("any") if _holds_float(hints[f.name]) else None)
        value = getattr(obj, f.name)
        numbers = _numbers(value)
        if valid is None or all(x in valid for x in numbers):
            continue
        key, many = prefix + f.name, isinstance(value, (list, tuple))
        default = _field_default(f)  # the example: the field's own default, when it is a valid number
        example = f"e.g. {key}={_show(default)}" if _numbers(default) and all(x in valid for x in _numbers(default)) \
            else ""
        if any(math.isnan(x) or math.isinf(x) for x in numbers if x not in valid):
            what = "holds a value that is not a finite number" if many else "is not a finite number"
            want = f"{'finite numbers' if many else 'a finite number'}" if valid.text == "finite" else \
                f"{'numbers' if many else 'a number'} {valid.text}"
            nullable = " or null" if _NONE_TYPE in typing.get_args(hints[f.name]) else ""
            raise ConfigError(f"{key}={_show(value)} {what}; give {want}{nullable}"
                              + (f", {example}" if example else ""))
        each = "each value of " if many else ""
        raise ConfigError(f"{each}{key} must be {valid.text}, got {_show(value)}" + (f"; {example}" if example else ""))


def _holds_float(tp: Any) -> bool:
    return tp is float or any(_holds_float(a) for a in typing.get_args(tp))


def _numbers(value: Any) -> list[float]:
    """The numbers a setting holds: itself, or the items of a list, tuple or mapping of numbers (bools are not)."""
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else [value]
    return [float(v) for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _show(value: Any) -> str:
    """A number or a list of numbers as a user would type it: ``nan``, ``0.05``, ``[0.9, 0.95]``."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------------------------------
# help text
# ---------------------------------------------------------------------------------------------------------------------


def _help_rows(cls: type, defaults: Mapping[str, Any], prefix: str, rows: list[tuple[str, str]]) -> None:
    docs = _attribute_docs(cls)
    hints = _hints(cls)
    for f in _init_fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        default = defaults.get(f.name, _MISSING)
        dc = _dataclass_in(tp)
        if dc is not None:
            if dc is not tp:  # an optional section: say so, then list its keys
                rows.append((key, f"({_type_name(tp)}, default {to_dict(default)!r}) {_help_text(f, docs)}".rstrip()))
            sub = default if isinstance(default, Mapping) else _default_raw(dc)
            _help_rows(dc, sub, f"{key}.", rows)
            continue
        shown = "required" if default is _MISSING else f"default {to_dict(default)!r}"
        valid = _ranges(cls).get(f.name)
        if valid is not None:
            shown += f", {valid.text}"
        rows.append((key, f"({_type_name(tp)}, {shown}) {_help_text(f, docs)}".rstrip()))


def _help_text(f: dataclasses.Field, docs: Mapping[str, str]) -> str:
    """The field's ``metadata['help']`` or else its docstring, on one line."""
    return " ".join(str(f.metadata.get("help") or docs.get(f.name, "")).split())


@functools.cache
def _attribute_docs(cls: type) -> dict[str, str]:
    """String literals written right below a field (litgpt-style field docstrings), read from the source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        body = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return {}
    docs: dict[str, str] = {}
    statements = getattr(body, "body", [])
    for stmt, nxt in itertools.pairwise(statements):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


# ---------------------------------------------------------------------------------------------------------------------
# type helpers
# ---------------------------------------------------------------------------------------------------------------------


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of the init fields (string annotations from ``from __future__`` included)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in _init_fields(cls)}


def _origin(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    return Union if origin is types.UnionType else origin


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass behind `tp` or `Optional[tp]`, else None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if _origin(tp) is Union:
        found = [a for a in typing.get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _is_dict_type(tp: Any) -> bool:
    if _origin(tp) is Union:
        return any(_is_dict_type(a) for a in typing.get_args(tp))
    return tp is dict or _origin(tp) is dict


def _wants_text(tp: Any) -> bool:
    """True when an override for this annotation should keep its text as written (str, Path, Optional[str])."""
    if _origin(tp) is Union:
        members = [a for a in typing.get_args(tp) if a is not _NONE_TYPE]
        return len(members) == 1 and _wants_text(members[0])
    if _origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return tp in (str, Path)


def _type_name(tp: Any) -> str:
    """Readable annotation: ``int``, ``float | None``, ``tuple[float, float]``, ``'adamw' | 'sgd'``."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin, args = _origin(tp), typing.get_args(tp)
    if origin is Union:
        return " | ".join("None" if a is _NONE_TYPE else _type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None and args:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return str(tp).replace("typing.", "")
