"""Search a database with a trained checkpoint: `python retrieve.py ckpt_path=... query=photo.jpg top_k=10` (see conf/retrieve.yaml).

The same command as `siamese-retrieve`: both run the @hydra.main task siamese_retrieval.entry_points.retrieve_task.
Run from the checkout, outputs/ and data_cache/ land in the repository whatever the current directory.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from siamese_retrieval.entry_points import retrieve_main  # noqa: E402

if __name__ == "__main__":
    retrieve_main()
