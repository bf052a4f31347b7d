"""A checkpoint's own chat template, rendered by us and by `transformers`' apply_chat_template.

The four templates below are written for these tests in the style of each family's (ChatML with
thinking for Qwen3, ChatML with a default system prompt for Qwen2, Llama-3 headers with a dated
system turn, Gemma with no system role); each checkpoint directory is a tiny BPE tokenizer trained
here. No downloads.
"""

import dataclasses
import datetime
import json
import sys

import pytest

from ftjax.models import chat_template, pretrained
from ftjax.models.chat_template import ChatTemplate
from ftjax.tasks import data, prompts, text

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

QWEN3 = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" + tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=messages | length - 1) %}
{%- for message in messages | reverse %}
    {%- if message.role == 'user' %}
        {%- set ns.last_user = messages | length - loop.index %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set answer = message.content %}
        {%- set thought = '' %}
        {%- if '</think>' in answer %}
            {%- set thought = answer.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
            {%- set answer = answer.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
        {%- if loop.index0 > ns.last_user and thought %}
            {{- '<think>\\n' + thought + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- answer + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# Tags on lines of their own and literal markup between: trim_blocks and lstrip_blocks decide
# the layout.
QWEN2 = """\
{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

LLAMA3 = """\
{%- macro header(role) -%}
<|start_header_id|>{{ role }}<|end_header_id|>{{ '\\n\\n' }}
{%- endmacro -%}
{%- if date_string is not defined -%}
    {%- set date_string = strftime_now('%d %b %Y') -%}
{%- endif -%}
{{- bos_token -}}
{%- if messages[0]['role'] == 'system' -%}
    {%- set system_text = messages[0]['content'] | trim -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system_text = '' -%}
    {%- set turns = messages -%}
{%- endif -%}
{{- header('system') -}}
{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' -}}
{{- system_text + eos_token -}}
{%- for turn in turns -%}
    {%- if turn['role'] not in ('user', 'assistant') -%}
        {{- raise_exception('Unexpected role after the system turn: ' + turn['role']) -}}
    {%- endif -%}
    {{- header(turn['role']) + turn['content'] | trim + eos_token -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- header('assistant') -}}
{%- endif -%}
"""

GEMMA3 = """\
{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}
    {{- message['content'] | trim -}}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""

SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<bos>", "<eos>", "<pad>", "<start_of_turn>",
    "<end_of_turn>", "<think>", "</think>",
]  # fmt: skip

# name -> (template, how the directory keeps it, special tokens of tokenizer_config.json)
FAMILIES = {
    "qwen3": (QWEN3, "config", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "qwen2": (QWEN2, "named", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "llama": (LLAMA3, "jinja", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "gemma3": (
        GEMMA3,
        "config",
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
    ),
}

QUESTION = "What is 1 + 1?\n" + data.DEFAULT_INSTRUCTION
ODD = "  Solve {x} for x ≥ 2: 'é' \"quoted\" {{ not_jinja }} {% raw %}  "
CONVERSATIONS = {
    "user": [{"role": "user", "content": QUESTION}],
    "system": [
        {"role": "system", "content": "You are a careful mathematician."},
        {"role": "user", "content": QUESTION},
    ],
    "multi_turn": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nIt is 2."},
        {"role": "user", "content": ODD},
    ],
    "odd_text": [{"role": "user", "content": ODD}],
}
DATE = "26 Jul 2024"


def train_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def write_tokenizer_dir(directory, tok, template, keep, tokens):
    """A checkpoint's tokenizer files, the template kept as `keep` says: in tokenizer_config.json
    ("config"), as a list of named templates there ("named"), or in chat_template.jinja."""
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens}
    if keep == "config":
        config["chat_template"] = template
    elif keep == "named":
        tool_use = "{{ 'tools: ' + tools | tojson }}"
        config["chat_template"] = [
            {"name": "tool_use", "template": tool_use},
            {"name": "default", "template": template},
        ]
    else:
        (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def tokenizer():
    texts = [QUESTION, ODD, "You are a careful mathematician.", "It is 2.", "system user model"]
    return train_tokenizer(texts)


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    return {
        family: write_tokenizer_dir(root / family, tokenizer, template, keep, tokens)
        for family, (template, keep, tokens) in FAMILIES.items()
    }


def theirs(directory):
    return transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_renders_as_transformers_does(family, checkpoints):
    ours = chat_template.from_directory(checkpoints[family]).with_variables(date_string=DATE)
    reference = theirs(checkpoints[family])
    for name, messages in CONVERSATIONS.items():
        for add_generation_prompt in (True, False):
            expected = reference.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                date_string=DATE,
            )
            got = ours.render(messages, add_generation_prompt=add_generation_prompt)
            assert got == expected, (family, name, add_generation_prompt)


def test_the_templates_render_what_each_family_expects(checkpoints):
    """The parity above compares like with like; this pins that the templates are the real
    thing (system turns, folded system, default system prompt, the opener) by hand."""
    system = CONVERSATIONS["system"]
    render = {
        family: chat_template.from_directory(path).with_variables(date_string=DATE)
        for family, path in checkpoints.items()
    }
    assert render["qwen3"].render(system, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a careful mathematician.<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render["qwen2"].render(CONVERSATIONS["user"], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
    )
    assert render["llama"].render(system, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"Cutting Knowledge Date: December 2023\nToday Date: {DATE}\n\n"
        "You are a careful mathematician.<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render["gemma3"].render(system, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nYou are a careful mathematician.\n\n"
        f"{QUESTION}<end_of_turn>\n<start_of_turn>model\n"
    )
    # The hand-written fallbacks agree with these templates on a system + user conversation
    # (Gemma's BOS comes from the tokenizer there).
    for family, bos in (("qwen3", ""), ("gemma3", "<bos>")):
        fallback = data.render("What is 1 + 1?", family, system="You are a careful mathematician.")
        assert bos + fallback == render[family].render(system, add_generation_prompt=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_token_ids_match_transformers(family, checkpoints):
    """Our tokenizer on our text (no BOS added: the template writes it) gives transformers'
    apply_chat_template(tokenize=True) ids."""
    ours = chat_template.from_directory(checkpoints[family]).with_variables(date_string=DATE)
    tok = pretrained.HFTokenizer(checkpoints[family])
    reference = theirs(checkpoints[family])
    for messages in CONVERSATIONS.values():
        expected = reference.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, date_string=DATE
        )
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        ids = tok.encode(ours.render(messages, add_generation_prompt=True), add_bos=False)
        assert ids == list(expected)


def test_thinking_switch_and_the_special_tokens_as_variables(checkpoints):
    ours = chat_template.from_directory(checkpoints["qwen3"])
    assert dict(ours.variables) == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    messages = CONVERSATIONS["user"]
    off = ours.with_variables(enable_thinking=False).render(messages, add_generation_prompt=True)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    expected = theirs(checkpoints["qwen3"]).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert off == expected


# --- the environment's semantics, each against transformers ------------------------------------


def both(tmp_path, tok, source, messages, **variables):
    directory = write_tokenizer_dir(tmp_path / "t", tok, source, "config", {"eos_token": "<eos>"})
    ours = chat_template.from_directory(directory).with_variables(**variables)
    expected = theirs(directory).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **variables
    )
    return ours.render(messages, add_generation_prompt=True), expected


def test_tojson_keeps_unicode_and_html_and_takes_options(tmp_path, tokenizer):
    source = (
        "{{ messages | tojson }}|{{ {'b': '<a&é>', 'a': [1, 2]} | tojson(indent=2, sort_keys=True) "
        "}}|{{ messages[0] | tojson(separators=(',', ':')) }}"
    )
    messages = [{"role": "user", "content": "<b>ça & 'x'</b>"}]
    got, expected = both(tmp_path, tokenizer, source, messages)
    assert got == expected
    assert "\"<b>ça & 'x'</b>\"" in got  # no \u escapes, no HTML escapes


def test_strftime_now_is_todays_date(tmp_path, tokenizer):
    before = datetime.datetime.now()
    got, expected = both(
        tmp_path, tokenizer, "{{ strftime_now('%Y-%m-%d') }}", CONVERSATIONS["user"]
    )
    after = datetime.datetime.now()
    if before.date() == after.date():
        assert got == expected == before.strftime("%Y-%m-%d")


def test_loop_controls_and_generation_blocks(tmp_path, tokenizer):
    source = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% generation %}{% set inner = m.content %}[{{ inner }}]{% endgeneration %}"
        "{% endfor %}{{ inner is defined }}"
    )
    got, expected = both(tmp_path, tokenizer, source, CONVERSATIONS["multi_turn"])
    assert got == expected == "[What is 1 + 1?]False"


def test_raise_exception_is_a_value_error_with_the_templates_message(checkpoints):
    wrong_order = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]
    with pytest.raises(Exception, match="must alternate"):
        theirs(checkpoints["gemma3"]).apply_chat_template(wrong_order, tokenize=False)
    with pytest.raises(ValueError, match="refused the conversation: Conversation roles must alt"):
        chat_template.from_directory(checkpoints["gemma3"]).render(wrong_order, True)


@pytest.mark.parametrize(
    "source",
    [
        "{% set _ = messages.append({'role': 'user'}) %}",  # the immutable sandbox
        "{{ messages.__class__.__mro__ }}",  # private attributes
        "{% set ns = namespace(_hidden=1) %}",  # private namespace names
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
    ],
)
def test_the_sandbox_refuses_what_templates_may_not_do(source):
    with pytest.raises(ValueError, match="refused the conversation"):
        ChatTemplate(source).render(CONVERSATIONS["user"], True)


def test_bad_templates_and_inputs_are_value_errors():
    with pytest.raises(ValueError, match="does not compile: line 2"):
        ChatTemplate("ok\n{% if %}").render(CONVERSATIONS["user"], True)
    with pytest.raises(ValueError, match="the chat template failed: TypeError"):
        ChatTemplate("{{ messages[0].content + 1 }}").render(CONVERSATIONS["user"], True)
    with pytest.raises(ValueError, match="non-empty"):
        ChatTemplate("  ")
    with pytest.raises(ValueError, match="'messages'"):
        ChatTemplate("x").with_variables(messages="no")
    with pytest.raises(ValueError, match="expected text"):
        ChatTemplate("x", (("options", [1]),))
    with pytest.raises(ValueError, match="message 0 must have text 'role' and 'content'"):
        ChatTemplate("x").render([{"role": "user", "content": None}], True)
    with pytest.raises(ValueError, match="non-empty list"):
        ChatTemplate("x").render([], True)


def test_missing_jinja2_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "jinja2", None)
    chat_template._compile.cache_clear()
    with pytest.raises(ValueError, match=r"pip install 'ftjax\[math\]'"):
        ChatTemplate("{{ 1 }} fresh").render(CONVERSATIONS["user"], True)
    chat_template._compile.cache_clear()


# --- where checkpoints keep it -------------------------------------------------------------------


def test_where_the_template_is_read_from(tmp_path, tokenizer):
    both_places = write_tokenizer_dir(tmp_path / "a", tokenizer, "from config", "config", {})
    (both_places / "chat_template.jinja").write_text("from the jinja file")
    assert chat_template.from_directory(both_places).source == "from the jinja file"
    assert theirs(both_places).chat_template == "from the jinja file"  # transformers agrees
    none = write_tokenizer_dir(tmp_path / "b", tokenizer, "x", "config", {})
    (none / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    assert chat_template.from_directory(none) is None
    no_default = tmp_path / "c"
    no_default.mkdir()
    config = {"chat_template": [{"name": "tool_use", "template": "x"}]}
    (no_default / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"\['tool_use'\] but none named 'default'"):
        chat_template.from_directory(no_default)


def test_special_tokens_from_added_token_dicts_legacy_map_and_extra_names(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": "{{ bos_token }}{{ eos_token }}{{ unk_token }}{{ image_token }}",
                "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True},
                "eos_token": None,
                "extra_special_tokens": {"image_token": "<img>"},
            }
        )
    )
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "</s>", "unk_token": {"content": "<unk>"}, "bos_token": "<x>"})
    )
    ours = chat_template.from_directory(tmp_path)
    assert dict(ours.variables) == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "image_token": "<img>",
    }
    assert ours.render(CONVERSATIONS["user"], True) == "<s></s><unk><img>"


