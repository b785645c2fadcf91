"""Search a database with a trained checkpoint: `python retrieve.py ckpt_path=... query=photo.jpg top_k=10` (see conf/retrieve.yaml)."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from siamese_retrieval.retrieve import retrieve  # noqa: E402
from siamese_retrieval.cli import report_user_errors  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="retrieve")
@report_user_errors
def main(cfg: DictConfig) -> None:
    retrieve(cfg)


if __name__ == "__main__":
    main()
