"""The thumbnail baseline: 16x12 standardised grayscale pixels, L2. The 'is the city a toy?' yardstick."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from siamese_retrieval.data.dataset import RetrievalDataset
from siamese_retrieval.data.images import thumbnail
from siamese_retrieval.retrieval.ranking import RankingSettings, rank_scores


def thumbnail_metrics(ds: RetrievalDataset, query_idx: Sequence[int] | None = None) -> dict[str, float]:
    """Retrieval metrics of thumbnail L2 ranking for the given queries (all by default), full database."""
    query_idx = np.arange(ds.n_query) if query_idx is None else np.asarray(query_idx)
    db = torch.from_numpy(np.stack([thumbnail(ds.db_file(i)) for i in range(ds.n_db)]))
    q = torch.from_numpy(np.stack([thumbnail(ds.query_file(int(i))) for i in query_idx]))
    return rank_scores((-torch.cdist(q, db)).numpy(), query_idx, ds, RankingSettings()).metrics
