"""experiments.gemma_causal's own pieces, hand-checked: the copied answer value, the token
classes, the masking arms on the maskable set, the position-matched sampler, the class shares;
and the whole script end to end on a tiny random Gemma-3-shaped model with a one-character
tokenizer and scripted responses (no Gemma download)."""

import json
import re
import types

import numpy as np
import pytest
import test_overrides
from flax import nnx

from experiments import common, gemma_causal, gemma_tokens
from experiments.gemma_tokens import (
    class_shares,
    copied_value_tokens,
    position_matched,
    question_names,
    ranked_ends,
    token_class,
)
from ftjax import overrides
from ftjax.models import config as model_config
from ftjax.models.transformer import Transformer


def offsets_of(pieces):
    """(start, end) of each piece in their concatenation."""
    ends = np.cumsum([len(p) for p in pieces]).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


# ------------------------------------------------------------------------ the copied value


def test_copied_value_is_the_tokens_of_the_last_reasoning_number():
    pieces = ["k", " =", " n", " +", " ", "1", " =", " ", "6", " +", " ", "1", " =", " ", "1",
              "7", ".", " Answer", ":", " ", "1", "7"]  # fmt: skip
    text = "".join(pieces)
    reasoning = text[: text.index("Answer:")]
    assert reasoning == "k = n + 1 = 6 + 1 = 17. "
    assert copied_value_tokens(offsets_of(pieces), reasoning) == [14, 15]  # "1", "7" of 17


def test_copied_value_takes_a_token_that_only_partly_overlaps_the_number():
    pieces = ["x", " =", " 12.", " Answer:", " 12"]
    text = "".join(pieces)
    assert copied_value_tokens(offsets_of(pieces), text[: text.index("Answer:")]) == [2]
    pieces = ["y = 2.", "5", ". ", "Answer: 2.5"]  # the last number is 2.5, over two tokens
    text = "".join(pieces)
    assert copied_value_tokens(offsets_of(pieces), text[: text.index("Answer:")]) == [0, 1]


def test_copied_value_leaves_out_tokens_past_the_reasoning_and_needs_a_number():
    pieces = ["z", " = 4 + ", "3 = ", "7. Answer", ": 7"]  # "7" shares a token with "Answer"
    text = "".join(pieces)
    assert copied_value_tokens(offsets_of(pieces), text[: text.index("Answer:")]) == []
    assert copied_value_tokens(offsets_of(["so", " it", " is"]), "so it is") == []


# ------------------------------------------------------------------------- token classes


def test_question_names_are_its_single_letter_words():
    assert question_names("m = 3. n = 6. k = n + 1. What is k?\n") == {"m", "n", "k"}
    assert question_names("Is a x2 or ab?") == {"a"}


@pytest.mark.parametrize(
    "piece, want",
    [
        (" =", "delimiter"), (".", "delimiter"), (",", "delimiter"), (":", "delimiter"),
        (";", "delimiter"), ("(", "delimiter"), (")", "delimiter"), (" ", "delimiter"),
        ("\n", "delimiter"), (" \n\n", "delimiter"), ("=.", "delimiter"),
        (" +", "operator"), ("-", "operator"), ("*", "operator"), (" /", "operator"),
        (" k", "variable"), ("n", "variable"),
        (" x", "word"), (" Answer", "word"), ("is", "word"), (" K", "word"),
        ("7", "number"), (" 12", "number"), ("3.5", "number"),
        ("7.", "other"), ("", "other"), ("k=", "other"), ("=+", "other"), ("$", "other"),
    ],
)  # fmt: skip
def test_token_class_of_hand_picked_pieces(piece, want):
    assert token_class(piece, frozenset({"k", "n"})) == want


# --------------------------------------------------------------------------- masking arms


def test_ranked_ends_break_ties_as_masked_sets_does():
    rng = np.random.default_rng(3)
    for _ in range(20):
        score_T = rng.integers(0, 3, 17).astype(float)  # many ties
        eligible_T = rng.random(17) < 0.7
        top_T, bottom_T = ranked_ends(score_T, eligible_T, 0.3)
        sets = common.masked_sets(score_T, eligible_T, 0.3, np.random.default_rng(0))
        assert (top_T == sets["top"]).all() and (bottom_T == sets["bottom"]).all()


