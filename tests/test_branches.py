"""The dead-end-branches task: hand-checked labels, verifier, and the generator's statistics
(chain membership independent of position, no prompt number predicting the answer)."""

import numpy as np
import pytest

from ftjax import tasks
from ftjax.tasks import branches
from ftjax.tasks.branches import BranchesConfig, BranchesTask, Role, chain_index
from ftjax.tasks.chain import Definition, Problem, dependency_chain, values
from ftjax.tasks.vocab import BOS, EOS, PAD, VOCAB

# Chains {b, e} (queried), {a, c} and {d, f}; the roots a and d number the dead ends 1 and 2.
HAND = Problem(
    (
        Definition("a", 4),
        Definition("b", 7),
        Definition("c", 3, "a", "+"),
        Definition("d", 1),
        Definition("e", 9, "b", "-"),
        Definition("f", 5, "d", "+"),
    ),
    query="e",
)
TASK = BranchesTask(BranchesConfig(chains=3, chain_length=2))
ROLE_CODE = {
    "n": Role.NAME,
    "o": Role.OPERATOR,
    "v": Role.VALUE,
    "d": Role.DELIMITER,
    "x": Role.OTHER,
}


def ids(text, eos=True):
    return [*VOCAB.encode(text), *([EOS] if eos else [])]


def prompt():
    return [BOS, *VOCAB.encode(TASK.prompt_text(HAND))]


def bits(text):
    return [c == "1" for c in text]


def test_hand_checked_problem():
    assert TASK.prompt_text(HAND) == "a=4=?;b=7=?;c=a+3=?;d=1=?;e=b-9=?;f=d+5=?;?e"
    assert values(HAND, 10) == {"a": 4, "b": 7, "c": 7, "d": 1, "e": 8, "f": 6}
    assert TASK.response_text(HAND) == "a=4=4;b=7=7;c=a+3=7;d=1=1;e=b-9=8;f=d+5=6;>8"
    assert chain_index(HAND) == {"a": 1, "b": 0, "c": 1, "d": 2, "e": 0, "f": 2}
    assert TASK.parse_prompt(prompt()) == HAND


def test_hand_checked_labels_position_by_position():
    # b=7=7; (queried)  e=b9=8; (garbled)  c=a+3=7; (dead end 1)  e=b-9=8; (queried)
    # z=1=1; (no such variable)  >8 (the answer)  <eos>
    response = ids("b=7=7;e=b9=8;c=a+3=7;e=b-9=8;z=1=1;>8")
    assert len(response) == 38
    assert TASK.labels(prompt(), response) == bits(
        "111111" + "0000000" + "00000000" + "11111111" + "000000" + "00" + "0"
    )
    assert TASK.value_labels(prompt(), response) == bits(
        "000010" + "0000000" + "00000000" + "00000010" + "000000" + "00" + "0"
    )
    assert TASK.chain_ids(prompt(), response) == (
        [0] * 6 + [-1] * 7 + [1] * 8 + [0] * 8 + [-1] * 6 + [-1] * 2 + [-1]
    )
    roles = "novovd" + "nonvovd" + "nonovovd" + "nonovovd" + "novovd" + "dv" + "x"
    assert TASK.roles(prompt(), response) == [int(ROLE_CODE[c]) for c in roles]
    reward, span = TASK.score(prompt(), response)
    assert reward == 1.0 and span == [False] * 36 + [True, False]


def test_solver_response_labels():
    response = ids(TASK.response_text(HAND))
    #     a=4=4;   b=7=7;   c=a+3=7;  d=1=1;   e=b-9=8;  f=d+5=6;  >8 <eos>
    chains = [1] * 6 + [0] * 6 + [1] * 8 + [2] * 6 + [0] * 8 + [2] * 8 + [-1] * 3
    assert TASK.chain_ids(prompt(), response) == chains
    assert TASK.labels(prompt(), response) == [c == 0 for c in chains]
    assert [i for i, v in enumerate(TASK.value_labels(prompt(), response)) if v] == [10, 32]


SUBSTITUTING = BranchesTask(BranchesConfig(chains=3, chain_length=2, substitute=True))


