"""Re-rankers on the stress sets and the synthetic city's test split: does re-ranking ever hurt? From the real
commands.

    python experiments/beat_verification/run_stress.py --ckpt SEED0.ckpt --ckpt SEED1.ckpt --ckpt SEED2.ckpt
    python experiments/beat_verification/run_stress.py --table results/stress.json   # the table of a stored run
    python experiments/beat_verification/run_stress.py --merge s0.json s1.json s2.json  # runs of one seed each

For every checkpoint (a seed of the default cnn_snn) and every set it runs `evaluate.py` with each re-ranker
(`split=all` on the stress sets, the fixed test split on the city) and ORB + RANSAC alone once per set, reads
each run's metrics.json, and writes results/stress.json (every number, with the commands, date, machine and
commit) and prints the markdown table: recall@1 per set, mean ± std over the checkpoints, and whether the
acceptance rule holds (never below the model alone - 0.01, nor below the better of model and orb_ransac - 0.02).
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
sys.path.insert(0, str(HERE))

import stress_sets  # noqa: E402

RERANKERS = ("null", "orb_ransac", "fused", "learned_matches")
NAMES = {"null": "model alone", "orb_ransac": "rerank=orb_ransac", "fused": "rerank=fused",
         "learned_matches": "rerank=learned_matches", "orb_alone": "ORB + RANSAC alone"}


def evaluate(args: list[str], out: Path) -> dict[str, float]:
    """One `python evaluate.py ...` run into `out`; its metrics (split prefix dropped)."""
    command = [sys.executable, str(ROOT / "evaluate.py"), *args, "logger=none", f"hydra.run.dir={out}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "offline"})
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    return {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.count("/") == 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", action="append", type=Path, help="a cnn_snn checkpoint (repeat)")
    parser.add_argument("--table", type=Path, help="print the markdown table of a stored results file and stop")
    parser.add_argument("--merge", type=Path, nargs="+", help="join results files (one per seed) into --out")
    parser.add_argument("--sets", type=Path, default=None, help="where the stress sets are (made if missing)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "stress.json")
    parser.add_argument("--rerankers", nargs="+", default=list(RERANKERS))
    args = parser.parse_args(argv)
    if args.table is not None:
        record = json.loads(args.table.read_text())
        print(table(record["recall@1"]) + "\n\n" + measured_line(record))
        return 0
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        record = {**parts[0], "commands": [c for p in parts for c in p["commands"]],
                  "checkpoints": [c for p in parts for c in p["checkpoints"]],
                  "commit": sorted({p["commit"] for p in parts}), "date": sorted({p["date"] for p in parts}),
                  "recall@1": {s: {rr: [v for p in parts for v in p["recall@1"][s].get(rr, [])]
                                   for rr in parts[0]["recall@1"][s]} for s in parts[0]["recall@1"]}}
        if "provenance" not in record:
            from siamese_retrieval.run_outputs import machine_description, provenance

            record["provenance"] = provenance()
        for s in record["recall@1"]:  # ORB + RANSAC alone has no checkpoint: the same number in every part
            record["recall@1"][s]["orb_alone"] = parts[0]["recall@1"][s]["orb_alone"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(table(record["recall@1"]))
        return 0
    if not args.ckpt:
        parser.error("give --ckpt (one per seed), --table or --merge")
    from siamese_retrieval.run_outputs import machine_description, provenance

    at_start = provenance()  # the code that runs the evaluations (the tree may change while they run)
    sets_dir = args.sets or Path(tempfile.mkdtemp(prefix="stress-sets-"))
    data = {}
    for name, make in (("repetitive", stress_sets.repetitive_set), ("viewpoint", stress_sets.viewpoint_set)):
        root = sets_dir / name
        if not (root / "gt.h5").is_file():
            make(root)
        data[name] = ["data=msls_city", f"data.root={root}", "split=all"]
    data["city test"] = []
    runs = Path(tempfile.mkdtemp(prefix="stress-runs-"))
    results: dict[str, dict[str, list[float]]] = {s: {} for s in data}
    commands = []
    for s, data_args in data.items():
        for ckpt in args.ckpt:
            for rr in args.rerankers:
                a = [f"ckpt_path={ckpt}", *data_args, *([] if rr == "null" else [f"rerank={rr}"])]
                commands.append("python evaluate.py " + " ".join(a))
                m = evaluate(a, runs / f"{len(commands)}")
                results[s].setdefault(rr, []).append(m["recall@1"])
                print(f"{s:11s} {ckpt.parent.parent.name:10s} {rr:16s} recall@1 {m['recall@1']:.3f}", flush=True)
        a = ["method=orb_ransac", *data_args]
        commands.append("python evaluate.py " + " ".join(a))
        results[s]["orb_alone"] = [evaluate(a, runs / f"{len(commands)}")["recall@1"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": datetime.date.today().isoformat(),
              "machine": machine_description(),
              "commit": (at_start["git_commit"] or "")[:7], "provenance": at_start,
              "checkpoints": [str(c) for c in args.ckpt],
              "commands": commands, "recall@1": results}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(table(results))
    return 0


def table(results: dict[str, dict[str, list[float]]]) -> str:
    """Markdown: one row per re-ranker, one column per set (mean ± std over checkpoints), then the rule."""
    sets = list(results)
    lines = ["| recall@1 | " + " | ".join(sets) + " |", "| --- |" + " ---: |" * len(sets)]
    for rr in [*RERANKERS, "orb_alone"]:
        cells = []
        for s in sets:
            v = results[s].get(rr)
            cells.append("" if not v else f"{statistics.mean(v):.3f}" + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else ""))
        lines.append(f"| {NAMES[rr]} | " + " | ".join(cells) + " |")
    for rr in ("fused", "learned_matches"):
        verdicts = []
        for s in sets:
            r = results[s]
            if rr not in r or "null" not in r:
                verdicts.append("")
                continue
            per_seed = [x >= m - 0.01 and x >= max(m, o) - 0.02
                        for x, m, o in zip(r[rr], r["null"], r.get("orb_ransac", r["null"]))]
            verdicts.append(f"{sum(per_seed)}/{len(per_seed)} seeds")
        lines.append(f"| rule holds for {NAMES[rr]} | " + " | ".join(verdicts) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
