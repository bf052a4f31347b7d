"""Token credit: a registry of pure, jittable functions `CreditInputs -> gamma_BxT`.

Dims: B batch, T tokens, L captured layers.

gamma multiplies the group advantage token by token, for both signs (docs/method.md, section 6).
A variant is one decorated function; it declares which inputs it reads so the train step captures
only those (attention capture is the expensive one):

    @credit.register("my_variant", needs=("entropy_BxT",))
    def my_variant(inputs: CreditInputs, cfg: CreditConfig) -> jax.Array: ...
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from collections.abc import Callable, Sequence
from fractions import Fraction

import jax
import jax.numpy as jnp

from ftjax import flow, masked

_INPUT_FIELDS = (
    "attn_BxTxT",
    "log_probs_BxT",
    "entropy_BxT",
    "tokens_BxT",
    "rng",
    "labels_BxT",
)
# What to do when a declared input is missing, beyond naming it.
_MISSING_HINTS = {
    "labels_BxT": (
        "the task must provide `labels(prompt, response)` (ground-truth essential tokens) and "
        "the batch must carry them (train.Batch.labels_BxT; the RL loop fills it for a variant "
        "that declares it)"
    ),
}


SINKS = ("answer", "predictors", "both")
SOURCES = ("prompt", "no_bos")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CreditInputs:
    """Every per-token signal a credit variant may read; unneeded ones may be None.

    Masks are bool B x T: prompt (question, FlowTracer's source), response (the trained tokens),
    answer (the answer span inside the response, FlowTracer's sink); non-padding is
    prompt | response.
    attn_BxTxT[b, k, i]: captured attention query k pays key i (mean over captured heads/layers).
    labels_BxT: the task's ground-truth essential tokens (bool), for the `oracle` upper bound.
    """

    prompt_mask_BxT: jax.Array
    response_mask_BxT: jax.Array
    answer_mask_BxT: jax.Array
    attn_BxTxT: jax.Array | None = None
    log_probs_BxT: jax.Array | None = None
    entropy_BxT: jax.Array | None = None
    tokens_BxT: jax.Array | None = None
    rng: jax.Array | None = None
    labels_BxT: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class CreditConfig:
    """Which credit variant, and its knobs (defaults: the paper's best ablation).

    top_fraction: share of each response's tokens that get `gamma` (top-40% in the paper).
    gamma: the weight of selected tokens (1.5 in the paper); others get 1.
    select_fraction: share of the batch's response tokens kept by `entropy_select` (80/20 rule).
    attention_window: how many later queries the attention baselines read (None: all).
    block_size: FlowTracer's triangular-solve block (speed only; results do not depend on it).
    sink: where FlowTracer's flow ends (see `endpoints`): "answer" (the answer tokens, the
        paper), "predictors" (the response rows whose next token is an answer token: the rows
        that produce the answer), "both".
    source: where it starts: "prompt" (every prompt token, the paper), "no_bos" (the prompt
        less its first token, the beginning-of-sequence token that attention sinks onto).
    """

    name: str = "flowtracer"  # a registered credit variant (--plugins adds your own)
    top_fraction: float = 0.4
    gamma: float = 1.5
    select_fraction: float = 0.2
    attention_window: int | None = None
    block_size: int = 64
    sink: str = "answer"
    source: str = "prompt"

    def __post_init__(self):
        get(self.name)
        if self.sink not in SINKS:
            raise ValueError(f"CreditConfig.sink must be one of {SINKS}, got {self.sink!r}")
        if self.source not in SOURCES:
            raise ValueError(f"CreditConfig.source must be one of {SOURCES}, got {self.source!r}")
        for field in ("top_fraction", "select_fraction"):
            value = getattr(self, field)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"CreditConfig.{field} must be in (0, 1], got {value!r}")
        if not self.gamma > 0.0:
            raise ValueError(f"CreditConfig.gamma must be > 0, got {self.gamma!r}")
        if self.attention_window is not None and (
            not isinstance(self.attention_window, int) or self.attention_window < 1
        ):
            raise ValueError(
                f"CreditConfig.attention_window must be None or an int >= 1, got "
                f"{self.attention_window!r}"
            )
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(
                f"CreditConfig.block_size must be an int >= 1, got {self.block_size!r}"
            )


CreditFn = Callable[[CreditInputs, CreditConfig], jax.Array]


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    fn: CreditFn
    needs: frozenset[str]
    per_sequence: bool = True  # each row's gamma depends on that row alone


_REGISTRY: dict[str, Variant] = {}


def register(
    name: str, *, needs: tuple[str, ...] = (), per_sequence: bool = True
) -> Callable[[CreditFn], CreditFn]:
    """Decorator: add `fn(inputs, cfg) -> gamma_BxT` to the registry under `name`.

    per_sequence: each row's gamma depends on that row's inputs alone, so the train step may
    compute it one micro-batch at a time (`StepConfig.micro_batch`). Say False for a variant
    that ranks or normalises across the batch; it then needs the whole batch at once."""
    unknown = set(needs) - set(_INPUT_FIELDS)
    if unknown:
        raise ValueError(
            f"credit variant {name!r} needs unknown inputs {sorted(unknown)}; "
            f"known: {list(_INPUT_FIELDS)}"
        )

    def add(fn: CreditFn) -> CreditFn:
        if name in _REGISTRY:
            raise ValueError(f"credit variant {name!r} is already registered")
        _REGISTRY[name] = Variant(name, fn, frozenset(needs), per_sequence)
        return fn

    return add


def unregister(name: str) -> None:
    get(name)
    del _REGISTRY[name]


def get(name: str) -> Variant:
    if name not in _REGISTRY:
        raise ValueError(f"unknown credit variant {name!r}; registered: {list(names())}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def load_plugins(paths: Sequence[str | pathlib.Path]) -> None:
    """Import each Python file, e.g. one whose functions `register` credit variants; every
    experiment that trains does this for its `--plugins`. A file already imported is skipped."""
    for path in paths:
        path = pathlib.Path(path)
        if not path.is_file():
            raise ValueError(f"plugin {str(path)!r} is not a file")
        name = f"ftjax_plugin_{path.resolve().as_posix().replace('/', '_').replace('.', '_')}"
        if name in _PLUGINS:
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _PLUGINS[name] = module


_PLUGINS: dict[str, object] = {}


def compute(inputs: CreditInputs, cfg: CreditConfig) -> jax.Array:
    """gamma_BxT of the configured variant: float32, 0 outside the response."""
    variant = get(cfg.name)
    shape = jnp.shape(inputs.response_mask_BxT)
    for field in ("prompt_mask_BxT", "answer_mask_BxT", "labels_BxT"):
        value = getattr(inputs, field)
        if value is not None and jnp.shape(value) != shape:
            raise ValueError(
                f"CreditInputs.{field} has shape {jnp.shape(value)}, response_mask_BxT has {shape}"
            )
    missing = sorted(f for f in variant.needs if getattr(inputs, f) is None)
    if missing:
        hints = "".join(f": {_MISSING_HINTS[f]}" for f in missing if f in _MISSING_HINTS)
        raise ValueError(
            f"credit variant {cfg.name!r} needs CreditInputs.{', '.join(missing)}{hints}"
        )
    gamma_BxT = variant.fn(inputs, cfg)
    if jnp.shape(gamma_BxT) != shape:
        raise ValueError(
            f"credit variant {cfg.name!r} returned shape {jnp.shape(gamma_BxT)}, expected {shape}"
        )
    return jnp.where(inputs.response_mask_BxT, gamma_BxT, 0.0).astype(jnp.float32)


# ----------------------------------------------------------------------------- selection


def selection_count(n, fraction: float):
    """ceil(n * fraction), exact: fraction is taken as the nearest rational with denominator
    <= 10000, so 0.4 * 10 is 4, never 5 by float rounding. Works on ints and int arrays."""
    ratio = Fraction(fraction).limit_denominator(10000)
    num, den = ratio.numerator, ratio.denominator
    if isinstance(n, int):
        return -((-n * num) // den)
    # q * num + ceil(r * num / den) with r < den keeps every product inside int32.
    q, r = jnp.divmod(jnp.asarray(n, jnp.int32), den)
    return q * num - ((-r * num) // den)


def _rank_BxT(score_BxT, eligible_BxT, descending: bool):
    """Rank of each eligible token in its row by score (ties: earlier first); ineligible last."""
    B, T = score_BxT.shape
    key_BxT = (-score_BxT if descending else score_BxT).astype(jnp.float32)
    position_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
    order_BxT = jnp.lexsort((position_BxT, key_BxT, ~eligible_BxT), axis=-1)
    rank_BxT = jnp.zeros((B, T), jnp.int32)
    return rank_BxT.at[jnp.arange(B)[:, None], order_BxT].set(jnp.arange(T, dtype=jnp.int32))


def top_fraction_mask(score_BxT, response_BxT, fraction: float, descending: bool = True):
    """The first ceil(fraction * n) response tokens of each row by score, ties earlier first."""
    k_Bx1 = selection_count(jnp.sum(response_BxT, axis=-1, keepdims=True), fraction)
    return response_BxT & (_rank_BxT(score_BxT, response_BxT, descending) < k_Bx1)


def _weights(selected_BxT, response_BxT, gamma: float):
    return jnp.where(selected_BxT, gamma, jnp.where(response_BxT, 1.0, 0.0)).astype(jnp.float32)


# ----------------------------------------------------------------------------- variants


@register("uniform")
def uniform(inputs: CreditInputs, cfg: CreditConfig) -> jax.Array:
    """Plain GRPO/DAPO: every response token weighs 1."""
    return inputs.response_mask_BxT.astype(jnp.float32)


def endpoints(inputs: CreditInputs, cfg: CreditConfig) -> tuple[jax.Array, jax.Array]:
    """(source_BxT, sink_BxT): where FlowTracer's flow starts and ends, by `cfg.source`/`sink`.

    "predictors" are the response tokens whose next token is an answer token (row t predicts
    token t + 1); a predictor that is a prompt token (an answer that opens the response) is
    left out, so source and sink never overlap. "no_bos" drops each row's first prompt token.
    """
    prompt_BxT, response_BxT = inputs.prompt_mask_BxT, inputs.response_mask_BxT
    answer_BxT = inputs.answer_mask_BxT & (prompt_BxT | response_BxT)
    next_is_answer_BxT = jnp.pad(answer_BxT[:, 1:], ((0, 0), (0, 1)))
    predictors_BxT = next_is_answer_BxT & response_BxT
    sink_BxT = {
        "answer": answer_BxT,
        "predictors": predictors_BxT,
        "both": answer_BxT | predictors_BxT,
    }[cfg.sink]
    source_BxT = prompt_BxT
    if cfg.source == "no_bos":
        first_BxT = jnp.cumsum(prompt_BxT, axis=-1) == 1
        source_BxT = prompt_BxT & ~first_BxT
    return source_BxT, sink_BxT


def throughput(inputs: CreditInputs, cfg: CreditConfig) -> tuple[jax.Array, jax.Array]:
    """FlowTracer's tau_BxT (source and sink from `endpoints`) and whether each row has a sink."""
    valid_BxT = inputs.prompt_mask_BxT | inputs.response_mask_BxT
    source_BxT, sink_BxT = endpoints(inputs, cfg)
    tr = flow.trace(inputs.attn_BxTxT, source_BxT, sink_BxT, valid_BxT, block_size=cfg.block_size)
    return tr.throughput_BxT, jnp.any(tr.sink_BxT, axis=-1, keepdims=True)


@register("flowtracer", needs=("attn_BxTxT",))
def flowtracer(inputs: CreditInputs, cfg: CreditConfig) -> jax.Array:
    """Top-`top_fraction` response tokens by flow throughput get gamma (docs/method.md, sec. 6).

    ftjax decisions: ties go to the earlier token, tau = 0 is never selected, and a response
    without an answer span gets weight 1 everywhere.
    """
    tau_BxT, has_sink_Bx1 = throughput(inputs, cfg)
    response_BxT = inputs.response_mask_BxT
    selected_BxT = top_fraction_mask(tau_BxT, response_BxT, cfg.top_fraction) & (tau_BxT > 0)
    return _weights(selected_BxT & has_sink_Bx1, response_BxT, cfg.gamma)


@register("flowtracer_inverse", needs=("attn_BxTxT",))
def flowtracer_inverse(inputs: CreditInputs, cfg: CreditConfig) -> jax.Array:
    """Control: the bottom-`top_fraction` tokens by throughput get gamma (should hurt)."""
    tau_BxT, has_sink_Bx1 = throughput(inputs, cfg)
    response_BxT = inputs.response_mask_BxT
    selected_BxT = top_fraction_mask(tau_BxT, response_BxT, cfg.top_fraction, descending=False)
    return _weights(selected_BxT & has_sink_Bx1, response_BxT, cfg.gamma)


@register("flowtracer_soft", needs=("attn_BxTxT",))
def flowtracer_soft(inputs: CreditInputs, cfg: CreditConfig) -> jax.Array:
    """Continuous ablation: 1 + (gamma - 1) sigmoid(z), z the throughput z-score in the response."""
    tau_BxT, has_sink_Bx1 = throughput(inputs, cfg)
    response_BxT = inputs.response_mask_BxT
    mean_Bx1 = masked.mean(tau_BxT, response_BxT, axis=-1, keepdims=True)
    var_Bx1 = masked.mean((tau_BxT - mean_Bx1) ** 2, response_BxT, axis=-1, keepdims=True)
    z_BxT = (tau_BxT - mean_Bx1) / (jnp.sqrt(var_Bx1) + 1e-8)
    soft_BxT = 1.0 + (cfg.gamma - 1.0) * jax.nn.sigmoid(z_BxT)
    return jnp.where(response_BxT, jnp.where(has_sink_Bx1, soft_BxT, 1.0), 0.0)


@register("random", needs=("rng",))
def random(inputs: CreditInputs, cfg: CreditConfig) -> jax.Array:
    """Control: `top_fraction` of each response chosen uniformly at random gets gamma."""
    response_BxT = inputs.response_mask_BxT
    score_BxT = jax.random.uniform(inputs.rng, response_BxT.shape)
    return _weights(
        top_fraction_mask(score_BxT, response_BxT, cfg.top_fraction), response_BxT, cfg.gamma
    )


@register("entropy", needs=("entropy_BxT",))
def entropy(inputs: CreditInputs, cfg: CreditConfig) -> jax.Array:
    """Top-`top_fraction` tokens of each response by next-token entropy get gamma."""
    response_BxT = inputs.response_mask_BxT
    selected_BxT = top_fraction_mask(inputs.entropy_BxT, response_BxT, cfg.top_fraction)
    return _weights(selected_BxT, response_BxT, cfg.gamma)


@register("entropy_select", needs=("entropy_BxT",), per_sequence=False)
def entropy_select(inputs: CreditInputs, cfg: CreditConfig) -> jax.Array:
    """80/20 (arXiv 2506.01939): the batch's top-`select_fraction` entropy tokens get weight 1,
    all others 0 (batch-global; ties: earlier row, then earlier token)."""
    response_BxT = inputs.response_mask_BxT
    B, T = response_BxT.shape
    selected_1xBT = top_fraction_mask(
        inputs.entropy_BxT.reshape(1, B * T), response_BxT.reshape(1, B * T), cfg.select_fraction
    )
    return selected_1xBT.reshape(B, T).astype(jnp.float32)


def _later_valid_queries_BxTxT(inputs: CreditInputs, window: int | None) -> jax.Array:
    """[b, k, i]: query k is valid and comes 1..window tokens after key i (window None: any
    later query). The point-wise attention baselines read attention over exactly these pairs."""
    T = inputs.response_mask_BxT.shape[-1]
    valid_BxT = inputs.prompt_mask_BxT | inputs.response_mask_BxT
    lag_TxT = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]  # query k minus key i
    later_TxT = (lag_TxT >= 1) & (lag_TxT <= (T if window is None else window))
    return later_TxT & valid_BxT[:, :, None]


def _top_by(score_BxT, inputs: CreditInputs, cfg: CreditConfig) -> jax.Array:
    response_BxT = inputs.response_mask_BxT
    selected_BxT = top_fraction_mask(score_BxT, response_BxT, cfg.top_fraction)
    return _weights(selected_BxT, response_BxT, cfg.gamma)


@register("attention_received", needs=("attn_BxTxT",))
def attention_received(inputs: CreditInputs, cfg: CreditConfig) -> jax.Array:
    """Point-wise attention credit: top-`top_fraction` by attention received from later valid
    queries (within `attention_window` of the key when set) get gamma."""
    later_BxTxT = _later_valid_queries_BxTxT(inputs, cfg.attention_window)
    received_BxT = jnp.sum(jnp.where(later_BxTxT, inputs.attn_BxTxT, 0.0), axis=1)
    return _top_by(received_BxT, inputs, cfg)


@register("attention_received_mean", needs=("attn_BxTxT",))
def attention_received_mean(inputs: CreditInputs, cfg: CreditConfig) -> jax.Array:
    """`attention_received` divided by the number of later valid queries it sums over (0 with
    none): the mean attention a token gets from the queries that can see it. The raw sum grows
    with the number of later tokens, so it favours early tokens; the mean does not."""
    later_BxTxT = _later_valid_queries_BxTxT(inputs, cfg.attention_window)
    received_BxT = jnp.sum(jnp.where(later_BxTxT, inputs.attn_BxTxT, 0.0), axis=1)
    count_BxT = jnp.sum(later_BxTxT, axis=1)
    return _top_by(received_BxT / jnp.maximum(count_BxT, 1), inputs, cfg)


@register("attention_max", needs=("attn_BxTxT",))
def attention_max(inputs: CreditInputs, cfg: CreditConfig) -> jax.Array:
    """Top-`top_fraction` by the largest attention any later valid query (within
    `attention_window`) pays the token get gamma; a token no such query sees scores 0."""
    later_BxTxT = _later_valid_queries_BxTxT(inputs, cfg.attention_window)
    largest_BxT = jnp.max(jnp.where(later_BxTxT, inputs.attn_BxTxT, -jnp.inf), axis=1)
    return _top_by(jnp.where(jnp.any(later_BxTxT, axis=1), largest_BxT, 0.0), inputs, cfg)


@register("oracle", needs=("labels_BxT",))
def oracle(inputs: CreditInputs, cfg: CreditConfig) -> jax.Array:
    """Upper bound: every response token the task labels essential gets gamma, all others 1 (no
    top fraction; a response with no labelled token gets 1 everywhere)."""
    response_BxT = inputs.response_mask_BxT
    labelled_BxT = jnp.asarray(inputs.labels_BxT).astype(bool) & response_BxT
    return _weights(labelled_BxT, response_BxT, cfg.gamma)


@register("oracle_answer", needs=("labels_BxT",))
def oracle_answer(inputs: CreditInputs, cfg: CreditConfig) -> jax.Array:
    """`oracle` plus the answer span: the labelled tokens and the answer tokens get gamma. The
    answer is essential too, and FlowTracer can select it (the sink carries the whole unit of
    flow), so this is the upper bound for credits that may up-weight the answer."""
    response_BxT = inputs.response_mask_BxT
    labelled_BxT = jnp.asarray(inputs.labels_BxT).astype(bool) | inputs.answer_mask_BxT
    return _weights(labelled_BxT & response_BxT, response_BxT, cfg.gamma)