def test_substituting_links_write_the_parent_value_and_label_it():
    assert SUBSTITUTING.prompt_text(HAND) == TASK.prompt_text(HAND)
    text = SUBSTITUTING.response_text(HAND)
    assert text == "a=4=4;b=7=7;c=a+3=4+3=7;d=1=1;e=b-9=7-9=8;f=d+5=1+5=6;>8"
    response = ids(text)
    #     a=4=4;   b=7=7;   c=a+3=4+3=7;  d=1=1;   e=b-9=7-9=8;  f=d+5=1+5=6;  >8 <eos>
    chains = [1] * 6 + [0] * 6 + [1] * 12 + [2] * 6 + [0] * 12 + [2] * 12 + [-1] * 3
    assert SUBSTITUTING.chain_ids(prompt(), response) == chains
    assert SUBSTITUTING.labels(prompt(), response) == [c == 0 for c in chains]
    # b's value (10), then e's substituted parent value 7 (36) and its own value 8 (40).
    assert [i for i, v in enumerate(SUBSTITUTING.value_labels(prompt(), response)) if v] == [
        10,
        36,
        40,
    ]
    assert SUBSTITUTING.score(prompt(), response)[0] == 1.0
    # Both grammars are read either way; a half-substituted link is garbled.
    assert SUBSTITUTING.labels(prompt(), ids("e=b-9=8;e=b-9=7-=8;")) == bits("1" * 8 + "0" * 12)


def test_value_labels_cover_every_value_digit_and_follow_what_is_written():
    response = ids("b=7=17;a=4=14;>1")  # wrong values are labelled as written
    assert TASK.value_labels(prompt(), response) == bits("0000110" + "0000000" + "00" + "0")
    assert TASK.labels(prompt(), response) == bits("1111111" + "0000000" + "00" + "0")
    assert TASK.score(prompt(), response)[0] == 0.0


@pytest.mark.parametrize(
    "text, eos, reward, has_span",
    [
        ("b=7=7;e=b-9=8;>8", False, 0.0, True),  # no <eos>: not finished
        ("b=7=7;e=b-9=8;>7", True, 0.0, True),  # wrong answer: span kept (it is the sink)
        ("b=7=7;e=b-9=8;", True, 0.0, False),  # no answer
        ("b=7=7;>8;", True, 0.0, False),  # answer not at the end
        ("", True, 0.0, False),
        (">8", True, 1.0, True),  # a bare answer is right
    ],
)
def test_score_cases(text, eos, reward, has_span):
    got_reward, span = TASK.score(prompt(), ids(text, eos))
    assert got_reward == reward
    assert any(span) == has_span and len(span) == len(ids(text, eos))


def test_specials_inside_a_response_do_not_shift_positions():
    response = [PAD, *ids("b=7=7;>8")]
    assert TASK.score(prompt(), response) == (1.0, [False] * 8 + [True, False])
    assert TASK.labels(prompt(), response) == [False] + [True] * 6 + [False] * 3
    assert TASK.roles(prompt(), response)[:2] == [Role.OTHER, Role.NAME]


def _check_label_invariants(task, prompt_ids, response):
    labels = task.labels(prompt_ids, response)
    value_labels = task.value_labels(prompt_ids, response)
    chains = task.chain_ids(prompt_ids, response)
    roles = task.roles(prompt_ids, response)
    assert len(labels) == len(value_labels) == len(chains) == len(roles) == len(response)
    assert labels == [c == 0 for c in chains]
    for is_value, is_label, role in zip(value_labels, labels, roles, strict=True):
        assert not is_value or (is_label and role == Role.VALUE)
    reward, span = task.score(prompt_ids, response)
    assert reward in (0.0, 1.0) and len(span) == len(response)
    assert all(roles[i] == Role.VALUE for i, s in enumerate(span) if s)
    assert all(chains[i] == -1 for i, s in enumerate(span) if s)


def test_random_ids_never_raise_and_labels_agree():
    rng = np.random.default_rng(0)
    for _ in range(200):
        response = rng.integers(0, VOCAB.size, rng.integers(0, 40)).tolist()
        _check_label_invariants(TASK, prompt(), response)


