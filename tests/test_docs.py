"""The documentation holds: every path it names exists, and the code in the variant guide runs.

Checked sources: every Markdown file of the repository (README.md, docs/, the RESULTS pages) and
the docstrings and comments of ftjax/, experiments/, benchmarks/ and tests/. In them:
- Markdown links to relative targets (Markdown files only), resolved from the file that holds
  them as GitHub resolves them, and their #anchors when they point into a Markdown file;
- tokens that look like paths of this repository: a name with a known extension (`.py`, `.md`,
  ...), or anything under docs/, ftjax/, experiments/, benchmarks/ or tests/;
- `python -m experiments.<name>` and `python -m benchmarks.<name>` modules, and the test named
  in a `tests/<file>.py::<test>` reference.
Names that are not files of this repository by design (run outputs, a user's own files, files
inside a checkpoint) are in the commented allow-list `NOT_IN_REPO`.
"""

import ast
import io
import os
import pathlib
import re
import shlex
import tokenize

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import causal_masking, common, credit_suite, evaluate, math_rl
from ftjax import credit, mesh_step, overrides, sharding, state_init, train

REPO = pathlib.Path(__file__).resolve().parents[1]
VARIANTS_DOC = REPO / "docs" / "credit_variants.md"
REPRODUCE_DOC = REPO / "docs" / "reproduce.md"
SKIPPED_DIRS = {"build", "data", "node_modules", "runs", "__pycache__"}  # plus hidden, *.egg-info
CODE_DIRS = ("ftjax", "experiments", "benchmarks", "tests")
EXTENSIONS = ("py", "md", "toml", "txt", "json", "cfg", "yaml", "yml")

# Not files of this repository, by design; a name matching one of these is not checked.
NOT_IN_REPO = [
    # What experiments and users write outside the tracked tree (both directories are gitignored):
    # run outputs under runs/ and data files under data/.
    re.compile(r"^(runs|data)/"),
    # Anything under a temporary directory.
    re.compile(r"(^|/)tmp/"),
    # A user's own files in examples: my_credit.py, tests/test_my_credit.py, and the generic
    # `--plugins a.py,b.py` of experiments/common.py.
    re.compile(r"(^|/)(test_)?my_\w*\.py$"),
    re.compile(r"^[ab]\.py$"),
    # Files an experiment writes into its --out or --run_dir (summary.md, table.md, the
    # quickstart's settings.json,
    # out_dir/stem.json in experiments/common.py, run_dir/config.json).
    re.compile(r"^(run_dir|out_dir)/"),
    re.compile(r"(^|/)(summary|table|stem|settings)\.(md|json)$"),
    # Files inside a Hugging Face checkpoint directory (config.json is also math_rl's output;
    # ftjax/models/hf.py calls model.safetensors.index.json "index.json" for short).
    re.compile(
        r"^(config|tokenizer|tokenizer_config|special_tokens_map|(model\.safetensors\.)?index)\.json$"
    ),
    # Files inside a directory that `datasets`' save_to_disk writes (ftjax/tasks/sources.py).
    re.compile(r"^(state|dataset_info|dataset_dict)\.json$"),
    # llama.cpp's converter script, named in ftjax/models/gguf.py.
    re.compile(r"^convert_hf_to_gguf\.py$"),
]

_PATH = re.compile(
    # Not inside a longer path, a glob, an absolute or home path, a variable or an URL.
    r"(?<![\w./*~$@:-])"
    rf"((?:[\w.-]+/)*[\w.-]*\w\.(?:{'|'.join(EXTENSIONS)})(?![\w/-])"
    rf"|(?:{'|'.join(('docs', *CODE_DIRS))})/[\w./-]*)"
)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_LINK_TARGET = re.compile(r"\]\([^)\s]+(?:\s+\"[^\"]*\")?\)")
_MODULE = re.compile(r"python -m ((?:experiments|benchmarks)\.\w+)")
_TEST = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def _walk(root: pathlib.Path):
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(
            d
            for d in subdirs
            if d not in SKIPPED_DIRS and not d.startswith(".") and not d.endswith(".egg-info")
        )
        for name in sorted(files):
            yield pathlib.Path(directory) / name


