"""Train a Siamese retrieval model: `python train.py model=keypoint_snn` (see conf/train.yaml).

The same command as `siamese-train`: both run the @hydra.main task siamese_retrieval.entry_points.train_task.
Run from the checkout, outputs/ and data_cache/ land in the repository whatever the current directory.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from siamese_retrieval.entry_points import train_main  # noqa: E402

if __name__ == "__main__":
    train_main()
