"""Command-line overrides of the frozen configs."""

import dataclasses

import pytest

from ftjax import overrides, sharding, train


@dataclasses.dataclass(frozen=True)
class Run:
    step: train.StepConfig = train.StepConfig()
    mesh: sharding.MeshConfig = sharding.MeshConfig()
    name: str = "run"
    steps: int = 10
    eval_every: int | None = None
    seeds: tuple[int, ...] = (0,)
    resume: bool = True


def test_overrides_reach_nested_fields_with_their_types():
    cfg = overrides.apply(Run(), ["--step.credit.name", "uniform", "--step.optim.lr=3e-6",
                                  "--mesh.fsdp", "4", "--steps", "7", "--eval_every", "none",
                                  "--seeds", "1,2,3", "--resume", "false",
                                  "--step.loss.aggregation", "seq-mean-token-mean"])
    assert cfg.step.credit.name == "uniform" and cfg.step.optim.lr == 3e-6
    assert cfg.mesh == sharding.MeshConfig(data=-1, fsdp=4)
    assert (cfg.steps, cfg.eval_every, cfg.seeds, cfg.resume) == (7, None, (1, 2, 3), False)
    assert cfg.step.loss.aggregation == "seq-mean-token-mean"
    assert Run().step.credit.name == "flowtracer"  # the default is untouched
    assert overrides.apply(Run(), ["--eval_every", "5"]).eval_every == 5


@pytest.mark.parametrize(("argv", "message"), [
    (["--step.credit.nme", "uniform"], "unknown config key --step.credit.nme"),
    (["--nope", "1"], "unknown config key --nope"),
    (["--steps", "ten"], "cannot parse 'ten' as int"),
    (["--resume", "maybe"], "cannot parse"),
    (["--step.credit", "uniform"], "is a group"),
    (["--steps"], "needs a value"),
    (["steps", "3"], "expected --key value"),
    (["--step.credit.name", "nope"], "unknown credit variant 'nope'"),
    (["--step.optim.lr", "-1"], "lr must be finite and > 0"),
    (["--step.optim.lr", "inf"], "--step.optim.lr: 'inf' is not a finite number"),
    (["--steps.x", "1"], "unknown config key --steps.x"),
])
def test_bad_overrides_are_rejected_with_the_key(argv, message):
    with pytest.raises(ValueError, match=message):
        overrides.apply(Run(), argv)


def test_cross_field_checks_see_the_final_values_in_any_flag_order():
    """StepConfig refuses group_size 1 with std-scaled advantages; turning scaling off in the
    same command line is fine whichever flag comes first."""
    for argv in (
        ["--step.group_size", "1", "--step.loss.scale_advantages", "false"],
        ["--step.loss.scale_advantages", "false", "--step.group_size", "1"],
    ):
        cfg = overrides.apply(Run(), argv)
        assert cfg.step.group_size == 1 and not cfg.step.loss.scale_advantages
    with pytest.raises(ValueError, match="group_size 1"):
        overrides.apply(Run(), ["--step.group_size", "1"])
    # A later flag wins over an earlier one for the same field.
    assert overrides.apply(Run(), ["--steps", "3", "--steps", "4"]).steps == 4


def test_help_lists_every_field_with_type_and_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        overrides.apply(Run(), ["--steps", "3", "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for line in ("--step.optim.lr float (default 1e-06)", "--steps int (default 10)",
                 "--eval_every int | none (default None)", "--seeds int,... (default 0)",
                 "--step.credit.name str (default flowtracer)"):
        assert line in printed, line
    assert len(overrides.usage(Run())) == printed.count("\n  --")
