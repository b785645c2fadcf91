"""python -m siamese_retrieval.data.synth --out DIR [--preset default|tiny] [--seed N] [--preview PNG] [--workers N]"""

from __future__ import annotations

import argparse
import sys
import time

from siamese_retrieval.data.synth.config import PRESETS, SynthConfig
from siamese_retrieval.data.synth.generate import generate_city
from siamese_retrieval.data.synth.preview import write_contact_sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m siamese_retrieval.data.synth", description="Generate the synthetic street-level city.")
    parser.add_argument("--out", required=True, help="dataset root to write")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--preview", default=None, help="also write a contact sheet PNG here")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    overrides = {} if args.seed is None else {"seed": args.seed}
    cfg = SynthConfig.from_preset(args.preset, **overrides)
    t0 = time.perf_counter()
    root = generate_city(args.out, cfg, workers=args.workers)
    elapsed = time.perf_counter() - t0

    import numpy as np

    from siamese_retrieval.data.dataset import read_dataset

    ds = read_dataset(root, check="none")
    n_pos = ds.relevance.n_positives(np.arange(ds.n_query))
    print(f"root: {root.resolve()}")
    print(f"database: {ds.n_db}  queries: {ds.n_query}  mean positives/query: {n_pos.mean():.2f}  queries without positive: {(n_pos == 0).mean():.1%}")
    print(f"generated in {elapsed:.1f} s")
    if args.preview:
        print(f"contact sheet: {write_contact_sheet(root, args.preview)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
