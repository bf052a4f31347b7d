"""Credit precision against ground truth: expected top-k membership under random tie-breaks is
checked against enumerating every tie-break order; precision on hand-built cases; the
position-controlled pairwise AUC against a double loop (tests/reference_credit.py)."""

import itertools
import math

import numpy as np
import pytest
import reference_credit as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from ftjax import evaluation


def brute_selection_probability(score, eligible, fraction):
    """Average top-k membership over every ordering of the eligible tokens that sorts them by
    score (ties in every possible order)."""
    idx = [i for i in range(len(score)) if eligible[i]]
    n = len(idx)
    k = math.ceil(fraction * n - 1e-12) if n else 0
    counts = np.zeros(len(score))
    total = 0
    for perm in itertools.permutations(idx):
        if any(score[perm[j]] < score[perm[j + 1]] for j in range(n - 1)):
            continue  # not a descending order
        total += 1
        for i in perm[:k]:
            counts[i] += 1
    return counts / total if total else counts


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5]), min_size=1, max_size=7),
    st.data(),
    st.sampled_from([0.2, 0.4, 0.5, 1.0]),
)
def test_selection_probability_matches_enumeration(score, data, fraction):
    eligible = data.draw(st.lists(st.booleans(), min_size=len(score), max_size=len(score)))
    got = evaluation.selection_probability(score, eligible, fraction)
    want = brute_selection_probability(score, eligible, fraction)
    np.testing.assert_allclose(got, want, atol=1e-12)
    n = sum(eligible)
    assert got.sum() == pytest.approx(math.ceil(fraction * n - 1e-12) if n else 0)


def test_precision_hand_built():
    # 5 response tokens + answer; essential are tokens 0 and 1.
    essential = np.array([[1, 1, 0, 0, 0, 0]], bool)
    answer = np.array([[0, 0, 0, 0, 0, 1]], bool)
    response = np.ones((1, 6), bool)
    perfect = np.array([[1.5, 1.5, 1, 1, 1, 1]])  # top ceil(0.4*6)=3: tokens 0, 1 + a 1/4 share
    # Selected mass: 1 + 1 on essential, 4 ties share 1 slot (answer gets 1/4, not counted).
    got = evaluation.precision(perfect, essential, answer, response, 0.4)
    assert got == pytest.approx(2 / (2 + 3 / 4))
    uniform = np.ones((1, 6))  # no preference: the base rate of the non-answer tokens
    assert evaluation.precision(uniform, essential, answer, response, 0.4) == pytest.approx(2 / 5)
    worst = np.array([[1, 1, 1.5, 1.5, 1.5, 1]])
    assert evaluation.precision(worst, essential, answer, response, 0.4) == 0.0


def test_precision_without_selection_is_nan():
    empty = np.zeros((1, 3), bool)
    assert math.isnan(evaluation.precision(np.ones((1, 3)), empty, empty, empty, 0.4))


# ----------------------------------------------------------------------------- pairwise AUC

AUC_KEYS = ("auc", "pairs", "essential_first", "essential_first_pairs", "essential_later",
            "essential_later_pairs")  # fmt: skip


def _same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(AUC_KEYS) and sorted(want) == sorted(AUC_KEYS)
    for key in AUC_KEYS:
        if isinstance(want[key], float) and math.isnan(want[key]):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(want[key], abs=1e-12), key


@st.composite
def auc_cases(draw):
    """B x T scores from a few values (many ties, -inf included), random essential, eligible
    and role masks."""
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    cells = lambda strategy: st.lists(  # noqa: E731
        st.lists(strategy, min_size=T, max_size=T), min_size=B, max_size=B
    )
    score = draw(cells(st.sampled_from([-math.inf, -1.0, 0.0, 0.5, 2.0])))
    essential, eligible = draw(cells(st.booleans())), draw(cells(st.booleans()))
    role = draw(cells(st.integers(0, 2)))
    return [np.asarray(x) for x in (score, essential, eligible, role)]


@settings(max_examples=150, deadline=None)
@given(auc_cases())
def test_pairwise_auc_matches_the_double_loop(arrays):
    _same(evaluation.pairwise_auc(*arrays), ref.pairwise_auc(*arrays))


@settings(max_examples=60, deadline=None)
@given(auc_cases())
def test_pairwise_auc_of_the_complement_is_one_minus(arrays):
    """Swapping essential and non-essential (among eligible tokens) swaps every pair: the AUC
    becomes 1 - AUC and the two splits trade places."""
    score, essential, eligible, role = arrays
    got = evaluation.pairwise_auc(score, essential, eligible, role)
    swapped = evaluation.pairwise_auc(score, ~essential, eligible, role)
    assert swapped["pairs"] == got["pairs"]
    assert swapped["essential_first_pairs"] == got["essential_later_pairs"]
    if got["pairs"]:
        assert swapped["auc"] == pytest.approx(1.0 - got["auc"], abs=1e-12)
    if got["essential_later_pairs"]:
        assert swapped["essential_first"] == pytest.approx(1.0 - got["essential_later"])


def test_position_only_score_wins_every_earlier_pair_and_loses_every_later_one():
    rng = np.random.default_rng(0)
    essential = rng.random((4, 30)) < 0.3
    eligible = rng.random((4, 30)) < 0.8
    role = rng.integers(0, 2, (4, 30))
    score = evaluation.position_score_BxT(eligible)
    assert score.shape == (4, 30)
    got = evaluation.pairwise_auc(score, essential, eligible, role)
    assert got["essential_first_pairs"] > 20 and got["essential_later_pairs"] > 20
    assert got["essential_first"] == 1.0 and got["essential_later"] == 0.0
    assert got["auc"] == pytest.approx(got["essential_first_pairs"] / got["pairs"])
    _same(got, ref.pairwise_auc(score, essential, eligible, role))


