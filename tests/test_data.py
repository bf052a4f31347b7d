"""Dataset loading: hand-written rows in each preset's layout, malformed rows, templates, splits."""

import json
import sys

import pytest

from ftjax.tasks.data import (
    DEFAULT_INSTRUCTION,
    TEMPLATES,
    DataConfig,
    Example,
    FieldMap,
    load,
    render,
    split_for_process,
)

GSM8K_ROWS = [
    {
        "question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
        "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\n48+24 = <<48+24=72>>72\n#### 72",
    },
    {"question": "A big sum?", "answer": "1000 + 234 = 1234\n#### 1,234"},
]
MATH_ROWS = [
    {  # MATH500: an answer field
        "problem": "What is $\\frac{1}{4} + \\frac{1}{4}$?",
        "solution": "Add: $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$.",
        "answer": "\\frac{1}{2}",
        "subject": "Prealgebra",
        "level": 1,
    },
    {  # original MATH: only the solution, whose last box is the answer
        "problem": "Simplify $\\sqrt{8}$.",
        "solution": "First \\boxed{\\sqrt{8}}, better $\\boxed{2\\sqrt{2}}$.",
        "level": "Level 2",
    },
]
DAPO_ROWS = [
    {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": "Solve: what is 6 times 7?"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": "42", "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": "a1"},
    }
]
AIME_ROWS = [
    {"id": 60, "problem": "Find the remainder when 2024 is divided by 1000.", "answer": 24},
    {"id": 61, "problem": "Find 10 + 3.", "answer": "013"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def write_parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


# --- presets ----------------------------------------------------------------------------------


def test_gsm8k_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    examples, problems = load(DataConfig(path, preset="gsm8k"))
    assert problems == []
    assert examples == [
        Example(
            GSM8K_ROWS[0]["question"],
            "72",
            "In May she sold 48/2 = <<48/2=24>>24 clips.\n48+24 = <<48+24=72>>72",
            f"{path}:1",
        ),
        Example("A big sum?", "1234", "1000 + 234 = 1234", f"{path}:2"),
    ]


def test_math_json_list_answer_field_or_last_box(tmp_path):
    path = tmp_path / "math500.json"
    path.write_text(json.dumps(MATH_ROWS), encoding="utf-8")
    examples, problems = load(DataConfig(str(path), preset="math"))
    assert problems == []
    assert examples == [
        Example(MATH_ROWS[0]["problem"], "\\frac{1}{2}", MATH_ROWS[0]["solution"], f"{path}:row 0"),
        Example(MATH_ROWS[1]["problem"], "2\\sqrt{2}", MATH_ROWS[1]["solution"], f"{path}:row 1"),
    ]


def test_math_parquet_with_null_answer_column(tmp_path):
    # Parquet has one schema: the second row's absent answer becomes null.
    rows = [{k: v for k, v in row.items() if k != "level"} for row in MATH_ROWS]  # mixed types
    path = write_parquet(tmp_path / "math.parquet", rows)
    examples, problems = load(DataConfig(path, preset="math"))
    assert problems == []
    assert [(e.answer, e.source) for e in examples] == [
        ("\\frac{1}{2}", f"{path}:row 0"),
        ("2\\sqrt{2}", f"{path}:row 1"),
    ]


def test_dapo_parquet_chat_prompt_and_nested_ground_truth(tmp_path):
    path = write_parquet(tmp_path / "dapo.parquet", DAPO_ROWS)
    examples, problems = load(DataConfig(path, preset="dapo_math_17k"))
    assert problems == []
    assert examples == [Example("Solve: what is 6 times 7?", "42", None, f"{path}:row 0")]


def test_aime_integer_answers_become_strings(tmp_path):
    path = write_jsonl(tmp_path / "aime.jsonl", AIME_ROWS)
    examples, _ = load(DataConfig(path, preset="aime"))
    assert [(e.prompt, e.answer) for e in examples] == [
        (AIME_ROWS[0]["problem"], "24"),
        (AIME_ROWS[1]["problem"], "013"),
    ]


def test_aime_parquet_integer_column(tmp_path):
    path = write_parquet(tmp_path / "aime.parquet", [AIME_ROWS[0], {**AIME_ROWS[0], "answer": 7}])
    examples, _ = load(DataConfig(path, preset="aime"))
    assert [e.answer for e in examples] == ["24", "7"]


def test_custom_fields_with_dotted_paths(tmp_path):
    rows = [{"q": {"text": "Why?"}, "meta": {"gold": "because"}, "work": "thinking"}]
    path = write_jsonl(tmp_path / "custom.jsonl", rows)
    fields = FieldMap(prompt="q.text", answer="meta.gold", solution="work")
    examples, _ = load(DataConfig(path, fields=fields))
    assert examples == [Example("Why?", "because", "thinking", f"{path}:1")]


# --- malformed rows ---------------------------------------------------------------------------

GOOD = json.dumps({"prompt": "What is 1+1?", "answer": "2"})
MALFORMED_LINES = [
    GOOD,  # 1
    '{"prompt": "broken", "answer": ',  # 2
    json.dumps({"prompt": "no answer"}),  # 3
    "",  # 4: blank lines are not rows
    json.dumps({"prompt": "   ", "answer": "1"}),  # 5
    json.dumps({"prompt": ["not", "messages"], "answer": "1"}),  # 6
    json.dumps({"prompt": "list answer", "answer": [1, 2]}),  # 7
    json.dumps([1, 2]),  # 8
    json.dumps({"prompt": "null answer", "answer": None}),  # 9
    json.dumps({"prompt": [{"role": "system", "content": "hi"}], "answer": "1"}),  # 10
    json.dumps({"prompt": "bool answer", "answer": True}),  # 11
    GOOD,  # 12
]


def malformed_file(tmp_path):
    path = tmp_path / "data.jsonl"
    text = "\n".join(MALFORMED_LINES) + "\n"
    # Line 13: bytes that are not UTF-8.
    path.write_bytes(text.encode() + b'{"prompt": "\xff\xfe", "answer": "1"}\n')
    return str(path)


def test_malformed_rows_are_reported_with_line_numbers(tmp_path):
    path = malformed_file(tmp_path)
    examples, problems = load(DataConfig(path))
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:12"]
    assert len(problems) == 10
    expected = {
        2: "not valid JSON",
        3: "missing field 'answer'",
        5: "field 'prompt' is empty",
        6: "field 'prompt' is a list but not of chat messages",
        7: "field 'answer' has type list",
        8: "row is a JSON list, expected an object",
        9: "field 'answer' is null",
        10: "field 'prompt' has 0 user messages, expected 1",
        11: "field 'answer' has type bool",
        13: "not valid JSON",
    }
    for problem, (line, why) in zip(problems, expected.items(), strict=True):
        assert problem.startswith(f"{path}:{line}: {why}"), problem


def test_error_mode_raises_on_the_first_bad_row(tmp_path):
    path = malformed_file(tmp_path)
    with pytest.raises(ValueError, match=rf"^{path}:2: not valid JSON"):
        load(DataConfig(path, on_bad_row="error"))


def test_preset_specific_problems(tmp_path):
    gsm8k = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "no hashes"}])
    _, problems = load(DataConfig(gsm8k, preset="gsm8k"))
    assert problems == [f"{gsm8k}:1: field 'answer' has no final answer after '####'"]
    math = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": "\\boxed{1"}])
    _, problems = load(DataConfig(math, preset="math"))
    assert problems == [
        f"{math}:1: no field 'answer' and no \\boxed{{}} answer in field 'solution'"
    ]
    dapo = write_jsonl(tmp_path / "d.jsonl", [{"prompt": [{"role": "user", "content": "x"}]}])
    _, problems = load(DataConfig(dapo, preset="dapo_math_17k"))
    assert problems == [f"{dapo}:1: missing field 'reward_model.ground_truth'"]


def test_json_list_rows_and_bad_json_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "p", "answer": "a"}, {"prompt": "p"}]))
    examples, problems = load(DataConfig(str(path)))
    assert len(examples) == 1 and problems == [f"{path}:row 1: missing field 'answer'"]
    path.write_text('{"prompt": "p", "answer": "a"}')
    with pytest.raises(ValueError, match="expected a list"):
        load(DataConfig(str(path)))
    path.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(DataConfig(str(path)))


