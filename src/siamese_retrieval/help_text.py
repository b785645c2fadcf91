"""`--help` for train.py / evaluate.py / retrieve.py: the command's own config groups and their options (read from
its primary config's defaults list and the config folders, so it cannot go stale), the overrides people use
most, and where the docs are. Hydra's own help prints the whole composed config (`--cfg job` still does)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from omegaconf import OmegaConf

# The overrides people use most, per command (tests/test_help.py composes every one of them).
COMMON: dict[str, list[tuple[str, str]]] = {
    "train": [
        ("model=cnn_snn", "the proposed plain-CNN Siamese network (default: keypoint_snn, the study's)"),
        ("seed=1", "python, numpy, torch and the pair sampler"),
        ("trainer.max_epochs=5", "or model.max_epochs (the model's recipe)"),
        ("data=synth_tiny", "a small city for a quick try; data=msls_city data.root=PATH: your dataset"),
        ("debug=fast", "one epoch on the tiny city, no tracker"),
        ("logger=none", "no W&B run (default: offline W&B)"),
        ("trainer=gpu", "one GPU; trainer=ddp trainer.devices=4: several"),
        ("ckpt_path=last", "continue the latest run"),
        ("'benchmarks=[vpr_folder:PATH]'", "after fitting, evaluate the best checkpoint there"),
        ("-m model=keypoint_snn,cnn_snn seed=0,1,2", "a sweep (then compare.py on its folder)"),
    ],
    "eval": [
        ("ckpt_path=PATH", "the checkpoint to evaluate (method=orb_ransac|orb_bow needs none)"),
        ("rerank=fused", "geometric verification that abstains when it cannot be trusted"),
        ("rerank=orb_ransac", "the top 20 re-ordered by RANSAC inliers"),
        ("split=all", "every query of the dataset (test: the fixed test split)"),
        ("data=msls_city data.root=PATH", "a dataset in the contract layout; vpr_folder, msls_official, gsv_cities"),
        ("'benchmarks=[NAME:ROOT,...]'", "several datasets in one run, one results table"),
        ("method=orb_ransac", "the classical baseline, no model"),
        ("index=ivfpq", "an approximate index for large databases"),
        ("search_k=100", "streaming metrics over each query's top 100 (large datasets)"),
        ("logger=none", "no W&B run"),
    ],
    "retrieve": [
        ("ckpt_path=PATH", "the trained checkpoint (required)"),
        ("query=IMAGE_OR_FOLDER", "what to look up (required)"),
        ("top_k=5", "results per query"),
        ("output=json", "machine-readable results on stdout"),
        ("rerank=fused", "geometric verification that abstains when it cannot be trusted"),
        ("data=msls_city data.root=PATH", "the database to search (default: the synthetic city)"),
        ("cache=false", "embed the database every time"),
        ("index=ivf", "an approximate index for large databases"),
        ("grid.dir=null", "no picture of the results"),
        ("device=cpu", "auto | cpu | cuda"),
    ],
}
COMMAND = {"train": "train.py", "eval": "evaluate.py", "retrieve": "retrieve.py"}
PURPOSE = {"train": "train a Siamese retrieval model and test its best checkpoint",
           "eval": "evaluate a checkpoint (or a classical baseline) on a dataset's queries",
           "retrieve": "look up images in a dataset with a trained checkpoint"}


def conf_dir(config_path: str) -> Path:
    """The folder of the primary configs, for Hydra's `pkg://` or plain path."""
    if config_path.startswith("pkg://"):
        return Path(str(importlib.resources.files(config_path.removeprefix("pkg://"))))
    return Path(config_path)


def groups(config_path: str, config_name: str) -> list[tuple[str, str | None, list[str]]]:
    """(group, its default option or None, every option) for each group in the primary config's defaults list."""
    root = conf_dir(config_path)
    defaults = OmegaConf.to_container(OmegaConf.load(root / f"{config_name}.yaml")).get("defaults", [])
    out = []
    for entry in defaults:
        if not isinstance(entry, dict):
            continue
        ((key, default),) = entry.items()
        group = key.split("@")[0].removeprefix("override ").strip()
        if group in ("hydra", "paths"):
            continue
        options = sorted(p.stem for p in (root / group).glob("*.yaml"))
        out.append((group, default, options))
    return out


def help_text(config_path: str, config_name: str) -> str:
    command = COMMAND[config_name]
    lines = [f"{command}: {PURPOSE[config_name]}.", "",
             f"Usage: python {command} [GROUP=OPTION ...] [KEY=VALUE ...]   (Hydra overrides; -m: a sweep)", "",
             "Config groups (GROUP=OPTION; * the default, - none by default):"]
    for group, default, options in groups(config_path, config_name):
        shown = [f"{o}*" if o == default else o for o in options]
        lines.append(f"  {group + ':':<16}{' '.join(shown)}{'' if default else '   (-)'}")
    lines += ["", "Overrides people use most:"]
    lines += [f"  {override:<42}{what}" for override, what in COMMON[config_name]]
    lines += ["",
              f"python {command} --cfg job     prints the whole composed config (every key you can override)",
              "Docs: README.md (quick start, options, workflows), docs/ (dataset formats, extending), and the",
              f"comments in conf/{config_name}.yaml and its groups. A bad override is one line naming the key."]
    return "\n".join(lines)
