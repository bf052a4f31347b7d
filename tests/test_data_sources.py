"""Local datasets as users keep them: `datasets` save_to_disk directories (built here by hand with
pyarrow, and by the real library when it is installed), load_dataset-style data_files (globs,
lists, split -> files), Arrow files; bad rows reported with their sources throughout."""

import json

import pytest

from ftjax import overrides
from ftjax.tasks import sources
from ftjax.tasks.data import DataConfig, Example, load

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROWS = [
    {"question": "Ana has 3 apples and finds 2. How many?", "answer": "3 + 2 = 5\n#### 5"},
    {"question": "Bo has 10 pens and gives 4. How many?", "answer": "10 - 4 = 6\n#### 6"},
    {"question": "Cy has 2 cats and doubles them. How many?", "answer": "2 * 2 = 4\n#### 4"},
    {"question": "Di has 7 cups and finds 1. How many?", "answer": "7 + 1 = 8\n#### 8"},
    {"question": "Ed has 9 hats and gives 9. How many?", "answer": "9 - 9 = 0\n#### 0"},
]
ANSWERS = ["5", "6", "4", "8", "0"]


def write_stream(path, rows, schema=None):
    """An Arrow IPC stream file, as `datasets` writes its shards."""
    table = pa.Table.from_pylist(rows, schema=schema)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=2):  # several batches per shard
            writer.write_batch(batch)


