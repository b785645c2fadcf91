"""The command-line entry points: `siamese-train`, `siamese-evaluate`, `siamese-retrieve`, `siamese-compare`
(pyproject's [project.scripts]); the root train.py / evaluate.py / retrieve.py / compare.py call the same
functions.

The configs ship inside the package as `siamese_retrieval.conf` (pyproject maps the repository's conf/ onto
it), so an installed package runs from any directory with the same overrides as the checkout. Outputs go
under `paths.root_dir`: the repository when run through the root scripts (they set PROJECT_ROOT), else
the current directory.

Each Hydra task checks its composed config (`report_user_errors`) and only then imports its pipeline: a
mistyped override fails in a second, before torch loads. `run_entry_point` turns Hydra's own errors
(unknown key, unknown group option) into one `error:` line naming the nearest valid key or option, and exit
code 2, like every user error.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback as _HydraCallback
from omegaconf import DictConfig, OmegaConf

from siamese_retrieval.cli import report_user_errors, run_entry_point
from siamese_retrieval.configs import register_schemas
from siamese_retrieval.errors import fail
from siamese_retrieval.sweeper_storage import check_sweeper_storage, sqlite_path

CONF_PACKAGE = "siamese_retrieval.conf"


def config_path() -> str:
    """Where Hydra finds train.yaml / eval.yaml / retrieve.yaml and their groups.

    `pkg://siamese_retrieval.conf` when the package carries its configs (a wheel, or `pip install -e .`,
    whose import hook maps the package onto the checkout's conf/); the checkout's conf/ itself when the
    package is imported straight from src/ (PYTHONPATH=src, or an editable install made before the configs
    became part of the package).
    """
    try:
        if importlib.util.find_spec(CONF_PACKAGE) is not None:
            return f"pkg://{CONF_PACKAGE}"
    except (ImportError, ValueError):
        pass
    checkout_conf = Path(__file__).resolve().parents[2] / "conf"
    if (checkout_conf / "train.yaml").is_file():
        return str(checkout_conf)
    return f"pkg://{CONF_PACKAGE}"  # not found: Hydra says the primary config module is missing


CONFIG_PATH = config_path()
register_schemas()  # schema/<name> in Hydra's ConfigStore: a user's config may extend one for merge-time typing


def job_name(name: str) -> Any:
    """Hydra names the job after the module of the task function: the `--help` banner, hydra.job.name in
    .hydra/hydra.yaml, a launcher's job name (SLURM). Name it after the command (train, evaluate, retrieve),
    as when the task lived in the root script, not `entry_points`."""

    def rename(task: Any) -> Any:
        task.__module__ = name
        return task

    return rename


# ---------------------------------------------------------------------------------------------- train
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@report_user_errors
@job_name("train")
def train_task(cfg: DictConfig) -> float:
    from siamese_retrieval.train import train  # imported here: a config typo fails before torch loads

    result = train(cfg)
    if cfg.get("benchmarks") and result.get("checkpoint"):  # the best checkpoint on every benchmark, then
        from siamese_retrieval.evaluate import benchmark_trained
        from siamese_retrieval.run_outputs import run_dir, write_metrics_json

        out_dir = run_dir(cfg)
        result["benchmarks"] = benchmark_trained(cfg, result["checkpoint"], out_dir)
        write_metrics_json(out_dir / "metrics.json", result)  # the training's metrics.json gains the rows
    return result["metrics"].get(cfg.optimized_metric, float("nan"))


def short_help(config_name: str) -> None:
    """`--help` / `-h`: the command's groups, common overrides and docs (help_text.py) instead of Hydra's page,
    which prints the whole config. Hydra's own page stays at `--hydra-help`; the config at `--cfg job`."""
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        from siamese_retrieval.help_text import help_text

        print(help_text(CONFIG_PATH, config_name))
        sys.exit(0)


def train_main() -> None:
    """`siamese-train [overrides]` = `python train.py [overrides]` (conf/train.yaml)."""
    short_help("train")
    run_entry_point(train_task)


# ---------------------------------------------------------------------------------------------- evaluate
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
@report_user_errors
@job_name("evaluate")
def evaluate_task(cfg: DictConfig) -> None:
    from siamese_retrieval.evaluate import evaluate  # imported here: a config typo fails before torch loads

    evaluate(cfg)


def evaluate_main() -> None:
    """`siamese-evaluate [overrides]` = `python evaluate.py [overrides]` (conf/eval.yaml)."""
    short_help("eval")
    run_entry_point(evaluate_task)


# ---------------------------------------------------------------------------------------------- retrieve
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="retrieve")
@report_user_errors
@job_name("retrieve")
def retrieve_task(cfg: DictConfig) -> None:
    from siamese_retrieval.retrieve import retrieve  # imported here: a config typo fails before torch loads

    retrieve(cfg)


