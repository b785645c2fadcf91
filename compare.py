"""Compare sweep runs offline: `python compare.py outputs/multirun/<date>/<time> [MORE_DIRS] [--metrics ...] [--out DIR]`.

Groups the jobs by their overrides other than the seed and writes comparison.md (mean ± std over seeds,
best in bold) and comparison.png into --out (default: the first sweep dir), printing the table.
"""

import argparse
import sys

from siamese_retrieval.compare import compare
from siamese_retrieval.errors import UserError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dirs", nargs="+", help="Hydra sweep directories (or single run directories)")
    parser.add_argument("--metrics", nargs="+", default=None,
                        help="metric names as in metrics.json, e.g. test/recall@1 val/mAP (default: the test metrics)")
    parser.add_argument("--out", default=None, help="where comparison.md/.png go (default: the first sweep dir)")
    args = parser.parse_args(argv)
    try:
        result = compare(args.sweep_dirs, args.metrics, args.out)
    except (FileNotFoundError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result["markdown"])
    print(f"wrote {result['md_path']} and {result['png_path']}")
    return 0 if result["groups"] else 1


if __name__ == "__main__":
    sys.exit(main())