def test_limit_stops_after_that_many_examples(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(10)]
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    examples, _ = load(DataConfig(path, limit=3))
    assert [e.answer for e in examples] == ["0", "1", "2"]
    parquet = write_parquet(tmp_path / "many.parquet", rows)
    examples, _ = load(DataConfig(parquet, limit=4))
    assert [e.answer for e in examples] == ["0", "1", "2", "3"]


# --- config and file errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"path": "x.jsonl", "preset": "gsm9k"}, "gsm9k"),
        ({"path": "x.csv"}, r"\.csv"),
        ({"path": "x.jsonl", "on_bad_row": "ignore"}, "ignore"),
        ({"path": "x.jsonl", "limit": 0}, "limit"),
    ],
)
def test_bad_config_is_a_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


@pytest.mark.parametrize("prompt", ["", "a..b", ".a"])
def test_bad_field_path_is_a_value_error(prompt):
    with pytest.raises(ValueError, match="FieldMap.prompt"):
        FieldMap(prompt=prompt)


def test_missing_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="nowhere.jsonl.* does not exist"):
        load(DataConfig(str(tmp_path / "nowhere.jsonl")))
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(ValueError, match="folder.jsonl.* is a directory"):
        load(DataConfig(str(tmp_path / "folder.jsonl")))