FILE_NAMES = {path.name for path in _walk(REPO)}


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    without_code = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return {slug(h) for h in re.findall(r"^#+\s+(.*)$", without_code, flags=re.M)}


def _allowed(token: str) -> bool:
    return any(pattern.search(token) for pattern in NOT_IN_REPO)


def _exists(token: str, where: pathlib.Path) -> bool:
    if (REPO / token).exists() or (where.parent / token).exists():
        return True
    return "/" not in token.rstrip("/") and token.rstrip("/") in FILE_NAMES


def python_text(source: str) -> str:
    """The docstrings and comments of a Python source: what a reader takes as documentation."""
    parts = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            docstring = ast.get_docstring(node, clean=False)
            if docstring:
                parts.append(docstring)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            parts.append(token.string)
    return "\n".join(parts)


def broken_references(text: str, where: pathlib.Path) -> list[str]:
    """What `text`, held by the file `where`, names that does not exist in the repository."""
    broken = []
    if where.suffix == ".md":
        for target in _LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            resolved = where if not path else (where.parent / path)
            if path and not resolved.exists() and not _allowed(path):
                broken.append(f"link {target}")
            elif (
                anchor
                and resolved.suffix == ".md"
                and resolved.is_file()
                and anchor not in anchors(resolved.read_text())
            ):
                broken.append(f"anchor {target}")
        text = _LINK_TARGET.sub("]", text)  # a link's target is checked above, its text below
    for match in _PATH.finditer(text):
        token = match.group(1).rstrip(".,")
        if not _allowed(token) and not _exists(token, where):
            broken.append(f"path {token}")
    for module in _MODULE.findall(text):
        if not (REPO / (module.replace(".", "/") + ".py")).is_file():
            broken.append(f"module {module}")
    for path, test in _TEST.findall(text):
        file = REPO / path
        if file.is_file() and not re.search(rf"^def {test}\(", file.read_text(), flags=re.M):
            broken.append(f"test {path}::{test}")
    return broken


def documentation_sources() -> list[tuple[pathlib.Path, str]]:
    markdown = [(p, p.read_text()) for p in _walk(REPO) if p.suffix == ".md"]
    code = [
        (p, python_text(p.read_text()))
        for directory in CODE_DIRS
        for p in _walk(REPO / directory)
        if p.suffix == ".py"
    ]
    return markdown + code


# ----------------------------------------------------------------------------- the checker


def test_every_path_named_in_the_docs_exists():
    sources = documentation_sources()
    names = {p.relative_to(REPO).as_posix() for p, _ in sources}
    assert {"README.md", "docs/method.md", "ftjax/flow.py", "tests/test_docs.py"} <= names
    broken = [
        f"{path.relative_to(REPO)}: {problem}"
        for path, text in sources
        for problem in broken_references(text, path)
    ]
    assert not broken, "named but missing:\n" + "\n".join(broken)


def test_the_checker_reports_what_is_missing():
    text = (
        "[the method](method.md), [a gone page](gone_page.md), [no such part](method.md#no-part),\n"
        "`docs/gone_page.md`, ftjax/gone_module.py, notes_kept_elsewhere.md.\n"
        "`python -m experiments.gone_experiment`, tests/test_flow.py::test_that_is_gone.\n"
        "Fine: [numerics](method.md#numerics), `ftjax/flow.py`, README.md, flow.py,\n"
        "runs/x/summary.md, my_credit.py, https://example.com/a/gone.md, /abs/gone.py,\n"
        "`python -m experiments.quickstart`, tests/test_flow.py::test_empty_sink.\n"
    )
    assert broken_references(text, REPO / "docs" / "example.md") == [
        "link gone_page.md",
        "anchor method.md#no-part",
        "path docs/gone_page.md",
        "path ftjax/gone_module.py",
        "path notes_kept_elsewhere.md",
        "module experiments.gone_experiment",
        "test tests/test_flow.py::test_that_is_gone",
    ]
    # In Python, docstrings and comments count, code does not.
    source = (
        'def f():\n    """Reads docs/gone_page.md."""\n'
        '    return "docs/gone_too.md"  # and ftjax/gone.py\n'
    )
    assert broken_references(python_text(source), REPO / "ftjax" / "example.py") == [
        "path docs/gone_page.md",
        "path ftjax/gone.py",
    ]


