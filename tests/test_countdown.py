"""Countdown: hand-checked verifier cases, the generator's promises, and the solver against a slow
brute-force reference over every expression tree."""

import fractions
import functools
import itertools

import numpy as np
import pytest

from ftjax.tasks.countdown import CountdownConfig, CountdownTask, Problem
from ftjax.tasks.vocab import BOS, EOS, PAD, VOCAB

TASK = CountdownTask()


def prompt_ids(problem):
    return [BOS, *VOCAB.encode(TASK.prompt_text(problem))]


def score_text(problem, text, eos=True):
    response = VOCAB.encode(text) + ([EOS] if eos else [])
    return TASK.score(prompt_ids(problem), response)


def expected_span(text, start, stop, eos=True):
    """True on text[start:stop], False elsewhere, one entry per token (+1 for <eos>)."""
    return [start <= i < stop for i in range(len(text) + (1 if eos else 0))]


P = Problem((3, 5, 7), 22)


def test_prompt_text_and_ids():
    assert TASK.prompt_text(P) == "3,5,7:22"
    assert TASK.response_text([(5, "*", 3, 15), (15, "+", 7, 22)]) == "5*3=15;15+7=22;"


@pytest.mark.parametrize(
    "problem,text,start,stop",
    [
        (P, "5*3=15;15+7=22;", 7, 14),
        (P, "3*5=15;7+15=22;", 7, 14),  # operands in either order
        (Problem((4, 4), 1), "4/4=1;", 0, 5),
        (Problem((8, 2, 5), 9), "8/2=4;4+5=9;", 6, 11),
        (Problem((9, 3, 3, 1), 7), "9/3=3;3+3=6;6+1=7;", 12, 17),  # a repeated number used twice
    ],
)
def test_correct_responses(problem, text, start, stop):
    reward, span = score_text(problem, text)
    assert reward == 1.0
    assert span == expected_span(text, start, stop)


@pytest.mark.parametrize(
    "problem,text,start,stop",
    [
        (P, "5*3=16;16+7=23;", 7, 14),  # wrong arithmetic
        (P, "5*3=15;15+7=23;", 7, 14),  # wrong arithmetic in the last step
        (P, "5*3=15;15+5=20;", 7, 14),  # 5 reused, 7 unused
        (Problem((6, 2, 9), 12), "9-6=3;3*2=6;6+6=12;", 12, 18),  # the one 6 used twice
        (P, "5*3=15;", 0, 6),  # 7 unused
        (P, "5*3=15;15+7=22;7+3=10;", 15, 21),  # keeps going with spent numbers
        (P, "5+3=8;8+7=15;", 6, 12),  # correct steps, wrong final value
        (P, "7-5=2;3-2=1;", 6, 11),  # well-formed, wrong final value
        (P, "7/3=2;2*5=10;", 6, 12),  # inexact division
        (Problem((3, 6), 2), "3/6=0;", 0, 5),  # smaller divided by larger
        (Problem((3, 6), 3), "3-6=3;", 0, 5),  # negative difference written as positive
        (P, "5-7=-2;", 0, 0),  # not parseable: negative result
        (P, "3-3=0;", 0, 5),  # 3 used twice, zero result
        (Problem((5, 3), 3), "5+0=5;", 0, 5),  # a number not in play
    ],
)
def test_wrong_responses_score_zero(problem, text, start, stop):
    reward, span = score_text(problem, text)
    assert reward == 0.0
    assert span == (expected_span(text, start, stop) if stop else [False] * (len(text) + 1))


def test_missing_eos_scores_zero_but_keeps_span():
    text = "5*3=15;15+7=22;"
    reward, span = score_text(P, text, eos=False)
    assert reward == 0.0
    assert span == expected_span(text, 7, 14, eos=False)


def test_tokens_after_eos_are_ignored():
    response = VOCAB.encode("5*3=15;15+7=22;") + [EOS, PAD, PAD, 7]
    reward, span = TASK.score(prompt_ids(P), response)
    assert reward == 1.0
    assert span == [7 <= i < 14 for i in range(len(response))]


@pytest.mark.parametrize(
    "response",
    [
        VOCAB.encode("5*3=15;15+7=22;x") + [EOS],  # trailing garbage
        VOCAB.encode("5*3=15;15+7=22") + [EOS],  # last ';' missing
        VOCAB.encode("5*3=15;15+7=22;;") + [EOS],
        VOCAB.encode("5*03=15;15+7=22;") + [EOS],  # leading zero
        VOCAB.encode("5*3=15;") + [PAD] + VOCAB.encode("15+7=22;") + [EOS],  # special inside
        VOCAB.encode("5*3=15;15+7=22;") + [BOS, EOS],
        [EOS],  # empty
        [],
        VOCAB.encode("=;*+"),
    ],
)
def test_malformed_responses_score_zero_with_empty_span(response):
    reward, span = TASK.score(prompt_ids(P), response)
    assert reward == 0.0
    assert span == [False] * len(response)


def test_random_ids_never_raise():
    rng = np.random.default_rng(0)
    alphabet = VOCAB.encode("0123456789+-*/=;") + [EOS, PAD, BOS]
    for n in range(300):
        length = int(rng.integers(0, 40))
        pool = alphabet if n % 2 else list(range(VOCAB.size))
        response = [int(t) for t in rng.choice(pool, length)]
        reward, span = TASK.score(prompt_ids(P), response)
        assert reward in (0.0, 1.0) and len(span) == length


