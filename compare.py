"""Compare sweep runs offline: `python compare.py outputs/train/multirun/<date>/<time> [MORE_DIRS] [--metrics ...] [--out DIR]`.

Groups the jobs by their overrides other than the seed and writes comparison.md (mean ± std over seeds,
best in bold) and comparison.png into --out (default: the first sweep dir), printing the table.
The same command as `siamese-compare` (siamese_retrieval.entry_points.compare_main).
"""

import sys

from siamese_retrieval.entry_points import compare_main


def main(argv=None) -> int:
    return compare_main(argv)


if __name__ == "__main__":
    sys.exit(main())
