"""Reward functions as plain Python (`ftjax.tasks.rewards`): loading, the call (TRL's keywords, row
fields), weights, answer spans and their default rule, loud failures naming the row, and a text
task scoring a rollout through them."""

import math
import textwrap

import numpy as np
import pytest

from ftjax import rollout, sampling
from ftjax.tasks import data, rewards
from ftjax.tasks import text as text_task

REWARDS_PY = '''
calls = []

def length(prompts, completions, **kwargs):
    calls.append(sorted(kwargs))
    return [float(len(c)) for c in completions]

def has_seven(prompts, completions, ground_truth, topic, **kwargs):
    scores = [1.0 if "7" in c else 0.0 for c in completions]
    spans = [(c.index("7"), c.index("7") + 1) if "7" in c else None for c in completions]
    return scores, spans

def echo_ids(completions, completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]

def boom(prompts, completions, **kwargs):
    if any("bad" in c for c in completions):
        raise ZeroDivisionError("no bad allowed")
    return [0.0] * len(completions)

def batch_only(prompts, completions, **kwargs):
    if len(completions) > 1:
        raise RuntimeError("too many")
    return [0.0]

def gives_none(prompts, completions, **kwargs):
    return [None] * len(completions)

def too_few(prompts, completions, **kwargs):
    return [1.0]

def bad_span(prompts, completions, **kwargs):
    return [1.0] * len(completions), [(0, 10_000)] * len(completions)

def nan(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)

def text(prompts, completions, **kwargs):
    return "1.0"
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent(REWARDS_PY))
    return path


def batch(completions, topics=("a", None)):
    n = len(completions)
    rows = [{"question": f"q{i}", "answer": "7"} for i in range(n)]
    for i, row in enumerate(rows):
        if topics[i % len(topics)] is not None:
            row["topic"] = topics[i % len(topics)]
    return rewards.RewardBatch(
        prompts=[f"q{i}" for i in range(n)],
        completions=list(completions),
        completion_ids=[list(range(len(c))) for c in completions],
        fields=rewards.row_fields(rows, ["7"] * n),
        sources=[f"f.jsonl:{i + 1}" for i in range(n)],
    )


def spec(path, name):
    return f"{path}:{name}"


def test_row_fields_are_the_columns_less_reserved_names_plus_ground_truth():
    rows = [{"prompt": "p", "answer": "7", "level": 3}, {"answer": "8", "extra": [1]}, None]
    fields = rewards.row_fields(rows, ["7", "8", "9"])
    assert fields == {
        "answer": ["7", "8", None],
        "level": [3, None, None],
        "extra": [None, [1], None],
        "ground_truth": ["7", "8", "9"],
    }
    assert rewards.row_fields([{"ground_truth": "x"}], ["7"])["ground_truth"] == ["x"]


def test_weighted_sum_parts_and_keywords(reward_file):
    cfg = rewards.RewardConfig(
        (spec(reward_file, "length"), spec(reward_file, "has_seven")), (0.5, 2.0)
    )
    scorer = rewards.Rewards(cfg, verifier="gsm8k")
    scored = scorer(batch(["so 7", "no idea"]))
    assert scored.rewards == [0.5 * 4 + 2.0, 0.5 * 7]
    assert scored.parts[spec(reward_file, "length")] == [4.0, 7.0]
    module = rewards._module(reward_file)
    assert module.calls[-1] == ["answer", "completion_ids", "ground_truth", "question", "topic"]
    assert rewards.Rewards(rewards.RewardConfig((spec(reward_file, "echo_ids"),)), "math")(
        batch(["abc"])
    ).rewards == [3.0]


def test_spans_first_given_then_verifier_then_final_line(reward_file):
    given = rewards.Rewards(
        rewards.RewardConfig((spec(reward_file, "length"), spec(reward_file, "has_seven"))),
        verifier="gsm8k",
    )
    completions = ["x 7 y #### 12", "work\n#### 12\n", "line one\n  last line  \n\n", "", " \n"]
    scored = given(batch(completions))
    assert scored.spans[0] == (2, 3)  # has_seven's span beats the verifier's
    assert scored.spans[1] == (10, 12)  # the verifier's: GSM8K's final number
    start = completions[2].index("last line")
    assert scored.spans[2] == (start, start + len("last line"))  # the last line, stripped
    assert scored.spans[3] is None and scored.spans[4] is None
    assert rewards.final_line_span("a\nb") == (2, 3)
    builtin = rewards.Rewards(rewards.RewardConfig(("verifier",)), verifier="gsm8k")
    scored = builtin(batch(["#### 7", "#### 8", "nothing"]))
    assert scored.rewards == [1.0, 0.0, 0.0]
    assert scored.spans[:2] == [(5, 6), (5, 6)] and scored.spans[2] == (0, 7)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("boom", r"reward .*:boom on row 1 of 3 \(f.jsonl:2\): prompt 'q1', completion 'bad'"),
        ("batch_only", "every row alone passes"),
        ("gives_none", r"row 0 of 3 .* score None is not a number"),
        ("too_few", "returned 1 scores for 3 completions"),
        ("bad_span", r"span \(0, 10000\) is not None or \(start, end\)"),
        ("text", "returned str"),
    ],
)
def test_failures_are_loud_and_name_the_row(reward_file, name, message):
    scorer = rewards.Rewards(rewards.RewardConfig((spec(reward_file, name),)), verifier="math")
    with pytest.raises(rewards.RewardError, match=message) as raised:
        scorer(batch(["good", "bad", "fine"]))
    if name == "boom":
        assert isinstance(raised.value.__cause__, ZeroDivisionError)
        assert "no bad allowed" in str(raised.value)


def test_nan_is_a_score_the_step_will_skip(reward_file):
    scorer = rewards.Rewards(
        rewards.RewardConfig((spec(reward_file, "nan"), spec(reward_file, "length"))), "math"
    )
    assert all(math.isnan(r) for r in scorer(batch(["a", "b"])).rewards)


def test_bad_configs_are_refused(reward_file, tmp_path):
    for bad in ("my_rewards.py", "rewards.txt:fn", "my_rewards.py:not-a-name", ""):
        with pytest.raises(ValueError, match="is not 'path/to/file.py:function_name'"):
            rewards.RewardConfig((bad,))
    with pytest.raises(ValueError, match="2 reward weights"):
        rewards.RewardConfig((spec(reward_file, "length"),), (1.0, 2.0))
    with pytest.raises(ValueError, match="finite"):
        rewards.RewardConfig((spec(reward_file, "length"),), (float("nan"),))
    with pytest.raises(ValueError, match="does not exist"):
        rewards.load(spec(tmp_path / "missing.py", "fn"), "math")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        rewards.load(spec(reward_file, "nope"), "math")


class CharTokenizer:
    """One token per character (ids 3...), BOS 1, EOS 2 decoding to nothing."""

    alphabet = "0123456789 #+-=x.?\nabcdefghijklmnopqrstuvwxyz"
    bos_id, eos_id = 1, 2

    def encode(self, text, add_bos=True):
        return ([1] if add_bos else []) + [3 + self.alphabet.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i - 3] for i in ids if i >= 3)


def char_task(reward_cfg):
    tok = CharTokenizer()
    cfg = text_task.TextTaskConfig(template="plain", verifier="gsm8k", instruction="")
    rows = [{"question": f"q{i}", "answer": str(i), "topic": "t"} for i in range(3)]
    examples = [
        data.Example(f"q{i}", str(i), source=f"f.jsonl:{i + 1}", row=row)
        for i, row in enumerate(rows)
    ]
    kept, ids, _ = text_task.encode_prompts(examples, tok, cfg, max_tokens=16)
    return text_task.TextTask(kept, ids, tok, cfg, reward=reward_cfg), tok


def test_text_task_scores_a_rollout_through_the_functions(reward_file):
    cfg = rewards.RewardConfig((spec(reward_file, "has_seven"), spec(reward_file, "length")))
    task, tok = char_task(cfg)
    prompts = task.prompts(0, 2)
    responses = [tok.encode("ab 7 c", add_bos=False) + [2], tok.encode("zz\nlast", add_bos=False)]
    tokens = np.full((2, 8), 0, np.int32)
    for b, r in enumerate(responses):
        tokens[b, : len(r)] = r
    got = sampling.Rollout(
        tokens_BxN=tokens,
        lengths_B=np.array([len(r) for r in responses]),
        log_probs_BxN=np.zeros((2, 8), np.float32),
        done_B=np.array([True, False]),
    )
    prompt_BxL, valid_BxL = rollout.left_pad(prompts, 8, 0)
    out = rollout.rollout_batch(task, prompts, got, prompt_BxL, valid_BxL, group_size=1)
    np.testing.assert_array_equal(np.asarray(out.rewards_B), [1.0 + 6, 0.0 + 7])
    answer = np.asarray(out.answer_mask_BxT)[:, 8:]
    assert answer[0].tolist() == [False, False, False, True] + [False] * 4  # the "7"
    assert answer[1].tolist() == [False] * 3 + [True] * 4 + [False]  # the last line
    assert task.token_strings(responses[1]) == list("zz\nlast")
    plain, _ = char_task(None)
    assert plain.fingerprint() != task.fingerprint()  # the reward files are part of the task


def test_a_nan_reward_reaches_the_batch(reward_file):
    task, tok = char_task(rewards.RewardConfig((spec(reward_file, "nan"),)))
    reward, span = task.score(task.prompts(0, 1)[0], tok.encode("12", add_bos=False))
    assert math.isnan(reward) and span == [True, True]  # the default: the last line, "12"
