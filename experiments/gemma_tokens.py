"""Pure helpers of `experiments.gemma_causal` on one response's tokens: the copied answer value,
the masking arms, and the token classes with their shares among the high- and low-flow tokens.

Dims: T token slots of one row, K tokens a top arm masks, N reasoning tokens pooled over rows.
Token offsets are (start, end) character spans in the decoded response (`token_offsets`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from experiments.common import masked_sets
from ftjax import credit

TOKEN_CLASSES = ("delimiter", "operator", "variable", "number", "word", "other")
DELIMITER_CHARS = frozenset(".,:;=()[]{}?!")  # `=` counts as structure, not as an operator
OPERATOR_CHARS = frozenset("+-*/×÷")
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def last_number_span(text: str) -> tuple[int, int] | None:
    """(start, end) characters of the last run of digits in `text` (a decimal point between
    digits included), or None when it has no digit."""
    spans = [m.span() for m in NUMBER.finditer(text)]
    return spans[-1] if spans else None


def copied_value_tokens(offsets: Sequence[tuple[int, int]], reasoning_text: str) -> list[int]:
    """Indices of the reasoning tokens that overlap the last number of the reasoning text: the
    value a `... = 7. Answer: 7` response copies into its answer. Reasoning tokens are those
    that end by the end of `reasoning_text` (the response text before "Answer:"); a token
    overlaps the number when it shares at least one character with it."""
    span = last_number_span(reasoning_text)
    if span is None:
        return []
    start, end = span
    return [
        i for i, (s, e) in enumerate(offsets) if e <= len(reasoning_text) and s < end and e > start
    ]


def question_names(question: str) -> frozenset[str]:
    """The single letters that stand alone as a word in the question (its variable names)."""
    return frozenset(re.findall(r"(?<![A-Za-z0-9_])[A-Za-z](?![A-Za-z0-9_])", question))


def token_class(piece: str, names: frozenset[str]) -> str:
    """The class of one token's decoded text, its surrounding whitespace ignored:
    `delimiter` (whitespace only, or only the characters . , : ; = ( ) [ ] { } ? !),
    `operator` (only + - * / × ÷), `number` (digits, possibly with a decimal point), `variable`
    (one letter that is one of `names`), `word` (letters only) and `other` (anything else,
    including an empty piece and a mix such as `7.`)."""
    if not piece:
        return "other"
    core = piece.strip()
    if not core or set(core) <= DELIMITER_CHARS:
        return "delimiter"
    if set(core) <= OPERATOR_CHARS:
        return "operator"
    if NUMBER.fullmatch(core):
        return "number"
    if len(core) == 1 and core in names:
        return "variable"
    if core.isalpha():
        return "word"
    return "other"


def ranked_ends(score_T, eligible_T, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (T,) of the top and of the bottom ceil(fraction * n) of the n eligible
    tokens by score, ties broken as `common.masked_sets` breaks them."""
    score_T, eligible_T = np.asarray(score_T, np.float64), np.asarray(eligible_T, bool)
    idx = np.flatnonzero(eligible_T)
    k = credit.selection_count(len(idx), fraction) if len(idx) else 0
    order = idx[np.argsort(-score_T[idx], kind="stable")]  # ties: earlier first
    top_T, bottom_T = np.zeros(len(score_T), bool), np.zeros(len(score_T), bool)
    top_T[order[:k]] = True
    bottom_T[order[len(order) - k :]] = True
    return top_T, bottom_T


def position_matched(top_T, maskable_T, radius: int, rng: np.random.Generator) -> np.ndarray:
    """One random maskable token near each token of a top arm: picks_K[j] goes with the j-th
    top token in position order (a_j). Taken in that order, the pool is the maskable tokens not
    picked yet that are not top tokens (all maskable tokens not picked yet when none of those is
    left); with d the smallest |position - a_j| in the pool, the pick is uniform over the pool
    tokens within max(radius, d) of a_j. So each top token's stand-in is within `radius`
    positions of it when the pool has a token that close, and among the nearest otherwise."""
    top_T, maskable_T = np.asarray(top_T, bool), np.asarray(maskable_T, bool)
    free_T = maskable_T.copy()
    anchors_K = np.flatnonzero(top_T)
    picks_K = np.zeros(len(anchors_K), np.int64)
    for j, anchor in enumerate(anchors_K):
        pool_T = free_T & ~top_T
        candidates = np.flatnonzero(pool_T if pool_T.any() else free_T)
        distance = np.abs(candidates - anchor)
        near = candidates[distance <= max(radius, int(distance.min()))]
        picks_K[j] = int(rng.choice(near))
        free_T[picks_K[j]] = False
    return picks_K


def arm_masks(
    tau_T,
    attention: Mapping[str, np.ndarray],
    reasoning_T,
    copied_T,
    fraction: float,
    radius: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Every masking arm of one response as a boolean mask (T,). The maskable set is the
    reasoning tokens minus the copied value; `top`, `random`, `bottom` (by throughput tau_T,
    `common.masked_sets`) and each attention score's top (keys of `attention`) take
    ceil(fraction * maskable) of it; `position_matched` as many tokens as `top`, by
    `position_matched`; `copied_value` masks the copied value alone."""
    reasoning_T, copied_T = np.asarray(reasoning_T, bool), np.asarray(copied_T, bool)
    maskable_T = reasoning_T & ~copied_T
    arms = masked_sets(np.asarray(tau_T), maskable_T, fraction, rng)
    matched_T = np.zeros(len(maskable_T), bool)
    matched_T[position_matched(arms["top"], maskable_T, radius, rng)] = True
    arms["position_matched"] = matched_T
    arms["copied_value"] = copied_T.copy()
    for name, score_T in attention.items():
        arms[name] = ranked_ends(score_T, maskable_T, fraction)[0]
    return arms


def class_shares(class_N, top_N, bottom_N) -> dict[str, dict[str, float | int | None]]:
    """For each of TOKEN_CLASSES, pooled over the N reasoning tokens given: its share of all of
    them ("all"), of the top-flow ones ("top") and of the bottom-flow ones ("bottom"), the
    ratios top / all and bottom / all, and its token count ("count"). A share of an empty group
    and a ratio with a share of 0 or None below it are None (so the result stays plain JSON)."""
    class_N = np.asarray(class_N, dtype=object)
    groups = {"all": np.ones(len(class_N), bool), "top": np.asarray(top_N, bool)}
    groups["bottom"] = np.asarray(bottom_N, bool)
    out = {}
    for name in TOKEN_CLASSES:
        is_N = class_N == name
        row = {
            group: float(np.sum(is_N & in_N) / in_N.sum()) if in_N.any() else None
            for group, in_N in groups.items()
        }
        for group in ("top", "bottom"):
            ok = row["all"] and row[group] is not None
            row[f"{group}_ratio"] = row[group] / row["all"] if ok else None
        row["count"] = int(is_N.sum())
        out[name] = row
    return out


def _cell(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def class_share_table(title: str, shares: Mapping[str, Mapping[str, float | int | None]]) -> str:
    """`class_shares` as a markdown table, one row per token class."""
    lines = [
        title,
        "| token class | tokens | share of all | share of top | top / all | share of bottom "
        "| bottom / all |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in shares.items():
        cells = [_cell(r["all"], 3), _cell(r["top"], 3), _cell(r["top_ratio"], 2)]
        cells += [_cell(r["bottom"], 3), _cell(r["bottom_ratio"], 2)]
        lines.append(f"| {name} | {r['count']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
