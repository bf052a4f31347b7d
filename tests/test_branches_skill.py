"""experiments.branches_skill: token kinds by hand, accuracy per kind against a loop, and the
teacher-forced read-out's alignment with models whose predictions are known."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from experiments import branches_skill
from ftjax.tasks.branches import BranchesConfig, BranchesTask


def test_token_kinds_of_a_substituting_trace_by_hand():
    text = "a=4=4;c=a+3=4+3=2;>2"
    want = (
        ["layout"] * 2 + ["copy", "layout", "copy", "layout"]  # a=4=4;
        + ["layout"] * 3 + ["operator", "copy", "layout", "substituted", "operator", "copy",
                            "layout", "link value", "layout"]  # c=a+3=4+3=2;
        + ["layout", "answer"]  # >2
    )  # fmt: skip
    assert branches_skill.token_kinds(text) == want


def test_token_kinds_of_a_plain_link_and_a_garbled_statement():
    assert branches_skill.token_kinds("c=a-3=1;") == (
        ["layout"] * 3 + ["operator", "copy", "layout", "link value", "layout"]
    )
    assert set(branches_skill.token_kinds("c=a+=3;x")) == {"layout"}  # no statement matches


def test_kind_accuracy_against_a_loop():
    rng = np.random.default_rng(0)
    kinds = rng.choice(["copy", "operator", "answer", ""], size=(5, 9))
    right = rng.random((5, 9)) < 0.6
    got = branches_skill.kind_accuracy(right, kinds)
    for kind in branches_skill.KINDS:
        cells = [right[b, t] for b in range(5) for t in range(9) if kinds[b, t] == kind]
        assert got[kind] == (sum(cells) / len(cells) if cells else None)


class NextTokenModel:
    """Logits that put all mass on a fixed function of the true next token."""

    def __init__(self, pick, vocab_size):
        self.pick, self.V = pick, vocab_size

    def __call__(self, tokens_BxT, valid_BxT):
        tokens_BxT = np.asarray(tokens_BxT)
        next_BxT = np.concatenate([tokens_BxT[:, 1:], tokens_BxT[:, -1:]], axis=1)
        logits = np.eye(self.V)[self.pick(next_BxT)]
        return types.SimpleNamespace(logits_BxTxV=logits)


@pytest.fixture(scope="module")
def task():
    return BranchesTask(BranchesConfig(chain_length=2, modulus=5, substitute=True))


def test_a_model_that_knows_the_next_token_scores_one_everywhere(task):
    model = NextTokenModel(lambda nxt: nxt, task.vocab.size)
    skill = branches_skill.teacher_forced_skill(model, task, 8, prompt_len=48)
    assert skill == {kind: 1.0 for kind in branches_skill.KINDS}


def test_a_model_that_is_one_token_off_scores_zero(task):
    model = NextTokenModel(lambda nxt: (nxt + 1) % task.vocab.size, task.vocab.size)
    skill = branches_skill.teacher_forced_skill(model, task, 8, prompt_len=48)
    assert skill == {kind: 0.0 for kind in branches_skill.KINDS}


def test_learning_curve_command_reads_the_warm_up_every_k_steps(tmp_path):
    out = tmp_path / "curve.json"
    rows = branches_skill.main(
        ["--warmup.steps", "4", "--warmup.warmup_steps", "1", "--warmup.batch_size", "4",
         "--every", "2", "--count", "4", "--policy.layers", "1", "--policy.hidden", "16",
         "--policy.heads", "2", "--out", str(out)]
    )  # fmt: skip
    assert [r["step"] for r in rows] == [2, 4]
    assert all(set(branches_skill.KINDS) <= set(r) and np.isfinite(r["loss"]) for r in rows)
    saved = json.loads(out.read_text())
    assert saved["curve"] == rows and saved["config"]["every"] == 2


@pytest.mark.parametrize("argv", [["--every", "0"], ["--every", "900"], ["--count", "0"]])
def test_learning_curve_refuses_bad_settings(argv):
    with pytest.raises(ValueError, match="CurveConfig"):
        branches_skill.main(argv)
