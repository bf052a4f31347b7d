"""Verifiers: hand-written right, wrong and malformed responses; spans checked by slicing."""

import sys
import threading

import pytest

from ftjax.tasks import verifiers
from ftjax.tasks.verifiers import (
    VERIFIERS,
    Verdict,
    boxed_answer,
    char_span_to_token_mask,
    verify_gsm8k,
    verify_math,
)

GARBAGE = [
    "",
    "\\boxed{",
    "\\boxed{}",
    "}}}{{{\\boxed",
    "\u2603\u00e9\U0001f600 \u202e\u0000\ufffd",
    "\\boxed{\u2603\U0001f600}",
    "x" * 10_000,
    "\\boxed{" * 2_000,
    "####" * 2_500,
    "<answer>" * 1_250,
    "(" * 10_000,
    "9" * 10_000,
]


def sliced(response, verdict):
    start, end = verdict.span
    return response[start:end]


# --- boxed_answer -----------------------------------------------------------------------------


def test_boxed_nested_braces():
    text = "so the answer is \\boxed{\\frac{1}{2}} indeed"
    content, start, end = boxed_answer(text)
    assert content == "\\frac{1}{2}" and text[start:end] == content


def test_boxed_last_wins_and_fbox_counts():
    assert boxed_answer("\\boxed{1} then \\boxed{2}")[0] == "2"
    assert boxed_answer("\\boxed{1} then \\fbox{3}")[0] == "3"


def test_boxed_inside_a_box_belongs_to_it():
    assert boxed_answer("\\boxed{\\boxed{4} + 1}")[0] == "\\boxed{4} + 1"


def test_boxed_whitespace_trimmed_and_escaped_braces_ignored():
    text = "\\boxed{  \\{1, 2\\} }"
    content, start, end = boxed_answer(text)
    assert content == "\\{1, 2\\}" and text[start:end] == content
    assert boxed_answer("\\boxed{\\}}")[0] == "\\}"


@pytest.mark.parametrize(
    "text", ["no box here", "\\boxed{\\frac{1}{2}", "\\boxed{1} and then \\boxed{2", "\\boxed 5"]
)
def test_boxed_absent_or_unbalanced_is_none(text):
    assert boxed_answer(text) is None


# --- verify_math ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, truth",
    [
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "\\frac12"),
        ("72", "\\boxed{72}"),
        ("72", "72"),
        ("\\sqrt{18}", "3\\sqrt{2}"),
        ("(1, 2)", "(1,2)"),
    ],
)
def test_math_equivalent_answers(answer, truth):
    response = f"Some reasoning. The answer is $\\boxed{{{answer}}}$."
    verdict = verify_math(response, truth)
    assert verdict == Verdict(1.0, verdict.span)
    assert sliced(response, verdict) == answer


@pytest.mark.parametrize(
    "answer, truth", [("73", "72"), ("\\frac{1}{3}", "0.5"), ("x", "1"), ("2", "(1,2)")]
)
def test_math_wrong_answers(answer, truth):
    response = f"\\boxed{{{answer}}}"
    verdict = verify_math(response, truth)
    assert verdict.reward == 0.0 and sliced(response, verdict) == answer


def test_math_last_box_decides():
    response = "first \\boxed{3}, on reflection \\boxed{72}"
    verdict = verify_math(response, "72")
    assert verdict.reward == 1.0 and sliced(response, verdict) == "72"
    assert verify_math("\\boxed{72} no wait \\boxed{3}", "72").reward == 0.0


def test_math_no_box_is_no_answer():
    assert verify_math("The answer is 72.", "72") == Verdict(0.0, None)


@pytest.mark.parametrize("response", GARBAGE)
def test_math_garbage_scores_zero(response):
    verdict = verify_math(response, "72")
    assert verdict.reward == 0.0


def test_math_overlong_answer_is_counted_not_parsed():
    response = "\\boxed{" + "1+" * 600 + "1}"
    verdict = verify_math(response, "1201")
    assert verdict.reward == 0.0 and "longer" in verdict.error
    assert sliced(response, verdict) == "1+" * 600 + "1"