def arm_example():
    """30 slots; reasoning at 5..24 (20 tokens), the copied value at 23 and 24 with the
    highest flow and attention; the maskable set is 5..22 (18 tokens)."""
    reasoning_T = np.zeros(30, bool)
    reasoning_T[5:25] = True
    copied_T = np.zeros(30, bool)
    copied_T[[23, 24]] = True
    tau_T = np.zeros(30)
    tau_T[5:25] = np.arange(20) % 7  # ties; the largest maskable values are 6 at 11 and 18
    tau_T[[23, 24]] = 100.0
    received_T = np.zeros(30)
    received_T[5:23] = np.arange(18)[::-1]  # the earliest maskable tokens rank first
    received_T[[23, 24]] = 100.0
    return tau_T, {"attention_received": received_T}, reasoning_T, copied_T


@pytest.mark.parametrize("fraction, count", [(0.1, 2), (0.2, 4), (0.5, 9), (1.0, 18)])
def test_ranked_arms_take_ceil_fraction_of_the_maskable_set_never_the_copied_value(fraction, count):
    tau_T, attention, reasoning_T, copied_T = arm_example()
    arms = gemma_tokens.arm_masks(
        tau_T, attention, reasoning_T, copied_T, fraction, 2, np.random.default_rng(0)
    )
    assert set(arms) == {"top", "random", "bottom", "position_matched", "copied_value",
                         "attention_received"}  # fmt: skip
    maskable_T = reasoning_T & ~copied_T
    for arm in ("top", "random", "bottom", "position_matched", "attention_received"):
        assert arms[arm].sum() == count, arm
        assert not (arms[arm] & ~maskable_T).any(), arm
    assert (arms["copied_value"] == copied_T).all()
    assert np.flatnonzero(arms["attention_received"]).tolist() == list(range(5, 5 + count))


def test_top_and_bottom_arms_are_the_hand_ranked_tokens():
    tau_T, attention, reasoning_T, copied_T = arm_example()
    arms = gemma_tokens.arm_masks(
        tau_T, attention, reasoning_T, copied_T, 0.2, 2, np.random.default_rng(0)
    )
    # maskable tau at 5..22 is 0..6, 0..6, 0..3: 6 at 11, 18; then 5 at 10, 17
    assert np.flatnonzero(arms["top"]).tolist() == [10, 11, 17, 18]
    # 0 at 5, 12, 19, then 1 at 6, 13, 20: of the tied 1s the latest (20) ranks lowest
    assert np.flatnonzero(arms["bottom"]).tolist() == [5, 12, 19, 20]


# ---------------------------------------------------------------- the position-matched arm


def dense_example():
    """100 maskable tokens, the top arm at the end of the range."""
    maskable_T = np.ones(100, bool)
    top_T = np.zeros(100, bool)
    top_T[[80, 81, 82, 90, 99]] = True
    return top_T, maskable_T


def test_position_matched_is_deterministic_given_the_generator():
    top_T, maskable_T = dense_example()
    draws = [position_matched(top_T, maskable_T, 3, np.random.default_rng(s)) for s in range(6)]
    again = [position_matched(top_T, maskable_T, 3, np.random.default_rng(s)) for s in range(6)]
    assert all((a == b).all() for a, b in zip(draws, again, strict=True))
    assert len({tuple(d) for d in draws}) > 1  # it is random: seeds differ


def test_position_matched_avoids_top_tokens_and_stays_in_the_radius():
    top_T, maskable_T = dense_example()
    anchors = np.flatnonzero(top_T)
    distances = []
    for seed in range(20):
        picks = position_matched(top_T, maskable_T, 3, np.random.default_rng(seed))
        assert len(set(picks.tolist())) == len(anchors)  # distinct
        assert not top_T[picks].any()
        distances += np.abs(picks - anchors).tolist()
    # The pool is dense: always inside the radius, and the whole window is used, not only the
    # nearest free token.
    assert max(distances) == 3 and min(distances) == 1


