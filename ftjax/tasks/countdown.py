"""Countdown (as in TinyZero): reach a target from N numbers, each used exactly once, with + - * /.

Arithmetic is on positive integers: every intermediate result must be a positive integer, so
subtraction needs a > b and division must be exact. The response is a list of steps, each
combining two numbers currently available (the prompt's numbers, then results) into one, until a
single number, the target, remains:

    prompt   <bos>3,5,7:22
    response 5*3=15;15+7=22;<eos>

Every generated problem is solvable: its target is built by combining its numbers.
Token layout: a response's answer span has one entry per response token (True on the
`a<op>b=c` of the last step, not its `;`); there are no ground-truth token labels.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterator

import numpy as np

from ftjax.tasks.vocab import BOS, EOS, PAD, SPECIALS, VOCAB

OPS = ("+", "-", "*", "/")
Step = tuple[int, str, int, int]  # (a, op, b, result)

_NUMBER = r"(?:0|[1-9][0-9]*)"
_POSITIVE = r"[1-9][0-9]*"
_STEP = re.compile(rf"({_NUMBER})([-+*/])({_NUMBER})=({_NUMBER});")
_STEPS = re.compile(rf"(?:{_NUMBER}[-+*/]{_NUMBER}={_NUMBER};)+")
_PROMPT = re.compile(rf"({_POSITIVE}(?:,{_POSITIVE})+):({_POSITIVE})")
# A target draw succeeds with probability >= 4**-(num_numbers - 1) (see `problem`), so running out
# of tries means a bug, not bad luck.
_MAX_TRIES = 10_000


@dataclasses.dataclass(frozen=True)
class CountdownConfig:
    num_numbers: int = 3  # 2..5
    max_number: int = 9  # numbers are drawn uniformly from 1..max_number
    max_target: int = 99  # targets are in 1..max_target
    seed: int = 0

    def __post_init__(self):
        if not 2 <= self.num_numbers <= 5:
            raise ValueError(
                f"CountdownConfig.num_numbers must be in [2, 5], got {self.num_numbers}"
            )
        if self.max_number < 1:
            raise ValueError(f"CountdownConfig.max_number must be >= 1, got {self.max_number}")
        # Any numbers in 1..max_number combine to some value in 1..max_number (|a - b| or a / a),
        # so this bound makes every draw of numbers have a target.
        if self.max_target < self.max_number:
            raise ValueError(
                f"CountdownConfig.max_target must be >= max_number ({self.max_number}), "
                f"got {self.max_target}"
            )
        if self.seed < 0:
            raise ValueError(f"CountdownConfig.seed must be >= 0, got {self.seed}")


@dataclasses.dataclass(frozen=True)
class Problem:
    numbers: tuple[int, ...]
    target: int


def apply_op(a: int, op: str, b: int) -> int | None:
    """a <op> b when it is a positive integer, else None."""
    if op == "+":
        return a + b
    if op == "*":
        return a * b
    if op == "-":
        return a - b if a > b else None
    return a // b if a % b == 0 else None


def _random_target(numbers: tuple[int, ...], rng: np.random.Generator) -> int | None:
    """Fold the numbers in a random order with random ops (larger operand first), None if an
    intermediate is not a positive integer."""
    order = rng.permutation(len(numbers))
    value = numbers[order[0]]
    for k in order[1:]:
        op = OPS[int(rng.integers(len(OPS)))]
        value = apply_op(max(value, numbers[k]), op, min(value, numbers[k]))
        if value is None:
            return None
    return value


def _solutions(values: tuple[int, ...], target: int) -> Iterator[list[Step]]:
    """Every step list reaching `target` from `values`, in a fixed order. Only the larger operand
    goes first: + and * commute; smaller - larger and smaller / larger are never positive
    integers."""
    if len(values) == 1:
        if values[0] == target:
            yield []
        return
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            a, b = max(values[i], values[j]), min(values[i], values[j])
            rest = values[:i] + values[i + 1 : j] + values[j + 1 :]
            for op in OPS:
                c = apply_op(a, op, b)
                if c is not None:
                    for tail in _solutions((*rest, c), target):
                        yield [(a, op, b, c), *tail]


def _check_ids(ids, what: str) -> list[int]:
    ids = [int(t) for t in ids]
    bad = [t for t in ids if not 0 <= t < VOCAB.size]
    if bad:
        raise ValueError(f"{what} token id {bad[0]} is outside the vocabulary (size {VOCAB.size})")
    return ids


def parse_prompt(prompt) -> Problem:
    """The problem written in a prompt's tokens (<bos> and padding are ignored)."""
    text = VOCAB.decode(_check_ids(prompt, "prompt"))
    match = _PROMPT.fullmatch(text)
    if match is None:
        raise ValueError(f"not a countdown prompt: {text!r}")
    return Problem(tuple(int(n) for n in match.group(1).split(",")), int(match.group(2)))


