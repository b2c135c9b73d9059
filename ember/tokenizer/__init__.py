"""ember.tokenizer: text <-> ids over Hugging Face `tokenizers`, training, and chat templates.

    from ember.tokenizer import load_tokenizer, tokenizer_from_gguf, train_tokenizer
    tok = load_tokenizer("path/to/model")   # a Hugging Face tokenizer folder, a GGUF file or a model name
    tok = tokenizer_from_gguf("model.gguf")  # the tokenizer in a GGUF's metadata
    tok = train_tokenizer(texts, vocab_size=32_000)
"""

from ember.tokenizer.tokenizer import Tokenizer, TokenizerError
from ember.tokenizer.chat_template import DEFAULT_CHAT_TEMPLATE, render_chat_template
from ember.tokenizer.gguf import tokenizer_from_gguf
from ember.tokenizer.load import load_tokenizer
from ember.tokenizer.train import DEFAULT_SPECIAL_TOKENS, train_tokenizer

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "DEFAULT_SPECIAL_TOKENS",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
    "render_chat_template",
    "tokenizer_from_gguf",
    "train_tokenizer",
]