def test_gguf_metadata_template_and_token_names():
    pieces = ["<pad>", "<eos>", "<bos>", "a"]
    metadata = {
        "tokenizer.chat_template": "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}",
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.padding_token_id": 0,
    }
    ours = chat_template.from_gguf(metadata, pieces)
    assert dict(ours.variables) == {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
    }
    assert ours.render(CONVERSATIONS["odd_text"], True) == f"<bos>{ODD}<eos>"
    assert chat_template.from_gguf({}, pieces) is None
    with pytest.raises(ValueError, match="outside the vocabulary"):
        chat_template.from_gguf({**metadata, "tokenizer.ggml.bos_token_id": 9}, pieces)


# --- the real-model prompt path uses it ---------------------------------------------------------


@pytest.fixture(scope="module")
def llama_checkpoint(tokenizer, tmp_path_factory):
    """A tiny random HF Llama whose tokenizer directory ships the Llama-style template."""
    import torch

    template, keep, tokens = FAMILIES["llama"]
    directory = write_tokenizer_dir(
        tmp_path_factory.mktemp("llama") / "ckpt", tokenizer, template, keep, tokens
    )
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=vocab["<|begin_of_text|>"],
        eos_token_id=vocab["<|eot_id|>"],
        pad_token_id=vocab["<pad>"],
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


