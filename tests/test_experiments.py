"""The quickstart end to end at toy size: it must run, write every output it promises, and print
exactly the numbers it wrote to its logs."""

import json
from html.parser import HTMLParser

import matplotlib.image
import numpy as np

from experiments import quickstart
from ftjax.logging import read_jsonl

TOY = [
    "--warmup.warmup_steps", "1", "--warmup.steps", "3", "--warmup.batch_size", "8",
    "--rl_steps", "2", "--prompts_per_step", "4", "--group_size", "2",
    "--eval_prompts", "4", "--precision_responses", "4", "--progress", "false",
    "--policy.layers", "3", "--policy.hidden", "32",
]  # fmt: skip


def test_quickstart_writes_what_it_prints(tmp_path, capsys):
    out = tmp_path / "qs"
    summary = quickstart.main([*TOY, "--out", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads((out / "summary.json").read_text())
    assert saved["runs"].keys() == {"uniform", "flowtracer"}
    table = (out / "summary.md").read_text()
    assert table.strip() in printed  # the printed table is the written one
    for name, run in saved["runs"].items():
        history = read_jsonl(out / f"rl_{name}" / "metrics.jsonl")
        assert sorted(history) == [0, 1]
        assert run["step_seconds"] == np.median([history[1]["time/step_s"]])
        assert f"| {name} | {saved['before']['accuracy_greedy']:.3f} | " in table
        assert f"{run['accuracy_greedy']:.3f}" in table
        assert (out / f"rl_{name}" / "checkpoints").is_dir()
        assert list((out / f"rl_{name}" / "tensorboard").iterdir())
    assert summary["runs"]["uniform"]["credit_overhead"] == 0.0
    assert len(read_jsonl(out / "warmup" / "metrics.jsonl")) == 3
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

    # Run again on the same directory: every stage is found and reused, nothing is redone.
    again = quickstart.main([*TOY, "--out", str(out)])
    assert again["warmup_seconds"] == 0.0
    assert (
        again["runs"]["flowtracer"]["accuracy_greedy"]
        == summary["runs"]["flowtracer"]["accuracy_greedy"]
    )
