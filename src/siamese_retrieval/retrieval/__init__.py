"""Retrieval: FAISS index over database embeddings and retrieval metrics."""

from siamese_retrieval.retrieval.index import (
    IndexConfig,
    build_index,
    load_index,
    save_index,
    search,
)
from siamese_retrieval.retrieval.metrics import (
    RangeAccuracy,
    RetrievalScores,
    per_query_retrieval_scores,
    prefixed,
    range_accuracy,
)

__all__ = [
    "IndexConfig",
    "build_index",
    "search",
    "save_index",
    "load_index",
    "RetrievalScores",
    "RangeAccuracy",
    "per_query_retrieval_scores",
    "range_accuracy",
    "prefixed",
]
