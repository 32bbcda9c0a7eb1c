"""Options files: YAML read strictly, and mapped key by key onto frozen dataclasses.

Every YAML file the package reads (recipes, text options) goes through `read_yaml` and `from_mapping`:
- the file must be UTF-8 text; a duplicate key is an error (PyYAML would keep the last value silently);
- `1e-4` is a float (YAML 1.2), not the string YAML 1.1 makes of it;
- each key maps to a typed dataclass field: an unknown key, a wrong type, or a value its field's check refuses
  is a RecipeError naming the dotted key and the file.

A field's check sits beside the field: ``lr: float = checked(3e-4, POSITIVE)``. `check_fields` applies the same
checks to a dataclass built in Python (call it from ``__post_init__``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from speechxfer.errors import RecipeError


@dataclass(frozen=True)
class Check:
    """A test a field's value must pass (None always passes), and what the value must be, for the message."""

    test: Callable[[Any], bool]
    must_be: str  # completes "KEY must be ...", e.g. "> 0"


POSITIVE = Check(lambda v: v > 0, "> 0")
NON_NEGATIVE = Check(lambda v: v >= 0, ">= 0")
AT_LEAST_ONE = Check(lambda v: v >= 1, ">= 1")
SHARE = Check(lambda v: 0 <= v <= 1, "between 0 and 1")


