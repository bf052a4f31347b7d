"""Verifiers for real-model RL: a reward and the final answer's character span, from response text.

Positions: character offsets into the response string; spans are [start, end). The span is
FlowTracer's sink, so it is reported whenever an answer was found, right or wrong;
`char_span_to_token_mask` turns it into a mask over the response tokens.

A verifier never raises on model output: empty, truncated, adversarial or huge responses score 0.
Only misuse raises (a ground truth that is not a number for GSM8K, a missing optional dependency,
math_verify's signal timeout outside the main thread).
"""

from __future__ import annotations

import dataclasses
import fractions
import re
import threading
from collections.abc import Sequence

# A final answer this long is never a dataset's answer, and sympy can spend seconds on it; it
# scores 0 with `error` set, so a run can count how often that happens.
MAX_ANSWER_CHARS = 1000
_BOX_OPENER = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Thousands separators only in groups of three, so "1,2" is the number 1 and "1,234" is 1234.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


@dataclasses.dataclass(frozen=True)
class Verdict:
    reward: float  # 1.0 correct, 0.0 otherwise
    span: tuple[int, int] | None  # [start, end) of the final answer; None when none was found
    error: str | None = None  # why the verifier gave up (timeout, ...); None for a plain verdict


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the `}` closing the `{` just before `start`, None when the text ends first.
    A backslash escapes the next character, so LaTeX's literal braces \\{ and \\} do not count."""
    depth, i = 1, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def boxed_answer(text: str) -> tuple[str, int, int] | None:
    """(content, start, end) of the last top-level \\boxed{...} or \\fbox{...}, whitespace trimmed.

    None when there is none, or when the last one never closes: a cut-off final answer is no
    answer, and an earlier box is not the final one. Boxes nested in a box belong to its content.
    """
    found, position = None, 0
    while (opener := _BOX_OPENER.search(text, position)) is not None:
        close = _closing_brace(text, opener.end())
        if close is None:
            return None
        found, position = (opener.end(), close), close + 1
    if found is None:
        return None
    start, end = _strip_span(text, *found)
    return text[start:end], start, end


def _math_verify():
    try:
        import math_verify
        from math_verify.errors import TimeoutException
    except ImportError as error:
        raise ValueError(
            "verify_math needs math-verify; install it with: pip install 'ftjax[math]'"
        ) from error
    return math_verify, TimeoutException


def verify_math(response: str, ground_truth: str, timeout_s: int | None = 5) -> Verdict:
    """Reward 1 when the last \\boxed{} of the response equals the ground truth by math_verify
    (fractions, decimals, LaTeX forms, intervals, ...). The span is the box's content.

    Both sides are parsed as \\boxed{...}, math_verify's most reliable extraction. A response
    without a closed box scores 0 with no span: the prompt asks for a box. `timeout_s` bounds
    each math_verify parse and comparison (a SIGALRM, so only in the main thread; pass None in
    worker threads and bound the time there). Any math_verify failure scores 0, span kept, with
    `error` naming it.
    """
    math_verify, timeout_exception = _math_verify()
    if timeout_s is not None and threading.current_thread() is not threading.main_thread():
        raise ValueError(
            "verify_math's timeout uses SIGALRM, which works only in the main thread; "
            f"got timeout_s={timeout_s} in thread {threading.current_thread().name!r}: "
            "pass timeout_s=None there"
        )
    found = boxed_answer(response)
    if found is None:
        return Verdict(0.0, None)
    answer, start, end = found
    span = (start, end)
    if not answer:
        return Verdict(0.0, span)
    if len(answer) > MAX_ANSWER_CHARS:
        return Verdict(0.0, span, f"answer longer than {MAX_ANSWER_CHARS} characters")
    gold_box = boxed_answer(ground_truth)
    gold = gold_box[0] if gold_box is not None else ground_truth.strip()
    try:
        gold_parsed = math_verify.parse(
            f"\\boxed{{{gold}}}", parsing_timeout=timeout_s, raise_on_error=True
        )
        if not gold_parsed:
            return Verdict(0.0, span, f"ground truth {ground_truth!r} did not parse")
        predicted = math_verify.parse(
            f"\\boxed{{{answer}}}", parsing_timeout=timeout_s, raise_on_error=True
        )
        correct = math_verify.verify(
            gold_parsed, predicted, timeout_seconds=timeout_s, raise_on_error=True
        )
    except (Exception, timeout_exception) as error:  # TimeoutException is a BaseException
        return Verdict(0.0, span, f"math_verify {type(error).__name__}")
    return Verdict(float(bool(correct)), span)


def _fraction(text: str) -> fractions.Fraction | None:
    try:
        return fractions.Fraction(text.replace(",", "").strip())
    except (ValueError, ZeroDivisionError):  # also Python's limit on digits in an int literal
        return None


def verify_gsm8k(response: str, ground_truth: str) -> Verdict:
    """Reward 1 when the response's final number equals the ground truth as a number ("1,234" ==
    "1234", "72.0" == "72"). The final number is the first one after the last "####", else the
    first one in the last \\boxed{}; the span covers it (sign and commas included)."""
    gold = _fraction(str(ground_truth))
    if gold is None:
        raise ValueError(f"GSM8K ground truth {ground_truth!r} is not a number")
    number = _gsm8k_number(response)
    if number is None:
        return Verdict(0.0, None)
    return Verdict(float(_fraction(number.group()) == gold), number.span())


def _gsm8k_number(response: str) -> re.Match | None:
    number = None
    marker = response.rfind("####")
    if marker >= 0:
        number = _NUMBER.search(response, marker + len("####"))
    if number is None and (box := boxed_answer(response)) is not None:
        number = _NUMBER.search(response, box[1], box[2])
    return number


def math_span(response: str) -> tuple[int, int] | None:
    """The span `verify_math` reports, without verifying: the last \\boxed{}'s content."""
    found = boxed_answer(response)
    return None if found is None else (found[1], found[2])


def gsm8k_span(response: str) -> tuple[int, int] | None:
    """The span `verify_gsm8k` reports, without a ground truth: the final number."""
    number = _gsm8k_number(response)
    return None if number is None else number.span()


def char_span_to_token_mask(
    offsets: Sequence[tuple[int, int]], span: tuple[int, int] | None
) -> list[bool]:
    """True for each response token whose [start, end) character range overlaps `span`; a token
    with an empty range overlaps nothing, and a None span selects no token."""
    if span is None:
        return [False] * len(offsets)
    span_start, span_end = span
    if not 0 <= span_start <= span_end:
        raise ValueError(f"span must be [start, end) with 0 <= start <= end, got {span}")
    return [max(start, span_start) < min(end, span_end) for start, end in offsets]


# name -> (response text, ground truth) -> Verdict. Countdown is checked by its own task
# (`ftjax.tasks.countdown`), on the step format its policies write.
VERIFIERS = {"math": verify_math, "gsm8k": verify_gsm8k}
# name -> response text -> the span its verifier would report (cheap: no answer is checked).
SPANS = {"math": math_span, "gsm8k": gsm8k_span}
