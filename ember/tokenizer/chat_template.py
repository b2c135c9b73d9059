"""Chat templates: render a conversation to prompt text with a sandboxed Jinja2 template.

Model folders from the Hugging Face Hub ship their prompt format as a Jinja2 template
(`tokenizer_config.json["chat_template"]` or `chat_template.jinja`). Templates are untrusted
code, so they run in jinja2's ImmutableSandboxedEnvironment, configured the way transformers
configures it (same options, filters, globals and variables), so that a template renders
byte-for-byte what transformers renders. `DEFAULT_CHAT_TEMPLATE` is the ChatML format of
ember's own models.

    from ember.tokenizer import render_chat_template, DEFAULT_CHAT_TEMPLATE
    render_chat_template(DEFAULT_CHAT_TEMPLATE, [{"role": "user", "content": "hi"}],
                         add_generation_prompt=True, special_tokens={})
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ember.tokenizer.tokenizer import TokenizerError

# ChatML. Content may be a string or OpenAI-style content parts ({"type": "text", "text": ...}).
# An unknown role is almost always a typo ("User"), so it fails loudly instead of rendering.
DEFAULT_CHAT_TEMPLATE = """\
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
        {{- raise_exception('unknown chat role ' ~ message['role'] ~ ': use system, user, assistant or tool') }}
    {%- endif %}
    {%- if message['content'] is string %}
        {%- set content = message['content'] %}
    {%- else %}
        {%- set content = message['content'] | selectattr('type', 'equalto', 'text')
                                             | map(attribute='text') | join('') %}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Older names for a message's reasoning text; templates read `reasoning_content` or `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks.

    Some Hub templates use the tag; rendering must accept it and emit the body unchanged.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, so templates cannot reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Same positional trick as jinja's Namespace so `namespace(self=...)` still works.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set the namespace attribute {name!r}")


class _Dict:
    """`dict(...)` for templates without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # jinja's own tojson HTML-escapes <, >, & and ', which corrupts tool schemas in prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template refused the conversation: {message}")


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(), namespace=_Namespace
    )
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template does not parse (line {e.lineno}: {e.message}): fix the template") from None


def _normalize(message: Any) -> dict:
    if not isinstance(message, Mapping):
        raise TokenizerError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
    # APIs send content=None / tool_calls=None; templates handle a missing key but print "None".
    out = {k: v for k, v in message.items() if v is not None}
    reasoning = next((out[k] for k in _REASONING_FIELDS if k in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
    tools: Sequence[Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> str:
    """Render `messages` with `template`, seeing the same variables transformers passes.

    `special_tokens` maps names (bos_token, eos_token, ...) to strings; extra `kwargs`
    (documents, enable_thinking, ...) become template variables and override them.
    Raises TokenizerError when the template rejects the conversation or fails.
    """
    if not messages:
        raise TokenizerError("cannot apply a chat template to an empty conversation: pass at least one message")
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise TokenizerError("tools must be JSON-schema dicts ({'type': 'function', 'function': {...}})")
    variables = {**special_tokens, "documents": None, **kwargs}
    try:
        return _compile(template).render(
            messages=[_normalize(m) for m in messages],
            tools=None if tools is None else [dict(t) for t in tools],
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template failed to render ({type(e).__name__}: {e}): check the messages") from None
