"""Dead-end branches: K independent variable chains, one of them queried.

The prompt defines `chains` (K) chains of `chain_length` (L) variables each. Every chain has the
same shape: its root is a number, each later link is `previous link op constant` mod `modulus`,
and no link reads a variable of another chain. One chain, chosen uniformly, is queried (its last
link); the other K-1 are dead-end branches: the response works them out too, but nothing flows
from them to the answer. The worksheet format is chain.py's:

    prompt   <bos>a=4=?;b=7=?;c=a+3=?;d=1=?;e=b-9=?;f=d+5=?;?e
    response a=4=4;b=7=7;c=a+3=7;d=1=1;e=b-9=8;f=d+5=6;>8<eos>

(chains {b, e} queried, {a, c} and {d, f} dead ends). The definitions are interleaved by a
uniformly random ready definition at each position; since the chains are alike and the queried one
is drawn independently, whether a definition is on the queried chain is independent of where it
stands. Variables are named a, b, c, ... in prompt order, as in chain.py.

No single prompt number predicts the answer: roots and constants are uniform on [0, modulus)
(constant 0 included), so with ops + and - the answer is root +/- c_1 ... +/- c_{L-1} mod modulus,
and conditioning on any one prompt number leaves another uniform, independent number of the
queried chain in the sum: the answer stays exactly uniform (constants in [1, modulus) would make
the answer never equal the root when L = 2). With `*` in `ops` this guarantee does not hold.

`answer_only` is the control format: demonstrations are `>value<eos>`, no worksheet.

`slip` makes the demonstrations a flawed teacher's: each `-` link of a trace is worked out as
`+` with probability `slip` (drawn per link from the problem's index; the trace still writes
`-`, and every later value and the answer follow the slipped value). Prompts, the verifier and
the labels are unchanged, so a warm-up that imitates the teacher learns a systematic error that
the reward can correct: with slip > 1/2 its greedy answer is wrong on a queried `-` link, while
sampling finds the right value about 1 - slip of the time.

Ground truth per response token (positions are tokens; nothing after <eos> is labelled):
`labels` marks well-formed statements of the queried chain's variables, `value_labels` only their
value digits (after the statement's last `=`), `chain_ids` gives each well-formed statement's chain
(0 queried, 1..K-1 the others by prompt order of their roots, -1 outside statements), and `roles`
gives each token's `Role` by its character. The answer after `>` is the sink (`score`'s span).
"""

from __future__ import annotations

import dataclasses
import enum
import re
import string

import numpy as np

from ftjax.tasks.chain import (
    OPS,
    Definition,
    Problem,
    dependency_chain,
    evaluation_order,
    parse_worksheet,
    response_chars,
    shuffled_topological,
    values,
)
from ftjax.tasks.vocab import BOS, EOS, PAD, VOCAB

_ANSWER = re.compile(r">(\d+)$")


class Role(enum.IntEnum):
    """What a response token is, read from its character alone (not from the statement around
    it), so garbled text gets roles too."""

    OTHER = 0  # <eos>, <pad> and characters statements do not use (? ( ) ...)
    NAME = 1  # a variable letter: the defined name or the parent it reads
    OPERATOR = 2  # + - * and =
    VALUE = 3  # digits: roots, constants, computed values and the answer (the sink)
    DELIMITER = 4  # ; ends a statement, > starts the answer


_ROLE_OF_CHARACTER = {
    **{c: Role.NAME for c in string.ascii_lowercase},
    **{c: Role.OPERATOR for c in "+-*="},
    **{c: Role.VALUE for c in string.digits},
    **{c: Role.DELIMITER for c in ";>"},
}


@dataclasses.dataclass(frozen=True)
class BranchesConfig:
    chains: int = 3  # K: the queried chain and K - 1 dead-end chains
    chain_length: int = 3  # L: variables per chain (a root and L - 1 links)
    modulus: int = 10  # values, roots and constants are in [0, modulus)
    ops: tuple[str, ...] = ("+", "-")  # operators of the links; `*` breaks the uniform answer
    answer_only: bool = False  # control: demonstrations are `>value<eos>` with no statements
    substitute: bool = False  # links write the parent's value first: `c=a+3=4+3=7;`
    slip: float = 0.0  # demonstrations only: share of `-` links the teacher works out as `+`
    seed: int = 0  # problem i depends on (seed, i) alone (experiments set it to their seed)

    def __post_init__(self):
        if self.chains < 2:
            raise ValueError(f"BranchesConfig.chains must be >= 2, got {self.chains}")
        if self.chain_length < 2:
            raise ValueError(f"BranchesConfig.chain_length must be >= 2, got {self.chain_length}")
        if self.chains * self.chain_length > 26:
            raise ValueError(
                f"BranchesConfig.chains * chain_length must be <= 26 (one letter per variable), "
                f"got {self.chains} * {self.chain_length}"
            )
        if not 2 <= self.modulus <= 1000:
            raise ValueError(f"BranchesConfig.modulus must be in [2, 1000], got {self.modulus}")
        if not 0.0 <= self.slip <= 1.0:
            raise ValueError(f"BranchesConfig.slip must be in [0, 1], got {self.slip}")
        ops = tuple(self.ops)
        if not ops or len(set(ops)) != len(ops) or any(op not in OPS for op in ops):
            raise ValueError(
                f"BranchesConfig.ops must be a non-empty subset of {OPS} without repeats, "
                f"got {self.ops}"
            )


