"""Tests for ftjax.credit: every variant against the float64 loop references, plus properties.

Dims: B batch, T tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_credit as ref
from absl.testing import parameterized

from ftjax import credit
from ftjax.credit import (
    CreditConfig,
    CreditInputs,
    Variant,
    compute,
    get,
    names,
    register,
    selection_count,
)

BUILTIN_NEEDS = {
    "uniform": frozenset(),
    "flowtracer": frozenset({"attn_BxTxT"}),
    "flowtracer_soft": frozenset({"attn_BxTxT"}),
    "flowtracer_inverse": frozenset({"attn_BxTxT"}),
    "attention_received": frozenset({"attn_BxTxT"}),
    "attention_received_mean": frozenset({"attn_BxTxT"}),
    "attention_max": frozenset({"attn_BxTxT"}),
    "oracle": frozenset({"labels_BxT"}),
    "oracle_answer": frozenset({"labels_BxT"}),
    "random": frozenset({"rng"}),
    "entropy": frozenset({"entropy_BxT"}),
    "entropy_select": frozenset({"entropy_BxT"}),
}
VARIANTS = tuple(BUILTIN_NEEDS)
# Variants whose row b depends on row b of the inputs only (random's draws depend on B x T).
PER_ROW = (
    "uniform",
    "flowtracer",
    "flowtracer_soft",
    "flowtracer_inverse",
    "entropy",
    "attention_received",
    "attention_received_mean",
    "attention_max",
    "oracle",
    "oracle_answer",
)
POINTWISE = ("attention_received", "attention_received_mean", "attention_max")
# Hard variants: response tokens get exactly gamma (selected) or 1.
HARD = (
    "flowtracer",
    "flowtracer_inverse",
    "random",
    "entropy",
    *POINTWISE,
    "oracle",
    "oracle_answer",
)
# (top_fraction, gamma) pairs.
FRACTION_GAMMA = ((0.2, 1.5), (0.4, 1.5), (0.6, 2.0), (1.0, 0.5))
ATOL = 1e-5
# Random draws whose reference scores are closer than this (relative to the row's largest
# score) but not equal are rejected: float32 may order them either way.
MIN_REL_GAP = 1e-4


# ---------------------------------------------------------------------------------------------
# Test batches. Each row has a layout kind; all rows of a batch share T.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    prompt: np.ndarray  # bool B x T
    response: np.ndarray  # bool B x T
    answer: np.ndarray  # bool B x T
    attn: np.ndarray  # float32 B x T x T
    entropy: np.ndarray  # float32 B x T
    labels: np.ndarray  # bool B x T: ground-truth essential tokens, for `oracle`
    seed: int

    @property
    def valid(self) -> np.ndarray:
        return self.prompt | self.response

    def inputs(self, **overrides) -> CreditInputs:
        B, T = self.response.shape
        fields = dict(
            prompt_mask_BxT=jnp.asarray(self.prompt),
            response_mask_BxT=jnp.asarray(self.response),
            answer_mask_BxT=jnp.asarray(self.answer),
            attn_BxTxT=jnp.asarray(self.attn),
            log_probs_BxT=jnp.asarray(-self.entropy),
            entropy_BxT=jnp.asarray(self.entropy),
            tokens_BxT=jnp.arange(B * T, dtype=jnp.int32).reshape(B, T) % 7,
            rng=jax.random.key(self.seed),
            labels_BxT=jnp.asarray(self.labels),
        )
        fields.update(overrides)
        return CreditInputs(**fields)

    def reference(self, cfg: CreditConfig) -> np.ndarray:
        draws = None
        if cfg.name == "random":  # the variant ranks exactly these draws
            draws = np.asarray(jax.random.uniform(jax.random.key(self.seed), self.response.shape))
        return ref.credit(
            cfg.name,
            prompt_BxT=self.prompt,
            response_BxT=self.response,
            answer_BxT=self.answer,
            attn_BxTxT=self.attn,
            entropy_BxT=self.entropy,
            random_BxT=draws,
            labels_BxT=self.labels,
            top_fraction=cfg.top_fraction,
            gamma=cfg.gamma,
            select_fraction=cfg.select_fraction,
            attention_window=cfg.attention_window,
            sink=cfg.sink,
            source=cfg.source,
        )

    def padded(self, T: int) -> Case:
        """The same rows with T - self.T padding tokens appended (attention 0 there; entropy
        high and labels on there, so that a variant that forgets the response mask picks
        padding)."""
        B, T0 = self.response.shape
        extra = T - T0

        def pad(x, value=0):
            widths = [(0, 0), (0, extra)] + [(0, extra)] * (x.ndim - 2)
            return np.pad(x, widths, constant_values=value)

        return Case(
            pad(self.prompt),
            pad(self.response),
            pad(self.answer),
            pad(self.attn),
            pad(self.entropy, 5.0),
            pad(self.labels, True),
            self.seed,
        )


def stack_rows(*picks: tuple[Case, int]) -> Case:
    """A batch made of row b of case c for each (c, b) in picks (all with the same T)."""
    fields = [f.name for f in dataclasses.fields(Case) if f.name != "seed"]
    stacked = {f: np.stack([getattr(c, f)[b] for c, b in picks]) for f in fields}
    return Case(**stacked, seed=picks[0][0].seed)


def _hand_graph() -> np.ndarray:
    """0 = prompt, 1..3 = response, 3 = answer. By hand: h = [1, .625, .75, 1],
    f = [1, .625, .75, 1], so tau = [2, 1.25, 1.5, 2]."""
    A = np.zeros((4, 4))
    A[0, 0] = 1.0
    A[1, 0] = 1.0
    A[2, 0], A[2, 1] = 0.5, 0.5
    A[3, 1], A[3, 2] = 0.25, 0.75
    return A


def _hand_row(T: int, offset: int):
    prompt, response, answer = (np.zeros(T, bool) for _ in range(3))
    prompt[offset] = True
    response[offset + 1 : offset + 4] = True
    answer[offset + 3] = True
    A = np.zeros((T, T))
    A[offset : offset + 4, offset : offset + 4] = _hand_graph()
    return prompt, response, answer, A


def _layout(rng: np.random.Generator, T: int, kind: str):
    """prompt, response, answer masks of one row: [pad][prompt][response][pad]."""
    pad_left = int(rng.integers(0, 3))
    if kind in ("chain", "skip"):
        # 2 or 4 sources: every flow on a chain is then exact in float32 too
        n_prompt = int(rng.choice([2, 4]))
    else:
        n_prompt = int(rng.integers(2 if kind == "dead_prompt" else 1, 5))
    room = T - pad_left - n_prompt  # tokens left for the response and right padding
    n_resp = 1 if kind == "one_token" else room - min(int(rng.integers(0, 3)), room - 3)
    if n_resp < 1 or room < 3:
        raise ValueError(f"T={T} too small for layout {kind}")
    prompt = np.zeros(T, bool)
    response = np.zeros(T, bool)
    answer = np.zeros(T, bool)
    prompt[pad_left : pad_left + n_prompt] = True
    start = pad_left + n_prompt
    response[start : start + n_resp] = True
    if kind == "no_answer":
        return prompt, response, answer
    if kind == "one_token":
        answer[start] = True
    elif kind == "answer_mid" and n_resp >= 3:
        a0 = int(rng.integers(1, n_resp - 1))
        a1 = int(rng.integers(a0 + 1, n_resp))  # at least one response token after the answer
        answer[start + a0 : start + a1] = True
    elif kind == "skip":
        # the last even response offset is the answer
        answer[start + 2 * ((n_resp - 1) // 2)] = True
    else:
        n_ans = int(rng.integers(1, min(3, n_resp) + 1))
        if kind == "chain" and rng.random() < 0.5:
            n_ans = 1  # a one-token answer in the middle: the tail has tau == 0
            answer[start + n_resp // 2] = True
        else:
            answer[start + n_resp - n_ans : start + n_resp] = True
    return prompt, response, answer


def _attention(rng: np.random.Generator, kind: str, prompt, response, answer) -> np.ndarray:
    """Causal attention of one row: zero on padding queries and keys."""
    valid = prompt | response
    T = valid.shape[0]
    A = np.zeros((T, T))
    pos = np.flatnonzero(valid)
    if kind in ("chain", "skip"):
        # Every token attends to one earlier token with weight 1: flows are exactly 1 or 0, so
        # many tokens tie exactly in tau and in attention received.
        A[pos[0], pos[0]] = 1.0
        resp = np.flatnonzero(response)
        for j in range(1, len(pos)):
            k = pos[j]
            prev = pos[j - 1]
            if kind == "skip" and response[k]:
                r = int(np.searchsorted(resp, k))
                # even offsets chain through the previous even token; odd ones are dead ends
                prev = resp[r - 2] if r >= 2 and r % 2 == 0 else pos[j - 1]
            A[k, prev] = 1.0
        return A
    for j, k in enumerate(pos):
        A[k, pos[: j + 1]] = rng.dirichlet(np.full(j + 1, 0.7))
    if kind == "unreachable":
        # Answer queries attend only to the first answer token: no source reaches the answer.
        first = np.flatnonzero(answer)[0]
        for k in np.flatnonzero(answer):
            A[k] = 0.0
            A[k, first] = 1.0
    if kind == "dead_prompt":
        # Nobody attends to the first prompt token: a source with h == 0 (not live).
        p0 = np.flatnonzero(prompt)[0]
        A[p0 + 1 :, p0] = 0.0
    return A


def _separated(scores: np.ndarray, mask: np.ndarray) -> bool:
    vals = np.unique(scores[mask])
    if len(vals) < 2:
        return True
    scale = max(float(np.abs(vals).max()), 1e-30)
    return bool(np.diff(vals).min() > MIN_REL_GAP * scale)


def _row_separated(prompt, response, answer, A, entropy) -> bool:
    valid = prompt | response
    if answer.any() and not _separated(ref.flow_tau(A, prompt, answer, valid), response):
        return False
    for window in (None, 1, 3):
        for score in (ref.attention_received, ref.attention_received_mean):  # max is exact
            if not _separated(score(A, valid, window), response):
                return False
    return _separated(entropy.astype(np.float64), response)


def make_case(seed: int, T: int, kinds: tuple[str, ...], tied_entropy: bool = False) -> Case:
    rng = np.random.default_rng(seed)
    rows = []
    for kind in kinds:
        for _ in range(100):
            if kind == "hand":
                prompt, response, answer, A = _hand_row(T, int(rng.integers(0, T - 3)))
            else:
                prompt, response, answer = _layout(rng, T, kind)
                A = _attention(rng, kind, prompt, response, answer)
            if tied_entropy or rng.random() < 0.3:
                entropy = rng.choice([0.25, 0.5, 1.0], size=T)
                ent_ok = True
            else:
                entropy = rng.uniform(0.0, 3.0, size=T)
                ent_ok = _separated(entropy, response)
            entropy = entropy.astype(np.float32)
            if ent_ok and _row_separated(
                prompt, response, answer, A, np.zeros(T) if tied_entropy else entropy
            ):
                break
        else:
            raise RuntimeError(f"could not draw a well separated row of kind {kind}")
        rows.append((prompt, response, answer, A.astype(np.float32), entropy))
    prompt, response, answer, attn, entropy = (np.stack(x) for x in zip(*rows, strict=True))
    # Labels from their own stream (the rows above do not move), on prompt and padding slots
    # too (they must be ignored); the first row has none on its response (weight 1 everywhere).
    labels = np.random.default_rng(seed + 1000).random(response.shape) < 0.35
    labels[0] &= ~response[0]
    return Case(prompt, response, answer, attn, entropy, labels, seed)


# name: (native T, row kinds, every entropy tied). Every case is also run right-padded to
# T_MAX so that all of them share one compiled function per config (FlowTracer compiles in
# ~1.3 s on a CPU; eager FlowTracer costs about as much per call).
CASE_SPECS = {
    "short": (8, ("answer_end", "one_token", "no_answer", "answer_mid"), False),
    "hand": (12, ("hand", "answer_end", "hand", "unreachable"), False),
    "odd": (13, ("one_token", "dead_prompt", "skip", "answer_mid"), False),
    "ties": (16, ("chain", "skip", "chain", "answer_end"), True),
    "mixed": (24, ("answer_mid", "unreachable", "dead_prompt", "answer_end"), False),
    "long": (40, ("answer_end", "answer_mid", "no_answer", "unreachable"), False),
}
T_MAX = 40


@functools.cache
def native_case(name: str) -> Case:
    T, kinds, tied = CASE_SPECS[name]
    return make_case(sorted(CASE_SPECS).index(name) + 11, T, kinds, tied)


@functools.cache
def case(name: str) -> Case:
    return native_case(name).padded(T_MAX)


@functools.cache
def _jitted(cfg: CreditConfig):
    return jax.jit(lambda inputs: compute(inputs, cfg))


def run(c: Case, cfg: CreditConfig, **overrides) -> np.ndarray:
    """compute() under jit; one compilation per (cfg, shapes)."""
    got = _jitted(cfg)(c.inputs(**overrides))
    assert got.dtype == jnp.float32, got.dtype
    return np.asarray(got)


@functools.cache
def gamma_of(name: str, cfg: CreditConfig) -> np.ndarray:
    return run(case(name), cfg)


def _check(got, want) -> None:
    got = np.asarray(got)
    assert got.dtype == np.float32, got.dtype
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def _cfg(name: str, **kw) -> CreditConfig:
    return CreditConfig(name=name, **kw)


# (variant, top_fraction, gamma) of the reference comparison. FlowTracer compiles cost ~1 s
# each, so its controls get fewer: soft ignores top_fraction, and inverse at top_fraction 1
# selects the whole response.
MAIN_CONFIGS = [
    (v, tf, g)
    for v in VARIANTS
    if v != "entropy_select"
    for tf, g in {
        "flowtracer_soft": ((0.4, 1.5), (0.6, 2.0)),
        "flowtracer_inverse": FRACTION_GAMMA[:3],
    }.get(v, FRACTION_GAMMA)
]


# ---------------------------------------------------------------------------------------------
# The reference itself, on hand-computed graphs.
# ---------------------------------------------------------------------------------------------


def test_reference_tau_by_hand():
    tau = ref.flow_tau(_hand_graph(), [1, 0, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1])
    np.testing.assert_allclose(tau, [2.0, 1.25, 1.5, 2.0], rtol=1e-12)


def test_reference_flowtracer_by_hand():
    masks = dict(
        prompt_BxT=[[1, 0, 0, 0]],
        response_BxT=[[0, 1, 1, 1]],
        answer_BxT=[[0, 0, 0, 1]],
        attn_BxTxT=_hand_graph()[None],
    )
    np.testing.assert_array_equal(ref.credit("flowtracer", **masks, gamma=3.0), [[0, 1, 3, 3]])
    np.testing.assert_array_equal(
        ref.credit("flowtracer_inverse", **masks, gamma=3.0), [[0, 3, 3, 1]]
    )


def test_reference_conserves_flow():
    c = native_case("long")
    for b, reachable in enumerate([True, True, False, False]):  # no_answer, unreachable last
        tau = ref.flow_tau(c.attn[b], c.prompt[b], c.answer[b], c.valid[b])
        into_sink = tau[c.answer[b]].sum() / 2
        assert into_sink == pytest.approx(1.0 if reachable else 0.0, abs=1e-12)


def test_reference_chain_ties():
    c = native_case("ties")
    for b in (0, 1, 2):
        tau = ref.flow_tau(c.attn[b], c.prompt[b], c.answer[b], c.valid[b])[c.response[b]]
        assert set(tau) <= {0.0, 2.0} and (tau == 2.0).sum() >= 4


def test_reference_pointwise_attention_by_hand():
    """Key 0 is seen by queries 1, 2, 3 (0.5, 0.2, 0.3), key 1 by 2, 3 (0.8, 0.1), key 2 by 3
    (0.6), key 3 by none; query 2 is padding."""
    A = np.zeros((4, 4))
    A[1, 0] = 0.5
    A[2, 0], A[2, 1] = 0.2, 0.8
    A[3, 0], A[3, 1], A[3, 2] = 0.3, 0.1, 0.6
    valid = [True, True, False, True]
    np.testing.assert_allclose(ref.attention_received(A, valid, None), [0.8, 0.1, 0.6, 0])
    np.testing.assert_allclose(ref.attention_received_mean(A, valid, None), [0.4, 0.1, 0.6, 0])
    np.testing.assert_allclose(ref.attention_max(A, valid, None), [0.5, 0.1, 0.6, 0])
    np.testing.assert_allclose(ref.attention_received_mean(A, valid, 1), [0.5, 0, 0.6, 0])
    np.testing.assert_allclose(ref.attention_max(A, valid, 2), [0.5, 0.1, 0.6, 0])


def test_mean_attention_is_not_biased_to_early_tokens():
    """Every later query pays every key 0.1, and key 6 twice that: the sum still ranks the early
    tokens first (they have more later queries), the mean and the max rank key 6 first."""
    T = 10
    A = np.tril(np.full((T, T), 0.1), -1)
    A[7:, 6] = 0.2
    prompt, response = np.zeros((1, T), bool), np.ones((1, T), bool)
    prompt[0, 0], response[0, 0] = True, False
    inputs = CreditInputs(
        prompt_mask_BxT=jnp.asarray(prompt),
        response_mask_BxT=jnp.asarray(response),
        answer_mask_BxT=jnp.zeros((1, T), bool),
        attn_BxTxT=jnp.asarray(A[None], jnp.float32),
    )
    top1 = lambda name: np.flatnonzero(  # noqa: E731
        np.asarray(compute(inputs, _cfg(name, top_fraction=0.1, gamma=2.0)))[0] == 2.0
    )
    np.testing.assert_array_equal(top1("attention_received"), [1])
    np.testing.assert_array_equal(top1("attention_received_mean"), [6])
    np.testing.assert_array_equal(top1("attention_max"), [6])


def test_oracle_up_weights_exactly_the_labelled_response_tokens():
    c = native_case("mixed")
    for labels, want in (
        (np.zeros_like(c.labels), np.where(c.response, 1.0, 0.0)),
        (np.ones_like(c.labels), np.where(c.response, 2.0, 0.0)),
        (c.labels, np.where(c.response, np.where(c.labels, 2.0, 1.0), 0.0)),
    ):
        got = compute(c.inputs(labels_BxT=jnp.asarray(labels)), _cfg("oracle", gamma=2.0))
        _check(got, want)


def test_oracle_answer_adds_exactly_the_answer_span():
    c = native_case("mixed")
    assert (c.answer & c.response & ~c.labels).any()  # the case can tell the two apart
    for labels in (np.zeros_like(c.labels), c.labels):
        essential = (labels | c.answer) & c.response
        got = compute(c.inputs(labels_BxT=jnp.asarray(labels)), _cfg("oracle_answer", gamma=2.0))
        _check(got, np.where(c.response, np.where(essential, 2.0, 1.0), 0.0))


# ---------------------------------------------------------------------------------------------
# selection_count
# ---------------------------------------------------------------------------------------------

# (n, fraction, ceil(n * fraction) computed exactly). Several fail with naive float math:
# float64 ceil(100 * 0.07) = 8 and float32 ceil(50 * 0.3) = 16.
COUNTS = [
    (10, 0.4, 4), (3, 0.4, 2), (0, 0.4, 0), (1, 0.4, 1), (7, 1.0, 7), (0, 1.0, 0),
    (100, 0.07, 7), (50, 0.14, 7), (25, 0.28, 7), (50, 0.3, 15), (25, 0.6, 15),
    (100, 0.15, 15), (8192, 0.4, 3277), (100000, 0.3, 30000), (5, 0.2, 1), (6, 0.2, 2),
]  # fmt: skip


@pytest.mark.parametrize(("n", "fraction", "want"), COUNTS)
def test_selection_count_int(n, fraction, want):
    assert ref.selection_count(n, fraction) == want
    assert int(selection_count(n, fraction)) == want


class SelectionCountArrayTest(chex.TestCase):
    """selection_count on an int32 array, eager and under jit (chex variants)."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0.4, 0.07, 0.3, 0.6, 1.0, 0.2)
    def test_selection_count_array(self, fraction):
        ns = [n for n, f, _ in COUNTS if f == fraction] + [0, 1, 2, 3, 17, 100, 999]
        n_arr = jnp.asarray(ns, dtype=jnp.int32)
        want = [ref.selection_count(n, fraction) for n in ns]
        got = self.variant(lambda n: selection_count(n, fraction))(n_arr)
        np.testing.assert_array_equal(np.asarray(got), want)