def test_huge_literal_scores_zero():
    text = "9" * 5000 + "+3=5;"
    reward, span = score_text(P, text)
    assert reward == 0.0 and span == expected_span(text, 0, len(text) - 1)


def test_bad_ids_and_bad_prompts_raise():
    with pytest.raises(ValueError, match="outside"):
        TASK.score(prompt_ids(P), [VOCAB.size])
    with pytest.raises(ValueError, match="outside"):
        TASK.score(prompt_ids(P), [EOS, -1])
    with pytest.raises(ValueError, match="not a countdown prompt"):
        TASK.score([BOS, *VOCAB.encode("3,5:x")], [EOS])
    with pytest.raises(ValueError, match="not a countdown prompt"):
        TASK.score([BOS, *VOCAB.encode("3:3")], [EOS])


def test_labels_are_none():
    assert TASK.labels(prompt_ids(P), VOCAB.encode("5*3=15;15+7=22;") + [EOS]) is None


def test_generator_problems_are_in_range_solvable_and_demonstrated():
    cfg = TASK.cfg
    prompts = TASK.prompts(0, 200)
    demos = TASK.demonstrations(0, 200)
    for i in range(200):
        problem = TASK.problem(i)
        assert len(problem.numbers) == cfg.num_numbers
        assert all(1 <= n <= cfg.max_number for n in problem.numbers)
        assert 1 <= problem.target <= cfg.max_target
        assert prompts[i] == demos[i][0] == TASK.prompts(i, 1)[0]
        steps = TASK.solve(problem)
        assert steps is not None
        canonical = VOCAB.encode(TASK.response_text(steps)) + [EOS]
        assert TASK.score(prompts[i], canonical)[0] == 1.0, (problem, steps)
        assert TASK.score(prompts[i], demos[i][1])[0] == 1.0, (problem, demos[i][1])


def test_generator_is_deterministic_and_seeded():
    again = CountdownTask(CountdownConfig())
    other = CountdownTask(CountdownConfig(seed=1))
    assert [TASK.problem(i) for i in range(50)] == [again.problem(i) for i in range(50)]
    assert TASK.demonstrations(0, 20) == again.demonstrations(0, 20)
    assert [TASK.problem(i) for i in range(50)] != [other.problem(i) for i in range(50)]


@pytest.mark.parametrize(
    "cfg",
    [
        CountdownConfig(num_numbers=5, max_number=20, max_target=20),
        CountdownConfig(num_numbers=2, max_number=3, max_target=3),
    ],
)
def test_generator_other_configs(cfg):
    task = CountdownTask(cfg)
    for i, (prompt, response) in enumerate(task.demonstrations(0, 5)):
        problem = task.problem(i)
        assert all(1 <= n <= cfg.max_number for n in problem.numbers)
        assert 1 <= problem.target <= cfg.max_target
        assert task.score(prompt, response)[0] == 1.0


@functools.cache
def reference_values(numbers: tuple[int, ...]) -> frozenset:
    """Every value of every binary expression tree over `numbers` in this order, keeping only
    trees whose every node is a positive integer."""
    if len(numbers) == 1:
        return frozenset({fractions.Fraction(numbers[0])})
    out = set()
    for split in range(1, len(numbers)):
        for x in reference_values(numbers[:split]):
            for y in reference_values(numbers[split:]):
                for v in (x + y, x - y, x * y, x / y):
                    if v > 0 and v.denominator == 1:
                        out.add(v)
    return frozenset(out)


def reference_solvable(problem: Problem) -> bool:
    return any(
        problem.target in reference_values(order)
        for order in itertools.permutations(problem.numbers)
    )


def test_solver_agrees_with_brute_force_reference():
    rng = np.random.default_rng(123)
    solvable = 0
    for _ in range(100):
        count = int(rng.integers(2, 5))
        numbers = tuple(int(n) for n in rng.integers(1, 10, count))
        problem = Problem(numbers, int(rng.integers(1, 80)))
        steps = TASK.solve(problem)
        assert (steps is not None) == reference_solvable(problem), problem
        if steps is not None:
            solvable += 1
            response = VOCAB.encode(TASK.response_text(steps)) + [EOS]
            assert TASK.score(prompt_ids(problem), response)[0] == 1.0
    assert 20 <= solvable <= 80  # both kinds were tested


def test_random_solutions_are_valid_and_diverse():
    problem = Problem((2, 3, 4, 6), 24)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(30):
        steps = TASK.solve(problem, rng)
        response = VOCAB.encode(TASK.response_text(steps)) + [EOS]
        assert TASK.score(prompt_ids(problem), response)[0] == 1.0
        seen.add(tuple(steps))
    assert len(seen) > 5
    assert TASK.solve(Problem((2, 3), 7)) is None
    assert TASK.solve(Problem((2, 3), 7), rng) is None


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"num_numbers": 1}, "num_numbers"),
        ({"num_numbers": 6}, "num_numbers"),
        ({"max_number": 0}, "max_number"),
        ({"max_target": 5, "max_number": 9}, "max_target"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CountdownConfig(**kwargs)


def test_negative_index_raises():
    with pytest.raises(ValueError, match="index"):
        TASK.problem(-1)
