"""Command lines of the frozen configs (through tyro): values, errors, `--help`."""

import dataclasses
import enum
import os
import pathlib
import re
import subprocess
import sys
import typing

import pytest

from experiments import common, math_rl
from ftjax import overrides, sharding, train

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Run:
    step: train.StepConfig = train.StepConfig()
    mesh: sharding.MeshConfig = sharding.MeshConfig()
    name: str = "run"
    steps: int = 10
    eval_every: int | None = None
    seeds: tuple[int, ...] = (0,)
    resume: bool = True


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass(frozen=True)
class Inner:
    """An inner group's own description."""

    width: int = 4  # how wide the inner thing is
    scale: float = 0.5  # a finite scale


@dataclasses.dataclass(frozen=True)
class Kinds:
    """Field types beyond the plain ones."""

    mode: typing.Literal["fast", "slow"] = "fast"  # how to go
    color: Color = Color.RED  # set by member name
    pair: tuple[int, int] = (1, 2)  # exactly two
    names: tuple[str, ...] | None = None  # optional list
    limit: int | None = 3  # optional int
    inner: Inner | None = Inner()  # an optional group that has a default
    absent: Inner | None = None  # an optional group without one: not on the command line


def dotted_fields(cfg, prefix: str = "") -> list[str]:
    """Every settable field of cfg as its flag's dotted name."""
    names = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            names += dotted_fields(value, f"{prefix}{field.name}.")
        else:
            names.append(f"{prefix}{field.name}")
    return names


def as_argv(cfg, prefix: str = "") -> list[str]:
    """A command line that sets every field of cfg to its value, as a person would type it."""
    argv = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            argv += as_argv(value, f"{prefix}{field.name}.")
            continue
        if isinstance(value, tuple):
            text = ",".join(map(str, value))
        elif value is None or isinstance(value, bool):
            text = str(value).lower()
        else:
            text = str(value)
        argv += [f"--{prefix}{field.name}", text]
    return argv


def help_entries(printed: str) -> dict[str, str]:
    """tyro's help as {flag: the rest of its entry (metavar, doc, default)}, box drawing removed."""
    entries, flag = {}, None
    for raw in printed.splitlines():
        line = raw.strip().strip("│|").strip()
        if raw.lstrip().startswith(("╭", "╰")) or not line.strip("-─ "):
            flag = None  # a group's frame or a rule
        elif line.startswith("--"):
            flag, _, rest = line.partition(" ")
            entries[flag] = rest.strip()
        elif flag is not None:
            entries[flag] += " " + line
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