# ---------------------------------------------------------------------------------------------
# Every variant against the reference.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "top_fraction", "gamma"), MAIN_CONFIGS)
@pytest.mark.parametrize("case_name", sorted(CASE_SPECS))
def test_matches_reference(case_name, variant, top_fraction, gamma):
    cfg = _cfg(variant, top_fraction=top_fraction, gamma=gamma)
    _check(gamma_of(case_name, cfg), case(case_name).reference(cfg))


@pytest.mark.parametrize("window", [None, 1, 3, 100])
@pytest.mark.parametrize("variant", POINTWISE)
@pytest.mark.parametrize("case_name", sorted(CASE_SPECS))
def test_pointwise_attention_window(case_name, variant, window):
    cfg = _cfg(variant, top_fraction=0.4, attention_window=window)
    _check(gamma_of(case_name, cfg), case(case_name).reference(cfg))


# The default pair (answer, prompt) is test_matches_reference; the controls share `throughput`,
# so one of them per case suffices.
ENDPOINT_CONFIGS = [
    *(
        ("flowtracer", k, s)
        for k in credit.SINKS
        for s in credit.SOURCES
        if (k, s) != ("answer", "prompt")
    ),
    ("flowtracer_soft", "predictors", "no_bos"),
]


@pytest.mark.parametrize(("variant", "sink", "source"), ENDPOINT_CONFIGS)
@pytest.mark.parametrize("case_name", sorted(CASE_SPECS))
def test_sink_and_source_choices_match_reference(case_name, variant, sink, source):
    cfg = _cfg(variant, top_fraction=0.4, sink=sink, source=source)
    _check(gamma_of(case_name, cfg), case(case_name).reference(cfg))


