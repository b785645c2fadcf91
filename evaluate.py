"""Evaluate a checkpoint (or the ORB+RANSAC baseline) on a dataset: `python evaluate.py ckpt_path=...` (see conf/eval.yaml).

The same command as `siamese-evaluate`: both run the @hydra.main task siamese_retrieval.entry_points.evaluate_task.
Run from the checkout, outputs/ and data_cache/ land in the repository whatever the current directory.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from siamese_retrieval.entry_points import evaluate_main  # noqa: E402

if __name__ == "__main__":
    evaluate_main()
