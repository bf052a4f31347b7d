"""experiments.compare_runs on hand-written run directories: the table's numbers, the pairing by
seed, and the refusals."""

from __future__ import annotations

import json

import pytest

from experiments import compare_runs


def write_run(root, credit, seed, rewards, before, after, lr=5e-6):
    run = root / f"{credit}_seed{seed}"
    run.mkdir()
    config = {
        "run_dir": str(run),
        "step": {"credit": {"name": credit}, "optim": {"lr": lr}},
        "loop": {"seed": seed, "steps": 2},  # a run stopped early has fewer metrics
    }
    (run / "config.json").write_text(json.dumps(config))
    metrics = [{"step": i, "reward_mean": r, "loss": 0.0} for i, r in enumerate(rewards)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    evals = [
        {"step": 0, "pass@1": before[0], "avg@2": before[1], "problems": 4.0},
        {"step": len(rewards), "pass@1": after[0], "avg@2": after[1], "problems": 4.0},
    ]
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    return run


def test_table_pairs_each_credit_with_the_baseline_of_its_seed(tmp_path, capsys):
    runs = [
        write_run(tmp_path, "uniform", 0, [0.25, 0.75], (0.5, 0.25), (0.5, 0.5)),
        write_run(tmp_path, "uniform", 1, [0.5, 0.5], (0.5, 0.25), (0.75, 0.25)),
        write_run(tmp_path, "flowtracer", 0, [0.5, 1.0], (0.5, 0.25), (0.75, 0.5)),
        write_run(tmp_path, "flowtracer", 1, [0.25, 0.25], (0.5, 0.25), (0.5, 0.5)),
    ]
    out = tmp_path / "out.json"
    text = compare_runs.main(
        [*map(str, runs), "--json", str(out), "--plot", str(tmp_path / "r.png")]
    )
    assert "| uniform | 0 | 2 | 0.500 | 0.500 | 0.500 | 0.250 | 0.500 |" in text
    assert "| flowtracer | 1 | 2 | 0.250 | 0.500 | 0.500 | 0.250 | 0.500 |" in text
    # flowtracer - uniform per seed: mean reward 0.75 - 0.5 = +0.25 and 0.25 - 0.5 = -0.25;
    # pass@1 after +0.25 and -0.25; avg@2 after 0.0 and +0.25.
    assert "- mean reward: +0.000 ± 0.250 (n = 2; +0.250, -0.250)" in text
    assert "- pass@1 after: +0.000 ± 0.250 (n = 2; +0.250, -0.250)" in text
    assert "- avg@2 after: +0.125 ± 0.125 (n = 2; +0.000, +0.250)" in text
    record = json.loads(out.read_text())
    assert record["paired"]["flowtracer"]["avg@2 after"] == [0.0, 0.25]
    assert (tmp_path / "r.png").stat().st_size > 0
    assert text in capsys.readouterr().out


def test_runs_that_are_not_paired_arms_are_refused(tmp_path):
    a = write_run(tmp_path, "uniform", 0, [0.5, 0.5], (0.5, 0.5), (0.5, 0.5))
    b = write_run(tmp_path, "flowtracer", 0, [0.5, 0.5], (0.5, 0.5), (0.5, 0.5), lr=1e-5)
    with pytest.raises(ValueError, match="differ in step.optim.lr"):
        compare_runs.main([str(a), str(b)])
    c = write_run(tmp_path, "random", 0, [0.5], (0.5, 0.5), (0.5, 0.5))
    with pytest.raises(ValueError, match="different numbers of steps"):
        compare_runs.check_paired([compare_runs.load_run(a), compare_runs.load_run(c)])
    with pytest.raises(ValueError, match="appears twice"):
        compare_runs.check_paired([compare_runs.load_run(a), compare_runs.load_run(a)])
    with pytest.raises(ValueError, match="baseline credit 'uniform'"):
        compare_runs.main([str(c)])
    (c / "eval.jsonl").unlink()
    with pytest.raises(ValueError, match="has no eval.jsonl"):
        compare_runs.load_run(c)
