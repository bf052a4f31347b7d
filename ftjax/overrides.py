"""Command-line overrides of frozen config dataclasses: `--credit.name flowtracer --optim.lr 1e-6`.

Each `--a.b.c value` replaces field c of the dataclass at a.b, parsed by the field's type (int,
float, bool, str, their Optional forms, tuples of them). Unknown keys, unparsable values and
non-finite floats (nan, inf) raise ValueError naming them, before anything is compiled; the
dataclasses re-validate themselves.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence

_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def _parse(text: str, annotation, key: str):
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if text.lower() in ("none", "null") and len(options) < len(typing.get_args(annotation)):
            return None
        return _parse(text, options[0], key)
    if origin is tuple:
        inner = typing.get_args(annotation)[0]
        return tuple(_parse(part, inner, key) for part in text.split(",") if part)
    try:
        if annotation is bool:
            if text.lower() not in _TRUE | _FALSE:
                raise ValueError(text)
            return text.lower() in _TRUE
        if annotation in (int, float, str):
            value = annotation(text)
    except ValueError:
        raise ValueError(f"--{key}: cannot parse {text!r} as {annotation.__name__}") from None
    if annotation is float and not math.isfinite(value):
        raise ValueError(f"--{key}: {text!r} is not a finite number")
    if annotation in (int, float, str):
        return value
    raise ValueError(f"--{key}: fields of type {annotation} cannot be set from the command line")


def _replace(cfg, changes: list[tuple[list[str], str, str]]):
    """`cfg` with every (path, text, key) change applied, each dataclass rebuilt once with all of
    its changes, so cross-field checks see the final values whatever the flags' order."""
    if not dataclasses.is_dataclass(cfg):
        raise ValueError(f"unknown config key --{changes[0][2]}")
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name for f in dataclasses.fields(cfg)}
    values, nested = {}, {}
    for path, text, key in changes:
        name = path[0]
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ValueError(f"unknown config key --{key} ({type(cfg).__name__} has: {known})")
        if len(path) == 1:
            if dataclasses.is_dataclass(getattr(cfg, name)):
                raise ValueError(f"--{key} is a group; set one of its fields, e.g. --{key}.<field>")
            values[name] = _parse(text, hints[name], key)
            nested.pop(name, None)
        else:
            nested.setdefault(name, []).append((path[1:], text, key))
    for name, inner in nested.items():
        values[name] = _replace(values.get(name, getattr(cfg, name)), inner)
    return dataclasses.replace(cfg, **values) if values else cfg


def _pairs(argv: Sequence[str]) -> list[tuple[str, str]]:
    """(key, text) of every `--key value` or `--key=value`, in order."""
    args, pairs, i = list(argv), [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"expected --key value, got {arg!r}")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"--{arg[2:]} needs a value")
            key, text = arg[2:], args[i + 1]
            i += 2
        pairs.append((key, text))
    return pairs


def peek(argv: Sequence[str], key: str) -> str | None:
    """The text of the last `--key` in argv, or None: for what must happen before the config is
    built (importing `--plugins`, whose credit variants the config then validates)."""
    if "--help" in argv or "-h" in argv:
        return None  # `apply` prints the fields and exits
    texts = [text for k, text in _pairs(argv) if k == key]
    return texts[-1] if texts else None


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is tuple:
        return f"{_type_name(typing.get_args(annotation)[0])},..."
    return "none" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def usage(cfg, prefix: str = "") -> list[str]:
    """One line per settable field of `cfg`: `--dotted.key TYPE (default VALUE)`."""
    hints = typing.get_type_hints(type(cfg))
    lines = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            lines += usage(value, f"{prefix}{field.name}.")
        else:
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            kind = _type_name(hints[field.name])
            lines.append(f"--{prefix}{field.name} {kind} (default {shown})")
    return lines


def apply(cfg, argv: Sequence[str]):
    """`cfg` with every `--dotted.key value` (or `--dotted.key=value`) of `argv` applied.
    `--help` (or `-h`) prints every settable field with its type and default, and exits."""
    if "--help" in argv or "-h" in argv:
        print(f"{type(cfg).__name__} fields (set with --key value):")
        print("\n".join(f"  {line}" for line in usage(cfg)))
        raise SystemExit(0)
    changes = [(key.split("."), text, key) for key, text in _pairs(argv)]
    return _replace(cfg, changes) if changes else cfg
