"""Variable-chain arithmetic with distractors: a task whose essential tokens are known exactly.

The prompt defines variables in shuffled order (chain links and distractors interleave at random;
like a program, each variable is defined after the one it reads): a chain's root is a number, the
others are `variable op constant` mod `modulus`. Some variables are on the queried variable's
dependency chain, the others are distractors. The prompt is a worksheet with a blank `?` per
value; the response fills it in, one statement `x=expression=value;` per variable in prompt order,
then writes the answer after `>` and ends with <eos>:

    prompt   <bos>a=4=?;b=7=?;c=a+3=?;d=b*2=?;e=c-1=?;?e
    response a=4=4;b=7=7;c=a+3=7;d=b*2=4;e=c-1=6;>6<eos>

Variables are named a, b, c, ... in prompt order, so statement k of the response is about line k
of the worksheet, and each value is one lookup (the operand's value, in an earlier statement) and
one operation away: a tiny policy learns the format quickly and then has to learn the lookups and
the arithmetic (`max_constant` and `ops` set how hard that is).

Ground truth: a response token is *essential* when it belongs to a well-formed statement of a
variable on the queried variable's dependency chain (here a, c, e). The answer span (the value
after `>`) is FlowTracer's sink; it is reported separately and not counted as essential.
"""

from __future__ import annotations

import dataclasses
import re
import string

import numpy as np

from ftjax.tasks.vocab import BOS, EOS, PAD, VOCAB

OPS = ("+", "-", "*")
DEFINITION = re.compile(r"([a-z])=(?:(\d+)|([a-z])([+\-*])(\d+))")
_STATEMENT = re.compile(r"([a-z])=(?:\d+|[a-z][+\-*]\d+)=\d+;")


@dataclasses.dataclass(frozen=True)
class ChainConfig:
    chain_length: int = 3  # variables on the queried variable's dependency chain
    distractors: int = 2  # variables off the chain
    modulus: int = 10  # values are in [0, modulus)
    ops: tuple[str, ...] = OPS  # operators of dependent definitions
    max_constant: int | None = None  # dependent definitions' constants: 1..this (None: modulus - 1)
    seed: int = 0  # problem i depends on (seed, i) alone

    def __post_init__(self):
        if not 1 <= self.chain_length <= 26:
            raise ValueError(
                f"ChainConfig.chain_length must be in [1, 26], got {self.chain_length}"
            )
        if not 0 <= self.distractors <= 26 - self.chain_length:
            raise ValueError(
                f"ChainConfig.distractors must be in [0, {26 - self.chain_length}], got "
                f"{self.distractors}"
            )
        if not self.ops or any(op not in OPS for op in self.ops):
            raise ValueError(f"ChainConfig.ops must be a non-empty subset of {OPS}, got {self.ops}")
        if not 2 <= self.modulus <= 1000:
            raise ValueError(f"ChainConfig.modulus must be in [2, 1000], got {self.modulus}")
        if self.max_constant is not None and not 1 <= self.max_constant < self.modulus:
            raise ValueError(
                f"ChainConfig.max_constant must be None or in [1, modulus), got {self.max_constant}"
            )


@dataclasses.dataclass(frozen=True)
class Definition:
    """`name = constant` (a chain's root) or `name = parent op constant`."""

    name: str
    constant: int
    parent: str | None = None
    op: str = "+"

    def expression(self) -> str:
        return (
            str(self.constant) if self.parent is None else f"{self.parent}{self.op}{self.constant}"
        )

    def text(self) -> str:
        return f"{self.name}={self.expression()}"


@dataclasses.dataclass(frozen=True)
class Problem:
    definitions: tuple[Definition, ...]  # in prompt order
    query: str


def _apply(value: int, op: str, constant: int, modulus: int) -> int:
    if op == "+":
        return (value + constant) % modulus
    if op == "-":
        return (value - constant) % modulus
    return (value * constant) % modulus


def evaluation_order(problem: Problem) -> list[Definition]:
    """Sweep the definitions in prompt order, emitting each once its parent is known; repeat.
    (Prompts this task generates are already in a valid order, so this is prompt order.)"""
    known, order, pending = set(), [], list(problem.definitions)
    while pending:
        ready = []
        for definition in pending:
            if definition.parent is None or definition.parent in known:
                ready.append(definition)
                known.add(definition.name)
        if not ready:
            raise ValueError(f"definitions of {problem.query!r} have a cycle or a missing variable")
        order.extend(ready)
        pending = [d for d in pending if d.name not in known]
    return order


def values(problem: Problem, modulus: int, as_plus: frozenset[str] = frozenset()) -> dict[str, int]:
    """Every variable's value; the links named in `as_plus` are worked out with `+` whatever
    their operator (a flawed teacher's slip, `branches.BranchesConfig.slip`)."""
    result = {}
    for d in evaluation_order(problem):
        if d.parent is None:
            result[d.name] = d.constant % modulus
        else:
            op = "+" if d.name in as_plus else d.op
            result[d.name] = _apply(result[d.parent], op, d.constant, modulus)
    return result


def dependency_chain(problem: Problem) -> set[str]:
    """The queried variable and every variable it depends on."""
    parent = {d.name: d.parent for d in problem.definitions}
    chain, name = set(), problem.query
    while name is not None:
        chain.add(name)
        name = parent[name]
    return chain


def shuffled_topological(definitions: list[Definition], rng) -> tuple[Definition, ...]:
    """A uniformly random choice among the ready definitions at every position: chain links and
    distractors interleave at random, and every variable is defined after its parent."""
    known, pending, order = set(), list(definitions), []
    while pending:
        ready = [d for d in pending if d.parent is None or d.parent in known]
        pick = ready[int(rng.integers(len(ready)))]
        order.append(pick)
        known.add(pick.name)
        pending.remove(pick)
    return tuple(order)


