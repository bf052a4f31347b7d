"""Math datasets from local files -> `Example`s, and the hand-written prompt templates.

Rows come from `sources`: a JSONL, JSON-list, Parquet or Arrow file, a `datasets` save_to_disk
directory, or `load_dataset`-style data_files (globs, lists, split -> files). A row's `source` is
"path:line" (JSONL) or "path:row i" (the others). A row that cannot become an example (bad JSON,
missing, empty or mistyped field) is reported with its source and skipped, or raises with the
same message.

Multi-host: every process reads the same file and keeps `split_for_process` of it, so the
processes' rows are disjoint and together are the whole file, with no coordination.
Templates are text only; tokenizing them is the model's business. The hand-written ones are the
fallback for checkpoints that ship no chat template of their own (`ftjax.models.chat_template`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence

from ftjax.tasks import sources, verifiers

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
EXTENSIONS = sources.FILE_EXTENSIONS
ON_BAD_ROW = ("skip", "error")
_MISSING = object()  # a field absent from the row, as opposed to present and null


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str  # the question text (before any template)
    answer: str  # ground-truth final answer, e.g. "72", "\\frac{1}{2}"
    solution: str | None = None
    source: str = ""  # "path:line" (JSONL) or "path:row i" (the other sources) for messages
    system: str | None = None  # the row's own system message, when its prompt is chat messages
    # The row as read (every column), for reward functions (`tasks.rewards`); None if made in code
    row: dict | None = dataclasses.field(default=None, compare=False, repr=False)


def _check_path(name: str, path: str | None, optional: bool) -> None:
    if path is None and optional:
        return
    if not isinstance(path, str) or not path or "" in path.split("."):
        raise ValueError(f"FieldMap.{name} must be a dotted field path like 'a.b', got {path!r}")


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Where a row keeps each part: dotted paths into nested objects ("reward_model.ground_truth").
    The prompt may be a string or a list of chat messages (its one user message is the prompt,
    its system message, if any, is kept)."""

    prompt: str = "prompt"  # the question
    answer: str = "answer"  # the reference answer rewards compare to
    solution: str | None = None  # a worked solution (few-shot demonstrations); None: none

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


def _message_rows(value: dict) -> list[dict] | None:
    """Messages stored column-wise ({"role": [...], "content": [...]}, as `datasets` keeps a
    Sequence of dicts) as a list of messages; None when `value` is not that."""
    columns = list(value.values())
    if not {"role", "content"} <= value.keys() or not all(isinstance(c, list) for c in columns):
        return None
    if len({len(c) for c in columns}) != 1:
        return None
    return [dict(zip(value, row, strict=True)) for row in zip(*columns, strict=True)]


