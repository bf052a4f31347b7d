"""Command-line overrides of frozen config dataclasses: `--credit.name flowtracer --optim.lr 1e-6`.

Each `--a.b.c value` replaces field c of the dataclass at a.b, parsed by the field's type (int,
float, bool, str, their Optional forms, tuples of them). Unknown keys and unparsable values raise
ValueError naming them, before anything is compiled; the dataclasses re-validate themselves.
"""

from __future__ import annotations

import dataclasses
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
            return annotation(text)
    except ValueError:
        raise ValueError(f"--{key}: cannot parse {text!r} as {annotation.__name__}") from None
    raise ValueError(f"--{key}: fields of type {annotation} cannot be set from the command line")


def _replace(cfg, path: list[str], text: str, key: str):
    if not dataclasses.is_dataclass(cfg):
        raise ValueError(f"unknown config key --{key}")
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name for f in dataclasses.fields(cfg)}
    name = path[0]
    if name not in fields:
        raise ValueError(
            f"unknown config key --{key} ({type(cfg).__name__} has: {', '.join(sorted(fields))})"
        )
    if len(path) == 1:
        value = getattr(cfg, name)
        if dataclasses.is_dataclass(value):
            raise ValueError(f"--{key} is a group; set one of its fields, e.g. --{key}.<field>")
        return dataclasses.replace(cfg, **{name: _parse(text, hints[name], key)})
    return dataclasses.replace(cfg, **{name: _replace(getattr(cfg, name), path[1:], text, key)})


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
    texts = [text for k, text in _pairs(argv) if k == key]
    return texts[-1] if texts else None


def apply(cfg, argv: Sequence[str]):
    """`cfg` with every `--dotted.key value` (or `--dotted.key=value`) of `argv` applied."""
    for key, text in _pairs(argv):
        cfg = _replace(cfg, key.split("."), text, key)
    return cfg
