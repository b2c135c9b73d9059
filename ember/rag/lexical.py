"""BM25 as sparse vectors: ember's lexical analyzer and Okapi term weighting, for stores without BM25.

Qdrant has no BM25 of its own, but it scores sparse vectors by dot product and can multiply each
query term by its inverse document frequency, kept up to date on the server (`Modifier.IDF`:
idf = ln(1 + (N - n + 0.5) / (n + 0.5))). So a document is stored as its BM25 term-frequency
part and a query as 1 per term; the dot product is then exactly

    score(q, d) = sum over terms t of q:  idf(t) * tf(t,d) * (k1 + 1) / (tf(t,d) + k1 * (1 - b + b * |d| / avgdl))

with IDF computed over the whole (sharded) collection. avgdl is a constant fixed when the index
is created (in words; the chunker makes chunks of similar size), as documents are weighted
when they are written. The analyzer matches the one ember configures for LanceDB's full-text
index: lower-case, ASCII folding, split on non-alphanumerics, Snowball English stemming, and no
stop-word list (as Elasticsearch's standard analyzer): in technical text "if", "for", "with",
"is" and "not" carry meaning, and IDF already discounts words that are everywhere.

    bm25 = BM25Encoder(avgdl=150)
    indices, values = bm25.document("The while statement loops")
    indices, values = bm25.query("while loop")
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections import Counter

from ember.rag.errors import require

_WORD = re.compile(r"[a-z0-9]+")
MAX_TOKEN_CHARS = 40


class Analyzer:
    """Text -> index terms: lower-case, ASCII-fold, split on non-alphanumerics, stem."""

    def __init__(self) -> None:
        self._stem = require("snowballstemmer").stemmer("english").stemWord

    def terms(self, text: str) -> list[str]:
        folded = unicodedata.normalize("NFKD", text.lower()).encode("ascii", "ignore").decode("ascii")
        return [self._stem(w) for w in _WORD.findall(folded) if len(w) <= MAX_TOKEN_CHARS]


def term_index(term: str) -> int:
    """A stable 32-bit index for a term (Qdrant sparse indices are u32; collisions are negligible)."""
    return zlib.crc32(term.encode("utf-8"))


class BM25Encoder:
    """Sparse BM25 vectors: document side carries the saturated, length-normalised tf; query side 1s."""

    def __init__(self, avgdl: float = 150.0, k1: float = 1.2, b: float = 0.75) -> None:
        self.avgdl, self.k1, self.b = avgdl, k1, b
        self.analyzer = Analyzer()

    def document(self, text: str) -> tuple[list[int], list[float]]:
        terms = self.analyzer.terms(text)
        norm = self.k1 * (1 - self.b + self.b * len(terms) / self.avgdl)
        weights: dict[int, float] = {}
        for term, tf in Counter(terms).items():
            idx = term_index(term)
            weights[idx] = weights.get(idx, 0.0) + tf * (self.k1 + 1) / (tf + norm)
        return list(weights), list(weights.values())

    def query(self, text: str) -> tuple[list[int], list[float]]:
        # A repeated query word counts once, as in Lucene's BM25 over a bag of query terms.
        indices = list(dict.fromkeys(term_index(t) for t in self.analyzer.terms(text)))
        return indices, [1.0] * len(indices)