def printed_help(cfg, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_info:
        overrides.apply(cfg, ["--steps", "3", "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


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
    assert overrides.apply(Run(), []) == Run()


@pytest.mark.parametrize(("argv", "seeds"), [
    (["--seeds", "1,2,3"], (1, 2, 3)),
    (["--seeds", "1", "2", "3"], (1, 2, 3)),  # space separated, as tyro reads lists
    (["--seeds", "1,2", "3", "--steps", "4"], (1, 2, 3)),
    (["--seeds=4,5"], (4, 5)),
    (["--seeds", ""], ()),
    (["--seeds"], ()),
])
def test_tuples_take_commas_or_spaces(argv, seeds):
    assert overrides.apply(Run(), argv).seeds == seeds


@pytest.mark.parametrize(("text", "value"), [
    ("true", True), ("True", True), ("yes", True), ("1", True),
    ("false", False), ("FALSE", False), ("no", False), ("0", False),
])
def test_bools_take_words(text, value):
    assert overrides.apply(Run(), ["--resume", text]).resume is value


@pytest.mark.parametrize("text", ["none", "None", "NULL"])
def test_none_sets_optional_fields(text):
    assert overrides.apply(Run(eval_every=4), ["--eval_every", text]).eval_every is None
    assert overrides.apply(Kinds(names=("a",)), ["--names", text]).names is None


@pytest.mark.parametrize(("argv", "message"), [
    (["--step.credit.nme", "uniform"], "Unrecognized options: --step.credit.nme"),
    (["--nope", "1"], "Unrecognized options: --nope"),
    (["--steps.x", "1"], "Unrecognized options: --steps.x"),
    (["steps", "3"], "Unrecognized options: steps"),
    (["--step.credit", "uniform"], "Unrecognized options: --step.credit,"),  # a group
    (["--steps"], "Missing value for argument '--steps'"),
    (["--steps", "ten"], "--steps: cannot parse 'ten' as int"),
    (["--eval_every", "1.5"], "--eval_every: cannot parse '1.5' as int"),
    (["--seeds", "1,x"], "--seeds: cannot parse 'x' as int"),
    (["--resume", "maybe"], "--resume: cannot parse 'maybe' as bool"),
    (["--step.optim.lr", "inf"], "--step.optim.lr: 'inf' is not a finite number"),
    (["--step.optim.lr", "nan"], "--step.optim.lr: 'nan' is not a finite number"),
    (["--step.optim.lr", "fast"], "--step.optim.lr: cannot parse 'fast' as float"),
    # The dataclasses' own __post_init__ checks, with the group they are in.
    (["--step.credit.name", "nope"], "step.credit: unknown credit variant 'nope'"),
    (["--step.optim.lr", "-1"], "step.optim: OptimConfig.lr must be finite and > 0"),
])
def test_bad_overrides_are_rejected_with_the_flag(argv, message, capsys):
    with pytest.raises(ValueError, match=re.escape(message)):
        overrides.apply(Run(), argv)
    assert capsys.readouterr() == ("", "")  # a ValueError, not tyro's printout


def test_an_unknown_flag_suggests_the_close_ones():
    with pytest.raises(ValueError, match="--step.credit.name") as error:
        overrides.apply(Run(), ["--step.credit.nam", "uniform"])
    assert "(default: flowtracer)" in str(error.value)


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


def test_every_field_round_trips_through_its_command_line():
    target = Run(
        step=train.StepConfig(group_size=3, micro_batch=2, scan_layers=True,
                              optim=train.OptimConfig(lr=2.5e-5, b2=0.95)),
        mesh=sharding.MeshConfig(data=2, fsdp=2),
        name="other run",
        steps=1,
        eval_every=7,
        seeds=(3, 1, 2),
        resume=False,
    )  # fmt: skip
    assert target != Run()
    assert overrides.apply(Run(), as_argv(target)) == target
    assert overrides.apply(target, as_argv(Run())) == Run()
    kinds = Kinds(names=("a", "b"), limit=None, inner=Inner(width=9, scale=2.0))
    assert overrides.apply(Kinds(), ["--names", "a,b", "--limit", "none", "--inner.width", "9",
                                     "--inner.scale", "2"]) == kinds  # fmt: skip


def test_literals_enums_fixed_tuples_and_optional_groups():
    cfg = overrides.apply(Kinds(), ["--mode", "slow", "--color", "BLUE", "--pair", "3", "4",
                                    "--names", "x", "y,z", "--inner.width", "7"])  # fmt: skip
    assert (cfg.mode, cfg.color, cfg.pair) == ("slow", Color.BLUE, (3, 4))
    assert cfg.names == ("x", "y", "z")
    assert cfg.inner == Inner(width=7)
    for argv, message in [
        (["--mode", "medium"], "invalid choice 'medium' for argument '--mode'"),
        (["--color", "blue"], "invalid choice 'blue' for argument '--color'"),  # names, not values
        (["--pair", "3"], "Missing value for argument '--pair'"),
        (["--inner.scale", "-inf"], "--inner.scale: '-inf' is not a finite number"),
        (["--absent.width", "3"], "Unrecognized options: --absent.width"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            overrides.apply(Kinds(), argv)


def test_help_lists_every_field_with_type_default_and_doc(capsys, monkeypatch):
    entries = help_entries(printed_help(Kinds(), capsys, monkeypatch))
    assert entries["--mode"] == "{fast,slow} how to go (default: fast)"
    assert entries["--color"] == "{RED,BLUE} set by member name (default: RED)"
    assert entries["--pair"] == "INT INT exactly two (default: 1 2)"
    assert entries["--names"] == "STR,...|none optional list (default: none)"
    assert entries["--limit"] == "INT|none optional int (default: 3)"
    assert entries["--inner.width"] == "INT how wide the inner thing is (default: 4)"
    assert entries["--inner.scale"] == "FLOAT a finite scale (default: 0.5)"
    assert set(entries) == {"--mode", "--color", "--pair", "--names", "--limit",
                            "--inner.width", "--inner.scale"}  # fmt: skip

    printed = printed_help(Run(), capsys, monkeypatch)
    entries = help_entries(printed)
    assert set(entries) == {f"--{name}" for name in dotted_fields(Run())}
    assert entries["--step.optim.lr"] == "FLOAT AdamW learning rate (constant) (default: 1e-06)"
    assert entries["--eval_every"] == "INT|none (default: none)"
    assert entries["--seeds"] == "INT,... (default: 0)"
    assert entries["--resume"] == "{true,false} (default: true)"
    # A group's class docstring heads its fields.
    assert "Which credit variant, and its knobs" in printed


@pytest.mark.parametrize("cfg", [math_rl.MathRLConfig(), common.QuickstartConfig()],
                         ids=["math_rl", "quickstart"])  # fmt: skip
def test_the_experiments_help_documents_every_field(cfg, capsys, monkeypatch):
    """Each field has a doc of its own (a `# comment`) or is described in its group's
    docstring, which the help prints above the group."""
    printed = printed_help(cfg, capsys, monkeypatch)
    entries = help_entries(printed)
    undocumented = []
    for name in dotted_fields(cfg):
        entry = entries[f"--{name}"]
        doc = re.sub(r"^\S+ |\(default: .*\)$", "", entry).strip()
        owner = cfg
        for part in name.split(".")[:-1]:
            owner = getattr(owner, part)
        group_doc = type(owner).__doc__ or ""
        if group_doc.startswith(f"{type(owner).__name__}("):
            group_doc = ""  # the signature dataclasses write when a class has no docstring
        described = re.search(rf"\b{name.split('.')[-1]}\b", group_doc)
        if not doc and not described:
            undocumented.append(name)
    assert not undocumented, f"fields without a doc: {undocumented}"


def test_math_rl_help_from_the_command_line_prints_every_field():
    env = {**os.environ, "COLUMNS": "100"}
    done = subprocess.run([sys.executable, "-m", "experiments.math_rl", "--help"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    entries = help_entries(done.stdout)
    assert done.stdout.startswith("usage: python -m experiments.math_rl")
    for name in dotted_fields(math_rl.MathRLConfig()):
        assert f"--{name}" in entries, name
        assert "(default: " in entries[f"--{name}"], name
    assert "gemma3-270m (from PyPI)" in entries["--model"]


def test_peek_reads_a_flag_before_the_config_is_built():
    assert overrides.peek(["--steps", "3", "--plugins", "a.py,b.py"], "plugins") == "a.py,b.py"
    assert overrides.peek(["--plugins", "a.py", "b.py", "--steps", "3"], "plugins") == "a.py,b.py"
    assert overrides.peek(["--plugins=a.py", "--plugins", "c.py"], "plugins") == "c.py"
    assert overrides.peek(["--steps", "3"], "plugins") is None
    assert overrides.peek(["--plugins", "a.py", "--help"], "plugins") is None