def test_pairwise_auc_by_hand():
    """Tokens 0-5, token 5 not eligible (the answer); essential 1 and 3. Roles: 0 0 1 1 1 0, so
    the pairs are (1, 0) and (3, 2), (3, 4); (1, 5) is not eligible."""
    score = np.array([[0.2, 0.9, 0.5, 0.5, 0.7, 9.0]])
    essential = np.array([[0, 1, 0, 1, 0, 0]], bool)
    eligible = np.array([[1, 1, 1, 1, 1, 0]], bool)
    role = np.array([[0, 0, 1, 1, 1, 0]])
    got = evaluation.pairwise_auc(score, essential, eligible, role)
    # (1, 0): 0.9 > 0.2 wins, later; (3, 2): tie, later; (3, 4): 0.5 < 0.7 loses, first.
    want = dict(auc=1.5 / 3, pairs=3, essential_first=0.0, essential_first_pairs=1,
                essential_later=0.75, essential_later_pairs=2)  # fmt: skip
    _same(got, want)
    one_role = evaluation.pairwise_auc(score, essential, eligible)  # role None: one role
    assert one_role["pairs"] == 2 * 3  # each essential token against tokens 0, 2, 4


def test_pairwise_auc_without_pairs_is_nan():
    got = evaluation.pairwise_auc(np.ones((1, 3)), np.ones((1, 3), bool), np.ones((1, 3), bool))
    assert got["pairs"] == 0 and math.isnan(got["auc"]) and math.isnan(got["essential_first"])


@pytest.mark.parametrize("bad", ["essential_BxT", "eligible_BxT", "role_BxT"])
def test_pairwise_auc_rejects_a_mask_of_another_shape(bad):
    args = dict(
        score_BxT=np.zeros((2, 4)),
        essential_BxT=np.zeros((2, 4), bool),
        eligible_BxT=np.ones((2, 4), bool),
        role_BxT=np.zeros((2, 4), int),
    )
    args[bad] = args[bad][:, :3]
    with pytest.raises(ValueError, match=bad):
        evaluation.pairwise_auc(**args)


def test_pairwise_auc_rejects_nan_scores_and_non_2d_input():
    with pytest.raises(ValueError, match="NaN"):
        evaluation.pairwise_auc(np.array([[0.0, np.nan]]), [[1, 0]], [[1, 1]])
    with pytest.raises(ValueError, match="score_BxT"):
        evaluation.pairwise_auc(np.zeros(3), np.zeros(3, bool), np.ones(3, bool))
    with pytest.raises(ValueError, match="response_BxT"):
        evaluation.position_score_BxT(np.ones(3, bool))


@pytest.mark.parametrize("window", [None, 1, 3])
def test_attention_scores_match_the_loop_references_and_rank_like_the_credits(window):
    """The raw scores against tests/reference_credit.py's loops, per row; and their top 40%
    is exactly the set the credit variants of the same name give gamma (same tie rule)."""
    import jax.numpy as jnp

    from ftjax import credit

    B, T = 3, 11
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(B, T, T))
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    prompt = np.zeros((B, T), bool)
    prompt[:, 1:4] = True
    response = np.zeros((B, T), bool)
    response[0, 4:9] = True  # padding on both sides
    response[1, 4:11] = True
    response[2, 4:10] = True
    got = evaluation.attention_scores(attn, prompt, response, window)
    assert sorted(got) == sorted(evaluation.ATTENTION_SCORES)
    for name, score in got.items():
        for b in range(B):
            want = ref.POINTWISE_ATTENTION[name](attn[b], prompt[b] | response[b], window)
            np.testing.assert_allclose(score[b], want, rtol=0, atol=1e-12, err_msg=name)
        inputs = credit.CreditInputs(
            prompt_mask_BxT=jnp.asarray(prompt),
            response_mask_BxT=jnp.asarray(response),
            answer_mask_BxT=jnp.zeros((B, T), bool),
            attn_BxTxT=jnp.asarray(attn, jnp.float32),
        )
        cfg = credit.CreditConfig(name=name, attention_window=window)
        selected = np.asarray(credit.compute(inputs, cfg)) > 1.0
        top = np.asarray(
            credit.top_fraction_mask(jnp.asarray(score), jnp.asarray(response), cfg.top_fraction)
        )
        np.testing.assert_array_equal(selected, top, err_msg=name)


def test_attention_scores_reject_a_map_of_another_shape():
    with pytest.raises(ValueError, match="attn_BxTxT"):
        evaluation.attention_scores(np.zeros((1, 4, 3)), np.ones((1, 4), bool), np.ones((1, 4)))


def test_layout_places_each_response_after_the_prompt_slots():
    from ftjax import train

    batch = train.Batch(*(np.zeros((2, 7)),) * 5, old_log_probs_BxT=np.zeros((2, 7)))
    got = evaluation.Sampled(prompts=[[1], [2]], batch=batch, responses=[[5, 6], [7]],
                             prompt_slots=4)  # fmt: skip
    ids = evaluation.layout(got, lambda p, r: [p[0] * 10 + t for t in r], dtype=int, fill=-1)
    np.testing.assert_array_equal(ids, [[-1, -1, -1, -1, 15, 16, -1], [-1, -1, -1, -1, 27, -1, -1]])
    with pytest.raises(ValueError, match="entries for a response of 2 tokens"):
        evaluation.layout(got, lambda p, r: [True])
