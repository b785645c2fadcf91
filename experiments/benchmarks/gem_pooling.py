"""keypoint_set's masked GeM pooling: autograd over the plain formula vs the fused autograd Function.

    python experiments/benchmarks/gem_pooling.py [--sets 64 --keypoints 256 --dims 512 1024 --repeats 7]

One measurement = forward + backward of the whole KeypointSetEncoder (d_model 64, no attention: the default) on
a random batch of `--sets` keypoint sets, the way a training step runs it. The baseline swaps the pooling's
Function for the plain formula (relu, clamp, pow by the learned exponent, masked mean, pow) written with
autograd's ops, as MaskedGeM computed it before; the two give the same values and gradients
(tests/test_keypoint_set.py). Interleaved repeats, medians, and the ratio plain / fused of the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch.nn import functional as F

from siamese_retrieval.models import keypoint_set
from siamese_retrieval.models.keypoint_set import KeypointSetEncoder


class PlainGeM:
    """Stand-in with the Function's `apply`: the plain formula, differentiated by autograd."""

    @staticmethod
    def apply(z: torch.Tensor, weights: torch.Tensor, p: torch.Tensor, eps: float) -> torch.Tensor:
        f = F.relu(z).clamp(min=eps).pow(p)
        return torch.bmm(weights.unsqueeze(1), f).squeeze(1).clamp(min=eps).pow(1.0 / p)


def step_ms(encoder: KeypointSetEncoder, batch: dict[str, torch.Tensor], gem: Any) -> float:
    keypoint_set._MaskedGeMFunction, original = gem, keypoint_set._MaskedGeMFunction
    try:
        encoder.zero_grad(set_to_none=True)
        start = time.perf_counter()
        encoder(batch).sum().backward()
        return (time.perf_counter() - start) * 1000
    finally:
        keypoint_set._MaskedGeMFunction = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, default=64, help="keypoint sets per step (a P x K batch: 64)")
    parser.add_argument("--keypoints", type=int, default=256)
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 1024], help="pooling.dim values")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    b, n = args.sets, args.keypoints
    batch = {"desc": torch.randint(0, 256, (b, n, 32), dtype=torch.uint8), "feat": torch.rand(b, n, 7),
             "mask": torch.rand(b, n) > 0.1}
    fused_gem = keypoint_set._MaskedGeMFunction
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {b} sets x {n} keypoints, d_model 64")
    print(f"{'dim':>6} {'plain ms':>10} {'fused ms':>10} {'plain/fused':>12}")
    for dim in args.dims:
        encoder = KeypointSetEncoder(n_keypoints=n, d_model=64, n_layers=0, pooling={"name": "gem", "dim": dim})
        for gem in (PlainGeM, fused_gem):  # warm-up
            step_ms(encoder, batch, gem)
        plain, fused = [], []
        for _ in range(args.repeats):
            plain.append(step_ms(encoder, batch, PlainGeM))
            fused.append(step_ms(encoder, batch, fused_gem))
        p_med, f_med = statistics.median(plain), statistics.median(fused)
        print(f"{dim:>6} {p_med:>10.1f} {f_med:>10.1f} {p_med / f_med:>11.2f}x")


if __name__ == "__main__":
    main()
