"""Small real tokenizers with chat templates for the fine-tuning tests: ember's ChatML and a Llama-3 style.

Both are byte-level BPEs trained in a second on the bundled Python docs, so answers tokenize
into many tokens and offsets are exercised on real text (and non-ASCII characters).
"""

from __future__ import annotations

from functools import lru_cache

from ember.data.sources import pydoc_topics
from ember.tokenizer import Tokenizer, train_tokenizer

LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|pad|>")


def _texts() -> list[str]:
    return [d.text for d in pydoc_topics()]


@lru_cache(maxsize=None)
def chatml_tokenizer(vocab_size: int = 700) -> Tokenizer:
    """ember's own kind: <|endoftext|> BOS/EOS, <|pad|>, ChatML template."""
    return train_tokenizer(_texts(), vocab_size=vocab_size, show_progress=False)


@lru_cache(maxsize=None)
def llama3_tokenizer(vocab_size: int = 700) -> Tokenizer:
    """Llama-3's special tokens and header layout; EOS is <|eot_id|>."""
    trained = train_tokenizer(_texts(), vocab_size=vocab_size, special_tokens=LLAMA3_SPECIALS,
                              chat_template=None, show_progress=False)
    return Tokenizer(trained.backend, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                       "pad_token": "<|pad|>"}, chat_template=LLAMA3_TEMPLATE)