def test_slugs_match_github_anchors():
    assert slug("6. Selection and gamma") == "6-selection-and-gamma"
    assert slug("Inputs and `needs`") == "inputs-and-needs"
    assert slug("How `trace` stores h") == "how-trace-stores-h"


# ----------------------------------------------------------------------------- the variant guide


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", VARIANTS_DOC.read_text(), flags=re.S)


def python_block(first_line: str) -> str:
    (block,) = [b for b in code_blocks("python") if b.startswith(first_line)]
    return block


def doc_commands(doc: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(experiment, argv) of every `python -m experiments.<name>` line of the doc's bash blocks,
    with the shell variables the page assigns (`NAME=value` lines) substituted."""
    variables, commands = {}, []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), line)
            words = shlex.split(line, comments=True)
            if len(words) == 1 and re.fullmatch(r"[A-Z_]+=\S+", words[0]):
                name, value = words[0].split("=", 1)
                variables[name] = value
            elif words[:2] == ["python", "-m"] and words[2].startswith("experiments."):
                commands.append((words[2].removeprefix("experiments."), words[3:]))
    return commands


def _credits_known(cfg):
    for name in cfg.credits:
        credit.get(name)
    return cfg


PARSERS = {
    "quickstart": lambda argv: _credits_known(common.parse(common.QuickstartConfig(), argv)),
    "credit_suite": lambda argv: _credits_known(common.parse(credit_suite.SuiteConfig(), argv)),
    "math_rl": lambda argv: common.parse(math_rl.MathRLConfig(), argv),
    "causal_masking": lambda argv: overrides.apply(causal_masking.CausalConfig(), argv),
    "evaluate": lambda argv: overrides.apply(evaluate.EvaluateConfig(), argv),
}


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The guide's my_credit.py saved as a user's file, loaded into a registry of the built-ins
    alone (a clone may hold the guide's own files too, already registered); every variant it
    registers is unregistered afterwards, and the registry is restored as it was."""
    path = tmp_path / "my_credit.py"
    path.write_text(python_block("# my_credit.py"))
    built_in = {name: credit.get(name) for name in credit_suite.BUILT_IN}
    monkeypatch.setattr(credit, "_REGISTRY", built_in)
    yield path
    for name in set(credit.names()) - set(built_in):
        credit.unregister(name)


def test_the_guides_variants_and_their_test_run(plugin, tmp_path):
    credit.load_plugins([plugin])
    # The guide's test file, run from tests/ next to the plugin as the guide lays them out.
    namespace = {"__file__": str(tmp_path / "tests" / "test_my_credit.py"), "__name__": "guide"}
    exec(compile(python_block("# tests/test_my_credit.py"), str(VARIANTS_DOC), "exec"), namespace)
    tests = [fn for name, fn in namespace.items() if name.startswith("test_")]
    assert tests
    for test in tests:
        test()

    B, T = 2, 20
    prompt, response, answer = (np.zeros((B, T), bool) for _ in range(3))
    prompt[:, :5], response[:, 5:], answer[:, 16:18] = True, True, True
    logits = jax.random.normal(jax.random.key(1), (B, T, T))
    attn = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf), -1)
    inputs = credit.CreditInputs(
        prompt_mask_BxT=jnp.asarray(prompt),
        response_mask_BxT=jnp.asarray(response),
        answer_mask_BxT=jnp.asarray(answer),
        attn_BxTxT=attn,
        entropy_BxT=jax.random.uniform(jax.random.key(2), (B, T)),
    )
    for name, share in (("flowtracer_mean1_top20", 0.2), ("flowtracer_mean1_top60", 0.6)):
        gamma = np.asarray(credit.compute(inputs, credit.CreditConfig(name=name)))
        np.testing.assert_allclose(gamma[response].reshape(B, -1).mean(-1), 1.0, rtol=1e-6)
        up = (gamma > 1.0).sum(-1)
        assert np.all((up > 0) & (up <= credit.selection_count(15, share)))
    gamma = np.asarray(credit.compute(inputs, credit.CreditConfig(name="flow_x_entropy")))
    assert set(np.unique(gamma[response])) <= {1.0, 1.5} and np.all(gamma[~response] == 0)
    with pytest.raises(ValueError, match="needs CreditInputs.entropy_BxT"):
        credit.compute(
            credit.CreditInputs(inputs.prompt_mask_BxT, inputs.response_mask_BxT,
                                inputs.answer_mask_BxT, attn_BxTxT=attn),
            credit.CreditConfig(name="flow_x_entropy"),
        )  # fmt: skip


