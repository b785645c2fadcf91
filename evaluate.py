"""Evaluate a checkpoint (or the ORB+RANSAC baseline) on a dataset: `python evaluate.py ckpt_path=...` (see conf/eval.yaml)."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from siamese_retrieval.evaluate import evaluate  # noqa: E402
from siamese_retrieval.cli import report_user_errors  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@report_user_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