def test_endpoints_by_hand():
    # [pad] p p r r a a r [pad]: predictors are the response rows before an answer token
    prompt = np.array([[0, 1, 1, 0, 0, 0, 0, 0, 0]], bool)
    response = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 0]], bool)
    answer = np.array([[0, 0, 0, 0, 0, 1, 1, 0, 1]], bool)  # the last one is on padding
    inputs = CreditInputs(jnp.asarray(prompt), jnp.asarray(response), jnp.asarray(answer))
    want = {
        "answer": [0, 0, 0, 0, 0, 1, 1, 0, 0],
        "predictors": [0, 0, 0, 0, 1, 1, 0, 0, 0],
        "both": [0, 0, 0, 0, 1, 1, 1, 0, 0],
    }
    for sink, sink_T in want.items():
        source_BxT, sink_BxT = credit.endpoints(inputs, _cfg("flowtracer", sink=sink))
        np.testing.assert_array_equal(np.asarray(sink_BxT)[0], np.array(sink_T, bool))
        np.testing.assert_array_equal(np.asarray(source_BxT), prompt)
    source_BxT, _ = credit.endpoints(inputs, _cfg("flowtracer", source="no_bos"))
    np.testing.assert_array_equal(np.asarray(source_BxT)[0], np.array([0, 0, 1] + [0] * 6, bool))