def test_position_matched_takes_the_nearest_free_token_outside_the_radius():
    maskable_T = np.zeros(30, bool)
    maskable_T[[0, 10, 11, 25]] = True
    top_T = np.zeros(30, bool)
    top_T[[0, 11]] = True
    # anchor 0: the pool is {10, 25}, nearest 10 is beyond radius 2, so 10; anchor 11: {25}.
    picks = position_matched(top_T, maskable_T, 2, np.random.default_rng(0))
    assert picks.tolist() == [10, 25]
    # no other token left: the top tokens stand in for themselves (nearest first)
    picks = position_matched(top_T, top_T, 0, np.random.default_rng(0))
    assert picks.tolist() == [0, 11]


def test_position_matched_matches_top_positions_far_better_than_plain_random():
    top_T, maskable_T = dense_example()
    anchors = np.flatnonzero(top_T)
    matched, plain = [], []
    for seed in range(50):
        rng = np.random.default_rng(seed)
        picks = np.sort(position_matched(top_T, maskable_T, 3, rng))
        matched.append(np.abs(picks - anchors).mean())
        random_T = common.masked_sets(np.zeros(100), maskable_T, 0.05, rng)["random"]
        plain.append(np.abs(np.flatnonzero(random_T) - anchors).mean())
    assert np.mean(matched) <= 3 and np.mean(plain) > 20


# --------------------------------------------------------------------------- class shares


def slow_class_shares(classes, top, bottom):
    out = {}
    for name in gemma_tokens.TOKEN_CLASSES:
        row = {"count": sum(1 for c in classes if c == name)}
        for group, flags in (("all", [True] * len(classes)), ("top", top), ("bottom", bottom)):
            members = [c for c, f in zip(classes, flags, strict=True) if f]
            row[group] = sum(1 for c in members if c == name) / len(members) if members else None
        for group in ("top", "bottom"):
            ok = row["all"] and row[group] is not None
            row[f"{group}_ratio"] = row[group] / row["all"] if ok else None
        out[name] = row
    return out


def test_class_shares_by_hand():
    shares = class_shares(
        ["delimiter", "number", "number", "word"], [True, True, False, False],
        [False, False, True, True],
    )  # fmt: skip
    assert shares["delimiter"] == {"all": 0.25, "top": 0.5, "bottom": 0.0, "top_ratio": 2.0,
                                   "bottom_ratio": 0.0, "count": 1}  # fmt: skip
    assert shares["word"]["top_ratio"] == 0.0 and shares["word"]["bottom_ratio"] == 2.0
    assert shares["number"]["top_ratio"] == 1.0
    assert shares["operator"] == {"all": 0.0, "top": 0.0, "bottom": 0.0, "top_ratio": None,
                                  "bottom_ratio": None, "count": 0}  # fmt: skip
    empty = class_shares(["word", "number"], [False, False], [True, False])
    assert empty["word"]["top"] is None and empty["word"]["top_ratio"] is None


def test_class_shares_match_a_slow_loop():
    rng = np.random.default_rng(7)
    classes = rng.choice(gemma_tokens.TOKEN_CLASSES[:5], 60).tolist()  # "other" stays absent
    top, bottom = (rng.random(60) < 0.2).tolist(), (rng.random(60) < 0.2).tolist()
    got, want = class_shares(classes, top, bottom), slow_class_shares(classes, top, bottom)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys()
        for key, value in want[name].items():
            if value is None:
                assert got[name][key] is None, (name, key)
            else:
                assert got[name][key] == pytest.approx(value), (name, key)
    table = gemma_tokens.class_share_table("t", got)
    assert "| other | 0 | 0.000 | 0.000 | n/a |" in table


@pytest.mark.parametrize("argv", [["--fraction", "0"], ["--fraction", "1.5"], ["--chunk", "0"],
                                  ["--match_radius", "-1"], ["--problems", "0"]])  # fmt: skip
def test_the_config_rejects_settings_that_mean_nothing(argv):
    with pytest.raises(ValueError, match=argv[0].removeprefix("--")):
        overrides.apply(gemma_causal.GemmaCausalConfig(), argv)