def retrieve_main() -> None:
    """`siamese-retrieve [overrides]` = `python retrieve.py [overrides]` (conf/retrieve.yaml)."""
    short_help("retrieve")
    run_entry_point(retrieve_task)


# ---------------------------------------------------------------------------------------------- compare
COMPARE_HELP = """Compare sweep runs offline: groups the jobs by their overrides other than the seed and writes
comparison.md (mean ± std over seeds, best in bold) and comparison.png into --out (default: the first sweep
dir), printing the table."""


def compare_main(argv: list[str] | None = None) -> int:
    """`siamese-compare SWEEP_DIR [MORE_DIRS] [--metrics ...] [--out DIR] [--save-results FILE]` = `python compare.py
    ...`; `siamese-compare --markdown FILE` prints the table of stored results.

    Exit code 0 with a table, 1 when no job had metrics, 2 on a user error (one `error:` line)."""
    parser = argparse.ArgumentParser(description=COMPARE_HELP)
    parser.add_argument("sweep_dirs", nargs="*", help="Hydra sweep directories (or single run directories)")
    parser.add_argument("--metrics", nargs="+", default=None,
                        help="metric names as in metrics.json, e.g. test/recall@1 val/mAP, and minutes (each run's wall "
                             "time) (default: the test metrics)")
    parser.add_argument("--out", default=None, help="where comparison.md/.png go (default: the first sweep dir)")
    parser.add_argument("--save-results", default=None, metavar="FILE",
                        help="also store every job's metrics, the command and the provenance as JSON (an experiment's "
                             "results/*.json), from which --markdown makes the table again")
    parser.add_argument("--markdown", default=None, metavar="FILE",
                        help="print the table of a results file written by --save-results, and stop")
    args = parser.parse_args(argv)

    import json

    from siamese_retrieval.compare import compare, results_record, table_from_results
    from siamese_retrieval.errors import UserError
    from siamese_retrieval.io_utils import atomic_write_text

    if args.markdown is not None:
        try:
            print(table_from_results(json.loads(Path(args.markdown).read_text())))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            print(f"error: {args.markdown}: not a results file of compare.py --save-results ({exc})", file=sys.stderr)
            return 2
        return 0
    if not args.sweep_dirs:
        parser.error("give one or more sweep directories, or --markdown FILE")
    try:
        result = compare(args.sweep_dirs, args.metrics, args.out)
    except (FileNotFoundError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result["markdown"])
    print(f"wrote {result['md_path']} and {result['png_path']}")
    if args.save_results is not None:
        command = "python compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
        record = results_record(result["jobs"], result["metrics"], command)
        try:
            Path(args.save_results).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(args.save_results), json.dumps(record, indent=1) + "\n")
        except OSError as exc:
            print(f"error: --save-results {args.save_results}: cannot write it ({exc.strerror or exc})", file=sys.stderr)
            return 2
        print(f"wrote {args.save_results}")
    return 0 if result["groups"] else 1


# ---------------------------------------------------------------------------------------------- sweeps

class SweeperStorageDir(_HydraCallback):
    """Hydra callback (conf/hparams_search/optuna.yaml): creates the directory of the sweeper's sqlite
    storage before the sweeper opens it, so `hparams_search=optuna` works on a fresh clone (sqlite does not
    create directories). A directory that cannot be made, or a storage file that is no Optuna study
    (`check_sweeper_storage`), is one line and exit code 2."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_sweeper_storage(config)
        path = sqlite_path(OmegaConf.select(config, "hydra.sweeper.storage", default=None))
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            fail(f"cannot create {path.parent} for the sweeper's storage ({exc.strerror or exc})")


COMMANDS = {"train": train_main, "evaluate": evaluate_main, "retrieve": retrieve_main, "compare": compare_main}
COMMAND_ENV = "SIAMESE_RETRIEVAL_COMMAND"


def module_main() -> int | None:
    """`python -m siamese_retrieval.entry_points {train|evaluate|retrieve|compare} [args ...]`: the console
    scripts without them on PATH. Lightning's trainer=ddp re-runs `python -m siamese_retrieval.entry_points`
    with this process's arguments (the command word already taken off) for ranks > 0: the word travels in
    the environment."""
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        name = sys.argv.pop(1)
        os.environ[COMMAND_ENV] = name
    else:
        name = os.environ.get(COMMAND_ENV)
    if name not in COMMANDS:
        print(f"usage: python -m siamese_retrieval.entry_points {{{'|'.join(COMMANDS)}}} [args ...]", file=sys.stderr)
        return 2
    return COMMANDS[name]()


if __name__ == "__main__":
    sys.exit(module_main())
