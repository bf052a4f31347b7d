"""A checkpoint's own Jinja chat template, rendered as Hugging Face `transformers` renders it.

Where a checkpoint keeps it: `chat_template.jinja` beside the tokenizer (newer transformers save it
there; it wins), else the `chat_template` entry of tokenizer_config.json (a string, or a list of
named templates of which "default" is used); a GGUF file keeps it in `tokenizer.chat_template`.

What rendering means (`apply_chat_template(..., tokenize=False)`): a sandboxed Jinja environment
that cannot change lists or dicts or reach private attributes, with `trim_blocks`,
`lstrip_blocks` and loop controls (`{% break %}`, `{% continue %}`). The template sees `messages`,
`add_generation_prompt`, `tools` and `documents` (None), the named special tokens of the
tokenizer config (`bos_token`, `eos_token`, ... as text), any extra variables (`enable_thinking`),
and `raise_exception(message)`, `strftime_now(format)`, a `tojson` filter that keeps non-ASCII text
and does not escape HTML. `{% generation %}` blocks render their body. The text is then tokenized
without an added BOS, special tokens written in it mapping to their ids: a template that wants BOS
writes `bos_token` itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import pathlib
import re
from collections.abc import Mapping, Sequence

# The tokenizer config's named special tokens, as transformers passes them to a template.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# GGUF metadata key (llama.cpp's spelling) -> the name a template knows the token by.
GGUF_SPECIAL_IDS = {
    "tokenizer.ggml.bos_token_id": "bos_token",
    "tokenizer.ggml.eos_token_id": "eos_token",
    "tokenizer.ggml.unknown_token_id": "unk_token",
    "tokenizer.ggml.seperator_token_id": "sep_token",
    "tokenizer.ggml.padding_token_id": "pad_token",
    "tokenizer.ggml.cls_token_id": "cls_token",
    "tokenizer.ggml.mask_token_id": "mask_token",
}
RESERVED = ("messages", "add_generation_prompt", "tools", "documents")
MIN_JINJA = (3, 1, 6)  # older releases have known sandbox escapes; templates are untrusted code
_NAME = re.compile(r"^[A-Za-z_]\w*$")
Scalar = str | int | float | bool | None


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the variables it renders with (special tokens, options)."""

    source: str
    variables: tuple[tuple[str, Scalar], ...] = ()  # (name, value), e.g. ("bos_token", "<s>")

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError("a chat template must be non-empty Jinja text")
        names = [name for name, _ in self.variables]
        for name, value in self.variables:
            if not isinstance(name, str) or not _NAME.match(name) or name in RESERVED:
                raise ValueError(
                    f"chat template variable {name!r} must be an identifier other than {RESERVED}"
                )
            if value is not None and not isinstance(value, str | int | float | bool):
                raise ValueError(
                    f"chat template variable {name}={value!r}: expected text, a number, a bool "
                    "or None"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"chat template variables name one twice: {names}")

    def with_variables(self, **values: Scalar) -> ChatTemplate:
        """The same template with `values` added, each replacing a variable of the same name."""
        merged = {**dict(self.variables), **values}
        return dataclasses.replace(self, variables=tuple(merged.items()))

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
        """The text of `messages` (dicts with text `role` and `content`); with
        `add_generation_prompt`, the opener of the assistant turn the model continues."""
        checked = _checked_messages(messages)
        template = _compile(self.source)
        jinja2 = _import_jinja()
        try:
            return template.render(
                messages=checked,
                tools=None,
                documents=None,
                add_generation_prompt=bool(add_generation_prompt),
                **dict(self.variables),
            )
        except jinja2.TemplateError as error:  # raise_exception, sandbox refusals, bad filters
            raise ValueError(f"the chat template refused the conversation: {error}") from error
        except Exception as error:  # the template's own bug, e.g. adding text to a number
            raise ValueError(
                f"the chat template failed: {type(error).__name__}: {error}"
            ) from error


def _checked_messages(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"a conversation is a non-empty list of messages, got {messages!r}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not all(
            isinstance(message.get(key), str) for key in ("role", "content")
        ):
            raise ValueError(f"message {i} must have text 'role' and 'content', got {message!r}")
        checked.append(dict(message))
    return checked