def _verify(problem: Problem, steps: list[re.Match]) -> bool:
    available = collections.Counter(problem.numbers)
    for step in steps:
        a, op, b, c = step.groups()
        try:
            a, b, c = int(a), int(b), int(c)
        except ValueError:  # a literal past Python's int-string limit is never a number in play
            return False
        available[a] -= 1
        available[b] -= 1
        if available[a] < 0 or available[b] < 0 or b == 0 or apply_op(a, op, b) != c:
            return False
        available[c] += 1
    remaining = +available  # drops the zero counts
    return sorted(remaining.elements()) == [problem.target]


class CountdownTask:
    """Prompts, verifier and an exhaustive solver (see the module docstring)."""

    name = "countdown"
    vocab = VOCAB
    stop_ids, pad_id = (EOS,), PAD

    def __init__(self, cfg: CountdownConfig = CountdownConfig()):
        self.cfg = cfg

    def problem(self, index: int) -> Problem:
        """Problem `index` of the stream, deterministic in (cfg.seed, index)."""
        if index < 0:
            raise ValueError(f"problem index must be >= 0, got {index}")
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, index])
        numbers = tuple(int(n) for n in rng.integers(1, cfg.max_number + 1, cfg.num_numbers))
        for _ in range(_MAX_TRIES):
            target = _random_target(numbers, rng)
            if target is not None and target <= cfg.max_target:
                return Problem(numbers, target)
        raise RuntimeError(
            f"no target in 1..{cfg.max_target} for {numbers} after {_MAX_TRIES} tries"
        )

    def prompt_text(self, problem: Problem) -> str:
        return ",".join(str(n) for n in problem.numbers) + f":{problem.target}"

    def prompts(self, start: int, count: int) -> list[list[int]]:
        return [
            [BOS, *VOCAB.encode(self.prompt_text(self.problem(i)))]
            for i in range(start, start + count)
        ]

    def solve(self, problem: Problem, rng: np.random.Generator | None = None) -> list[Step] | None:
        """Steps reaching the target, or None when there are none. With `rng`, a uniform pick among
        all solutions (diverse demonstrations); without, the first in a fixed enumeration order."""
        found = _solutions(tuple(problem.numbers), problem.target)
        if rng is None:
            return next(found, None)
        everything = list(found)
        return everything[int(rng.integers(len(everything)))] if everything else None

    def response_text(self, steps: list[Step]) -> str:
        return "".join(f"{a}{op}{b}={c};" for a, op, b, c in steps)

    def demonstrations(self, start: int, count: int) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, solver response ids + <eos>) for problems start, ..., start + count - 1."""
        pairs = []
        for i in range(start, start + count):
            problem = self.problem(i)
            steps = self.solve(problem, np.random.default_rng([self.cfg.seed, i, 1]))
            if steps is None:
                raise RuntimeError(f"generated problem {i} {problem} has no solution")
            prompt = [BOS, *VOCAB.encode(self.prompt_text(problem))]
            pairs.append((prompt, [*VOCAB.encode(self.response_text(steps)), EOS]))
        return pairs

    def score(self, prompt, response) -> tuple[float, list[bool]]:
        """Reward 1 when the response is steps reaching the target with every number used once,
        then <eos>. The span is the last step's `a<op>b=c` whenever the text before <eos> parses
        as steps, right or wrong. Malformed responses score 0; only bad ids raise."""
        problem = parse_prompt(prompt)
        response = _check_ids(response, "response")
        end = response.index(EOS) if EOS in response else len(response)
        # One character per token, so text positions are token positions; a special token before
        # <eos> becomes a character no step contains, which makes the text malformed.
        text = "".join(
            " " if t < len(SPECIALS) else VOCAB.characters[t - len(SPECIALS)]
            for t in response[:end]
        )
        span = [False] * len(response)
        if _STEPS.fullmatch(text) is None:
            return 0.0, span
        steps = list(_STEP.finditer(text))
        for i in range(steps[-1].start(), steps[-1].end() - 1):
            span[i] = True
        return float(end < len(response) and _verify(problem, steps)), span

    def labels(self, prompt, response) -> None:
        """Countdown has many valid solutions and no essential tokens known a priori: None."""
        return None
