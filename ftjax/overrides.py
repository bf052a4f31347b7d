"""Command lines of the frozen config dataclasses, through tyro: `--credit.name flowtracer
--optim.lr 1e-6`, and `--help` listing every field with its type, default and documentation.

Each `--a.b.c value` (or `--a.b.c=value`) replaces field c of the dataclass at a.b. Values read
as they always have here: bools as true/false (yes/no, 1/0), `none` (or null) for an Optional
field, tuples comma separated (`--arms uniform,oracle`) or space separated (`--arms uniform
oracle`), and floats must be finite. tyro rebuilds each dataclass once with all of its flags, so
`__post_init__` checks see the final values whatever the flags' order; a later flag wins over an
earlier one. What tyro would print and exit on (unknown flags, unparsable values, a
`__post_init__` ValueError) is raised as a ValueError naming the flag, before any work.
Field documentation is what tyro reads from the source: a trailing `# comment` on the field's
line (or comment lines right above it), and the class docstring for each group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import math
import os
import re
import sys
import textwrap
import types
import typing
from collections.abc import Sequence

import tyro
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, PrimitiveTypeInfo

_TRUE, _FALSE, _NONE = ("true", "yes", "1"), ("false", "no", "0"), ("none", "null")
_SCALARS = (bool, int, float, str)


def _scalar(kind: type, text: str):
    """`text` as a bool, int, finite float or str; tyro puts the flag in front of the error."""
    if kind is bool:
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError(f"cannot parse {text!r} as bool (true or false)")
        return text.lower() in _TRUE
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"cannot parse {text!r} as {kind.__name__}") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _scalar_spec(kind: type) -> PrimitiveConstructorSpec:
    return PrimitiveConstructorSpec(
        nargs=1,
        metavar="{true,false}" if kind is bool else kind.__name__.upper(),
        instance_from_str=lambda texts: _scalar(kind, texts[0]),
        is_instance=lambda value: isinstance(value, kind),
        str_from_instance=lambda value: [str(value).lower() if kind is bool else str(value)],
    )


def _tuple_spec(item: PrimitiveConstructorSpec) -> PrimitiveConstructorSpec:
    """Any number of values, each of which may hold several separated by commas."""
    return PrimitiveConstructorSpec(
        nargs="*",
        metavar=f"{item.metavar},...",
        instance_from_str=lambda texts: tuple(
            item.instance_from_str([part]) for text in texts for part in text.split(",") if part
        ),
        is_instance=lambda value: isinstance(value, tuple) and all(map(item.is_instance, value)),
        str_from_instance=lambda value: [",".join(item.str_from_instance(v)[0] for v in value)],
    )


def _optional_spec(inner: PrimitiveConstructorSpec) -> PrimitiveConstructorSpec:
    def parse(texts: list[str]):
        if len(texts) == 1 and texts[0].lower() in _NONE:
            return None
        return inner.instance_from_str(texts)

    return PrimitiveConstructorSpec(
        nargs=inner.nargs,
        metavar=f"{inner.metavar}|none",
        instance_from_str=parse,
        is_instance=lambda value: value is None or inner.is_instance(value),
        str_from_instance=lambda value: (
            ["none"] if value is None else inner.str_from_instance(value)
        ),
    )


def _spec(annotation) -> PrimitiveConstructorSpec | None:
    """Our reading of a field type, or None to leave it to tyro (Literal, Enum, nested configs)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _SCALARS:
        return _scalar_spec(annotation)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in _SCALARS:
        return _tuple_spec(_scalar_spec(args[0]))
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = _spec(next(arg for arg in args if arg is not type(None)))
        return None if inner is None else _optional_spec(inner)
    return None


_REGISTRY = ConstructorRegistry()


@_REGISTRY.primitive_rule
def _rule(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    return _spec(info.type)


def _report(printed: str) -> str:
    """tyro's boxed error report as plain lines: no frame, title, rules or `--help` footer."""
    lines = [
        line.strip("│╭╮╰╯").rstrip() for line in re.sub(r"\x1b\[[0-9;]*m", "", printed).splitlines()
    ]
    kept = [
        line
        for line in lines
        if line.strip(" -─") and not line.strip().startswith("For full helptext")
    ]
    return textwrap.dedent("\n".join(kept[1:] if len(kept) > 1 else kept)).strip()


@contextlib.contextmanager
def _unwrapped_terminal():
    """A terminal wide enough that tyro never wraps a message (it wraps to COLUMNS)."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100000"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = before


def _parse_or_raise(cls: type, **kwargs):
    """tyro.cli, with what it would print and exit on raised as a ValueError instead."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with (
            _unwrapped_terminal(),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            cfg = tyro.cli(cls, **kwargs)
    except SystemExit as exit:
        if exit.code not in (0, None):
            report = _report(err.getvalue()) or f"cannot parse {' '.join(kwargs['args'])!r}"
            raise ValueError(report) from None
        sys.stdout.write(out.getvalue())  # what a successful exit printed (shell completion)
        raise
    sys.stdout.write(out.getvalue())  # anything printed on the way (warnings)
    sys.stderr.write(err.getvalue())
    return cfg


def _prog() -> str:
    """How this program was started, for the usage line: `python -m experiments.math_rl`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec else os.path.basename(sys.argv[0])


def _wants_help(argv: Sequence[str]) -> bool:
    return "--help" in argv or "-h" in argv


def apply(cfg, argv: Sequence[str]):
    """`cfg` with every `--dotted.key value` (or `--dotted.key=value`) of `argv` applied.
    `--help` (or `-h`) prints every field with its type, default and documentation, and exits."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"apply needs a config dataclass instance, got {cfg!r}")
    argv = list(argv)
    if not argv:
        return cfg
    kwargs = dict(
        default=cfg,
        args=argv,
        prog=_prog(),
        use_underscores=True,
        # `--resume false` (not `--no-resume`); `--a.b 1` for a field `a: A | None = A()`.
        config=(tyro.conf.FlagConversionOff, tyro.conf.AvoidSubcommands),
        registry=_REGISTRY,
    )
    if _wants_help(argv):
        return tyro.cli(type(cfg), **kwargs)  # prints the help to the terminal and exits 0
    return _parse_or_raise(type(cfg), **kwargs)


def peek(argv: Sequence[str], key: str) -> str | None:
    """The values of the last `--key` in argv, joined by commas, or None: for what must happen
    before the config is built (importing `--plugins`, whose credit variants the config then
    validates). Lenient: `apply` checks the whole command line."""
    if _wants_help(argv):
        return None  # `apply` prints the fields and exits
    args, found = list(argv), None
    for i, arg in enumerate(args):
        name, has_value, text = arg.partition("=")
        if name.startswith("--") and name[2:].replace("-", "_") == key:
            values = itertools.takewhile(lambda word: not word.startswith("-"), args[i + 1 :])
            found = [text] if has_value else list(values)
    return None if found is None else ",".join(found)
