"""Chat answers grounded in a RAG index: `ember serve --model DIR --rag-index IDX`.

With an index, every chat completion is grounded unless the request sends `"rag": false`: the
last user message is the query, the retrieved chunks become numbered sources inside that message
(ember.rag.ground, packed so the prompt fits the context minus the answer budget), and the
response carries them as a top-level `"sources"` list (on the first chunk when streaming).
Since the sources take the rest of the context, `max_completion_tokens` defaults to
`--rag-max-tokens` for grounded requests. Retrieval (embedding the query, the vector and BM25
searches) runs on one worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from ember.serve.errors import bad_request
from ember.tokenizer import Tokenizer


class Grounding:
    """An open index, its retriever and the search settings every grounded request uses."""

    def __init__(self, index_dir: str | os.PathLike, k: int = 5, mode: str = "hybrid", max_tokens: int = 256) -> None:
        from ember.rag import Index, SearchParams

        self.index = Index.open(index_dir)
        self.retriever = self.index.retriever()
        self.params = SearchParams(k=k, mode=mode)
        self.params.check()
        self.max_tokens = max_tokens
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-serve-rag")

    async def ground(self, messages: list[dict[str, Any]], tokenizer: Tokenizer, context_length: int,
                     max_tokens: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The messages with the sources packed into the last one, and the sources as JSON."""
        from ember.rag import RagError, ground

        def run():
            return ground(self.retriever, messages, tokenizer, context_length=context_length,
                          max_tokens=max_tokens, params=self.params)

        try:
            grounded = await asyncio.get_running_loop().run_in_executor(self._pool, run)
        except RagError as e:
            raise bad_request(str(e), "messages") from None
        return grounded.messages, [asdict(s) for s in grounded.sources]

    def document(self, path: str) -> str:
        """The text of one indexed source, for the chat page's source links (webui.py)."""
        from ember.serve.webui import read_source

        return read_source(path, path in self.index.manifest)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.index.close()
