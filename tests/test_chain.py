"""The chain task: hand-checked problems, labels, verifier and generator properties."""

import numpy as np
import pytest

from ftjax.tasks.chain import ChainConfig, ChainTask, Definition, Problem, dependency_chain, values
from ftjax.tasks.vocab import BOS, EOS, PAD, VOCAB

# a=0+4; b=0+7; c=a+3; d=b*2; e=c-1; ?e   -> chain {a, c, e}, distractors {b, d}
HAND = Problem(
    (
        Definition("a", 4),
        Definition("b", 7),
        Definition("c", 3, "a", "+"),
        Definition("d", 2, "b", "*"),
        Definition("e", 1, "c", "-"),
    ),
    query="e",
)
TASK = ChainTask(ChainConfig(chain_length=3, distractors=2))


def ids(text, eos=True):
    return [*VOCAB.encode(text), *([EOS] if eos else [])]


def prompt():
    return [BOS, *VOCAB.encode(TASK.prompt_text(HAND))]


def test_hand_checked_problem():
    assert TASK.prompt_text(HAND) == "a=4=?;b=7=?;c=a+3=?;d=b*2=?;e=c-1=?;?e"
    assert values(HAND, 10) == {"a": 4, "b": 7, "c": 7, "d": 4, "e": 6}
    assert dependency_chain(HAND) == {"a", "c", "e"}
    assert TASK.response_text(HAND) == "a=4=4;b=7=7;c=a+3=7;d=b*2=4;e=c-1=6;>6"
    assert TASK.parse_prompt(prompt()) == HAND


def test_hand_checked_labels_and_span():
    response = ids("a=4=4;b=7=7;c=a+3=7;d=b*2=4;e=c-1=6;>6")
    labels = TASK.labels(prompt(), response)
    #          a=4=4;    b=7=7;    c=a+3=7;  d=b*2=4;  e=c-1=6;  >6 <eos>
    expected = [1] * 6 + [0] * 6 + [1] * 8 + [0] * 8 + [1] * 8 + [0, 0, 0]
    assert labels == [bool(x) for x in expected]
    reward, span = TASK.score(prompt(), response)
    assert reward == 1.0
    assert span == [False] * 37 + [True, False]


def test_labels_follow_the_written_statements_not_the_solution():
    # Wrong values and a skipped statement: labels mark chain statements as written.
    response = ids("a=4=5;c=a+3=9;b=7=1;e=c-1=0;>3")
    expected = [1] * 14 + [0] * 6 + [1] * 8 + [0] * 3
    assert TASK.labels(prompt(), response) == [bool(x) for x in expected]
    reward, span = TASK.score(prompt(), response)
    assert reward == 0.0 and span == [False] * 29 + [True, False]


@pytest.mark.parametrize(
    "text, eos, reward, has_span",
    [
        ("a=4=4;e=c-1=6;>6", False, 0.0, True),  # no <eos>: not finished
        ("a=4=4;e=c-1=6;>7", True, 0.0, True),  # wrong answer: span kept (it is the sink)
        ("a=4=4;e=c-1=6;", True, 0.0, False),  # no answer
        ("a=4=4;>6;", True, 0.0, False),  # answer not at the end
        ("", True, 0.0, False),
        (">6", True, 1.0, True),  # a bare answer is right (the policy may skip the work)
    ],
)
def test_score_cases(text, eos, reward, has_span):
    got_reward, span = TASK.score(prompt(), ids(text, eos))
    assert got_reward == reward
    assert any(span) == has_span
    assert len(span) == len(ids(text, eos))


def test_specials_inside_a_response_do_not_shift_positions():
    response = [PAD, *ids("a=4=4;>6")]
    reward, span = TASK.score(prompt(), response)
    assert reward == 1.0 and span.index(True) == 8
    assert TASK.labels(prompt(), response) == [False] + [True] * 6 + [False] * 3


def test_a_garbled_statement_does_not_hide_later_ones():
    response = ids("=4=4;c=a+3=7;>6")  # the policy dropped the first name
    assert TASK.labels(prompt(), response) == [False] * 5 + [True] * 8 + [False] * 3


def test_random_ids_never_raise():
    rng = np.random.default_rng(0)
    for _ in range(200):
        response = rng.integers(0, VOCAB.size, rng.integers(0, 30)).tolist()
        reward, span = TASK.score(prompt(), response)
        assert reward in (0.0, 1.0) and len(span) == len(response)
        assert len(TASK.labels(prompt(), response)) == len(response)


def test_generator_properties():
    cfg = ChainConfig(chain_length=4, distractors=3, modulus=7, seed=3)
    task = ChainTask(cfg)
    for index in range(100):
        problem = task.problem(index)
        names = [d.name for d in problem.definitions]
        assert names == list("abcdefg")  # named in prompt order
        seen = set()
        for d in problem.definitions:  # every parent is defined earlier
            assert d.parent is None or d.parent in seen
            assert 0 <= d.constant < cfg.modulus and d.op in cfg.ops
            assert d.parent is None or d.constant > 0
            seen.add(d.name)
        assert len(dependency_chain(problem)) == cfg.chain_length
        ((p, r),) = task.demonstrations(index, 1)
        assert task.score(p, r)[0] == 1.0
        assert sum(task.labels(p, r)) == 6 + 8 * (cfg.chain_length - 1)
        assert task.prompts(index, 1)[0] == p
    assert task.problem(5) == ChainTask(cfg).problem(5)
    other = ChainTask(ChainConfig(chain_length=4, distractors=3, modulus=7, seed=4))
    assert [other.problem(i) for i in range(10)] != [task.problem(i) for i in range(10)]


def test_chain_positions_are_shuffled():
    """Chain links are not always first: the labels are not a position cue."""
    patterns = set()
    for i in range(50):
        problem = TASK.problem(i)
        chain = dependency_chain(problem)
        patterns.add(tuple(d.name in chain for d in problem.definitions))
    assert len(patterns) > 3


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(chain_length=0), "chain_length"),
        (dict(distractors=30), "distractors"),
        (dict(modulus=1), "modulus"),
        (dict(ops=("/",)), "ops"),
        (dict(max_constant=10), "max_constant"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ChainConfig(**kwargs)


def test_bad_prompt():
    with pytest.raises(ValueError, match="not a chain-task prompt"):
        TASK.score([BOS, *VOCAB.encode("1,2,3:6")], ids(">6"))