def test_math_timeout_scores_zero_and_keeps_span():
    # sympy spends far longer than a second deciding 10^(10^10) == 1.
    response = "\\boxed{10^{10^{10}}}"
    verdict = verify_math(response, "1", timeout_s=1)
    assert verdict.reward == 0.0 and verdict.error == "math_verify TimeoutException"
    assert sliced(response, verdict) == "10^{10^{10}}"


def test_math_timeout_outside_main_thread_is_refused_without_timeout_works():
    results = {}

    def worker():
        try:
            verify_math("\\boxed{1}", "1")
        except ValueError as error:
            results["error"] = str(error)
        results["verdict"] = verify_math("\\boxed{1}", "1", timeout_s=None)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert "timeout_s=None" in results["error"]
    assert results["verdict"].reward == 1.0


def test_math_any_math_verify_exception_scores_zero(monkeypatch):
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(math_verify, "verify", broken)
    verdict = verify_math("\\boxed{72}", "72")
    assert verdict.reward == 0.0 and verdict.error == "math_verify RuntimeError"
    assert verdict.span is not None


def test_math_missing_dependency_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(ValueError, match=r"ftjax\[math\]"):
        verify_math("\\boxed{1}", "1")


# --- verify_gsm8k -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, truth, number",
    [
        ("so she has 1,234 apples\n#### 1,234", "1234", "1,234"),
        ("#### 72.0", "72", "72.0"),
        ("#### $72 dollars", "72", "72"),
        ("#### -5", "-5", "-5"),
        ("steps 3 + 4 = 7, so \\boxed{7}", "7", "7"),
        ("#### 1,234", "1,234", "1,234"),
        ("#### 12 first\n#### 72", "72", "72"),
    ],
)
def test_gsm8k_correct(response, truth, number):
    verdict = verify_gsm8k(response, truth)
    assert verdict.reward == 1.0 and sliced(response, verdict) == number


def test_gsm8k_hashes_before_box_and_box_fallback():
    assert verify_gsm8k("#### 5 then \\boxed{72}", "72").reward == 0.0
    response = "#### nothing here \\boxed{72}"
    verdict = verify_gsm8k(response, "72")
    assert verdict.reward == 1.0 and sliced(response, verdict) == "72"


@pytest.mark.parametrize(
    "response, number", [("#### 73", "73"), ("#### 7.2", "7.2"), ("\\boxed{1,2}", "1")]
)
def test_gsm8k_wrong(response, number):
    verdict = verify_gsm8k(response, "72")
    assert verdict.reward == 0.0 and sliced(response, verdict) == number


@pytest.mark.parametrize("response", GARBAGE)
def test_gsm8k_garbage_scores_zero(response):
    assert verify_gsm8k(response, "72").reward == 0.0


def test_gsm8k_no_number_is_no_answer():
    assert verify_gsm8k("The answer is seventy-two.", "72") == Verdict(0.0, None)


def test_gsm8k_bad_ground_truth_raises():
    with pytest.raises(ValueError, match="seventy"):
        verify_gsm8k("#### 72", "seventy")


# --- char_span_to_token_mask and the registry -------------------------------------------------


def test_token_mask_marks_overlapping_tokens():
    response = "so #### 1,234 ok"
    offsets = [(0, 3), (3, 8), (8, 10), (10, 13), (13, 13), (13, 16)]
    verdict = verify_gsm8k(response, "1234")
    assert sliced(response, verdict) == "1,234"
    assert char_span_to_token_mask(offsets, verdict.span) == [
        False,
        False,
        True,
        True,
        False,
        False,
    ]


def test_token_mask_partial_overlap_empty_token_and_none():
    offsets = [(0, 2), (2, 5), (5, 5), (5, 9)]
    assert char_span_to_token_mask(offsets, (4, 6)) == [False, True, False, True]
    assert char_span_to_token_mask(offsets, (5, 5)) == [False] * 4
    assert char_span_to_token_mask(offsets, None) == [False] * 4
    assert char_span_to_token_mask([], (0, 3)) == []
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        char_span_to_token_mask(offsets, (5, 2))


def test_registry_names_the_verifiers():
    assert sorted(VERIFIERS) == ["gsm8k", "math"]
    assert VERIFIERS["math"] is verifiers.verify_math
    assert VERIFIERS["gsm8k"] is verifiers.verify_gsm8k
