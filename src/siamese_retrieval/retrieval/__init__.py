"""Retrieval: FAISS index over database embeddings and retrieval metrics."""

from siamese_retrieval.retrieval.index import (
    IndexConfig,
    build_index,
    load_index,
    save_index,
    search,
)
from siamese_retrieval.retrieval.metrics import (
    RetrievalScores,
    per_query_retrieval_scores,
    prefixed,
)

__all__ = [
    "IndexConfig",
    "build_index",
    "search",
    "save_index",
    "load_index",
    "RetrievalScores",
    "per_query_retrieval_scores",
    "prefixed",
]