def _import_jinja():
    try:
        import jinja2
    except ImportError as error:
        raise ValueError(
            "rendering a checkpoint's chat template needs jinja2: pip install 'ftjax[math]'"
        ) from error
    version = tuple(int(part) for part in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < MIN_JINJA:
        raise ValueError(
            f"jinja2 {jinja2.__version__} has known sandbox escapes; chat templates need "
            f">= {'.'.join(map(str, MIN_JINJA))}: pip install -U jinja2"
        )
    return jinja2


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want the plain JSON text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    jinja2 = _import_jinja()
    from jinja2 import ext, nodes, sandbox, utils

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    class Generation(ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks;
        rendering keeps the body, in a scope of its own."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    class Namespace(utils.Namespace):
        """`namespace(...)` that refuses private names, so no template reaches Python internals."""

        def __init__(self, *args, **kwargs):
            attributes = dict(*args, **kwargs)
            for name in attributes:
                _refuse_private(name)
            utils.Namespace.__init__(self, attributes)

        def __setitem__(self, name, value):
            _refuse_private(name)
            utils.Namespace.__setitem__(self, name, value)

    def _refuse_private(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is private")

    environment = sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["namespace"] = Namespace
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(
            f"the chat template does not compile: line {error.lineno}: {error.message}"
        ) from error


# ----------------------------------------------------------------------------- from checkpoints


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def _token_text(value: object, where: str) -> str | None:
    if isinstance(value, Mapping):  # a serialized AddedToken: {"content": "<s>", ...}
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: a special token must be text, got {value!r}")
    return value


def special_tokens(directory: pathlib.Path) -> dict[str, str]:
    """name -> text of the tokenizer's named special tokens: tokenizer_config.json's, then those
    of special_tokens_map.json (older checkpoints) it lacks, then a dict `extra_special_tokens`
    (model-specific names such as `image_token`)."""
    config = _read_json(directory / "tokenizer_config.json")
    legacy = _read_json(directory / "special_tokens_map.json")
    sources = ((config, "tokenizer_config.json"), (legacy, "special_tokens_map.json"))
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        for source, where in sources:
            text = _token_text(source.get(name), f"{directory / where} {name}")
            if text is not None:
                tokens[name] = text
                break
    extra = config.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        for name, value in extra.items():
            text = _token_text(value, f"{directory} extra_special_tokens {name}")
            if text is not None and _NAME.match(str(name)) and name not in RESERVED:
                tokens.setdefault(name, text)
    return tokens


def _configured_source(value: object, where: pathlib.Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use"}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if "default" not in named:
            raise ValueError(
                f"{where} has chat templates {sorted(map(str, named))} but none named 'default'"
            )
        return named["default"]
    raise ValueError(f"{where}: chat_template is a {type(value).__name__}, expected text")


def from_directory(directory: str | pathlib.Path) -> ChatTemplate | None:
    """The chat template of an HF checkpoint directory, or None when it ships none."""
    directory = pathlib.Path(directory)
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        source = jinja_file.read_text(encoding="utf-8")
    else:
        config_path = directory / "tokenizer_config.json"
        source = _configured_source(_read_json(config_path).get("chat_template"), config_path)
    if source is None or not source.strip():
        return None
    return ChatTemplate(source, tuple(special_tokens(directory).items()))


def from_gguf(metadata: Mapping[str, object], pieces: Sequence[str]) -> ChatTemplate | None:
    """The chat template of a GGUF file's metadata, its special tokens named from `pieces` (the
    vocabulary), or None when it ships none."""
    source = metadata.get("tokenizer.chat_template")
    if source is None:
        return None
    if not isinstance(source, str):
        raise ValueError(f"GGUF tokenizer.chat_template is a {type(source).__name__}, not text")
    tokens = {}
    for key, name in GGUF_SPECIAL_IDS.items():
        token_id = metadata.get(key)
        if token_id is None:
            continue
        if not 0 <= int(token_id) < len(pieces):
            raise ValueError(f"GGUF {key}={token_id} is outside the vocabulary [0, {len(pieces)})")
        tokens[name] = pieces[int(token_id)]
    return ChatTemplate(source, tuple(tokens.items())) if source.strip() else None
