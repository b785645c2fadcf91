"""Train a Siamese retrieval model: `python train.py model=keypoint_snn` (see conf/train.yaml)."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from siamese_retrieval.cli import report_user_errors  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> float:
    from siamese_retrieval.train import train  # imported here: a config typo fails in a second, not after torch loads

    result = train(cfg)
    return result["metrics"].get(cfg.optimized_metric, float("nan"))


if __name__ == "__main__":
    main()
