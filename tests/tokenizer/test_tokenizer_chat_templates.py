"""Hub-style chat templates render exactly as transformers renders them.

The templates are written here in the styles of popular model families (not copied from
them); each exercises a different part of the environment: whitespace control, raise_exception,
tojson, tools, namespace, loop controls, the generation tag and extra variables.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from ember.tokenizer import TokenizerError, load_tokenizer, render_chat_template

LLAMA3_STYLE = """\
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_text = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_text = 'Knowledge cutoff: 2024' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_text + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if loop.first and message['role'] != 'user' %}
        {{- raise_exception('the conversation must start with a user turn') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL_STYLE = """\
{%- if messages[0]['role'] == 'system' %}
    {%- set system_text = messages[0]['content'] %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set turns = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in turns %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('roles must alternate user/assistant after the optional system message') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_text is defined %}
            {{- '[INST] ' + system_text + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- else %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
"""

QWEN2_STYLE = """\
{%- set default_system = 'You are a helpful assistant.' %}
{%- if messages[0].role == 'system' %}{% set system_text = messages[0].content %}{% else %}{% set system_text = default_system %}{% endif %}
{{- '<|im_start|>system\\n' + system_text }}
{%- if tools %}
    {{- '\\n\\n# Tools\\n\\nCall a function by answering with <tool_call>{...}</tool_call>.\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>' }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
        {%- continue %}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}{{ '\\n' + message.content }}{% endif %}
        {%- for call in message.tool_calls %}
            {%- set fn = call.function if call.function is defined else call %}
            {{- '\\n<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' + fn.arguments | tojson + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# No "-" whitespace control at all: trim_blocks/lstrip_blocks decide every newline.
ZEPHYR_STYLE = """\
{% for message in messages %}
    {% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n' + message['content'] + eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
    {% endif %}
{% endfor %}
"""

# Environment features: namespace, break, dict(), tojson options, strftime_now, the generation
# tag, undefined special tokens, None-valued keys, reasoning aliases, documents and extra kwargs.
KITCHEN_SINK = """\
{%- set ns = namespace(users=0) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}{% endfor %}
{{- 'year=' + strftime_now('%Y') + ' users=' + ns.users|string + ' pad=' + (pad_token if pad_token is defined else 'none') + '\\n' }}
{{- dict(a=1, b=[1, 2]) | tojson(indent=2, sort_keys=True) + '\\n' }}
{%- if documents %}{% for d in documents %}{{ '[doc] ' + d.title + ': ' + d.text + '\\n' }}{% endfor %}{% endif %}
{%- for m in messages %}
    {%- if m.role == 'stop' %}{% break %}{% endif %}
    {%- if m.role == 'assistant' %}
        {{- '<assistant>' }}
        {%- if m.reasoning_content is defined and enable_thinking | default(true) %}{{ '<think>' + m.reasoning_content + '</think>' }}{% endif %}
        {%- generation %}{{ m.content if m.content is defined else '(no content)' }}{% endgeneration %}
        {{- '</assistant>\\n' }}
    {%- else %}
        {{- '<' + m.role + '>' + m.content + '</' + m.role + '>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<assistant>' }}{% endif %}
"""

CONFIGS = {
    "llama3": (LLAMA3_STYLE, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
               ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]),
    "mistral": (MISTRAL_STYLE, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
                ["<s>", "</s>", "<unk>"]),
    "qwen2": (QWEN2_STYLE, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, []),
    "zephyr": (ZEPHYR_STYLE, {"bos_token": "<s>", "eos_token": "</s>"}, ["<s>", "</s>"]),
    "kitchen_sink": (KITCHEN_SINK, {"eos_token": "<|endoftext|>"}, []),
}

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello there!"}],
    "system+user": [{"role": "system", "content": "  You answer in French. "},
                    {"role": "user", "content": "What is 2 + 2?\n"}],
    "multi-turn": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue 💙"},
                   {"role": "user", "content": "Another <b>one</b> & 'more'"}],
    "system+multi-turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
}

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Wetter <heute> & 'morgen' für München 🌦",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Köln?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Köln"}}}]},
    {"role": "tool", "content": '{"temp": "12°C"}'},
]


def _folder(hf_folder, name: str):
    template, specials, added = CONFIGS[name]
    decoder = {str(5000 + i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                               "single_word": False, "special": True} for i, t in enumerate(added)}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **specials}
    if decoder:
        config["added_tokens_decoder"] = decoder
    return hf_folder(config)


def _both(folder: Path, messages, **kwargs):
    ours = load_tokenizer(folder).apply_chat_template(messages, **kwargs)
    theirs = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False, **kwargs)
    return ours, theirs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_templates_render_like_transformers(name: str, hf_folder) -> None:
    folder = _folder(hf_folder, name)
    ours, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.vocab_size == len(hf)
    for conversation, messages in CONVERSATIONS.items():
        for gen in (True, False):
            expected = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected, (conversation, gen)
            expected_ids = hf.apply_chat_template(messages, add_generation_prompt=gen, return_dict=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True) == expected_ids


def test_tools_branch_and_tojson(hf_folder) -> None:
    folder = _folder(hf_folder, "qwen2")
    ours, theirs = _both(folder, TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=True)
    assert ours == theirs
    # tojson must not HTML-escape or ASCII-escape (jinja's built-in filter does both)
    assert '"Wetter <heute> & \'morgen\' für München 🌦"' in ours
    assert '{"name": "get_weather", "arguments": {"city": "Köln"}}' in ours


def test_kitchen_sink_extras(hf_folder) -> None:
    folder = _folder(hf_folder, "kitchen_sink")
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "a", "reasoning": "because"},
                {"role": "assistant", "content": None},
                {"role": "stop", "content": "never shown"}, {"role": "user", "content": "hidden"}]
    documents = [{"title": "T", "text": "body"}]
    for extra in ({}, {"enable_thinking": False}):
        ours, theirs = _both(folder, messages, documents=documents, add_generation_prompt=True, **extra)
        assert ours == theirs
    assert "<think>because</think>" in _both(folder, messages)[0]
    assert "(no content)" in ours and "hidden" not in ours and "[doc] T: body" in ours


@pytest.mark.parametrize("name, messages, message", [
    ("mistral", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "roles must alternate"),
    ("llama3", [{"role": "assistant", "content": "a"}], "must start with a user turn"),
])
def test_raise_exception_is_tokenizer_error(name: str, messages, message: str, hf_folder) -> None:
    folder = _folder(hf_folder, name)
    with pytest.raises(TokenizerError, match=f"chat template refused the conversation: .*{message}"):
        load_tokenizer(folder).apply_chat_template(messages)
    with pytest.raises(jinja2.TemplateError, match=message):
        AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False)


def test_chat_template_jinja_file_wins(hf_folder) -> None:
    folder = hf_folder({"chat_template": ZEPHYR_STYLE, "eos_token": "</s>"},
                       files={"chat_template.jinja": MISTRAL_STYLE})
    assert load_tokenizer(folder).chat_template == MISTRAL_STYLE
    ours, theirs = _both(folder, CONVERSATIONS["system+multi-turn"])
    assert ours == theirs and "[INST]" in ours


def test_legacy_template_sources(hf_folder) -> None:
    legacy = hf_folder({"eos_token": "</s>"}, files={"chat_template.json": json.dumps({"chat_template": ZEPHYR_STYLE})})
    assert load_tokenizer(legacy).chat_template == ZEPHYR_STYLE
    named = hf_folder({"chat_template": [{"name": "tool_use", "template": QWEN2_STYLE},
                                         {"name": "default", "template": MISTRAL_STYLE}]})
    assert load_tokenizer(named).chat_template == MISTRAL_STYLE
    nameless = hf_folder({"chat_template": [{"name": "tool_use", "template": QWEN2_STYLE}]})
    with pytest.raises(TokenizerError, match="none named 'default'"):
        load_tokenizer(nameless)


def test_render_errors_are_one_line() -> None:
    with pytest.raises(TokenizerError, match="does not parse"):
        render_chat_template("{% for %}", [{"role": "user", "content": "x"}], True, {})
    with pytest.raises(TokenizerError, match="failed to render"):
        render_chat_template("{{ messages[0].content.nope() }}", [{"role": "user", "content": "x"}], True, {})
    with pytest.raises(TokenizerError, match="failed to render.*SecurityError"):
        render_chat_template("{{ ''.__class__ }}{% set ns = namespace() %}{% set ns._x = 1 %}",
                             [{"role": "user", "content": "x"}], True, {})