def max_lengths(cfg: BranchesConfig) -> tuple[int, int]:
    """(prompt ids with <bos>, solver response ids with <eos>) of the longest problem `cfg` makes,
    from its shape: root `a=N=?;`, link `c=a+N=?;`, query `?c`; statements `a=N=N;`, `c=a+N=N;`
    (`c=a+N=N+N=N;` when links substitute), answer `>N<eos>`."""
    digits = len(str(cfg.modulus - 1))
    roots, links = cfg.chains, cfg.chains * (cfg.chain_length - 1)
    prompt = 1 + roots * (5 + digits) + links * (7 + digits) + 2
    link = 6 + 2 * digits + (2 + 2 * digits) * cfg.substitute
    response = roots * (4 + 2 * digits) + links * link + 1 + digits + 1
    return prompt, (1 + digits + 1) if cfg.answer_only else response


def chain_index(problem: Problem) -> dict[str, int]:
    """Every variable's chain: 0 for the queried variable's chain, then 1, 2, ... for the other
    chains in the order their roots appear in the prompt."""
    root_of = {}
    for d in evaluation_order(problem):
        root_of[d.name] = d.name if d.parent is None else root_of[d.parent]
    queried = root_of[problem.query]
    others = [d.name for d in problem.definitions if d.parent is None and d.name != queried]
    number = {queried: 0, **{root: k + 1 for k, root in enumerate(others)}}
    return {name: number[root] for name, root in root_of.items()}


# chain.py's statement, or a link that writes its parent's value first (`c=a+3=4+3=7;`).
_STATEMENT = re.compile(r"([a-z])=(?:\d+|[a-z][+\-*]\d+(?:=(\d+)[+\-*]\d+)?)=(\d+);")


def _statements(text: str):
    """(name, start, end, value spans) of every well-formed statement; the value spans are the
    digits the statement works out: the parent's value it substitutes (if any) and its own."""
    for match in _STATEMENT.finditer(text):
        spans = [match.span(g) for g in (2, 3) if match.start(g) >= 0]
        yield match.group(1), match.start(), match.end(), spans


