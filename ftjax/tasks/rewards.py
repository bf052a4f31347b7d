"""Reward functions as plain Python, TRL-style: `--reward my_rewards.py:fn`.

A reward function scores a batch of completions and is called with keywords:

    def fn(prompts: list[str], completions: list[str], **row_fields) -> list[float]

`prompts`: the questions as the data file has them (before any template or few-shot examples);
`completions`: the decoded responses; `row_fields`: `completion_ids` (the response token ids),
`ground_truth` (each row's final answer as the data preset reads it; a column of that name wins)
and every other top-level column of the data file's rows, each a list over the batch (None where
a row lacks the column). Take `**kwargs` for the ones you do not read.

Answer spans (FlowTracer's sink): a function may return `(scores, spans)` instead of `scores`,
each span a `(start, end)` character range in its completion, or None. A row's span is the first
one given by the functions in `--reward` order; when none gives one, the default rule: the span
the built-in verifier (`--prompt.verifier`) would report (the last \\boxed{} content, GSM8K's
final number), else the completion's last non-empty line, else none (an empty completion).

Several functions: `--reward a.py:f,b.py:g --reward_weights 1.0,0.5`: the reward is the weighted
sum (weights default to 1). The name `verifier` in the list is the built-in verifier as a reward
function (1 right, 0 wrong, its span given). A function sees one rollout batch at a time (with
several hosts, the rows this process holds).

Failures are loud. An exception inside a function stops the run with a `RewardError` naming the
function and the first row it fails on alone (its data-file source, prompt and completion
excerpts), the original exception chained; so does a result of the wrong length or type (None, a
string, a span outside its completion). A NaN or infinite score is a score: the train step then
skips the whole step and counts it (`nonfinite/rewards`), and the loop stops after
`step.optim.max_nonfinite_steps` such steps in a row, as for any non-finite reward.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import numbers
import pathlib
from collections.abc import Callable, Mapping, Sequence

from ftjax.tasks import verifiers

BUILTIN = "verifier"  # the spec naming the built-in verifier
# Names the call itself passes; a data column of the same name is not passed.
RESERVED = ("prompts", "completions", "completion_ids", "prompt", "completion")
EXCERPT_CHARS = 120

Span = tuple[int, int]


class RewardError(ValueError):
    """A reward function failed, or returned something that is not a reward."""


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """functions: specs like "my_rewards.py:fn" (a file and a function in it) or "verifier";
    weights: one per function, or () for all 1."""

    functions: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()

    def __post_init__(self):
        for spec in self.functions:
            parse_spec(spec)
        if self.weights and len(self.weights) != len(self.functions):
            raise ValueError(
                f"{len(self.weights)} reward weights {self.weights} for {len(self.functions)} "
                f"reward functions {self.functions}"
            )
        bad = [w for w in self.weights if not math.isfinite(w)]
        if bad:
            raise ValueError(f"reward weights must be finite numbers, got {bad}")


def parse_spec(spec: str) -> tuple[pathlib.Path, str] | None:
    """(file, function name) of a "my_rewards.py:fn" spec; None for the built-in "verifier"."""
    if spec == BUILTIN:
        return None
    path, colon, name = str(spec).rpartition(":")
    if not colon or not path.endswith(".py") or not name.isidentifier():
        raise ValueError(f"reward {spec!r} is not 'path/to/file.py:function_name' (or {BUILTIN!r})")
    return pathlib.Path(path), name


_MODULES: dict[pathlib.Path, object] = {}


def _module(path: pathlib.Path):
    """The imported file (once per process, like `credit.load_plugins`)."""
    resolved = path.resolve()
    if resolved not in _MODULES:
        if not path.is_file():
            raise ValueError(f"reward file {str(path)!r} does not exist")
        name = f"ftjax_reward_{resolved.as_posix().replace('/', '_').replace('.', '_')}"
        spec = importlib.util.spec_from_file_location(name, resolved)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[resolved] = module
    return _MODULES[resolved]


def verifier_reward(name: str) -> Callable:
    """The built-in verifier `name` as a reward function giving its spans."""
    verify = verifiers.VERIFIERS[name]

    def verifier(prompts, completions, ground_truth, **_):
        verdicts = [verify(c, g) for c, g in zip(completions, ground_truth, strict=True)]
        return [v.reward for v in verdicts], [v.span for v in verdicts]

    verifier.__name__ = name
    return verifier


def load(spec: str, verifier: str) -> Callable:
    """The function a spec names (`verifier`: the built-in verifier called `verifier`)."""
    parsed = parse_spec(spec)
    if parsed is None:
        return verifier_reward(verifier)
    path, name = parsed
    fn = getattr(_module(path), name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {path} has no function {name!r}")
    return fn


def final_line_span(text: str) -> Span | None:
    """The last line with something on it, surrounding whitespace left out."""
    end = len(text.rstrip())
    if end == 0:
        return None
    start = text.rfind("\n", 0, end) + 1
    while text[start].isspace():
        start += 1
    return start, end


def default_span(completion: str, verifier: str) -> Span | None:
    """The span when no reward function gives one (see the module docstring)."""
    span = verifiers.SPANS[verifier](completion)
    return span if span is not None else final_line_span(completion)


@dataclasses.dataclass(frozen=True)
class RewardBatch:
    """What the functions see, row by row, and where each row comes from (for messages)."""

    prompts: list[str]
    completions: list[str]
    completion_ids: list[list[int]]
    fields: dict[str, list]  # ground_truth and the data file's other columns
    sources: list[str]  # "path:line" of each row

    def __post_init__(self):
        n = len(self.completions)
        lengths = [len(self.prompts), len(self.completion_ids), len(self.sources)]
        lengths += [len(v) for v in self.fields.values()]
        if any(length != n for length in lengths):
            raise ValueError(f"RewardBatch fields have lengths {lengths}, completions {n}")

    def row(self, i: int) -> RewardBatch:
        return RewardBatch(
            [self.prompts[i]],
            [self.completions[i]],
            [self.completion_ids[i]],
            {k: [v[i]] for k, v in self.fields.items()},
            [self.sources[i]],
        )


def row_fields(rows: Sequence[Mapping | None], ground_truth: Sequence[str]) -> dict[str, list]:
    """Each top-level column of the rows (None where a row lacks it), less the names the call
    passes itself, and `ground_truth` unless a column has that name."""
    names = []
    for row in rows:
        names += [k for k in (row or {}) if k not in names and k not in RESERVED]
    fields = {k: [None if row is None else row.get(k) for row in rows] for k in names}
    fields.setdefault("ground_truth", list(ground_truth))
    return fields


@dataclasses.dataclass(frozen=True)
class Scored:
    rewards: list[float]  # the weighted sum over the functions
    spans: list[Span | None]  # the answer span of each completion
    parts: dict[str, list[float]]  # spec -> that function's scores


def _excerpt(text: str, chars: int = EXCERPT_CHARS) -> str:
    text = str(text)
    if len(text) <= chars:
        return repr(text)
    return repr(text[: chars // 2]) + " ... " + repr(text[-chars // 2 :])


def _where(spec: str, batch: RewardBatch, i: int) -> str:
    return (
        f"reward {spec} on row {i} of {len(batch.completions)} ({batch.sources[i]}): prompt "
        f"{_excerpt(batch.prompts[i])}, completion {_excerpt(batch.completions[i])}"
    )


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, str)


def _checked(spec: str, result, batch: RewardBatch) -> tuple[list[float], list | None]:
    """(scores, spans or None) of a function's result, or a RewardError saying what is wrong."""
    n, spans = len(batch.completions), None
    if isinstance(result, tuple) and len(result) == 2 and not _number(result[0]):
        result, spans = result
    if isinstance(result, str | bytes | Mapping) or not hasattr(result, "__len__"):
        raise RewardError(
            f"reward {spec} returned {type(result).__name__}; expected a list of {n} numbers "
            "(or a tuple (scores, spans))"
        )
    if len(result) != n:
        raise RewardError(f"reward {spec} returned {len(result)} scores for {n} completions")
    scores = []
    for i, value in enumerate(result):
        if not _number(value):
            raise RewardError(
                f"{_where(spec, batch, i)}: score {value!r} is not a number (return NaN to "
                "have the step skipped)"
            )
        scores.append(float(value))
    if spans is not None:
        if isinstance(spans, str | bytes) or len(spans) != n:
            raise RewardError(f"reward {spec} returned spans {spans!r} for {n} completions")
        spans = [_span(spec, span, batch, i) for i, span in enumerate(spans)]
    return scores, spans