def test_the_guides_commands_parse_and_its_variant_trains(plugin):
    commands = [
        (name, [str(plugin) if word == "my_credit.py" else word for word in argv])
        for name, argv in doc_commands(VARIANTS_DOC)
    ]
    assert {name for name, _ in commands} <= set(PARSERS)
    assert "credit_suite" in {name for name, _ in commands}
    for name, argv in commands:
        PARSERS[name](argv)  # imports the plugin; unknown flags and credit names raise

    # One jitted train step with the variant, capture on, on 8 fake devices: what every
    # experiment runs for it (tests/test_experiments.py runs the experiments themselves).
    B, T = 8, 24
    model = common.build_policy(common.PolicyConfig(layers=3, hidden=32), seed=0)
    cfg = train.StepConfig(group_size=2, credit=credit.CreditConfig(name="flowtracer_mean1"))
    graphdef, state = state_init.init_state(model, cfg, jax.random.key(0))
    positions = np.arange(T)
    batch = train.Batch(
        tokens_BxT=jax.random.randint(jax.random.key(1), (B, T), 1, 20),
        prompt_mask_BxT=jnp.asarray(np.broadcast_to(positions < 8, (B, T))),
        response_mask_BxT=jnp.asarray(np.broadcast_to(positions >= 8, (B, T))),
        answer_mask_BxT=jnp.asarray(np.broadcast_to((positions >= 20) & (positions < 22), (B, T))),
        rewards_B=jnp.asarray([1.0, 0.0] * (B // 2)),
        old_log_probs_BxT=jnp.zeros((B, T)),
    )
    mesh = sharding.make_mesh(sharding.MeshConfig())
    step, state = mesh_step.make_train_step(graphdef, state, batch, cfg, mesh)
    _, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    # Equal-length responses, each with mean weight 1: the batch's mean weight is 1 too.
    np.testing.assert_allclose(float(metrics["credit/gamma_mean"]), 1.0, rtol=1e-5)
    top = credit.selection_count(T - 8, 0.4) / (T - 8)  # of the 16 response tokens
    assert 0.0 < float(metrics["credit/selected_fraction"]) <= top + 1e-6


# ------------------------------------------------------------------------- the reproduction page


def test_the_reproduction_commands_parse_and_say_what_the_page_says():
    commands = doc_commands(REPRODUCE_DOC)
    assert {name for name, _ in commands} == {"math_rl", "evaluate"}
    for name, argv in commands:
        cfg = PARSERS[name](argv)  # unknown flags, bad values and unset $VARIABLES raise
        if name == "math_rl":  # the paper's settings, as the page states them
            assert cfg.loop.prompts_per_step * cfg.step.group_size == 512
            assert cfg.step.optim.lr == 1e-6 and cfg.step.loss.kl_coef == 0.0
            assert cfg.step.credit.name == "flowtracer"
            assert cfg.loop.epochs * cfg.loop.minibatches == 1
