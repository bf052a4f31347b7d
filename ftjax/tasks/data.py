"""Math datasets from local files (JSONL, a JSON list, Parquet) -> `Example`s, and prompt templates.

Rows: one JSON object per JSONL line, one element of a JSON list, one Parquet row. A row's
`source` is "path:line" (JSONL, 1-based as editors number lines) or "path:row i" (JSON list and
Parquet, 0-based as `rows[i]` reads it). A row that cannot become an example (bad JSON, missing,
empty or mistyped field) is reported with its source and skipped, or raises with the same message.

Multi-host: every process reads the same file and keeps `split_for_process` of it, so the
processes' rows are disjoint and together are the whole file, with no coordination.
Templates are text only; tokenizing them is the model's business.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Iterator, Sequence

from ftjax.tasks import verifiers

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
EXTENSIONS = (".jsonl", ".json", ".parquet")
ON_BAD_ROW = ("skip", "error")
_MISSING = object()  # a field absent from the row, as opposed to present and null


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str  # the question text (before any template)
    answer: str  # ground-truth final answer, e.g. "72", "\\frac{1}{2}"
    solution: str | None = None
    source: str = ""  # "path:line" (JSONL) or "path:row i" (JSON list, Parquet) for messages


def _check_path(name: str, path: str | None, optional: bool) -> None:
    if path is None and optional:
        return
    if not isinstance(path, str) or not path or "" in path.split("."):
        raise ValueError(f"FieldMap.{name} must be a dotted field path like 'a.b', got {path!r}")


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Where a row keeps each part: dotted paths into nested objects ("reward_model.ground_truth").
    The prompt may be a string or a list of chat messages (its one user message is taken)."""

    prompt: str = "prompt"
    answer: str = "answer"
    solution: str | None = None

    def __post_init__(self):
        _check_path("prompt", self.prompt, optional=False)
        _check_path("answer", self.answer, optional=False)
        _check_path("solution", self.solution, optional=True)


class _BadRowError(Exception):
    """A row that cannot become an example; the message says why, without the source."""


def _field(row: dict, path: str) -> object:
    value = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _as_text(value: object, name: str, *, required: bool) -> str | None:
    """A field's text, stripped: integers (AIME answers) become strings; an optional field that is
    absent, null or empty is None."""
    if value is _MISSING or value is None or (isinstance(value, str) and not value.strip()):
        if not required:
            return None
        if value is _MISSING:
            raise _BadRowError(f"missing field '{name}'")
        raise _BadRowError(f"field '{name}' is {'null' if value is None else 'empty'}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _BadRowError(f"field '{name}' has type {type(value).__name__}, expected a string")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # Parquet / pandas may store integer answers as floats
    return str(value).strip()


def _prompt_text(value: object, name: str) -> str:
    if not isinstance(value, list):
        return _as_text(value, name, required=True)
    if not all(isinstance(message, dict) for message in value):
        raise _BadRowError(f"field '{name}' is a list but not of chat messages (objects)")
    users = [message for message in value if message.get("role") == "user"]
    if len(users) != 1:
        raise _BadRowError(f"field '{name}' has {len(users)} user messages, expected 1")
    return _as_text(users[0].get("content", _MISSING), f"{name}[user].content", required=True)


AnswerRule = Callable[[dict, FieldMap], tuple[str, str | None]]  # row -> (answer, solution)


def _answer_as_is(row: dict, fields: FieldMap) -> tuple[str, str | None]:
    answer = _as_text(_field(row, fields.answer), fields.answer, required=True)
    solution = None
    if fields.solution is not None:
        solution = _as_text(_field(row, fields.solution), fields.solution, required=False)
    return answer, solution


def _answer_after_hashes(row: dict, fields: FieldMap) -> tuple[str, str | None]:
    """GSM8K: the answer field is a worked solution whose last line is "#### 72"."""
    worked = _as_text(_field(row, fields.answer), fields.answer, required=True)
    solution, marker, answer = worked.rpartition("####")
    answer = answer.replace(",", "").strip()
    if not marker or not answer:
        raise _BadRowError(f"field '{fields.answer}' has no final answer after '####'")
    return answer, solution.strip() or None


def _answer_or_last_box(row: dict, fields: FieldMap) -> tuple[str, str | None]:
    """MATH: the answer field when present (MATH500), else the solution's last \\boxed{}."""
    answer = _as_text(_field(row, fields.answer), fields.answer, required=False)
    solution = _as_text(_field(row, fields.solution), fields.solution, required=False)
    if answer is None:
        boxed = verifiers.boxed_answer(solution or "")
        if boxed is None or not boxed[0]:
            raise _BadRowError(
                f"no field '{fields.answer}' and no \\boxed{{}} answer in field '{fields.solution}'"
            )
        answer = boxed[0]
    return answer, solution


@dataclasses.dataclass(frozen=True)
class Preset:
    """A dataset's file layout: where the fields are and how its answer is written."""

    fields: FieldMap
    answer_rule: AnswerRule = _answer_as_is


PRESETS: dict[str, Preset] = {
    "gsm8k": Preset(FieldMap(prompt="question", answer="answer"), _answer_after_hashes),
    "math": Preset(
        FieldMap(prompt="problem", answer="answer", solution="solution"), _answer_or_last_box
    ),
    "dapo_math_17k": Preset(FieldMap(prompt="prompt", answer="reward_model.ground_truth")),
    "aime": Preset(FieldMap(prompt="problem", answer="answer")),
}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str
    preset: str | None = None  # one of PRESETS (its field names and answer rule), or None
    fields: FieldMap = FieldMap()  # a field set here (not left at its default) beats the preset's
    on_bad_row: str = "skip"  # "skip" (report and continue) or "error" (raise on the first)
    limit: int | None = None  # stop after this many examples

    def __post_init__(self):
        if not str(self.path):
            raise ValueError("DataConfig.path is empty")
        if pathlib.Path(self.path).suffix.lower() not in EXTENSIONS:
            raise ValueError(
                f"DataConfig.path {self.path!r} has extension "
                f"{pathlib.Path(self.path).suffix!r}; known: {EXTENSIONS}"
            )
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"DataConfig.preset {self.preset!r} is not one of {sorted(PRESETS)}")
        if self.on_bad_row not in ON_BAD_ROW:
            raise ValueError(
                f"DataConfig.on_bad_row must be one of {ON_BAD_ROW}, got {self.on_bad_row!r}"
            )
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise ValueError(f"DataConfig.limit must be None or >= 1, got {self.limit!r}")