def checked(default: Any = dataclasses.MISSING, check: Check | None = None, *,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose value `from_mapping` and `check_fields` test with `check`."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={} if check is None else {"check": check})


def check_fields(instance: Any) -> None:
    """Raise ValueError for the first field of a dataclass instance that its type's allowed values (Literal) or
    its check refuse; for ``__post_init__``, so that options built in Python are held to the file's rules."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        problem = _field_problem(f, hints[f.name], getattr(instance, f.name))
        if problem:
            raise ValueError(f"{f.name} {problem}")


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-4` as a float (YAML 1.2) and refusing a key repeated in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}  # key -> the line it first appears on
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be followed by keys it overrides
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own check reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first})", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(path: str | os.PathLike, *, what: str = "recipe") -> Any:
    """The content of a UTF-8 YAML file (None when empty). RecipeError names the file (and line) when it cannot be
    read, is not UTF-8 text, is not valid YAML, or repeats a key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RecipeError(f"cannot read {what}: {err.strerror}", path=path) from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not part of the text
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise RecipeError(f"not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} cannot be decoded "
                          "(save the file as UTF-8)", path=path, line=line) from None
    return parse_yaml(text, path=path)


def parse_yaml(text: str, *, path: str | os.PathLike) -> Any:
    """Parse YAML text with YamlLoader; RecipeError names `path` and the line of the problem."""
    try:
        loader = YamlLoader(text)  # yaml.load's steps, keeping the loader to say where it stopped
        try:
            return loader.get_single_data()
        except RecursionError:  # PyYAML recurses a few levels per bracket or indentation: `[[[...]]]` 1000 deep
            raise RecipeError("YAML nested too deeply to read", path=path, line=loader.line + 1) from None
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        if mark is None and isinstance(err, yaml.reader.ReaderError):  # a control character such as NUL
            line = text.count("\n", 0, err.position) + 1
            raise RecipeError(f"not YAML text: character 0x{err.character:02x} at character {err.position}",
                              path=path, line=line) from None
        raise RecipeError(f"not valid YAML: {getattr(err, 'problem', None) or err}", path=path,
                          line=None if mark is None else mark.line + 1) from None


def from_mapping(cls: type, raw: Any, *, path: str | os.PathLike, prefix: str = "",
                 cli_keys: typing.Collection[str] = ()) -> Any:
    """Build dataclass `cls` from a mapping, checking keys, types and each field's check.

    Nested dataclass fields take nested mappings; `X | None` takes null; tuple fields take lists (`[0.9, 1.1]`).
    Errors are RecipeErrors naming the dotted key (`prefix` + field name) and `path`; keys in `cli_keys` (or under
    them) are marked as coming from --set.
    """
    where = prefix.rstrip(".") or "the file"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping of keys, got {_describe(raw)}", path=path)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise RecipeError(f"unknown key '{prefix}{unknown[0]}' (known keys{' of ' + where if prefix else ''}: "
                          f"{', '.join(fields)})", path=path)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(f"missing required key '{key}' (set it in the file or with --set {key}=...)",
                                  path=path)
            continue
        value = _convert(hints[name], raw[name], key=key, path=path, cli_keys=cli_keys)
        problem = _field_problem(f, hints[name], value)
        if problem:
            raise RecipeError(f"{key} {problem}{_origin(key, cli_keys)}", path=path)
        values[name] = value
    try:
        return cls(**values)
    except ValueError as err:  # checks that span fields, in the class's __post_init__
        raise RecipeError(f"{where}: {err}", path=path) from None


def set_dotted(cls: type, raw: dict, key: str, value: Any, *, path: str | os.PathLike) -> None:
    """Set raw[a][b][c] = value for key "a.b.c" (a --set override), refusing keys that are not fields of `cls`.
    The last part may also be an entry of a mapping field (text.replacements.X, model_config.hidden_size)."""
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if cls is None:  # inside a mapping field: any key, one level deep
            if depth != len(parts) - 1:
                raise RecipeError(f"--set {key}: '{'.'.join(parts[:depth + 1])}' has no sub-keys", path=path)
            node[part] = value
            return
        if part not in {f.name for f in dataclasses.fields(cls)}:
            raise RecipeError(f"--set {key}: unknown key '{'.'.join(parts[:depth + 1])}'", path=path)
        if depth == len(parts) - 1:
            node[part] = value
            return
        tp = typing.get_type_hints(cls)[part]
        cls = _dataclass_in(tp)
        if cls is None and not _holds_mapping(tp):
            raise RecipeError(f"--set {key}: '{'.'.join(parts[:depth + 1])}' has no sub-keys", path=path)
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child


def _field_problem(f: dataclasses.Field, tp: Any, value: Any) -> str | None:
    """What is wrong with a value of the right type for field `f`: "must be ..., got ...", or None."""
    allowed = _literal_values(tp)
    if allowed is not None and value not in allowed:
        return f"must be one of {', '.join(map(str, allowed))}, got {_describe(value)}"
    check = f.metadata.get("check")
    if check is not None and value is not None and not check.test(value):
        return f"must be {check.must_be}, got {value!r}"
    return None


def _literal_values(tp: Any) -> tuple | None:
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [_literal_values(a) for a in typing.get_args(tp) if a is not type(None)]
        return inner[0] if len(inner) == 1 else None
    return None


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass a field holds, looking through `X | None`."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return inner[0] if inner else None
    return None


def _holds_mapping(tp: Any) -> bool:
    """Whether a field's type is dict[...] (or dict[...] | None)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_holds_mapping(a) for a in typing.get_args(tp))
    return typing.get_origin(tp) is dict


def _convert(tp: Any, value: Any, *, key: str, path: str | os.PathLike, cli_keys: typing.Collection[str]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key=key, path=path, cli_keys=cli_keys)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, prefix=key + ".", path=path, cli_keys=cli_keys)
    if origin is Literal:
        return value  # its allowed values are checked with the field's check, in _field_problem
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {_describe(value)}{_origin(key, cli_keys)}", path=path)
        key_type, value_type = args
        return {_convert(key_type, k, key=f"{key}.{k}", path=path, cli_keys=cli_keys):
                _convert(value_type, v, key=f"{key}.{k}", path=path, cli_keys=cli_keys) for k, v in value.items()}
    if origin is tuple:  # YAML has no tuples: a list, of any length for tuple[X, ...], else of len(args)
        any_length = len(args) == 2 and args[1] is Ellipsis
        if not isinstance(value, list) or not (any_length or len(value) == len(args)):
            length = "" if any_length else f"{len(args)} "
            raise RecipeError(f"{key}: expected a list of {length}{args[0].__name__} values, got "
                              f"{_describe(value)}{_origin(key, cli_keys)}", path=path)
        return tuple(_convert(args[0] if any_length else args[i], v, key=f"{key}[{i}]", path=path, cli_keys=cli_keys)
                     for i, v in enumerate(value))
    accepted = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(tp)
    if accepted is None:
        raise TypeError(f"field {key} has a type the options reader does not handle: {tp}")
    # bool is an int in Python, but `lr: true` is a mistake, not 1.0
    if not isinstance(value, accepted) or (isinstance(value, bool) and tp is not bool):
        raise RecipeError(f"{key}: expected {tp.__name__}, got {_describe(value)}{_origin(key, cli_keys)}",
                          path=path)
    return float(value) if tp is float else value


def _describe(value: Any) -> str:
    return "nothing (null)" if value is None else f"{type(value).__name__} {value!r}"


def _origin(key: str, cli_keys: typing.Collection[str]) -> str:
    return " (from --set)" if any(key == k or key.startswith((k + ".", k + "[")) for k in cli_keys) else ""
