"""Five ways to retrieve places from ORB keypoints, mean +- std over seeds.

    python train.py experiment=keypoint_representation          # the two learned encoders x 3 seeds
    python experiments/keypoint_representation/run.py --sweep outputs/train/multirun/<date>/<time>

Rows (test split of the default city; every number comes from a train.py or evaluate.py run made here):
  keypoint_snn                  the study's MLP over 10 flattened descriptors   (the sweep's metrics.json)
  keypoint_set                  the permutation-invariant set encoder           (the sweep's metrics.json)
  orb_bow                       bag of binary words, vocabulary per seed        evaluate.py method=orb_bow seed=N
  orb_ransac                    ratio-test matches + RANSAC inliers, all pairs  evaluate.py method=orb_ransac
  keypoint_set + orb_ransac     its top 20 re-ordered by inlier counts          ... rerank=orb_ransac rerank.top_n=20
  keypoint_set + fused (ORB)    RANSAC-verified candidates of its top 20 first  ... rerank=fused
  keypoint_set + learned        the same rule over the learned verifier's soft  ... rerank=learned_matches
                                inlier counts (fitted on the training split with rerank.train.seed=N)

Each evaluation is the command above run as a subprocess with its run directory under
<sweep>/keypoint_representation/<row>/seed<N>; a row whose metrics.json is already there is not run again.
Writes every number, with the date, machine, versions and commit, to results/representation.json and prints the
table; `run.py --table results/representation.json` prints the table of the stored file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

from siamese_retrieval.run_outputs import measured_line

ROOT = Path(__file__).resolve().parents[2]
METRICS = ("recall@1", "recall@5", "recall@10", "mAP")  # re-ranking time: experiments/benchmarks/rerank_time.py


def sweep_jobs(sweep: Path) -> dict[str, dict[int, dict]]:
    """{model: {seed: metrics.json}} of the sweep's successful jobs."""
    jobs: dict[str, dict[int, dict]] = {}
    for path in sorted(sweep.glob("*/metrics.json")):
        record = json.loads(path.read_text())
        if record.get("status") == "ok":
            jobs.setdefault(record["model"], {})[int(record["seed"])] = record
    if not jobs:
        raise SystemExit(f"{sweep}: no successful job (no */metrics.json with status ok)")
    return jobs


def evaluate(out: Path, overrides: list[str]) -> dict:
    """evaluate.py with `overrides`, its run directory `out`; its metrics.json (reused when present)."""
    if not (out / "metrics.json").exists():
        cmd = [sys.executable, str(ROOT / "evaluate.py"), *overrides, f"hydra.run.dir={out}", "logger=none"]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    record = json.loads((out / "metrics.json").read_text())
    if record.get("status") != "ok":
        raise SystemExit(f"{out}: evaluation failed ({record.get('error', 'see its eval.log')})")
    return record["metrics"]


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def table(record: dict) -> str:
    """Markdown: one row per method, mean ± std over its runs."""
    lines = [f"| method | n | {' | '.join(f'test/{m}' for m in METRICS)} |",
             "|---|---:|" + "---:|" * len(METRICS)]
    for name, runs in record["rows"].items():
        cells = [mean_std([r[f"test/{m}"] for r in runs if f"test/{m}" in r]) for m in METRICS]
        lines.append(f"| {name} | {len(runs)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", type=Path, help="the train.py experiment=keypoint_representation sweep")
    ap.add_argument("--top-n", type=int, default=20, help="candidates re-ranked per query")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "representation.json")
    ap.add_argument("--table", type=Path, help="print the table of a stored results file and stop")
    args = ap.parse_args()
    if args.table is not None:
        record = json.loads(args.table.read_text())
        print(table(record) + "\n\n" + measured_line(record))
        return
    if args.sweep is None:
        ap.error("give --sweep (or --table)")
    from siamese_retrieval.run_outputs import machine_description, provenance

    at_start = provenance()
    jobs = sweep_jobs(args.sweep)
    out = args.sweep.resolve() / "keypoint_representation"
    rows: dict[str, list[dict]] = {}
    for model in ("keypoint_snn", "keypoint_set"):
        rows[model] = [r["metrics"] for _, r in sorted(jobs.get(model, {}).items())]
    set_runs = sorted(jobs.get("keypoint_set", {}).items())
    seeds = [seed for seed, _ in set_runs] or [0, 1, 2]
    rows["orb_bow"] = [evaluate(out / "orb_bow" / f"seed{s}", ["method=orb_bow", f"seed={s}"]) for s in seeds]
    rows["orb_ransac"] = [evaluate(out / "orb_ransac", ["method=orb_ransac"])]
    for name, rerank in (("keypoint_set + orb_ransac", ["rerank=orb_ransac"]),
                         ("keypoint_set + fused (ORB)", ["rerank=fused"]),
                         ("keypoint_set + learned verifier", ["rerank=learned_matches"])):
        rows[name] = []
        for seed, run in set_runs:
            extra = [f"rerank.train.seed={seed}"] if "learned" in name else []
            folder = name.replace(" + ", "+").replace(" ", "_").replace("(", "").replace(")", "")
            record = evaluate(out / folder / f"seed{seed}",
                              [f"ckpt_path={run['checkpoint']}", f"seed={seed}", *rerank, f"rerank.top_n={args.top_n}",
                               *extra])
            rows[name].append(record)
    keep = [f"test/{m}" for m in METRICS]
    record = {"date": datetime.date.today().isoformat(), "machine": machine_description(), "provenance": at_start,
              "command": f"python experiments/keypoint_representation/run.py --sweep {args.sweep}",
              "rows": {name: [{k: float(r[k]) for k in keep if k in r} for r in runs] for name, runs in rows.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{table(record)}\n\n{measured_line(record)}\nwritten to {args.out}")


if __name__ == "__main__":
    main()