def test_predictor_sink_of_an_answer_that_opens_the_response_is_empty():
    prompt = np.array([[1, 1, 0, 0]], bool)
    response = np.array([[0, 0, 1, 1]], bool)
    answer = np.array([[0, 0, 1, 0]], bool)
    inputs = CreditInputs(jnp.asarray(prompt), jnp.asarray(response), jnp.asarray(answer))
    _, sink_BxT = credit.endpoints(inputs, _cfg("flowtracer", sink="predictors"))
    assert not np.asarray(sink_BxT).any()  # the prompt's last token is a source, never a sink


@pytest.mark.parametrize("select_fraction", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("case_name", sorted(CASE_SPECS))
def test_entropy_select_matches_reference(case_name, select_fraction):
    c = case(case_name)
    cfg = _cfg("entropy_select", select_fraction=select_fraction, gamma=3.0)
    got = gamma_of(case_name, cfg)
    _check(got, c.reference(cfg))
    K = ref.selection_count(int(c.response.sum()), select_fraction)
    assert int((got == 1.0).sum()) == K


def test_flowtracer_hand_graph():
    """tau = 1.25, 1.5, 2 on the hand graph's response; top/bottom 60% = 2 of 3 tokens."""
    c = case("hand")
    top = gamma_of("hand", _cfg("flowtracer", top_fraction=0.6, gamma=2.0))
    bottom = gamma_of("hand", _cfg("flowtracer_inverse", top_fraction=0.6, gamma=2.0))
    for b in (0, 2):
        resp = c.response[b]
        np.testing.assert_array_equal(top[b][resp], [1.0, 2.0, 2.0])
        np.testing.assert_array_equal(bottom[b][resp], [2.0, 2.0, 1.0])


@pytest.mark.parametrize("variant", [*ref.FLOW_VARIANTS, *POINTWISE])
def test_attention_outside_causal_valid_region_is_ignored(variant):
    """Garbage in padding rows/columns, on the diagonal and above it must not matter."""
    c = case("mixed")
    T = c.attn.shape[-1]
    causal_valid = c.valid[:, :, None] & c.valid[:, None, :] & np.tril(np.ones((T, T), bool), -1)
    noise = np.random.default_rng(0).uniform(0, 1, c.attn.shape)
    noisy = np.where(causal_valid, c.attn, noise).astype(np.float32)
    cfg = _cfg(variant)
    _check(run(c, cfg, attn_BxTxT=jnp.asarray(noisy)), c.reference(cfg))


@pytest.mark.parametrize("variant", ["flowtracer", "flowtracer_inverse", "flowtracer_soft"])
def test_answer_on_padding_only_is_an_empty_sink(variant):
    """The effective sink is answer & valid: an answer mask on padding alone means no answer."""
    c = dataclasses.replace(case("short"), answer=~case("short").valid)
    cfg = _cfg(variant)
    want = c.reference(cfg)
    np.testing.assert_array_equal(want, c.response.astype(np.float64))
    _check(run(c, cfg), want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_row_without_response(variant):
    """A prompt with no response, and a fully padded row, get 0 everywhere, never NaN."""
    c = case("mixed")
    prompt, response, answer = c.prompt.copy(), c.response.copy(), c.answer.copy()
    response[1] = answer[1] = False
    prompt[2] = response[2] = answer[2] = False
    c = dataclasses.replace(c, prompt=prompt, response=response, answer=answer)
    cfg = _cfg(variant)
    got = run(c, cfg)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[1:3], 0.0)
    _check(got, c.reference(cfg))


# ---------------------------------------------------------------------------------------------
# Properties.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_outside_response(variant):
    for name in CASE_SPECS:
        c = case(name)
        got = gamma_of(name, _cfg(variant))
        np.testing.assert_array_equal(got[~c.response], 0.0)
        if variant != "entropy_select":
            assert np.all(got[c.response] > 0)


def test_uniform_is_the_response_mask():
    for name in CASE_SPECS:
        _check(gamma_of(name, _cfg("uniform")), case(name).response.astype(np.float64))


@pytest.mark.parametrize(
    ("variant", "top_fraction", "gamma"), [c for c in MAIN_CONFIGS if c[0] in HARD]
)
def test_selected_count(variant, top_fraction, gamma):
    for name in CASE_SPECS:
        c = case(name)
        got = gamma_of(name, _cfg(variant, top_fraction=top_fraction, gamma=gamma))
        for b in range(c.response.shape[0]):
            resp = c.response[b]
            k = ref.selection_count(int(resp.sum()), top_fraction)
            n_sel = int((got[b][resp] == np.float32(gamma)).sum())
            n_one = int((got[b][resp] == 1.0).sum())
            assert n_sel + n_one == resp.sum()
            has_sink = bool((c.answer[b] & c.valid[b]).any())
            if variant == "flowtracer":
                tau = ref.row_tau(c.attn[b], c.prompt[b], resp, c.answer[b])
                want = min(k, int((tau[resp] > 0).sum())) if has_sink else 0
            elif variant == "flowtracer_inverse":
                want = k if has_sink else 0
            elif variant == "oracle":
                want = int((c.labels[b] & resp).sum())
            elif variant == "oracle_answer":
                want = int(((c.labels[b] | c.answer[b]) & resp).sum())
            else:
                want = k
            assert n_sel == want, (name, b, n_sel, want)


# variant -> a native-T case, so that eager and jit also run at unpadded lengths. The three
# FlowTracer variants share one shape: eager FlowTracer pays a one-off warm-up per shape.
EAGER_CASE = {
    "uniform": "short",
    "flowtracer": "odd",
    "flowtracer_inverse": "odd",
    "flowtracer_soft": "odd",
    "attention_received": "ties",
    "attention_received_mean": "ties",
    "attention_max": "mixed",
    "oracle": "short",
    "oracle_answer": "mixed",
    "random": "odd",
    "entropy": "mixed",
    "entropy_select": "ties",
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_jit_matches_eager(variant):
    """Eager at the native T equals the reference and the jitted result.

    The jitted result is the cached one on the same rows right-padded to T_MAX (padding must
    change nothing), plus, except for FlowTracer (~1 s per compilation), a jit at the native T.
    """
    name = EAGER_CASE[variant]
    c = native_case(name)
    window = 3 if variant in POINTWISE else None  # others: reuse compiled configs
    cfg = _cfg(variant, top_fraction=0.6, gamma=2.0, attention_window=window)
    eager = np.asarray(compute(c.inputs(), cfg))
    _check(eager, c.reference(cfg))
    if variant not in ref.FLOW_VARIANTS:
        jitted = np.asarray(jax.jit(lambda inputs: compute(inputs, cfg))(c.inputs()))
        np.testing.assert_allclose(jitted, eager, atol=1e-6, rtol=0)
    if variant != "random":  # the draws depend on T
        T = c.response.shape[1]
        np.testing.assert_allclose(run(case(name), cfg)[:, :T], eager, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", PER_ROW)
def test_batch_independence(variant):
    """Row b of the output depends on row b of the inputs only."""
    picks = [("long", 0), ("ties", 1), ("odd", 2), ("short", 3), ("hand", 0), ("mixed", 1)]
    cfg = _cfg(variant)
    for window in (picks[:4], picks[2:]):
        got = run(stack_rows(*[(case(n), b) for n, b in window]), cfg)
        want = [gamma_of(n, cfg)[b] for n, b in window]
        chex.assert_trees_all_close(list(got), want, atol=1e-6, rtol=0)


def _random_case() -> Case:
    return make_case(5, T_MAX, ("answer_end", "no_answer", "answer_mid", "one_token"))


def test_random_same_rng_same_gamma():
    c = _random_case()
    cfg = _cfg("random")
    a = run(c, cfg, rng=jax.random.key(3))
    b = run(c, cfg, rng=jax.random.key(3))
    np.testing.assert_array_equal(a, b)


def test_random_different_rng_different_selection():
    c = _random_case()
    cfg = _cfg("random")
    n = int(c.response[0].sum())
    assert n >= 30  # C(30, 12) possible selections: a repeat is practically impossible
    picks = set()
    for seed in range(4):
        row = run(c, cfg, rng=jax.random.key(seed))[0]
        assert int((row == 1.5).sum()) == ref.selection_count(n, 0.4)
        picks.add(tuple(np.flatnonzero(row == 1.5)))
    assert len(picks) == 4


def test_random_is_not_positional():
    """Over many keys every response position gets selected sometimes."""
    c = _random_case()
    cfg = _cfg("random")
    keys = jax.random.split(jax.random.key(0), 64)
    hits = sum(run(c, cfg, rng=key) == 1.5 for key in keys)
    assert np.all(hits[c.response] > 0)


@pytest.mark.parametrize("top_fraction", [0.2, 0.4])
def test_inverse_is_disjoint_from_flowtracer(top_fraction):
    c = make_case(7, T_MAX, ("answer_end",) * 4)
    top = run(c, _cfg("flowtracer", top_fraction=top_fraction))
    bottom = run(c, _cfg("flowtracer_inverse", top_fraction=top_fraction))
    for b in range(4):
        resp = c.response[b]
        tau = ref.row_tau(c.attn[b], c.prompt[b], resp, c.answer[b])
        assert len(np.unique(tau[resp])) == resp.sum() and np.all(tau[resp] > 0)
        k = ref.selection_count(int(resp.sum()), top_fraction)
        assert 2 * k <= resp.sum()
        sel_top, sel_bottom = top[b] == 1.5, bottom[b] == 1.5
        assert sel_top.sum() == k and sel_bottom.sum() == k
        assert not np.any(sel_top & sel_bottom)


def test_soft_is_monotone_in_tau_and_bounded():
    c = case("long")
    got = gamma_of("long", _cfg("flowtracer_soft"))
    for b in (0, 1):  # the rows with a reachable answer
        resp = c.response[b]
        tau = ref.row_tau(c.attn[b], c.prompt[b], resp, c.answer[b])[resp]
        w = got[b][resp]
        assert np.all((w >= 1.0) & (w <= 1.5))
        order = np.argsort(tau, kind="stable")
        assert np.all(np.diff(w[order]) >= -1e-6)


# ---------------------------------------------------------------------------------------------
# Registry and validation.
# ---------------------------------------------------------------------------------------------


def test_builtins_registered_with_their_needs():
    assert isinstance(names(), tuple)
    assert set(VARIANTS) <= set(names())
    for name, needs in BUILTIN_NEEDS.items():
        v = get(name)
        assert isinstance(v, Variant)
        assert v.name == name
        assert frozenset(v.needs) == needs


def test_variant_fn_is_what_compute_runs():
    c = native_case("short")
    cfg = _cfg("attention_received")
    np.testing.assert_array_equal(
        np.asarray(get(cfg.name).fn(c.inputs(), cfg)), np.asarray(compute(c.inputs(), cfg))
    )


def test_config_defaults():
    cfg = CreditConfig()
    assert (cfg.name, cfg.top_fraction, cfg.gamma, cfg.select_fraction, cfg.attention_window) == (
        "flowtracer",
        0.4,
        1.5,
        0.2,
        None,
    )


USER_VARIANT = "test_user_entropy_doubled"


@pytest.fixture
def user_variant():
    @register(USER_VARIANT, needs=("entropy_BxT",))
    def doubled(inputs, cfg):
        return jnp.where(inputs.response_mask_BxT, 2.0 * inputs.entropy_BxT, 0.0)

    try:
        yield USER_VARIANT
    finally:
        credit.unregister(USER_VARIANT)
    assert USER_VARIANT not in names()


def test_user_variant_end_to_end(user_variant):
    assert user_variant in names()
    assert get(user_variant).needs == frozenset({"entropy_BxT"})
    c = native_case("mixed")
    cfg = CreditConfig(name=user_variant)
    want = np.where(c.response, 2.0 * c.entropy.astype(np.float64), 0.0)
    _check(compute(c.inputs(), cfg), want)
    _check(jax.jit(lambda inputs: compute(inputs, cfg))(c.inputs()), want)
    with pytest.raises(ValueError, match="entropy_BxT"):
        compute(c.inputs(entropy_BxT=None), cfg)


def test_user_variant_is_gone_after_unregister():
    assert USER_VARIANT not in names()
    with pytest.raises(ValueError, match=USER_VARIANT):
        CreditConfig(name=USER_VARIANT)


def test_duplicate_registration_raises(user_variant):
    def fn(inputs, cfg):
        return inputs.response_mask_BxT.astype(jnp.float32)

    for name in (user_variant, "uniform", "flowtracer"):
        with pytest.raises(ValueError, match=name):
            register(name)(fn)
    assert get("uniform").fn is not fn
    assert get(user_variant).fn is not fn


def test_unknown_name_raises():
    for make in (lambda: get("nope"), lambda: CreditConfig(name="nope")):
        with pytest.raises(ValueError) as err:
            make()
        msg = str(err.value)
        assert "nope" in msg
        assert all(name in msg for name in VARIANTS), msg


@pytest.mark.parametrize("variant", [v for v, needs in BUILTIN_NEEDS.items() if needs])
def test_missing_input_raises(variant):
    (field,) = BUILTIN_NEEDS[variant]
    with pytest.raises(ValueError, match=field):
        compute(native_case("short").inputs(**{field: None}), _cfg(variant))


def test_oracle_without_labels_says_the_task_must_provide_them():
    with pytest.raises(ValueError, match=r"'oracle' needs CreditInputs.labels_BxT.*task must"):
        compute(native_case("short").inputs(labels_BxT=None), _cfg("oracle"))


def test_labels_of_another_shape_raise():
    c = native_case("short")
    with pytest.raises(ValueError, match="labels_BxT has shape"):
        compute(c.inputs(labels_BxT=jnp.asarray(c.labels[:, :-1])), _cfg("oracle"))


def test_uniform_needs_only_masks():
    c = native_case("short")
    inputs = CreditInputs(
        prompt_mask_BxT=jnp.asarray(c.prompt),
        response_mask_BxT=jnp.asarray(c.response),
        answer_mask_BxT=jnp.asarray(c.answer),
    )
    _check(compute(inputs, _cfg("uniform")), c.response.astype(np.float64))


@pytest.mark.parametrize(
    "bad",
    [
        dict(top_fraction=0.0),
        dict(top_fraction=-0.2),
        dict(top_fraction=1.01),
        dict(gamma=0.0),
        dict(gamma=-1.5),
        dict(select_fraction=0.0),
        dict(select_fraction=1.5),
        dict(attention_window=0),
        dict(attention_window=-3),
        dict(sink="answers"),
        dict(source="question"),
    ],
)
def test_config_validation(bad):
    ((field, value),) = bad.items()
    with pytest.raises(ValueError, match=field):
        CreditConfig(**bad)


def test_config_boundaries_accepted():
    CreditConfig(top_fraction=1.0, select_fraction=1.0, attention_window=1, gamma=0.01)


@pytest.mark.parametrize("which", ["prompt", "response", "answer"])
def test_mismatched_mask_shapes_raise(which):
    c = native_case("short")
    fields = dict(
        prompt_mask_BxT=jnp.asarray(c.prompt),
        response_mask_BxT=jnp.asarray(c.response),
        answer_mask_BxT=jnp.asarray(c.answer),
    )
    key = f"{which}_mask_BxT"
    fields[key] = fields[key][:, :-1]
    with pytest.raises(ValueError):
        compute(CreditInputs(**fields), _cfg("uniform"))