def save_dataset(directory, rows, shards=2, split=None):
    """What `Dataset.save_to_disk` writes: data-0000k-of-0000n.arrow, state.json (the shards in
    order), dataset_info.json."""
    directory.mkdir(parents=True)
    names = [f"data-{k:05d}-of-{shards:05d}.arrow" for k in range(shards)]
    per = -(-len(rows) // shards)
    schema = pa.Table.from_pylist(rows).schema
    for k, name in enumerate(names):
        write_stream(directory / name, rows[k * per : (k + 1) * per], schema)
    state = {"_data_files": [{"filename": n} for n in names], "_split": split, "_fingerprint": "f"}
    (directory / "state.json").write_text(json.dumps(state))
    (directory / "dataset_info.json").write_text(json.dumps({"features": {}, "splits": None}))
    return directory


def save_dataset_dict(directory, splits):
    for name, rows in splits.items():
        save_dataset(directory / name, rows, shards=1, split=name)
    (directory / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    return directory


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- save_to_disk directories -----------------------------------------------------------------


def test_saved_dataset_rows_across_shards_in_state_order(tmp_path):
    directory = save_dataset(tmp_path / "gsm8k", ROWS, shards=3)
    # Listed order, not name order, decides: reverse the shards in state.json.
    state = json.loads((directory / "state.json").read_text())
    state["_data_files"].reverse()
    (directory / "state.json").write_text(json.dumps(state))
    examples, problems = load(DataConfig(str(directory), preset="gsm8k"))
    assert not problems
    order = [4, 2, 3, 0, 1]  # shard 2 holds row 4; shard 1 rows 2, 3; shard 0 rows 0, 1
    assert [e.answer for e in examples] == [ANSWERS[i] for i in order]
    assert [e.source for e in examples] == [f"{directory}:row {i}" for i in range(5)]
    assert examples[0] == Example(ROWS[4]["question"], "0", "9 - 9 = 0", f"{directory}:row 0")


def test_dataset_dict_split_is_chosen(tmp_path):
    directory = save_dataset_dict(tmp_path / "dd", {"train": ROWS[:3], "test": ROWS[3:]})
    examples, _ = load(DataConfig(str(directory), preset="gsm8k", split="test"))
    assert [e.answer for e in examples] == ["8", "0"]
    assert examples[0].source == f"{directory / 'test'}:row 0"
    with pytest.raises(ValueError, match=r"has splits \['train', 'test'\]; choose one"):
        load(DataConfig(str(directory), preset="gsm8k"))
    with pytest.raises(ValueError, match=r"no split 'validation'; it has \['train', 'test'\]"):
        load(DataConfig(str(directory), preset="gsm8k", split="validation"))
    only = save_dataset_dict(tmp_path / "only", {"test": ROWS[:2]})
    assert len(load(DataConfig(str(only), preset="gsm8k"))[0]) == 2  # the only split


def test_a_single_dataset_directory_and_a_split(tmp_path):
    directory = save_dataset(tmp_path / "one", ROWS, split="train")
    assert len(load(DataConfig(str(directory), preset="gsm8k", split="train"))[0]) == 5
    with pytest.raises(ValueError, match="split is 'test' but .* holds one dataset"):
        load(DataConfig(str(directory), preset="gsm8k", split="test"))


def test_bad_rows_in_a_saved_dataset_are_reported_by_row(tmp_path):
    rows = [
        {"question": "fine", "answer": "#### 1"},
        {"question": None, "answer": "#### 2"},
        {"question": "no hashes", "answer": "2"},
        {"question": "fine too", "answer": "#### 3"},
    ]
    directory = save_dataset(tmp_path / "bad", rows)
    examples, problems = load(DataConfig(str(directory), preset="gsm8k"))
    assert [e.answer for e in examples] == ["1", "3"]
    assert problems == [
        f"{directory}:row 1: field 'question' is null",
        f"{directory}:row 2: field 'answer' has no final answer after '####'",
    ]
    with pytest.raises(ValueError, match=rf"^{directory}:row 1: field 'question' is null"):
        load(DataConfig(str(directory), preset="gsm8k", on_bad_row="error"))


def test_broken_saved_directories_are_value_errors(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ValueError, match="is a directory without dataset_dict.json or state"):
        load(DataConfig(str(plain)))
    directory = save_dataset(tmp_path / "gone", ROWS)
    (directory / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(ValueError, match="data-00001-of-00002.arrow is listed in state.json"):
        load(DataConfig(str(directory), preset="gsm8k"))
    escape = save_dataset(tmp_path / "escape", ROWS, shards=1)
    (escape / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../x.arrow"}]}))
    with pytest.raises(ValueError, match="lists a bad data file"):
        load(DataConfig(str(escape)))
    corrupt = save_dataset(tmp_path / "corrupt", ROWS, shards=1)
    (corrupt / "data-00000-of-00001.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(ValueError, match="data-00000-of-00001.arrow is not a readable Arrow"):
        load(DataConfig(str(corrupt), preset="gsm8k"))
    truncated = save_dataset(tmp_path / "truncated", ROWS, shards=1)
    shard = truncated / "data-00000-of-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(ValueError, match="is not a readable Arrow"):
        load(DataConfig(str(truncated), preset="gsm8k"))


def test_chat_messages_stored_column_wise_keep_their_system_message(tmp_path):
    """`datasets` keeps a Sequence of dicts as a dict of lists."""
    rows = [
        {"prompt": {"role": ["system", "user"], "content": ["Be brief.", "6 times 7?"]},
         "reward_model": {"ground_truth": "42"}},
        {"prompt": [{"role": "user", "content": "1 + 1?"}], "reward_model": {"ground_truth": 2}},
    ]  # fmt: skip
    directory = save_dataset(tmp_path / "dapo", rows[:1], shards=1)
    (example,), _ = load(DataConfig(str(directory), preset="dapo_math_17k"))
    assert (example.prompt, example.system, example.answer) == ("6 times 7?", "Be brief.", "42")
    other = save_dataset(tmp_path / "dapo_list", rows[1:], shards=1)
    (example,), _ = load(DataConfig(str(other), preset="dapo_math_17k"))
    assert (example.prompt, example.system, example.answer) == ("1 + 1?", None, "2")


def test_real_datasets_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    reference, _ = load(DataConfig(str(write_jsonl(tmp_path / "rows.jsonl", ROWS)), "gsm8k"))
    one = tmp_path / "one"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(one), num_shards=2)
    examples, problems = load(DataConfig(str(one), preset="gsm8k"))
    assert not problems
    assert [(e.prompt, e.answer, e.solution) for e in examples] == [
        (e.prompt, e.answer, e.solution) for e in reference
    ]
    assert examples[3].source == f"{one}:row 3"
    both = tmp_path / "dict"
    split = {
        "train": datasets.Dataset.from_list(ROWS[:4]),
        "test": datasets.Dataset.from_list(ROWS[4:]),
    }
    datasets.DatasetDict(split).save_to_disk(str(both))
    examples, _ = load(DataConfig(str(both), preset="gsm8k", split="test"))
    assert [e.answer for e in examples] == ["0"]
    messages = datasets.Features(
        {
            "prompt": datasets.Sequence(
                {"role": datasets.Value("string"), "content": datasets.Value("string")}
            ),
            "answer": datasets.Value("string"),
        }
    )
    chat = [
        {"prompt": {"role": ["system", "user"], "content": ["Be brief.", "2+2?"]}, "answer": "4"}
    ]
    seq = tmp_path / "seq"
    datasets.Dataset.from_list(chat, features=messages).save_to_disk(str(seq))
    (example,), _ = load(DataConfig(str(seq)))
    assert (example.prompt, example.system, example.answer) == ("2+2?", "Be brief.", "4")


# --- data_files -------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train-00.jsonl", ROWS[:2])
    pq.write_table(pa.Table.from_pylist(ROWS[2:4]), folder / "train-01.parquet")
    write_stream(folder / "test-00.arrow", ROWS[4:])
    return folder


def answers(cfg):
    examples, problems = load(cfg)
    assert not problems, problems
    return [e.answer for e in examples]


def test_data_files_glob_list_and_mapping(files):
    train = str(files / "train-*")
    assert answers(DataConfig(data_files=train, preset="gsm8k")) == ANSWERS[:4]
    listed = [str(files / "train-01.parquet"), str(files / "train-00.jsonl")]
    assert answers(DataConfig(data_files=listed, preset="gsm8k")) == ["4", "8", "5", "6"]
    mapping = {"train": train, "test": [str(files / "test-*.arrow")]}
    assert answers(DataConfig(data_files=mapping, preset="gsm8k", split="test")) == ["0"]
    assert answers(DataConfig(data_files=mapping, preset="gsm8k", split="train")) == ANSWERS[:4]
    examples, _ = load(DataConfig(data_files=mapping, preset="gsm8k", split="train"))
    assert [e.source for e in examples] == [
        f"{files / 'train-00.jsonl'}:1",
        f"{files / 'train-00.jsonl'}:2",
        f"{files / 'train-01.parquet'}:row 0",
        f"{files / 'train-01.parquet'}:row 1",
    ]
    recursive = DataConfig(data_files=str(files.parent / "**" / "test-*.arrow"), preset="gsm8k")
    assert answers(recursive) == ["0"]


def test_data_files_normalize_to_split_entries_and_replace_path(files):
    cfg = DataConfig("ignored.jsonl", data_files={"train": ["a.jsonl", "b.jsonl"], "test": "c"})
    assert cfg.data_files == ("train=a.jsonl", "train=b.jsonl", "test=c")
    assert cfg.path == ""  # data_files replace path, and the recorded config says so
    assert DataConfig(data_files=["x/*.parquet", "dev=y.jsonl"]).data_files == (
        "train=x/*.parquet",
        "dev=y.jsonl",
    )
    assert DataConfig(data_files="train=year=2024/*.parquet").data_files == (
        "train=year=2024/*.parquet",
    )
    assert DataConfig(data_files=cfg.data_files).data_files == cfg.data_files  # idempotent
    # On the command line: comma separated, "split=pattern".
    flags = ["--data_files", f"train={files}/train-*,test={files}/test-00.arrow", "--split", "test"]
    parsed = overrides.apply(DataConfig("data/arith/train.jsonl", preset="gsm8k"), flags)
    assert parsed.path == "" and answers(parsed) == ["0"]


def test_data_files_problems_are_value_errors(files):
    with pytest.raises(ValueError, match="has splits .*'train', 'test'.*choose one"):
        load(DataConfig(data_files={"train": str(files / "train-*"), "test": str(files / "t*")}))
    with pytest.raises(ValueError, match="matches no file"):
        load(DataConfig(data_files=str(files / "nothing-*.jsonl")))
    with pytest.raises(ValueError, match="which does not exist"):
        load(DataConfig(data_files=str(files / "gone.jsonl")))
    (files / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt.*extension is not one of"):
        load(DataConfig(data_files=str(files / "*")))
    (files / "notes.txt").unlink()
    (files / "sub").mkdir()
    with pytest.raises(ValueError, match="sub.*which is not a file"):
        load(DataConfig(data_files=str(files / "*")))
    twice = [str(files / "train-00.jsonl"), str(files / "train-*")]
    with pytest.raises(ValueError, match="more than once"):
        load(DataConfig(data_files=twice))
    with pytest.raises(ValueError, match="no split 'test'"):
        load(DataConfig(data_files=str(files / "train-*"), split="test"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "needs a path or data_files"),
        ({"data_files": {"bad split": "a.jsonl"}}, "not a split name"),
        ({"data_files": {"train": []}}, "must be a pattern or a list"),
        ({"data_files": ["train="]}, "non-empty path"),
        ({"data_files": 3}, "a pattern, a list or a mapping"),
        ({"path": "x.jsonl", "split": "a b"}, "not a split name"),
    ],
)
def test_bad_data_config_is_a_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_split_needs_a_directory_or_data_files(files):
    with pytest.raises(ValueError, match="needs a save_to_disk directory or data_files"):
        load(DataConfig(str(files / "train-00.jsonl"), split="train"))


def test_bad_rows_across_data_files_are_reported_per_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "answer": "1"}])
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "p", "answer": "2"}\n{"prompt": "p"\n{"prompt": "q"}\n')
    write_stream(
        tmp_path / "c.arrow", [{"prompt": "p", "answer": None}, {"prompt": "r", "answer": "3"}]
    )
    examples, problems = load(DataConfig(data_files=str(tmp_path / "*")))
    assert [e.answer for e in examples] == ["1", "2", "3"]
    assert [p.split(": ", 1)[0] for p in problems] == [
        f"{bad}:2",
        f"{bad}:3",
        f"{tmp_path / 'c.arrow'}:row 0",
    ]
    assert "not valid JSON" in problems[0] and "missing field 'answer'" in problems[1]
    assert "field 'answer' is null" in problems[2]


def test_limit_stops_before_reading_later_files(tmp_path):
    write_jsonl(
        tmp_path / "a.jsonl", [{"prompt": "p", "answer": "1"}, {"prompt": "q", "answer": "2"}]
    )
    (tmp_path / "b.json").write_text("[{")  # never read: the limit is reached first
    examples, _ = load(DataConfig(data_files=str(tmp_path / "*"), limit=2))
    assert [e.answer for e in examples] == ["1", "2"]
    with pytest.raises(ValueError, match="b.json is not valid JSON"):
        load(DataConfig(data_files=str(tmp_path / "*")))


def test_arrow_ipc_file_format_is_read_too(tmp_path):
    table = pa.Table.from_pylist(ROWS)
    path = tmp_path / "rows.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    assert answers(DataConfig(str(path), preset="gsm8k")) == ANSWERS


def test_rows_of_one_file_directory_and_data_files_agree(tmp_path):
    """The same rows through every source: the examples agree but for their sources."""
    jsonl = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    saved = save_dataset(tmp_path / "saved", ROWS, shards=2)
    arrow = tmp_path / "rows.arrow"
    write_stream(arrow, ROWS)
    reads = [
        load(DataConfig(str(jsonl), preset="gsm8k"))[0],
        load(DataConfig(str(saved), preset="gsm8k"))[0],
        load(DataConfig(data_files=str(saved / "data-*.arrow"), preset="gsm8k"))[0],
        load(DataConfig(data_files=[str(arrow)], preset="gsm8k"))[0],
    ]
    triples = [[(e.prompt, e.answer, e.solution) for e in read] for read in reads]
    assert all(t == triples[0] for t in triples) and len(triples[0]) == 5
    assert sources.splits_of(("train=a", "test=b", "train=c")) == {
        "train": ["a", "c"],
        "test": ["b"],
    }
