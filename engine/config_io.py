"""Config machinery for the typed run configs (``engine/config.py``, ``engine/eval/config.py``):
YAML presets, dotted CLI overrides, type conversion, validation, saving and self-description.

``load_config(RunConfig, "tiny_cpu", ["--data.batch_size", "64"])`` reads the YAML (the name of a
preset in ``engine/presets`` or a path), applies overrides (``--a.b value`` or ``--a.b=value``;
values parsed as YAML scalars, lists also as ``a,b,c``), converts every field to its annotated type
and runs each section's ``validate()``. Every error is a :class:`~engine.errors.UserError` naming
the dotted field, e.g. ``--optim.lr: expected float, got 'fast'``.

YAML is read with YAML 1.2's booleans: only true/false are booleans, so ``--x off`` gives a string
field or a ``Literal[..., "off"]`` the word "off" (YAML 1.1 would make it False); a bool field still
takes yes/no/on/off.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from engine.atomic import atomic_write_text
from engine.errors import UserError
from engine.presets import resolve_preset


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (true/false only); yes/no/on/off stay strings."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# what a bool field takes as text (case-insensitive)
_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")


def read_yaml(text: str) -> Any:
    """``text`` as YAML with YAML 1.2 booleans (see the module docstring)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader: no arbitrary objects


def check_field(ok: bool, name: str, msg: str) -> None:
    """Raise UserError('--<name>: <msg>') unless ``ok`` (for the sections' ``validate()``)."""
    if not ok:
        raise UserError(f"--{name}: {msg}")


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML/CLI value to annotation ``tp``; raise UserError naming ``name``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, name)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"--{name}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"--{name}: expected one of {list(args)}, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"--{name}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=name + ".")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [read_yaml(v) for v in value.split(",")] if value else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_convert(v, args[0], name) for v in value)
            if len(value) != len(args):
                raise UserError(f"--{name}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_convert(v, a, name) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return [_convert(v, inner, name) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"--{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.lower() in _TRUE_WORDS
        raise UserError(f"--{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UserError(f"--{name}: expected int, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise UserError(f"--{name}: expected int, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"--{name}: expected float, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"--{name}: expected float, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"--{name}: expected a string, got {value!r}")
        if isinstance(value, bool):  # YAML read `false` as a boolean; the field wants the word back
            return "true" if value else "false"
        return "" if value is None else str(value)
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict, converting and validating every field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"--{prefix}{unknown[0]}: unknown option; valid: {', '.join(sorted(names))}")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def parse_overrides(argv: list[str]) -> dict:
    """``["--a.b", "1", "--c=x", "--flag"]`` -> ``{"a": {"b": 1}, "c": "x", "flag": True}``."""
    out: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument {arg!r}; options look like --section.field value")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            raw = argv[i + 1]
            i += 1
        else:
            raw = "true"
        i += 1
        try:
            value = read_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and value != raw:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--{key}: conflicts with an earlier --{p}")
        node[parts[-1]] = value
    return out


def _merge(base: dict, over: dict, prefix: str = "") -> dict:
    out = dict(base)
    for k, v in over.items():
        old = out.get(k)
        if isinstance(v, dict) and old is not None and not isinstance(old, dict):
            # a preset's `train: 5` must not vanish under a `--train.x` override
            raise UserError(f"--{prefix}{k}: expected a mapping of options, got {old!r} (in --config)")
        out[k] = _merge(old, v, f"{prefix}{k}.") if isinstance(v, dict) and isinstance(old, dict) else v
    return out


def load_config(cls: type, path: str | None = None, overrides: list[str] | None = None) -> Any:
    """YAML preset (optional; a shipped preset's name or a path) + dotted CLI overrides -> validated
    ``cls`` instance."""
    data: dict = {}
    if path:
        p = resolve_preset(path)
        try:
            data = read_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"--config: '{path}' is not valid YAML ({e.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise UserError(f"--config: '{path}' must hold a mapping of sections")
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically) so a run can be reproduced from it."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


@dataclasses.dataclass
class FieldDoc:
    """One config field as ``--help`` shows it."""

    name: str
    """Dotted name, e.g. 'data.batch_size'."""
    type: Any
    """The annotation (resolved)."""
    default: Any
    """The default value."""
    doc: str
    """The docstring under the field ('' when it has none)."""


def _attribute_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` read from the string literal under each annotated field of ``cls``."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    try:
        node = ast.parse(inspect.getsource(cls)).body[0]
    except (OSError, TypeError):
        return docs
    body = node.body if isinstance(node, ast.ClassDef) else []
    for a, b in zip(body, body[1:]):
        if (
            isinstance(a, ast.AnnAssign)
            and isinstance(a.target, ast.Name)
            and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant)
        ):
            docs[a.target.id] = " ".join(str(b.value.value).split())
    return docs


def sections(cls: type, prefix: str = "", doc: str = "") -> list[tuple[str, str, list[FieldDoc]]]:
    """``(dotted section, its docstring, its leaf fields)`` of config class ``cls``, depth first."""
    docs = _attribute_docs(cls)
    hints = typing.get_type_hints(cls)
    leaves: list[FieldDoc] = []
    nested: list[tuple[str, str, list[FieldDoc]]] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            nested += sections(tp, prefix + f.name + ".", docs.get(f.name, ""))
        else:
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                raise TypeError(f"config field {prefix}{f.name} has no default")
            leaves.append(FieldDoc(prefix + f.name, tp, default, docs.get(f.name, "")))
    return ([(prefix.rstrip("."), doc, leaves)] if leaves else []) + nested


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted name, default, docstring)`` for every leaf field, read from the source."""
    return [(prefix + f.name, repr(f.default), f.doc) for _, _, fields in sections(cls) for f in fields]