@pytest.mark.parametrize(
    "cfg",
    [
        BranchesConfig(),
        BranchesConfig(chains=2, chain_length=2, modulus=100, ops=("+", "-", "*"), seed=1),
        BranchesConfig(chains=5, chain_length=5, modulus=7, seed=2),
    ],
)
def test_solver_scores_one_and_wrong_answers_zero(cfg):
    task = BranchesTask(cfg)
    for index, (p, r) in enumerate(task.demonstrations(0, 100)):
        assert task.score(p, r)[0] == 1.0
        _check_label_invariants(task, p, r)
        problem = task.problem(index)
        answer = values(problem, cfg.modulus)[problem.query]
        assert r[-1] == EOS and VOCAB.decode(r).endswith(f">{answer}")
        wrong = VOCAB.decode(r).rpartition(">")[0] + f">{(answer + 1) % cfg.modulus}"
        assert task.score(p, ids(wrong))[0] == 0.0
        # Every token before `>` is in a statement of a defined variable, one per definition.
        statement_tokens = len(r) - len(f">{answer}") - 1
        assert min(task.chain_ids(p, r)[:statement_tokens]) == 0
        assert VOCAB.decode(r).count(";") == cfg.chains * cfg.chain_length
        assert sum(task.labels(p, r)) > 0 and sum(task.value_labels(p, r)) > 0
        assert task.prompts(index, 1)[0] == p


def test_answer_only_control_format():
    cfg = BranchesConfig(answer_only=True)
    task = BranchesTask(cfg)
    assert task.prompts(0, 20) == BranchesTask(BranchesConfig()).prompts(0, 20)
    for index, (p, r) in enumerate(task.demonstrations(0, 20)):
        problem = task.problem(index)
        assert r == ids(f">{values(problem, cfg.modulus)[problem.query]}")
        assert task.score(p, r)[0] == 1.0 and not any(task.labels(p, r))


def test_chains_are_independent_paths():
    """K roots, each starting a path of L links, no variable read twice (no links between
    chains), every parent defined earlier, names in prompt order, the query a path's end."""
    cfg = BranchesConfig(chains=4, chain_length=3, seed=5)
    task = BranchesTask(cfg)
    for index in range(200):
        problem = task.problem(index)
        names = [d.name for d in problem.definitions]
        assert names == list("abcdefghijkl")
        children = {}
        for position, d in enumerate(problem.definitions):
            assert d.parent is None or d.parent in names[:position]
            assert 0 <= d.constant < cfg.modulus and d.op in cfg.ops
            if d.parent is not None:
                assert d.parent not in children, "a variable read by two links"
                children[d.parent] = d.name
        roots = [d.name for d in problem.definitions if d.parent is None]
        assert len(roots) == cfg.chains
        for root in roots:
            path = [root]
            while path[-1] in children:
                path.append(children[path[-1]])
            assert len(path) == cfg.chain_length
        assert problem.query not in children
        assert len(dependency_chain(problem)) == cfg.chain_length
    assert task.problem(7) == BranchesTask(cfg).problem(7)
    other = BranchesTask(BranchesConfig(chains=4, chain_length=3, seed=6))
    assert [other.problem(i) for i in range(10)] != [task.problem(i) for i in range(10)]


def _membership_gap(problems):
    """Per problem: mean relative position (0 first, 1 last) of the queried chain's definitions
    minus that of the other definitions. One number per problem, so the problems are independent
    samples and std / sqrt(n) is an honest standard error. Returns (mean, standard error)."""
    gaps = []
    for problem in problems:
        chain = dependency_chain(problem)
        where = np.linspace(0.0, 1.0, len(problem.definitions))
        on = np.array([d.name in chain for d in problem.definitions])
        gaps.append(where[on].mean() - where[~on].mean())
    gaps = np.array(gaps)
    return gaps.mean(), gaps.std(ddof=1) / np.sqrt(len(gaps))