def _span(spec: str, span, batch: RewardBatch, i: int) -> Span | None:
    if span is None:
        return None
    size = len(batch.completions[i])
    ok = isinstance(span, Sequence) and len(span) == 2
    ok = ok and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in span)
    if not ok or not 0 <= span[0] <= span[1] <= size:
        raise RewardError(
            f"{_where(spec, batch, i)}: span {span!r} is not None or (start, end) with "
            f"0 <= start <= end <= {size} (the completion's length)"
        )
    return int(span[0]), int(span[1])


def _call(spec: str, fn: Callable, batch: RewardBatch):
    return fn(
        prompts=batch.prompts,
        completions=batch.completions,
        completion_ids=batch.completion_ids,
        **batch.fields,
    )


def call(spec: str, fn: Callable, batch: RewardBatch) -> tuple[list[float], list | None]:
    """One function on the batch, checked. When it raises, it is called row by row to name the
    first row it fails on alone (the batch's error when every row passes alone)."""
    try:
        result = _call(spec, fn, batch)
    except Exception as error:
        for i in range(len(batch.completions)):
            try:
                _call(spec, fn, batch.row(i))
            except Exception as row_error:
                raise RewardError(
                    f"{_where(spec, batch, i)}: raised {type(row_error).__name__}: {row_error}"
                ) from row_error
        raise RewardError(
            f"reward {spec} raised {type(error).__name__}: {error} on a batch of "
            f"{len(batch.completions)} (every row alone passes; first row: "
            f"{_where(spec, batch, 0)})"
        ) from error
    return _checked(spec, result, batch)


