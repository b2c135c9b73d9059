"""Incremental detokenization with stop strings, for one generated sequence.

Text grows token by token through `tokenizers`' DecodeStream (seeded with the prompt's last
tokens, so a leading space or a UTF-8 character split across tokens comes out right); the
concatenated pieces equal decoding all output tokens at once. After each piece the stop
strings are searched in the new tail, reaching back len(stop) - 1 characters so a stop string
spanning a token boundary is found. On a match the text is cut before it (or after it, with
include_stop_str_in_output). While streaming, the last max(len(stop)) - 1 characters are held
back, since they might be the start of a stop string that the next token completes.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from ember.engine.sampling_params import SamplingParams
from ember.tokenizer import Tokenizer

# Prompt tokens fed to the stream as context before the first output token (vLLM uses 5).
PROMPT_CONTEXT = 5


class Detokenizer:
    """Output text of one sequence; `append` returns the stop string that ended it, if any."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.stream = DecodeStream(ids=list(prompt_ids[-PROMPT_CONTEXT:]),
                                   skip_special_tokens=params.skip_special_tokens)
        self.stops = params.stop_strings
        self.include_stop = params.include_stop_str_in_output
        self.holdback = 0 if self.include_stop or not self.stops else max(map(len, self.stops)) - 1
        self.text = ""
        self.ids: list[int] = []
        self.skip_special = params.skip_special_tokens

    def append(self, token_id: int, check_stops: bool = True) -> str | None:
        self.ids.append(token_id)
        piece = self.stream.step(self.tokenizer.backend, token_id)
        if not piece:
            return None
        before = len(self.text)
        self.text += piece
        if not check_stops:
            return None
        for stop in self.stops:
            at = self.text.find(stop, max(0, before - len(stop) + 1))
            if at >= 0:
                self.text = self.text[:at + (len(stop) if self.include_stop else 0)]
                return stop
        return None

    def flush(self) -> None:
        """At the end, add what the stream still holds back (bytes of an unfinished character)."""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special)
        if len(full) > len(self.text) and full.startswith(self.text):
            self.text = full

    def streamable(self, finished: bool) -> str:
        """The text that may be sent now: all of it once finished, else minus the held-back tail."""
        if finished or not self.holdback:
            return self.text
        return self.text[:max(0, len(self.text) - self.holdback)]