def _prompt_parts(value: object, name: str) -> tuple[str, str | None]:
    """(the prompt text, the system message or None) of a prompt field."""
    if isinstance(value, dict):
        value = _message_rows(value) or value
    if not isinstance(value, list):
        return _as_text(value, name, required=True), None
    if not all(isinstance(message, dict) for message in value):
        raise _BadRowError(f"field '{name}' is a list but not of chat messages (objects)")
    users = [message for message in value if message.get("role") == "user"]
    if len(users) != 1:
        raise _BadRowError(f"field '{name}' has {len(users)} user messages, expected 1")
    systems = [message for message in value if message.get("role") == "system"]
    if len(systems) > 1:
        raise _BadRowError(f"field '{name}' has {len(systems)} system messages, expected 0 or 1")
    prompt = _as_text(users[0].get("content", _MISSING), f"{name}[user].content", required=True)
    system = None
    if systems:
        content = systems[0].get("content", _MISSING)
        system = _as_text(content, f"{name}[system].content", required=False)
    return prompt, system


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
    """Where the rows are (`path`, or `data_files` instead) and how they become examples."""

    path: str = ""  # a data file (JSONL, JSON, Parquet, Arrow) or a save_to_disk directory
    preset: str | None = None  # one of PRESETS (its field names and answer rule), or None
    fields: FieldMap = FieldMap()  # a field set here (not left at its default) beats the preset's
    on_bad_row: str = "skip"  # "skip" (report and continue) or "error" (raise on the first)
    limit: int | None = None  # stop after this many examples
    # load_dataset-style files or globs, "split=pattern" for a split other than train
    # (--data.data_files 'train=a/*.jsonl,test=b.parquet'); when given, they replace path. Python
    # callers may also pass a pattern, a list, or a {split: pattern(s)} dict.
    data_files: tuple[str, ...] = ()
    split: str | None = None  # which split of data_files or a DatasetDict; None: the only one

    def __post_init__(self):
        object.__setattr__(self, "data_files", sources.normalize_data_files(self.data_files))
        if self.data_files:
            object.__setattr__(self, "path", "")  # so the recorded config says what is read
        elif not str(self.path):
            raise ValueError("DataConfig needs a path or data_files; both are empty")
        suffix = pathlib.Path(self.path).suffix.lower()
        if self.path and suffix not in ("", *EXTENSIONS) and not pathlib.Path(self.path).is_dir():
            raise ValueError(
                f"DataConfig.path {self.path!r} has extension {suffix!r}; known: {EXTENSIONS} "
                "(or a save_to_disk directory)"
            )
        if self.split is not None and not sources.is_split_name(self.split):
            raise ValueError(f"DataConfig.split {self.split!r} is not a split name like 'train'")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"DataConfig.preset {self.preset!r} is not one of {sorted(PRESETS)}")
        if self.on_bad_row not in ON_BAD_ROW:
            raise ValueError(
                f"DataConfig.on_bad_row must be one of {ON_BAD_ROW}, got {self.on_bad_row!r}"
            )
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise ValueError(f"DataConfig.limit must be None or >= 1, got {self.limit!r}")

    @property
    def label(self) -> str:
        """Where the rows come from, for messages: the path, or the data_files; and the split."""
        where = self.path or f"data_files {','.join(self.data_files)}"
        return where if self.split is None else f"{where} (split {self.split})"


def _example(row: object, preset: Preset, source: str) -> Example:
    if not isinstance(row, dict):
        raise _BadRowError(f"row is a JSON {type(row).__name__}, expected an object")
    prompt, system = _prompt_parts(_field(row, preset.fields.prompt), preset.fields.prompt)
    answer, solution = preset.answer_rule(row, preset.fields)
    return Example(prompt, answer, solution, source, system, row)


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
    """(examples, problems): problems are "source: why" for each skipped row, in row order."""
    preset = effective_preset(cfg)
    examples, problems = [], []
    for source, row, unreadable in sources.rows(cfg.path, cfg.data_files, cfg.split):
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


# Hand-written markup, for checkpoints without a chat template of their own: family -> (the
# system message's part, the turns). The turns are the system part (empty without a message), one
# user turn, then the opener of the assistant turn the model continues. Plain text and Gemma have
# no system role: the message goes before the question, a blank line between (as Gemma's own
# template does).
_CHATML = "{system}<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
TEMPLATES = {
    "plain": ("{text}\n\n", "{system}{content}\n"),
    "llama": (
        "<|start_header_id|>system<|end_header_id|>\n\n{text}<|eot_id|>",
        "<|begin_of_text|>{system}<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "qwen2": ("<|im_start|>system\n{text}<|im_end|>\n", _CHATML),
    "qwen3": ("<|im_start|>system\n{text}<|im_end|>\n", _CHATML),
    "gemma3": (
        "{text}\n\n",
        "<start_of_turn>user\n{system}{content}<end_of_turn>\n<start_of_turn>model\n",
    ),
}


def user_content(example_prompt: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The user turn's text: the question, a newline, the instruction (left out when empty)."""
    return "\n".join(part for part in (example_prompt.strip(), instruction.strip()) if part)


def render(
    example_prompt: str,
    family: str,
    instruction: str = DEFAULT_INSTRUCTION,
    system: str | None = None,
) -> str:
    """The prompt text a `family` model continues, in the family's hand-written markup: the
    system message (None or blank: none), then `user_content` as one user turn."""
    if family not in TEMPLATES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(TEMPLATES)}")
    system_part, turns = TEMPLATES[family]
    system_text = system_part.format(text=system.strip()) if system and system.strip() else ""
    return turns.format(system=system_text, content=user_content(example_prompt, instruction))


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
