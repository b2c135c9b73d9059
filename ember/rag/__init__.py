"""Retrieval-augmented generation: ingest documents, retrieve passages, answer with citations.

    from ember.rag import Index, ingest, ground, generate_text
    with Index.open("runs/idx", create=True) as idx:                  # LanceDB, all-MiniLM-L6-v2
        print(ingest(idx, ["docs/", "pydoc"]).summary())
        hits = idx.retriever().search("when does a while loop's else run?", k=5, mode="hybrid")

One concept per module: loaders (files -> Documents), chunking (structure-aware, in embedder
tokens), embed (sentence-transformers, offline), lexical (BM25 as sparse vectors), store (the
protocol) with store_lancedb and store_qdrant, retrieve (dense / BM25 / RRF, filters, threshold,
rerank, MMR), index (the index folder), ingest (incremental), answer (grounded prompts),
evaluate (hit rate, recall, MRR, nDCG). Heavy dependencies (the `rag` extra) load on first use.
"""

from ember.rag.answer import Answer, Grounded, Source, generate_text, ground, pack_sources
from ember.rag.chunking import Chunk, Chunker
from ember.rag.embed import Embedder
from ember.rag.errors import RagError
from ember.rag.index import Index, IndexSettings
from ember.rag.ingestion import IngestReport, ingest
from ember.rag.loaders import Document, load_documents
from ember.rag.retrieve import Reranker, Retriever, SearchParams
from ember.rag.store import Hit, VectorStore

__all__ = [
    "Answer", "Chunk", "Chunker", "Document", "Embedder", "Grounded", "Hit", "Index", "IndexSettings",
    "IngestReport", "RagError", "Reranker", "Retriever", "SearchParams", "Source", "VectorStore",
    "generate_text", "ground", "ingest", "load_documents", "pack_sources",
]