def test_field_map_overrides_the_preset_field_by_field(tmp_path):
    """GSM8K's answer rule (the number after ####) with the question under another name."""
    path = tmp_path / "renamed.jsonl"
    path.write_text('{"q": "What is 2 + 3?", "answer": "2 + 3 = 5\\n#### 5"}\n')
    cfg = DataConfig(str(path), preset="gsm8k", fields=FieldMap(prompt="q"))
    (example,), problems = load(cfg)
    assert not problems and (example.prompt, example.answer) == ("What is 2 + 3?", "5")


def test_unreadable_parquet_is_a_value_error(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text("not parquet")
    with pytest.raises(ValueError, match="fake.parquet"):
        load(DataConfig(str(path)))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "any.parquet"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"pip install 'ftjax\[math\]'"):
        load(DataConfig(str(path)))


# --- templates --------------------------------------------------------------------------------

OPENERS = {
    "plain": f"\n{DEFAULT_INSTRUCTION}\n",
    "llama": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2": "<|im_end|>\n<|im_start|>assistant\n",
    "qwen3": "<|im_end|>\n<|im_start|>assistant\n",
    "gemma3": "<end_of_turn>\n<start_of_turn>model\n",
}


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_templates_hold_question_and_instruction_then_open_the_answer(family):
    question = "What is $\\{x\\}$ if {x} = 2?"
    text = render(question, family)
    assert f"{question}\n{DEFAULT_INSTRUCTION}" in text
    assert text.endswith(OPENERS[family])
    assert text.count(question) == 1


def test_template_exact_text():
    assert render("1+1?", "plain") == f"1+1?\n{DEFAULT_INSTRUCTION}\n"
    assert render("1+1?", "qwen3", instruction="Box it.") == (
        "<|im_start|>user\n1+1?\nBox it.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render("1+1?", "llama", instruction="") == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n1+1?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render("1+1?", "gemma3", instruction="Box it.") == (
        "<start_of_turn>user\n1+1?\nBox it.<end_of_turn>\n<start_of_turn>model\n"
    )


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(ValueError, match="gemma3.*llama.*plain.*qwen2.*qwen3"):
        render("q", "mistral")


def test_templates_with_a_system_message():
    system = " Be brief. "
    assert render("1+1?", "plain", "Box it.", system) == "Be brief.\n\n1+1?\nBox it.\n"
    assert render("1+1?", "qwen2", "", system) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render("1+1?", "llama", "", system) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n1+1?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # Gemma has no system role: the message opens the user turn.
    assert render("1+1?", "gemma3", "", system) == (
        "<start_of_turn>user\nBe brief.\n\n1+1?<end_of_turn>\n<start_of_turn>model\n"
    )
    for family in TEMPLATES:  # a blank system message is none
        assert render("{x}?", family, "", "  ") == render("{x}?", family, "", None)


def test_chat_prompts_keep_their_system_message(tmp_path):
    rows = [
        {"prompt": [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "q"}],
         "answer": "1"},
        {"prompt": [{"role": "user", "content": "q"}], "answer": "2"},
        {"prompt": [{"role": "system", "content": ""}, {"role": "user", "content": "q"}],
         "answer": "3"},
        {"prompt": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
                    {"role": "user", "content": "q"}], "answer": "4"},
        {"prompt": [{"role": "system", "content": [{"type": "text", "text": "a"}]},
                    {"role": "user", "content": "q"}], "answer": "5"},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    examples, problems = load(DataConfig(path))
    got = [(e.system, e.answer) for e in examples]
    assert got == [("Be brief.", "1"), (None, "2"), (None, "3")]
    assert problems == [
        f"{path}:4: field 'prompt' has 2 system messages, expected 0 or 1",
        f"{path}:5: field 'prompt[system].content' has type list, expected a string",
    ]


# --- split_for_process ------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [0, 1, 7, 12])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_split_partitions_the_rows(rows, count):
    examples = [Example(f"q{i}", str(i)) for i in range(rows)]
    parts = [split_for_process(examples, index, count) for index in range(count)]
    sources = [e.prompt for part in parts for e in part]
    assert sorted(sources) == sorted(e.prompt for e in examples)  # union is everything
    assert len(sources) == len(set(sources)) == rows  # disjoint
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts[0] == examples[::count]


@pytest.mark.parametrize("index, count", [(0, 0), (2, 2), (-1, 2), (0, 1.5), (True, 2)])
def test_split_rejects_bad_arguments(index, count):
    with pytest.raises(ValueError):
        split_for_process([], index, count)