def response_chars(response: list[int]) -> str:
    """The response up to <eos>, one character per token (other specials become NUL), so that
    character positions are token positions."""
    end = response.index(EOS) if EOS in response else len(response)
    return "".join(
        "\0" if s.startswith("<") and len(s) > 1 else s for s in VOCAB.token_strings(response[:end])
    )


def parse_worksheet(prompt: list[int], task: str) -> Problem:
    """The Problem of a worksheet prompt `<bos>a=4=?;c=a+3=?;...?q`; ValueError naming `task`
    when the prompt is not one."""
    text = VOCAB.decode([t for t in prompt if t != BOS])
    body, _, query = text.rpartition(";?")
    definitions = []
    for part in body.replace("=?", "").split(";"):
        match = DEFINITION.fullmatch(part)
        if match is None:
            raise ValueError(f"not a {task}-task prompt: definition {part!r} in {text!r}")
        name, root, parent, op, constant = match.groups()
        if parent is None:
            definitions.append(Definition(name, int(root)))
        else:
            definitions.append(Definition(name, int(constant), parent, op))
    if len(query) != 1 or query not in {d.name for d in definitions}:
        raise ValueError(f"not a {task}-task prompt: query {query!r} in {text!r}")
    return Problem(tuple(definitions), query)


class ChainTask:
    """Prompts, verifier, solver traces and ground-truth token labels (see the module docstring)."""

    name = "chain"
    vocab = VOCAB
    stop_ids, pad_id = (EOS,), PAD

    def __init__(self, cfg: ChainConfig = ChainConfig()):
        self.cfg = cfg

    def problem(self, index: int) -> Problem:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, index])
        count = cfg.chain_length + cfg.distractors
        names = list(string.ascii_lowercase[:count])  # generation order; renamed below
        definitions = []
        for j, name in enumerate(names):
            on_chain = j < cfg.chain_length
            if on_chain:  # a chain: each link depends on the previous one
                parent = names[j - 1] if j > 0 else None
            else:  # a distractor: a constant or a dependent of any earlier variable
                parent = names[int(rng.integers(j))] if rng.random() < 0.7 else None
            op = cfg.ops[int(rng.integers(len(cfg.ops)))]
            if parent is None:  # a root: a number
                definitions.append(Definition(name, int(rng.integers(cfg.modulus))))
            else:
                top = cfg.max_constant or cfg.modulus - 1
                definitions.append(Definition(name, int(rng.integers(1, top + 1)), parent, op))
        ordered = shuffled_topological(definitions, rng)
        # Names follow prompt order (a, b, c, ...): the response's statement k is about the
        # prompt's definition k, so the task is the values, not finding the next name.
        rename = {d.name: string.ascii_lowercase[k] for k, d in enumerate(ordered)}
        renamed = tuple(
            dataclasses.replace(
                d, name=rename[d.name], parent=None if d.parent is None else rename[d.parent]
            )
            for d in ordered
        )
        return Problem(renamed, query=rename[names[cfg.chain_length - 1]])

    def prompt_text(self, problem: Problem) -> str:
        return "".join(f"{d.text()}=?;" for d in problem.definitions) + f"?{problem.query}"

    def response_text(self, problem: Problem) -> str:
        value = values(problem, self.cfg.modulus)
        statements = "".join(f"{d.text()}={value[d.name]};" for d in evaluation_order(problem))
        return f"{statements}>{value[problem.query]}"

    def prompts(self, start: int, count: int) -> list[list[int]]:
        return [
            [BOS, *VOCAB.encode(self.prompt_text(self.problem(i)))]
            for i in range(start, start + count)
        ]

    def demonstrations(self, start: int, count: int) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, solver response ids + <eos>) for problems start, ..., start + count - 1."""
        pairs = []
        for i in range(start, start + count):
            problem = self.problem(i)
            prompt = [BOS, *VOCAB.encode(self.prompt_text(problem))]
            pairs.append((prompt, [*VOCAB.encode(self.response_text(problem)), EOS]))
        return pairs

    def parse_prompt(self, prompt: list[int]) -> Problem:
        return parse_worksheet(prompt, "chain")

    def _answer(self, response: list[int]) -> tuple[str, int, int] | None:
        """(text, answer start, answer end) in token positions, when the response has `>digits`
        right before its end (<eos> or the last token)."""
        text = response_chars(response)
        match = re.search(r">(\d+)$", text)
        if match is None:
            return None
        return text, match.start(1), match.end(1)

    def score(self, prompt: list[int], response: list[int]) -> tuple[float, list[bool]]:
        """Reward 1 when the response ends with `>v<eos>` and v is the queried value; the answer
        span is the digits of v whenever the response ends with `>digits`, right or wrong."""
        problem = self.parse_prompt(prompt)
        span = [False] * len(response)
        found = self._answer(response)
        if found is None:
            return 0.0, span
        _, start, end = found
        for i in range(start, end):
            span[i] = True
        correct = int(found[0][start:end]) == values(problem, self.cfg.modulus)[problem.query]
        return float(correct and EOS in response), span

    def labels(self, prompt: list[int], response: list[int]) -> list[bool]:
        """Ground truth: True on the tokens of well-formed statements of chain variables, wherever
        they stand in the response (a garbled statement does not hide the ones after it)."""
        problem = self.parse_prompt(prompt)
        chain = dependency_chain(problem)
        text = response_chars(response)
        labels = [False] * len(response)
        for match in _STATEMENT.finditer(text):
            if match.group(1) in chain:
                for i in range(match.start(), match.end()):
                    labels[i] = True
        return labels