def test_build_task_renders_prompts_through_the_checkpoints_template(llama_checkpoint, tmp_path):
    rows = [
        {
            "prompt": [
                {"role": "system", "content": "You are a careful mathematician."},
                {"role": "user", "content": "What is 1 + 1?"},
            ],
            "answer": "2",
        },
        {"prompt": "What is 2 + 2?", "answer": "4"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    policy = pretrained.load(str(llama_checkpoint))
    assert policy.chat_template is not None and policy.chat_template.source == LLAMA3
    data_cfg = data.DataConfig(str(path))
    reference = theirs(llama_checkpoint)

    def expected_ids(system, question):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": f"{question}\n{data.DEFAULT_INSTRUCTION}"})
        out = reference.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, date_string=DATE
        )
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    fixed_date = prompts.PromptConfig(template_vars=(f"date_string={DATE}",))
    task, problems = prompts.build_task(policy, data_cfg, fixed_date, 256)
    assert not problems and task.cfg.template == text.CHECKPOINT and not task.cfg.add_bos
    assert task.prompt_ids == [
        expected_ids("You are a careful mathematician.", "What is 1 + 1?"),
        expected_ids(None, "What is 2 + 2?"),
    ]
    # One system message for every prompt, or none at all.
    brief = dataclasses.replace(fixed_date, system="Be brief.")
    task, _ = prompts.build_task(policy, data_cfg, brief, 256)
    assert task.prompt_ids == [
        expected_ids("Be brief.", "What is 1 + 1?"),
        expected_ids("Be brief.", "What is 2 + 2?"),
    ]
    silent = dataclasses.replace(fixed_date, system="")
    task, _ = prompts.build_task(policy, data_cfg, silent, 256)
    assert task.prompt_ids[0] == expected_ids(None, "What is 1 + 1?")
    # A hand-written template on request, BOS added by the tokenizer.
    plain, _ = prompts.build_task(policy, data_cfg, prompts.PromptConfig(template="plain"), 256)
    system_first = "You are a careful mathematician.\n\nWhat is 1 + 1?\n"
    assert plain.prompt_ids[0] == policy.tokenizer.encode(
        system_first + data.DEFAULT_INSTRUCTION + "\n"
    )
    assert policy.tokenizer.bos_id == plain.prompt_ids[0][0]


def test_template_choices_fail_loudly(llama_checkpoint):
    policy = pretrained.load(str(llama_checkpoint))
    without = dataclasses.replace(policy, chat_template=None)
    assert prompts.PromptConfig().resolve(without, None).template == "plain"
    with pytest.raises(ValueError, match="ships no chat template"):
        prompts.PromptConfig(template="checkpoint").resolve(without, None)
    with pytest.raises(ValueError, match="only apply to the checkpoint's own template"):
        prompts.PromptConfig(template="qwen3", template_vars=("x=1",)).resolve(policy, None)
    with pytest.raises(ValueError, match="not name=value"):
        prompts.PromptConfig(template_vars=("enable_thinking",))
    with pytest.raises(ValueError, match="vicuna"):
        prompts.PromptConfig(template="vicuna")
    values = prompts.PromptConfig(template_vars=("a=false", "b=26 Jul", "c=3")).variables()
    assert values == {"a": False, "b": "26 Jul", "c": 3}