def test_the_config_documents_every_field(capsys, monkeypatch):
    test_overrides.test_the_experiments_help_documents_every_field(
        gemma_causal.GemmaCausalConfig(), capsys, monkeypatch
    )


# ------------------------------------------------------------------ end to end, tiny model

ALPHABET = "0123456789 =+-.?:\nabcdefghijklmnopqrstuvwxyzAW"


class OneCharTokenizer:
    """Each character its own token (ids from 3); BOS 1."""

    bos_id, eos_id = 1, 2

    def encode(self, text, add_bos=True):
        return [1] * add_bos + [3 + ALPHABET.index(c) for c in text]

    def decode(self, ids):
        return "".join(ALPHABET[i - 3] for i in ids if i >= 3)


def solved(question):
    """The response a good few-shot model writes, as in the shots."""
    values = dict(re.findall(r"\b([a-z]) = (\d+)\.", question))
    name, parent, op, constant = re.search(r"([a-z]) = ([a-z]) ([+-]) (\d+)\.", question).groups()
    value = int(values[parent]) + (int(constant) if op == "+" else -int(constant))
    return (f"{name} = {parent} {op} {constant} = {values[parent]} {op} {constant} = {value}. "
            f"Answer: {value}")  # fmt: skip


def test_main_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    tok = OneCharTokenizer()
    cfg = model_config.tiny("gemma3", vocab_size=3 + len(ALPHABET))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    monkeypatch.setattr(gemma_causal.pretrained, "load",
                        lambda name: types.SimpleNamespace(model=model, tokenizer=tok))  # fmt: skip
    responses = []

    def scripted_generate(model, prompt_BxP, valid_BxP, rng, sampling_cfg):
        for prompt, valid in zip(np.asarray(prompt_BxP), np.asarray(valid_BxP), strict=True):
            question = tok.decode(prompt[valid].tolist())[len(gemma_causal.SHOTS) :]
            responses.append(solved(question))
        ids = [tok.encode(r, add_bos=False) for r in responses]
        N = max(map(len, ids))
        return types.SimpleNamespace(
            tokens_BxN=np.asarray([r + [0] * (N - len(r)) for r in ids]),
            lengths_B=np.asarray([len(r) for r in ids]),
        )

    monkeypatch.setattr(gemma_causal.sampling, "generate", scripted_generate)
    result = gemma_causal.main(["--problems", "4", "--chunk", "3", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "result.json").read_text()) == result
    written = (tmp_path / "result.md").read_text()
    assert "copied value alone" in written and "| token class |" in written
    assert result["responses_with_answer"] == 4 and result["copied_value_found"] == 4

    reasoning = [r[: r.index("Answer:")] for r in responses]  # one token per character
    copied = [gemma_tokens.last_number_span(r) for r in reasoning]
    maskable = [len(r) - (e - s) for r, (s, e) in zip(reasoning, copied, strict=True)]
    per_arm = np.mean([-(-n // 5) for n in maskable])  # ceil(0.2 n)
    for arm in gemma_causal.ARMS:
        assert set(result[arm]) == {"answer_change_rate", "correctness_flip_rate",
                                    "tokens_masked", "mean_position"}  # fmt: skip
        if arm != "copied_value":
            assert result[arm]["tokens_masked"] == pytest.approx(per_arm), arm
    positions = [i for s, e in copied for i in range(s, e)]  # the copied value's own positions
    assert result["copied_value"]["tokens_masked"] == pytest.approx(len(positions) / 4)
    assert result["copied_value"]["mean_position"] == pytest.approx(np.mean(positions))

    shares = result["token_classes"]["shares"]
    assert result["token_classes"]["reasoning_tokens"] == sum(map(len, reasoning))
    digits = sum(c.isdigit() for r in reasoning for c in r)
    assert shares["number"]["all"] == pytest.approx(digits / sum(map(len, reasoning)))
    assert shares["variable"]["count"] == 2 * len(reasoning)  # "k = n ..." names two
    assert shares["word"]["count"] == 0 and shares["other"]["count"] == 0