class Rewards:
    """The weighted sum of a `RewardConfig`'s functions, with answer spans (module docstring)."""

    def __init__(self, cfg: RewardConfig, verifier: str):
        if not cfg.functions:
            raise ValueError("Rewards needs at least one reward function")
        if verifier not in verifiers.VERIFIERS:
            raise ValueError(f"unknown verifier {verifier!r}; known: {sorted(verifiers.VERIFIERS)}")
        self.cfg, self.verifier = cfg, verifier
        self.functions = [load(spec, verifier) for spec in cfg.functions]
        self.weights = list(cfg.weights) or [1.0] * len(cfg.functions)

    def fingerprint(self) -> list[tuple[str, str]]:
        """(spec, sha256 of its file or the verifier's name): a reward file edited between a run
        and its resume is another task."""
        out = []
        for spec in self.cfg.functions:
            parsed = parse_spec(spec)
            if parsed is None:
                out.append((spec, self.verifier))
            else:
                out.append((spec, hashlib.sha256(parsed[0].read_bytes()).hexdigest()[:16]))
        return out

    def __call__(self, batch: RewardBatch) -> Scored:
        n = len(batch.completions)
        totals, spans, parts = [0.0] * n, [None] * n, {}
        for spec, fn, weight in zip(self.cfg.functions, self.functions, self.weights, strict=True):
            scores, given = call(spec, fn, batch)
            parts[spec] = scores
            totals = [t + weight * s for t, s in zip(totals, scores, strict=True)]
            if given is not None:
                spans = [a if a is not None else b for a, b in zip(spans, given, strict=True)]
        spans = [
            span if span is not None else default_span(text, self.verifier)
            for span, text in zip(spans, batch.completions, strict=True)
        ]
        return Scored(totals, spans, parts)