def test_chain_membership_is_independent_of_position():
    cfg = BranchesConfig(chains=3, chain_length=3, seed=11)
    task = BranchesTask(cfg)
    problems = [task.problem(i) for i in range(2500)]
    mean, se = _membership_gap(problems)
    assert abs(mean) < 4 * se, (mean, se)
    # Position by position: each definition is on the queried chain with probability 1 / K.
    on_NxP = np.array([[d.name in dependency_chain(p) for d in p.definitions] for p in problems])
    rate, p = on_NxP.mean(axis=0), 1 / cfg.chains
    assert np.all(np.abs(rate - p) < 4 * np.sqrt(p * (1 - p) / len(problems))), rate
    # The check can fail: the same problems with the queried chain's definitions moved first.
    first = [
        Problem(
            tuple(sorted(q.definitions, key=lambda d: d.name not in dependency_chain(q))), q.query
        )
        for q in problems
    ]
    mean, se = _membership_gap(first)
    assert mean < -20 * se


def _split_half_accuracy(xs, ys):
    """How well the best map x -> y fitted on the first half predicts y on the second half
    (most frequent y per x; unseen x predicts -1). Returns (accuracy, number of test cases)."""
    half = len(xs) // 2
    best = {}
    for x in set(xs[:half]):
        seen = [y for x_, y in zip(xs[:half], ys[:half], strict=True) if x_ == x]
        best[x] = max(sorted(set(seen)), key=seen.count)
    hits = [best.get(x, -1) == y for x, y in zip(xs[half:], ys[half:], strict=True)]
    return float(np.mean(hits)), len(hits)


def test_split_half_accuracy_detects_a_shortcut():
    rng = np.random.default_rng(0)
    xs = rng.integers(10, size=2000).tolist()
    assert _split_half_accuracy(xs, [(x + 3) % 10 for x in xs])[0] == 1.0
    noise = rng.integers(10, size=2000).tolist()
    accuracy, n = _split_half_accuracy(xs, noise)
    assert abs(accuracy - 0.1) < 4 * np.sqrt(0.09 / n)


@pytest.mark.parametrize("chains, chain_length", [(3, 3), (2, 2)])
def test_no_prompt_number_predicts_the_answer(chains, chain_length):
    cfg = BranchesConfig(chains=chains, chain_length=chain_length, modulus=10, seed=13)
    task = BranchesTask(cfg)
    problems = [task.problem(i) for i in range(4000)]
    answers = [values(p, cfg.modulus)[p.query] for p in problems]
    p = 1 / cfg.modulus
    se_all = np.sqrt(p * (1 - p) / len(problems))

    def check(numbers, what):
        equal = np.mean([x == y for x, y in zip(numbers, answers, strict=True)])
        assert abs(equal - p) < 4 * se_all, (what, "answer == number", equal)
        accuracy, n = _split_half_accuracy(numbers, answers)
        assert abs(accuracy - p) < 4 * np.sqrt(p * (1 - p) / n), (what, "predictor", accuracy)

    for position in range(chains * chain_length):  # the number written at each position
        check([q.definitions[position].constant for q in problems], f"position {position}")
    by_name = [{d.name: d for d in q.definitions} for q in problems]
    for depth in range(chain_length):  # the queried chain's root (depth 0) and its constants
        numbers = []
        for q, defs in zip(problems, by_name, strict=True):
            name = q.query
            for _ in range(chain_length - 1 - depth):
                name = defs[name].parent
            numbers.append(defs[name].constant)
        check(numbers, f"queried chain depth {depth}")


def test_slipped_links_are_worked_out_with_plus_downstream_too():
    # HAND's e = b - 9: worked out as b + 9 = 16 when it slips; f's chain is untouched.
    sub = BranchesTask(BranchesConfig(chains=3, chain_length=2, modulus=10, substitute=True))
    assert values(HAND, 10, frozenset({"e"}))["e"] == 6
    assert sub.response_text(HAND) == "a=4=4;b=7=7;c=a+3=4+3=7;d=1=1;e=b-9=7-9=8;f=d+5=1+5=6;>8"
    assert (
        sub.response_text(HAND, frozenset({"e"}))
        == "a=4=4;b=7=7;c=a+3=4+3=7;d=1=1;e=b-9=7-9=6;f=d+5=1+5=6;>6"
    )


