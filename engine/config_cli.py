"""The command line of a config-driven launcher: ``--config``, ``--help``, ``--print-config``.

``--help`` lists every field of the run's config class, grouped by section, with its type, default
and docstring, read from the dataclasses (``engine/config.py``, ``engine/eval/config.py``), so a new
field documents itself. ``--print-config`` prints the resolved config (preset + overrides) as YAML,
which ``--config`` reads back.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union

import yaml

from engine.config_io import load_config, sections, to_dict
from engine.errors import UserError
from engine.presets import preset_names

HELP_FLAGS = ("-h", "--help")
PRINT_CONFIG = "--print-config"


def split_config_arg(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``[--config NAME|PATH] [--a.b v ...]`` -> (NAME|PATH, overrides)."""
    rest, path = [], None
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UserError(f"--config: needs a preset name or a YAML path; presets: {', '.join(preset_names())}")
            path = argv[i + 1]
            next(it)
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
    return path, rest


def parse_config_args(config_cls: type, argv: Sequence[str], doc: str = "") -> Any:
    """The validated ``config_cls`` that ``argv`` describes. ``-h``/``--help`` prints the options and
    ``--print-config`` the resolved YAML; both then exit 0."""
    argv = list(argv)
    if any(a in HELP_FLAGS for a in argv):
        _print_and_exit(help_text(config_cls, doc) + "\n")
    printing = PRINT_CONFIG in argv
    path, overrides = split_config_arg([a for a in argv if a != PRINT_CONFIG])
    cfg = load_config(config_cls, path, overrides)
    if printing:
        _print_and_exit(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return cfg


def _print_and_exit(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `--help | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)


def type_name(tp: Any) -> str:
    """Readable type of an annotation: ``int``, ``{a,b}``, ``list[int]``, ``float,float``, ``str|null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return "|".join(names) + ("|null" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{type_name(args[0])}]"
        return ",".join(type_name(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def format_default(value: Any) -> str:
    """A default as it would be typed on the command line (lists as ``a,b``; '' for empty)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (list, tuple, dict)) for v in value):
            return yaml.safe_dump(to_dict(list(value)), default_flow_style=True).strip()
        return ",".join(format_default(v) for v in value) if value else "''"
    if isinstance(value, str):
        return value if value else "''"
    return repr(value)


def help_text(config_cls: type, doc: str = "") -> str:
    """The launcher's docstring, the general options, then every config field by section."""
    width = min(max(shutil.get_terminal_size((100, 24)).columns, 60), 120)
    wrap = textwrap.TextWrapper(width=width, initial_indent=" " * 6, subsequent_indent=" " * 6, break_on_hyphens=False)
    out = [doc.strip(), ""] if doc.strip() else []
    presets = ", ".join(preset_names())
    out += [
        "general options:",
        "  -h, --help            this list, then exit",
        "  --config NAME|PATH    YAML preset: a file, or the name of a shipped preset:",
        *textwrap.wrap(presets, width, initial_indent=" " * 24, subsequent_indent=" " * 24),
        "  --print-config        print the resolved config (preset + overrides) as YAML, then exit",
        "  --SECTION.FIELD VALUE override any field below (--a.b=v also works; lists as a,b,c; true/false; null)",
    ]
    for section, section_doc, fields in sections(config_cls):
        out += ["", f"{section}:" + (f"  {section_doc}" if section_doc else "")]
        for f in fields:
            out.append(f"  --{f.name} {type_name(f.type)}  (default: {format_default(f.default)})")
            if f.doc:
                out += wrap.wrap(f.doc)
    return "\n".join(out)
