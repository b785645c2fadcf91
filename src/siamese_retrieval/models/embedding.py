"""A model embedding its own inputs: every item of a dict of input tensors, in batches, on the model's device.

    embed_all(module, inputs, batch_size)              -> (n, dim) on CPU
    embed_sharded(trainer, module, inputs, batch_size) -> the same under DDP: each rank embeds one block

Used wherever embeddings of a whole split are needed: the retrieval engine (retrieval/ranking.py), the
look-alike place batches (SiameseModule.on_train_epoch_start), the aggregation fitting (aggregation_fitting.py),
retrieve.py and the benchmarks.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from siamese_retrieval.data.inputs import Tensors, take
from siamese_retrieval.io_utils import release_mapped_pages
from siamese_retrieval.progress import progress


class Embeds(Protocol):
    """What `embed_all` needs of a module: its device and an embed()."""

    device: torch.device

    def embed(self, inputs: Tensors) -> torch.Tensor: ...


@torch.inference_mode()
def embed_all(module: Embeds, inputs: Tensors, batch_size: int = 512) -> torch.Tensor:
    """Embeddings of every item of `inputs`, in batches, on the module's device; returned on CPU.

    A progress bar (progress.py) when there are more than a few batches (fewer take a moment).
    """
    n = len(next(iter(inputs.values())))
    few_batches = 4
    out = []
    with progress(f"embedding {n} items", total=n if -(-n // batch_size) > few_batches else 0) as advance:
        for start in range(0, n, batch_size):
            chunk = {k: v[start : start + batch_size].to(module.device) for k, v in inputs.items()}
            out.append(module.embed(chunk).float().cpu())
            release_mapped_pages()  # memory-mapped inputs: embedded rows leave RSS (io_utils; once a second at most)
            advance(len(out[-1]))
    return torch.cat(out) if out else torch.zeros(0, 1)


def embed_sharded(trainer: Any, module: Any, inputs: Tensors, batch_size: int = 512) -> torch.Tensor:
    """Embeddings of every item under DDP: rank r embeds the r-th contiguous block, the blocks are all-gathered.

    Every rank returns the full (n, dim) tensor on CPU, in the original order.
    """
    n = len(next(iter(inputs.values())))
    world, rank = trainer.world_size, trainer.global_rank
    block = -(-n // world)
    start, stop = min(rank * block, n), min((rank + 1) * block, n)
    idx = np.arange(start, stop)
    local = embed_all(module, take(inputs, idx), batch_size) if len(idx) else None
    dim = torch.tensor([local.shape[1] if local is not None else 0], device=module.device)
    dim = int(trainer.strategy.reduce(dim, reduce_op="max").item())
    padded = torch.zeros(block, dim)
    if local is not None:
        padded[: len(local)] = local
    gathered = module.all_gather(padded.to(module.device)).reshape(world * block, dim).cpu()
    return gathered[:n]