@pytest.mark.parametrize("chain_length", [2, 3])
def test_slip_rate_and_what_it_leaves_alone(chain_length):
    cfg = BranchesConfig(chains=3, chain_length=chain_length, modulus=5, substitute=True)
    right, flawed = BranchesTask(cfg), BranchesTask(BranchesConfig(**{**vars(cfg), "slip": 0.6}))
    n = 400
    demos, truth = flawed.demonstrations(0, n), right.demonstrations(0, n)
    assert flawed.demonstrations(0, n, flawed=False) == truth
    assert flawed.prompts(0, n) == right.prompts(0, n)  # prompts and problems unchanged
    minus = slipped = 0
    pairs = enumerate(zip(demos, truth, strict=True))
    for i, ((prompt, response), (prompt_r, response_r)) in pairs:
        assert prompt == prompt_r
        problem = flawed.problem(i)
        links = flawed.slipped_links(problem, i)
        minus += sum(d.parent is not None and d.op == "-" for d in problem.definitions)
        slipped += len(links)
        assert all(problem.definitions[ord(x) - ord("a")].op == "-" for x in links)
        assert response[:-1] == VOCAB.encode(right.response_text(problem, links))
        # the verifier judges the true value: a slip that changes the answer scores 0
        answer_changed = (
            VOCAB.decode(response).split(">")[1] != VOCAB.decode(response_r).split(">")[1]
        )
        assert flawed.score(prompt, response)[0] == (0.0 if answer_changed else 1.0)
    # 0.6 of the `-` links slip, within 4 binomial standard errors
    assert abs(slipped / minus - 0.6) < 4 * np.sqrt(0.24 / minus)


def test_registered():
    task = tasks.make("branches")
    assert isinstance(task, BranchesTask) and task.name == "branches"
    assert task.cfg == BranchesConfig()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(chains=1), "chains"),
        (dict(chain_length=1), "chain_length"),
        (dict(chains=9, chain_length=3), r"chains \* chain_length"),
        (dict(modulus=1), "modulus"),
        (dict(modulus=1001), "modulus"),
        (dict(ops=("/",)), "ops"),
        (dict(ops=()), "ops"),
        (dict(ops=("+", "+")), "ops"),
        (dict(slip=-0.1), "slip"),
        (dict(slip=1.5), "slip"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BranchesConfig(**kwargs)


def test_bad_prompt():
    with pytest.raises(ValueError, match="not a branches-task prompt"):
        TASK.score([BOS, *VOCAB.encode("1,2,3:6")], ids(">6"))
    with pytest.raises(ValueError, match="missing variable"):
        TASK.labels([BOS, *VOCAB.encode("a=b+1=?;?a")], ids(">6"))


@pytest.mark.parametrize(
    "cfg",
    [
        BranchesConfig(chains=3, chain_length=2, modulus=5, substitute=True),
        BranchesConfig(chains=2, chain_length=4, modulus=100),
        BranchesConfig(chains=4, chain_length=3, modulus=10, substitute=True, answer_only=True),
    ],
)
def test_max_lengths_bound_every_problem_and_are_reached(cfg):
    task = BranchesTask(cfg)
    pairs = task.demonstrations(0, 300, flawed=False)
    prompt_len, response_len = branches.max_lengths(cfg)
    assert max(len(p) for p, _ in pairs) <= prompt_len
    assert max(len(r) for _, r in pairs) <= response_len
    # reached when every number has the most digits: constants m - 1 and `+` keep the values
    # at m - 1, m - 2, ... (as wide as m - 1 for these moduli)
    widest = Problem(
        tuple(
            Definition(
                "abcdefghijklmnopqrstuvwxyz"[i],
                cfg.modulus - 1,
                None if i < cfg.chains else "abcdefghijklmnopqrstuvwxyz"[i - cfg.chains],
            )
            for i in range(cfg.chains * cfg.chain_length)
        ),
        query="abcdefghijklmnopqrstuvwxyz"[cfg.chains * cfg.chain_length - 1],
    )
    prompt = [BOS, *VOCAB.encode(task.prompt_text(widest))]
    response = [*VOCAB.encode(task.response_text(widest)), EOS]
    assert len(prompt) == prompt_len
    assert len(response) == response_len