Row = tuple[str, object, str | None]  # (source, row, why it is unreadable or None)


def _jsonl_rows(path: str) -> Iterator[Row]:
    # Bytes, decoded per line, so one line of bad UTF-8 is one bad row, not a failed file.
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line), None
            except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError
                yield f"{path}:{number}", None, f"not valid JSON ({error})"


def _json_rows(path: str) -> Iterator[Row]:
    try:
        with open(path, encoding="utf-8") as file:
            rows = json.load(file)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(rows, list):
        raise ValueError(f"{path} holds a JSON {type(rows).__name__}, expected a list of rows")
    for index, row in enumerate(rows):
        yield f"{path}:row {index}", row, None


def _parquet_rows(path: str) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ValueError(
            f"reading {path} needs pyarrow; install it with: pip install 'ftjax[math]'"
        ) from error
    try:
        file = pq.ParquetFile(path)
    except Exception as error:  # pyarrow's ArrowInvalid and friends
        raise ValueError(f"{path} is not a readable Parquet file ({error})") from error
    index = 0
    for batch in file.iter_batches(batch_size=1024):  # batches, so `limit` stops reading early
        for row in batch.to_pylist():
            yield f"{path}:row {index}", row, None
            index += 1


def _rows(path: str) -> Iterator[Row]:
    if pathlib.Path(path).is_dir():
        raise ValueError(f"data file {path!r} is a directory, not a file")
    if not pathlib.Path(path).is_file():
        raise ValueError(f"data file {path!r} does not exist")
    suffix = pathlib.Path(path).suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        return _json_rows(path)
    return _parquet_rows(path)


def _example(row: object, preset: Preset, source: str) -> Example:
    if not isinstance(row, dict):
        raise _BadRowError(f"row is a JSON {type(row).__name__}, expected an object")
    prompt = _prompt_text(_field(row, preset.fields.prompt), preset.fields.prompt)
    answer, solution = preset.answer_rule(row, preset.fields)
    return Example(prompt, answer, solution, source)


def effective_preset(cfg: DataConfig) -> Preset:
    """The preset's answer rule and field names, each field name replaced by the one `cfg.fields`
    sets (a field left at FieldMap's default keeps the preset's name)."""
    if cfg.preset is None:
        return Preset(cfg.fields)
    preset, default = PRESETS[cfg.preset], FieldMap()
    chosen = {
        f.name: getattr(cfg.fields, f.name)
        for f in dataclasses.fields(FieldMap)
        if getattr(cfg.fields, f.name) != getattr(default, f.name)
    }
    return dataclasses.replace(preset, fields=dataclasses.replace(preset.fields, **chosen))


def load(cfg: DataConfig) -> tuple[list[Example], list[str]]:
    """(examples, problems): problems are "source: why" for each skipped row, in file order."""
    preset = effective_preset(cfg)
    examples, problems = [], []
    for source, row, unreadable in _rows(cfg.path):
        try:
            if unreadable is not None:
                raise _BadRowError(unreadable)
            examples.append(_example(row, preset, source))
        except _BadRowError as bad:
            if cfg.on_bad_row == "error":
                raise ValueError(f"{source}: {bad}") from None
            problems.append(f"{source}: {bad}")
        if cfg.limit is not None and len(examples) >= cfg.limit:
            break
    return examples, problems


# One user turn, then the opener of the assistant turn the model continues.
TEMPLATES = {
    "plain": "{content}\n",
    "llama": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "qwen2": "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    "qwen3": "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    "gemma3": "<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
}


def render(example_prompt: str, family: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The prompt text a `family` model continues: the question, a newline, the instruction (an
    empty instruction is left out), in the family's chat markup for one user turn."""
    if family not in TEMPLATES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(TEMPLATES)}")
    content = "\n".join(part for part in (example_prompt.strip(), instruction.strip()) if part)
    return TEMPLATES[family].format(content=content)


def split_for_process(
    examples: Sequence[Example], process_index: int, process_count: int
) -> list[Example]:
    """Rows i with i % process_count == process_index: disjoint across processes, together all
    rows, and balanced to within one row."""
    if isinstance(process_count, bool) or not isinstance(process_count, int) or process_count < 1:
        raise ValueError(f"process_count must be an integer >= 1, got {process_count!r}")
    if (
        isinstance(process_index, bool)
        or not isinstance(process_index, int)
        or not 0 <= process_index < process_count
    ):
        raise ValueError(
            f"process_index must be an integer in [0, {process_count}), got {process_index!r}"
        )
    return list(examples)[process_index::process_count]