class BranchesTask:
    """Prompts, verifier, solver traces and ground-truth token labels (see the module docstring)."""

    name = "branches"
    vocab = VOCAB
    stop_ids, pad_id = (EOS,), PAD

    def __init__(self, cfg: BranchesConfig = BranchesConfig()):
        self.cfg = cfg

    def problem(self, index: int) -> Problem:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, index])
        queried = int(rng.integers(cfg.chains))
        # Generation names: chain j's link i is letter j * L + i; renamed to prompt order below.
        names = [
            [string.ascii_lowercase[j * cfg.chain_length + i] for i in range(cfg.chain_length)]
            for j in range(cfg.chains)
        ]
        definitions = []
        for chain in names:
            definitions.append(Definition(chain[0], int(rng.integers(cfg.modulus))))
            for parent, name in zip(chain, chain[1:], strict=False):
                op = cfg.ops[int(rng.integers(len(cfg.ops)))]
                definitions.append(Definition(name, int(rng.integers(cfg.modulus)), parent, op))
        ordered = shuffled_topological(definitions, rng)
        rename = {d.name: string.ascii_lowercase[k] for k, d in enumerate(ordered)}
        renamed = tuple(
            dataclasses.replace(
                d, name=rename[d.name], parent=None if d.parent is None else rename[d.parent]
            )
            for d in ordered
        )
        return Problem(renamed, query=rename[names[queried][-1]])

    def prompt_text(self, problem: Problem) -> str:
        return "".join(f"{d.text()}=?;" for d in problem.definitions) + f"?{problem.query}"

    def response_text(self, problem: Problem, slipped: frozenset[str] = frozenset()) -> str:
        """The solver's response (without <eos>); just `>value` when `answer_only`. The links
        named in `slipped` are worked out with `+` whatever their operator (see `slip`)."""
        value = values(problem, self.cfg.modulus, slipped)
        answer = f">{value[problem.query]}"
        if self.cfg.answer_only:
            return answer
        return "".join(self._statement(d, value) for d in evaluation_order(problem)) + answer

    def _statement(self, d: Definition, value: dict[str, int]) -> str:
        if d.parent is None or not self.cfg.substitute:
            return f"{d.text()}={value[d.name]};"
        return f"{d.text()}={value[d.parent]}{d.op}{d.constant}={value[d.name]};"

    def slipped_links(self, problem: Problem, index: int) -> frozenset[str]:
        """The `-` links the teacher works out as `+` in demonstration `index` (see `slip`)."""
        if self.cfg.slip == 0.0:
            return frozenset()
        rng = np.random.default_rng([self.cfg.seed, index, 1])
        minus = [d.name for d in problem.definitions if d.parent is not None and d.op == "-"]
        return frozenset(name for name in minus if rng.random() < self.cfg.slip)

    def prompts(self, start: int, count: int) -> list[list[int]]:
        return [
            [BOS, *VOCAB.encode(self.prompt_text(self.problem(i)))]
            for i in range(start, start + count)
        ]

    def demonstrations(
        self, start: int, count: int, flawed: bool = True
    ) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, solver response ids + <eos>) for problems start, ..., start + count - 1:
        the flawed teacher's responses when `slip` > 0, unless `flawed` is False."""
        pairs = []
        for i in range(start, start + count):
            problem = self.problem(i)
            prompt = [BOS, *VOCAB.encode(self.prompt_text(problem))]
            slipped = self.slipped_links(problem, i) if flawed else frozenset()
            response = self.response_text(problem, slipped)
            pairs.append((prompt, [*VOCAB.encode(response), EOS]))
        return pairs

    def parse_prompt(self, prompt: list[int]) -> Problem:
        problem = parse_worksheet(prompt, "branches")
        evaluation_order(problem)  # a missing parent or a cycle is a ValueError here
        return problem

    def score(self, prompt: list[int], response: list[int]) -> tuple[float, list[bool]]:
        """Reward 1 when the response ends with `>v<eos>` and v is the queried value; the answer
        span is the digits of v whenever the response ends with `>digits`, right or wrong."""
        problem = self.parse_prompt(prompt)
        span = [False] * len(response)
        match = _ANSWER.search(response_chars(response))
        if match is None:
            return 0.0, span
        for i in range(*match.span(1)):
            span[i] = True
        correct = int(match.group(1)) == values(problem, self.cfg.modulus)[problem.query]
        return float(correct and EOS in response), span

    def labels(self, prompt: list[int], response: list[int]) -> list[bool]:
        """True on the tokens of well-formed statements of the queried chain's variables, wherever
        they stand and whatever values they write (a garbled statement hides no later one)."""
        chain = dependency_chain(self.parse_prompt(prompt))
        labels = [False] * len(response)
        for name, start, end, _ in _statements(response_chars(response)):
            if name in chain:
                labels[start:end] = [True] * (end - start)
        return labels

    def value_labels(self, prompt: list[int], response: list[int]) -> list[bool]:
        """True only on the value digits of the statements `labels` marks: the value after the
        last `=` and, for a link that substitutes, its parent's value."""
        chain = dependency_chain(self.parse_prompt(prompt))
        labels = [False] * len(response)
        for name, _, _, spans in _statements(response_chars(response)):
            for a, b in spans if name in chain else ():
                labels[a:b] = [True] * (b - a)
        return labels

    def chain_ids(self, prompt: list[int], response: list[int]) -> list[int]:
        """Per token: the chain (`chain_index`) of the well-formed statement it is in, else -1
        (also for a statement of a variable the prompt does not define)."""
        chain_of = chain_index(self.parse_prompt(prompt))
        ids = [-1] * len(response)
        for name, start, end, _ in _statements(response_chars(response)):
            ids[start:end] = [chain_of.get(name, -1)] * (end - start)
        return ids

    def roles(self, prompt: list[int], response: list[int]) -> list[int]:
        """Per token: its `Role` code, by character (tokens from <eos> on are OTHER)."""
        self.parse_prompt(prompt)  # the same prompt check as the other labels
        text = response_chars(response)
        roles = [int(_ROLE_OF_CHARACTER.get(c, Role.OTHER)) for c in text]
        return roles + [int(Role.OTHER)] * (len(response) - len(text))
