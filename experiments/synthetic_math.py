"""Small GSM8K-layout files of arithmetic word problems, to try math RL without a download.

    python -m experiments.synthetic_math [--out data/arith] [--train 512] [--test 64] [--seed 0]
    python -m experiments.synthetic_math --kind variables --out data/variables

Writes `train.jsonl` and `test.jsonl` under --out, one `{"question": ..., "answer": ...}` per line,
the answer a worked solution ending in `#### <number>` as GSM8K's are, so `--data.preset gsm8k`
reads them. The two files come from disjoint index ranges of one seeded generator. Kinds:
- story: two or three steps of +, - or x on numbers below 20, phrased in a few fixed story
  patterns;
- variables: `m = 3. n = 6. k = n + 1. What is k?`, solved as `k = n + 1 = 6 + 1 = 7`: the
  questions of `experiments.gemma_causal`, which Gemma-3-270M answers about half right few-shot.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import string
import sys

import numpy as np

NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun")
ITEMS = ("apples", "marbles", "stickers", "books", "shells", "coins", "pencils", "cards")
TEST_START = 10**6  # index offset of the held-out problems


def problem(index: int, seed: int) -> tuple[str, str, int]:
    """(question, worked solution, answer) of problem `index`: a start count, then one to two
    more events (find more, give away, double or triple)."""
    rng = np.random.default_rng([seed, index])
    name, item = str(rng.choice(NAMES)), str(rng.choice(ITEMS))
    count = int(rng.integers(2, 20))
    sentences = [f"{name} has {count} {item}."]
    steps = []
    for _ in range(int(rng.integers(1, 3))):
        kind = int(rng.integers(3))
        if kind == 0:
            more = int(rng.integers(1, 20))
            sentences.append(f"Then {name} finds {more} more.")
            steps.append(f"{count} + {more} = {count + more}")
            count += more
        elif kind == 1 and count > 1:
            fewer = int(rng.integers(1, count))
            sentences.append(f"Then {name} gives {fewer} away.")
            steps.append(f"{count} - {fewer} = {count - fewer}")
            count -= fewer
        else:
            factor = int(rng.integers(2, 4))
            word = {2: "doubles", 3: "triples"}[factor]
            sentences.append(f"Then {name} {word} the {item}.")
            steps.append(f"{count} x {factor} = {count * factor}")
            count *= factor
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return question, "\n".join(steps), count


def variables_problem(index: int, seed: int) -> tuple[str, str, int]:
    """(question, worked solution, answer) of problem `index`: two variables with values 1-9 and a
    third defined as one of them plus or minus 1-4 (minus only while the result stays >= 1)."""
    rng = np.random.default_rng([seed, index])
    names = [str(c) for c in rng.choice(list(string.ascii_lowercase), 3, replace=False)]
    values = [int(v) for v in rng.integers(1, 10, 2)]
    parent = int(rng.integers(2))
    op, constant = ("+", "-")[int(rng.integers(2))], int(rng.integers(1, 5))
    if op == "-" and values[parent] <= constant:
        op = "+"
    answer = values[parent] + constant if op == "+" else values[parent] - constant
    lines = [f"{names[0]} = {values[0]}.", f"{names[1]} = {values[1]}."]
    lines.append(f"{names[2]} = {names[parent]} {op} {constant}.")
    question = " ".join(lines) + f" What is {names[2]}?"
    formula = f"{op} {constant}"
    worked = f"{names[2]} = {names[parent]} {formula} = {values[parent]} {formula} = {answer}"
    return question, worked, answer


KINDS = {"story": problem, "variables": variables_problem}


def rows(start: int, count: int, seed: int, kind: str = "story") -> list[dict[str, str]]:
    if kind not in KINDS:
        raise ValueError(f"unknown problem kind {kind!r}; known: {sorted(KINDS)}")
    out = []
    for index in range(start, start + count):
        question, worked, answer = KINDS[kind](index, seed)
        out.append({"question": question, "answer": f"{worked}\n#### {answer}"})
    return out


def write(
    out: pathlib.Path, train: int, test: int, seed: int, kind: str = "story"
) -> tuple[pathlib.Path, pathlib.Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "test.jsonl"
    for path, (start, count) in zip(paths, ((0, train), (TEST_START, test)), strict=True):
        lines = (json.dumps(row) + "\n" for row in rows(start, count, seed, kind))
        path.write_text("".join(lines))
    return paths


def main(argv: list[str]) -> tuple[pathlib.Path, pathlib.Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/arith")
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", choices=sorted(KINDS), default="story")
    args = parser.parse_args(argv)
    if args.train < 1 or args.test < 1:
        raise ValueError(f"--train and --test must be >= 1, got {args.train} and {args.test}")
    paths = write(pathlib.Path(args.out), args.train, args.test, args.seed, args.kind)
    print(f"wrote {args.train} problems to {paths[0]} and {args.test} to {paths[1]}")
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
