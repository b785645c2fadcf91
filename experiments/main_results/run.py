"""The README's results table: the study's model, the CNN, the keypoint set encoder, ORB + RANSAC and fused
re-ranking on the default synthetic city's test split (75 queries against 960 database images), from the real
commands.

    python experiments/main_results/run.py --cnn-ckpt S0.ckpt --cnn-ckpt S1.ckpt --cnn-ckpt S2.ckpt
    python experiments/main_results/run.py --table results/main.json     # the table of a stored run

It trains `keypoint_snn` and `keypoint_set` for seeds 0, 1, 2 (about 10 minutes per keypoint_set run on 2 CPU
cores), evaluates the given `cnn_snn` checkpoints (`python train.py model=cnn_snn seed=N`, about 30 minutes each,
so they are trained beforehand) alone and with `rerank=fused`, and runs ORB + RANSAC once (deterministic). Every
number, with its command, the date, machine, versions and commit, goes to results/main.json; the table is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from siamese_retrieval.run_outputs import measured_line

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
METRICS = ("recall@1", "recall@5", "recall@10", "mAP")
SEEDS = (0, 1, 2)
# the rows, in table order: (key, label, command template; {seed} / {ckpt} filled per run)
ROWS = (
    ("keypoint_snn", "the study's model: 10 ORB descriptors, flattened, into an MLP",
     "python train.py model=keypoint_snn seed={seed}"),
    ("keypoint_set", "`keypoint_set`: 512 ORB keypoints as an unordered set", "python train.py model=keypoint_set seed={seed}"),
    ("orb_ransac", "ORB + RANSAC, every database image verified (no learning)", "python evaluate.py method=orb_ransac"),
    ("cnn_snn", "**`cnn_snn`**: the plain CNN Siamese network (the default)", "python train.py model=cnn_snn seed={seed}"),
    ("cnn_snn+fused", "`cnn_snn` + `rerank=fused` (verification where it can be trusted)",
     "python evaluate.py ckpt_path={ckpt} rerank=fused"),
)
PUBLISHED = {"precision@10": 0.02, "range_acc": 0.8507}  # the study's own report (London, its own protocol)


def run(script: str, args: list[str], out: Path) -> dict[str, float]:
    """`python <script> ...` into `out` (no W&B); its test metrics."""
    command = [sys.executable, str(ROOT / script), *args, "logger=none", f"hydra.run.dir={out}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    if done.returncode != 0:
        raise SystemExit(f"error: {script} {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    return {m: float(metrics[f"test/{m}"]) for m in METRICS}


def measure(cnn_ckpts: list[Path], rows: list[str]) -> tuple[dict[str, list[dict[str, float]]], list[str]]:
    runs = Path(tempfile.mkdtemp(prefix="main-results-"))
    results: dict[str, list[dict[str, float]]] = {}
    commands: list[str] = []

    def one(key: str, script: str, args: list[str], shown: str) -> None:
        commands.append(shown)
        results.setdefault(key, []).append(run(script, args, runs / str(len(commands))))
        print(f"{shown}: " + ", ".join(f"{m} {v:.3f}" for m, v in results[key][-1].items()), flush=True)

    for key in rows:
        if key in ("keypoint_snn", "keypoint_set"):
            for seed in SEEDS:
                one(key, "train.py", [f"model={key}", f"seed={seed}"], f"python train.py model={key} seed={seed}")
        elif key == "orb_ransac":
            one(key, "evaluate.py", ["method=orb_ransac"], "python evaluate.py method=orb_ransac")
        elif key == "cnn_snn":
            for ckpt in cnn_ckpts:
                one(key, "evaluate.py", [f"ckpt_path={ckpt}"], f"python evaluate.py ckpt_path={ckpt}")
        elif key == "cnn_snn+fused":
            for ckpt in cnn_ckpts:
                one(key, "evaluate.py", [f"ckpt_path={ckpt}", "rerank=fused"],
                    f"python evaluate.py ckpt_path={ckpt} rerank=fused")
    return results, commands


def cell(values: list[float]) -> str:
    mean = f"{statistics.mean(values):.3f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.3f}"


def table(record: dict) -> str:
    """Markdown: one row per method (mean ± std over seeds where there are several), with its command."""
    results = record["results"]
    lines = ["| method | " + " | ".join(METRICS) + " | seeds | command |",
             "| --- |" + " ---: |" * len(METRICS) + " ---: | --- |"]
    for key, label, command in ROWS:
        runs = results.get(key)
        if not runs:
            continue
        cells = [cell([r[m] for r in runs]) for m in METRICS]
        shown = command.replace("{seed}", "0,1,2" if len(runs) > 1 else "0").replace("{ckpt}", "<its checkpoint>")
        if "seed=0,1,2" in shown:
            shown = shown.replace("python train.py", "python train.py -m")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(runs)} | `{shown}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cnn-ckpt", action="append", type=Path, default=[],
                        help="a best checkpoint of `python train.py model=cnn_snn seed=N` (repeat, one per seed)")
    parser.add_argument("--rows", nargs="+", default=[k for k, _, _ in ROWS], help="measure only these rows")
    parser.add_argument("--merge", type=Path, help="keep the other rows of this stored file")
    parser.add_argument("--table", type=Path, help="print the markdown table of a stored results file and stop")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "main.json")
    args = parser.parse_args(argv)
    if args.table is not None:
        record = json.loads(args.table.read_text())
        print(table(record) + "\n\n" + measured_line(record))
        return 0
    if {"cnn_snn", "cnn_snn+fused"} & set(args.rows) and not args.cnn_ckpt:
        parser.error("the cnn_snn rows need --cnn-ckpt (one per seed)")
    from siamese_retrieval.run_outputs import machine_description, provenance

    at_start = provenance()  # the code that runs the measurements (the tree may change while they run)
    results, commands = measure(args.cnn_ckpt, args.rows)

    record = {"date": datetime.date.today().isoformat(), "machine": machine_description(),
              "provenance": at_start, "published": PUBLISHED, "checkpoints": [str(c) for c in args.cnn_ckpt],
              "commands": commands, "results": results}
    if args.merge is not None:
        old = json.loads(args.merge.read_text())
        record["results"] = {**old["results"], **results}
        record["commands"] = [c for c in old["commands"] if not any(c.startswith(p) for p in commands)] + commands
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(table(record) + "\n\n" + measured_line(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
